"""The LLaVA-NeXT code (`.venv-next`, made by scripts/setup_reference_next.sh): running
tests/reference/run_next.py, building its checkpoints (its own classes write them, their towers
in a test Hugging Face cache under the hub ids the releases name), and loading them here."""

import json
import os
import shutil
import subprocess

import huggingface_hub.constants
import pytest

from llava_mlx import load

from conftest import ROOT

NEXT_PYTHON = os.environ.get("LLAVA_NEXT_PYTHON", str(ROOT / ".venv-next" / "bin" / "python"))
RUNNER = str(ROOT / "tests" / "reference" / "run_next.py")


def next_env(fixtures) -> dict:
    return {**os.environ, "HF_HOME": str(fixtures / "hf-home"), "HF_HUB_OFFLINE": "1"}


def run_next(*args, env, timeout=1800):
    result = subprocess.run([NEXT_PYTHON, RUNNER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# Meta-Llama-3-8B-Instruct's chat template, which lmms-lab/llama3-llava-next-8b's tokenizer carries
LLAMA_3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_next_fixtures(root, family, checkpoints, training):
    """The checkpoints written by the LLaVA-NeXT code under `root`, their towers in a Hugging Face cache."""
    from fixtures.build_hf_rows import _llama3_tokenizer

    llama3 = root / "llama3-tokenizer"
    llama3.mkdir()
    _llama3_tokenizer(llama3)
    config = json.loads((llama3 / "tokenizer_config.json").read_text())
    config.update(chat_template=LLAMA_3_INSTRUCT_TEMPLATE, processor_class=None)
    (llama3 / "tokenizer_config.json").write_text(json.dumps(config))
    mistral = root / "mistral-tokenizer"  # the SentencePiece fixture, legacy as Mistral's and Mixtral's releases
    mistral.mkdir()
    shutil.copyfile(checkpoints["orig-v1.6-mistral"] / "tokenizer.model", mistral / "tokenizer.model")
    config = json.loads((checkpoints["orig-v1.6-mistral"] / "tokenizer_config.json").read_text())
    (mistral / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    tokenizers = [family["hub-onevision"], llama3, mistral, training["qwen2-tokenizer"]]
    run_next("build", str(root), *map(str, tokenizers), env=next_env(root))
    return root


def load_next(next_fixtures, path):
    """Ours, the tower's config read from the fixtures' Hugging Face cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(next_fixtures / "hf-home" / "hub"))
        return load(str(path))
