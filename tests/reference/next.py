"""The LLaVA-NeXT code (`.venv-next`, made by scripts/setup_reference_next.sh): running
tests/reference/run_next.py, building its checkpoints (its own classes write them, their towers
in a test Hugging Face cache under the hub ids the releases name), and loading them here."""

import json
import os
import shutil
import subprocess
from contextlib import contextmanager

import huggingface_hub.constants
import pytest

from llava_mlx import load

from conftest import ROOT

NEXT_PYTHON = os.environ.get("LLAVA_NEXT_PYTHON", str(ROOT / ".venv-next" / "bin" / "python"))
RUNNER = str(ROOT / "tests" / "reference" / "run_next.py")
TRAIN_RUNNER = str(ROOT / "tests" / "reference" / "run_train_next.py")


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


def load_next(next_fixtures, path, model_base=None):
    """Ours, the tower's config read from the fixtures' Hugging Face cache."""
    with next_cache(next_fixtures):
        return load(str(path), model_base=str(model_base) if model_base else None)


def next_train(fixtures, argv: list, record, adapter=None, probe: dict = None, timeout: float = 1800) -> dict:
    """The code's own train() on `argv` (its arguments): each step's loss, learning rates and
    gradient norm; with `adapter`, peft's initial LoRA weights saved there; with `probe` (a job
    of run_next.py's), the trained model's logits on it, in memory, written to probe["out"]."""
    head = [str(record), str(adapter) if adapter else "-"]
    if probe is not None:
        probe_file = record.parent / f"{record.stem}-probe.json"
        probe_file.write_text(json.dumps(probe))
        head.append(str(probe_file))
    result = subprocess.run(
        [NEXT_PYTHON, TRAIN_RUNNER, "train", *head, "--", *map(str, argv)],
        capture_output=True, text=True, timeout=timeout, env=next_env(fixtures),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(record.read_text())


def next_preprocess(fixtures, jobs: dict, out, timeout: float = 600) -> list:
    """ids, labels and pictures of each record, from the code's own LazySupervisedDataset."""
    (out / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run(
        [NEXT_PYTHON, TRAIN_RUNNER, "preprocess", str(out / "jobs.json"), str(out / "items.json")],
        capture_output=True, text=True, timeout=timeout, env=next_env(fixtures),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "items.json").read_text())


@contextmanager
def next_cache(fixtures):
    """This project reads the towers the checkpoints name from the fixtures' Hugging Face cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fixtures / "hf-home" / "hub"))
        yield
