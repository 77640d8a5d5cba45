"""LoRA, projector-only and delta checkpoints: parity with the ORIGINAL builder, float32.

The reference is llava/model/builder.py's `load_pretrained_model(path, model_base, name)` (its
LoRA path through peft's `merge_and_unload`, its projector-only path) and
llava/model/apply_delta.py, run once per session in the reference environment on the tiny
checkpoints of fixtures/build_adapters.py. Each case is checked through `load`, through
`generate.py`, and (LoRA, delta) through a `convert.py` merge: prompt, token ids, crops, image
token counts, the logits of the whole merged sequence within 1e-4 of the largest |logit| and
16 greedy tokens.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llava_mlx import convert, load
from llava_mlx.checkpoint.lora import is_target, scaling
from llava_mlx.generation import generate

from conftest import ROOT
from helpers import expect_error
from reference.original import QUESTION, REFERENCE_PYTHON, check_case, run_original

BASE = "base-vicuna"
# name -> (checkpoint, image, what the reference does with it)
CASES = {
    "lora-v1.5": ("lora-v1.5-vicuna", "odd1", {}),
    "lora-v1.6": ("lora-v1.6-vicuna", "wide", {}),  # use_rslora, LoRA on the CLIP tower too
    "proj-v1.5": ("proj-v1.5-vicuna", "square", {}),
    "proj-v1.6": ("proj-v1.6-vicuna", "tall", {}),
    "delta-v1.5": ("delta-v1.5-vicuna", "wide", {"apply_delta": True}),
}
LORAS = ["lora-v1.5", "lora-v1.6"]


@pytest.fixture(scope="session")
def original_builder(adapters, images, tmp_path_factory):
    """case -> reference npz, all computed by one run of the original code."""
    if not os.path.exists(REFERENCE_PYTHON):
        pytest.fail(f"missing reference environment {REFERENCE_PYTHON}: run `bash scripts/setup_reference.sh`")
    jobs = [
        {
            "name": case,
            "checkpoint": str(adapters[checkpoint]),
            "model_base": str(adapters[BASE]),
            "images": [str(images[image])],
            "question": QUESTION,
            "conv_mode": "llava_v1",
            "new_tokens": 16,
            **extra,
        }
        for case, (checkpoint, image, extra) in CASES.items()
    ]
    return run_original(jobs, tmp_path_factory.mktemp("original-builder"))


def check(model, processor, ref, image):
    """check_case with the family prompt; the delta's extra rows (3 tokens the tokenizer lacks,
    which the builder's resize_token_embeddings drops) are kept here and compared up to the vocabulary."""
    prompt = processor.apply_template(QUESTION, 1)
    check_case(model, processor, ref, [image], prompt)
    logits = np.asarray(model(**processor(prompt, [image]))[0])[:, : ref["logits"].shape[-1]]
    print(
        f"max |diff| {np.abs(logits - ref['logits']).max() / np.abs(ref['logits']).max():.2e} of max |logit|", end=" "
    )


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("delta")])
def test_load_matches_the_original_builder(case, adapters, original_builder, images):
    checkpoint, image, _ = CASES[case]
    model, processor = load(str(adapters[checkpoint]), model_base=str(adapters[BASE]))
    check(model, processor, original_builder[case], images[image])


@pytest.mark.parametrize("case", LORAS)
def test_the_adapters_change_greedy_tokens(case, adapters, original_builder, images, tmp_path):
    """Without its LoRA update (lora_alpha 0) the model answers otherwise: the merge is tested."""
    checkpoint, image, _ = CASES[case]
    unmerged = shutil.copytree(adapters[checkpoint], tmp_path / checkpoint)
    config = json.loads((unmerged / "adapter_config.json").read_text())
    (unmerged / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 0.0}))
    model, processor = load(str(unmerged), model_base=str(adapters[BASE]))
    result = generate(model, processor, QUESTION, [images[image]], max_tokens=16, ignore_eos=True)
    assert result.tokens != original_builder[case]["greedy"].tolist()


def streamed_text(processor, tokens) -> str:
    """The text generate.py prints for `tokens` (its streaming detokenizer, byte tokens included)."""
    detokenizer = processor.tokenizer.detokenizer
    detokenizer.reset()
    pieces = []
    for token in tokens:
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    return "".join(pieces + [detokenizer.last_segment])


@pytest.mark.parametrize("case", LORAS + ["proj-v1.6"])
def test_generate_cli_matches_the_original_builder(case, adapters, original_builder, images):
    checkpoint, image, _ = CASES[case]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            "--model",
            str(adapters[checkpoint]),
            "--model-base",
            str(adapters[BASE]),
            "--image",
            str(images[image]),
            "--prompt",
            QUESTION,
            "--max-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    greedy = original_builder[case]["greedy"].tolist()
    greedy = greedy[: greedy.index(2)] if 2 in greedy else greedy  # the CLI stops at </s>
    _, processor = load(str(adapters[checkpoint]), model_base=str(adapters[BASE]))
    assert result.stdout == streamed_text(processor, greedy) + "\n"
    assert f"Generation: {len(greedy)} tokens" in result.stderr


def test_server_serves_a_lora_with_its_base(adapters, original_builder, images, tmp_path):
    """server.py --model LORA --model-base BASE: the openai client gets the original builder's
    greedy answer."""
    from serving import ask, start_server, user

    checkpoint, image, _ = CASES["lora-v1.5"]
    server = start_server(adapters[checkpoint], tmp_path / "server.log", "--model-base", str(adapters[BASE]))
    try:
        answer = ask(server, [user(QUESTION, images[image])], max_tokens=16)
    finally:
        assert server.stop() == 0, server.log.read_text()[-2000:]
    greedy = original_builder["lora-v1.5"]["greedy"].tolist()
    greedy = greedy[: greedy.index(2)] if 2 in greedy else greedy  # the server stops at </s>
    _, processor = load(str(adapters[checkpoint]), model_base=str(adapters[BASE]))
    assert answer.choices[0].message.content == streamed_text(processor, greedy)
    assert answer.usage.completion_tokens == len(greedy)


@pytest.fixture(scope="module")
def merged(adapters, tmp_path_factory):
    """case -> the float32 MLX checkpoint convert.py writes (LoRA merged, delta applied), made once."""
    cache = {}

    def get(case):
        if case not in cache:
            checkpoint, _, extra = CASES[case]
            out = tmp_path_factory.mktemp("merged") / case
            if extra.get("apply_delta"):  # through the command line: --delta DELTA --model-base BASE
                from llava_mlx.cli.convert import main

                argv = ["--delta", str(adapters[checkpoint]), "--model-base", str(adapters[BASE]), "--out", str(out)]
                assert main(argv + ["--dtype", "float32"]) == 0
            else:
                convert(
                    str(adapters[checkpoint]), str(out), model_base=str(adapters[BASE]), dtype="float32", progress=False
                )
            cache[case] = out
        return cache[case]

    return get


@pytest.mark.parametrize("case", LORAS + ["delta-v1.5"])
def test_convert_merge_matches_the_original_builder(case, merged, original_builder, images):
    out = merged(case)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_mlx" and not (out / "adapter_config.json").exists()
    model, processor = load(str(out))  # an ordinary checkpoint now: no base needed
    check(model, processor, original_builder[case], images[CASES[case][1]])


def test_delta_keeps_its_extra_rows(merged, adapters):
    from llava_mlx.checkpoint.files import load_weights

    weights = load_weights(merged("delta-v1.5"))
    assert weights["language_model.model.embed_tokens.weight"].shape[0] == 1003
    assert weights["language_model.lm_head.weight"].shape[0] == 1003


def test_merged_then_quantized(adapters, merged, original_builder, images, tmp_path):
    """-q quantizes the merged weights (the LoRA update is in them), and the answer stays close."""
    import mlx.core as mx

    out = convert(
        str(adapters["lora-v1.5-vicuna"]),
        str(tmp_path / "q8"),
        model_base=str(adapters[BASE]),
        quantize=True,
        q_bits=8,
        progress=False,
    )
    model, processor = load(str(out))
    float_model, _ = load(str(merged("lora-v1.5")))
    base, _ = load(str(adapters["proj-v1.5-vicuna"]), model_base=str(adapters[BASE]))  # no LoRA
    q = model.language_model.model.layers[0].self_attn.q_proj
    weight = np.asarray(mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits))
    merged_weight = np.asarray(float_model.language_model.model.layers[0].self_attn.q_proj.weight)
    base_weight = np.asarray(base.language_model.model.layers[0].self_attn.q_proj.weight)
    assert np.abs(weight - merged_weight).max() < 0.01 * np.abs(merged_weight - base_weight).max()
    ref = original_builder["lora-v1.5"]
    inputs = processor(str(ref["prompt"]), [images["odd1"]])
    expected = ref["logits"].ravel()

    def cosine(m):
        logits = np.asarray(m(**inputs)[0]).ravel()
        return float(logits @ expected / np.linalg.norm(logits) / np.linalg.norm(expected))

    quantized, unmerged = cosine(model), cosine(base)
    assert quantized > 0.99 and 1 - quantized < 0.1 * (1 - unmerged), (quantized, unmerged)


# -- bad input: one clear line ----------------------------------------------------------------


def test_bad_input(adapters, checkpoints, images, tmp_path, capsys):
    from llava_mlx.cli.convert import main as convert_main
    from llava_mlx.cli.generate import main as generate_main

    ask = ["--image", str(images["odd1"]), "--prompt", "Hi", "--max-tokens", "2"]
    lora, proj, base = (str(adapters[n]) for n in ("lora-v1.5-vicuna", "proj-v1.5-vicuna", BASE))
    mistral = str(checkpoints["orig-v1.6-mistral"])  # GQA: k_proj/v_proj of another shape
    # An adapter for modules the model does not have (layer 7 of a 2-layer decoder).
    extra = shutil.copytree(adapters["lora-v1.5-vicuna"], tmp_path / "lora-extra")
    import torch

    tensors = torch.load(extra / "adapter_model.bin")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 8)
    torch.save(tensors, extra / "adapter_model.bin")
    cases = [
        (generate_main, ["--model", lora, *ask], "is a LoRA adapter (adapter_config.json): pass --model-base"),
        (
            generate_main,
            ["--model", proj, *ask],
            "is a projector-only checkpoint (mm_projector weights): pass --model-base",
        ),
        (generate_main, ["--model", lora, "--model-base", mistral, *ask], "the base model does not fit this adapter"),
        (generate_main, ["--model", proj, "--model-base", mistral, *ask], f"the base model {mistral} does not fit"),
        (
            generate_main,
            ["--model", str(extra), "--model-base", base, *ask],
            "LoRA weights for 'model.layers.7.self_attn.q_proj', which this model does not have",
        ),
        (generate_main, ["--model", mistral, "--model-base", base, *ask], "is a full checkpoint: --model-base is for"),
        (
            generate_main,
            ["--model", lora, "--model-base", "lmsys/vicuna-7b-v1.5", *ask],
            "cannot download model base 'lmsys/vicuna-7b-v1.5' (HF_HUB_OFFLINE is set)",
        ),
        (
            convert_main,
            ["--delta", str(adapters["delta-v1.5-vicuna"]), "--out", str(tmp_path / "o1")],
            "--delta needs --model-base",
        ),
        (
            convert_main,
            ["--delta", str(adapters["delta-v1.5-vicuna"]), "--model-base", mistral, "--out", str(tmp_path / "o2")],
            "the base model does not fit these delta weights",
        ),
        (convert_main, ["--model", lora, "--out", str(tmp_path / "o3")], "is a LoRA adapter"),
    ]
    for main, argv, fragment in cases:
        expect_error(capsys, main, argv, fragment)
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("case", ["lora-v1.5", "proj-v1.5"])
def test_bin_files_without_torch(case, adapters, original_builder, images, monkeypatch):
    """adapter_model.bin, non_lora_trainables.bin and mm_projector.bin are read without torch
    (checkpoint/torch_bin.py), and the answer is still the original builder's."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    checkpoint, image, _ = CASES[case]
    assert sorted(p.name for p in adapters[checkpoint].glob("*.bin"))  # the case really ships .bin files
    model, processor = load(str(adapters[checkpoint]), model_base=str(adapters[BASE]))
    check(model, processor, original_builder[case], images[image])


# -- peft's rules, hand-worked ----------------------------------------------------------------
def test_target_modules_as_peft_reads_them():
    names = {"target_modules": ["q_proj", "model.layers.1.mlp.up_proj"]}
    assert is_target(names, "model.layers.0.self_attn.q_proj")
    assert is_target(names, "model.layers.1.mlp.up_proj")
    assert not is_target(names, "model.layers.0.mlp.up_proj")
    assert not is_target(names, "model.layers.0.self_attn.xq_proj")  # a suffix is a whole name part
    regex = {"target_modules": r".*layers\.\d+\.self_attn\.(q|v)_proj"}
    assert is_target(regex, "model.layers.3.self_attn.v_proj")
    assert not is_target(regex, "model.layers.3.self_attn.k_proj")
    layers = {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}
    assert is_target(layers, "model.layers.1.self_attn.q_proj")
    assert not is_target(layers, "model.layers.0.self_attn.q_proj")


def test_scaling():
    assert scaling({"lora_alpha": 16}, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert scaling({"lora_alpha": 16, "use_rslora": True}, "model.layers.0.self_attn.q_proj", 16) == 4.0
    pattern = {"lora_alpha": 16, "alpha_pattern": {"v_proj": 64}}
    assert scaling(pattern, "model.layers.0.self_attn.v_proj", 8) == 8.0
    assert scaling(pattern, "model.layers.0.self_attn.q_proj", 8) == 2.0


def test_lora_outside_target_modules_is_left_out_with_a_warning(adapters, original_builder, images, tmp_path, capsys):
    """peft builds no LoRA layer for a module target_modules does not name: its pair goes unused."""
    narrow = shutil.copytree(adapters["lora-v1.5-vicuna"], tmp_path / "narrow")
    config = json.loads((narrow / "adapter_config.json").read_text())
    (narrow / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    model, _ = load(str(narrow), model_base=str(adapters[BASE]))
    assert "LoRA pair(s) outside target_modules left out, as peft does" in capsys.readouterr().err
    full, _ = load(str(adapters["lora-v1.5-vicuna"]), model_base=str(adapters[BASE]))
    base, _ = load(str(adapters["proj-v1.5-vicuna"]), model_base=str(adapters[BASE]))  # same projector, no LoRA
    layer = lambda m: m.language_model.model.layers[0]  # noqa: E731
    assert np.array_equal(np.asarray(layer(model).mlp.up_proj.weight), np.asarray(layer(base).mlp.up_proj.weight))
    assert np.array_equal(
        np.asarray(layer(model).self_attn.q_proj.weight), np.asarray(layer(full).self_attn.q_proj.weight)
    )
