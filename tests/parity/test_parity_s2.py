"""LLaVA-1.5-S2 (the original code's CLIPVisionTowerS2 over S2-Wrapper) against the original code
at the commit that added it, float32: the released scales (336,672,1008) and two scales, a full
checkpoint and LoRA over the plain language model (as bfshi/llava-v1.5-7b-s2-lora), on wide,
tall, tiny and very wide pictures. Prompt, token ids, the 1008² pixels, 576 positions a picture,
the logits of the whole merged sequence within 1e-4 of the largest |logit| and 16 greedy tokens.
Then the paths: generate.py with --model-base, convert.py (merged; 8-bit), mlx.launch -n 2, the
server (the picture's features cached)."""

import json
import os
import sys

import pytest

from llava_mlx import load
from llava_mlx.errors import LlavaError
from llava_mlx.generation import generate

from conftest import ROOT
from fixtures.build_s2 import build_s2
from helpers import cosine, environment, launch_two, logits, run_bounded, with_config
from reference.original import QUESTION, REFERENCE_PYTHON, S2_CODE, check_case, run_original

PICTURES = ["wide", "tall", "tiny", "very_wide"]
CASES = (
    [("s2-v1.5-vicuna", im) for im in PICTURES]
    + [("s2two-v1.5-vicuna", im) for im in PICTURES]
    + [("s2lora-v1.5-vicuna", im) for im in ("tall", "very_wide")]
)
BASE = {"s2lora-v1.5-vicuna": "base-vicuna"}


@pytest.fixture(scope="session")
def s2(checkpoints, adapters, tmp_path_factory):
    return build_s2(tmp_path_factory.mktemp("s2"), checkpoints, adapters)


@pytest.fixture(scope="session")
def s2_loaded(s2):
    cache = {}

    def get(name):
        if name not in cache:
            base = BASE.get(name)
            cache[name] = load(str(s2[name]), model_base=str(s2[base]) if base else None)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def s2_original(s2, images, tmp_path_factory):
    """case -> reference npz, from one run of the original code at the S2 commit."""
    if not (os.path.exists(REFERENCE_PYTHON) and (S2_CODE / "s2wrapper").is_dir()):
        pytest.fail(f"the S2 reference ({S2_CODE}) is missing: run `bash scripts/setup_reference.sh`")
    jobs = [
        {
            "name": f"{name}-{picture}",
            "checkpoint": str(s2[name]),
            **({"model_base": str(s2[BASE[name]])} if name in BASE else {}),
            "images": [str(images[picture])],
            "question": QUESTION,
            "conv_mode": "llava_v1",
            "new_tokens": 16,
        }
        for name, picture in CASES
    ]
    return run_original(jobs, tmp_path_factory.mktemp("s2-original"), s2=True)


@pytest.mark.parametrize("name,picture", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_s2_matches_the_original(name, picture, s2_loaded, s2_original, images):
    model, processor = s2_loaded(name)
    reference = s2_original[f"{name}-{picture}"]
    scales = model.config.vision.s2_scales
    assert reference["pixel_values_0"].shape[-1] == scales[-1]  # the processor's size: the largest scale
    check_case(model, processor, reference, [images[picture]], processor.apply_template(QUESTION, 1))


@pytest.mark.parametrize(
    "changes,said",
    [
        ({"s2_scales": "336,500"}, "s2_scales [336, 500] must be multiples of the tower's image size 336"),
        ({"s2_scales": "224,448"}, "the smallest equal to it"),
        ({"s2_scales": "336,x"}, "s2_scales '336,x' in config.json is not a list of sizes"),
        ({"image_aspect_ratio": "anyres"}, "S2 with image_aspect_ratio 'anyres' is not supported"),
        ({"mm_vision_select_feature": "cls_patch"}, "S2 with mm_vision_select_feature 'cls_patch'"),
    ],
)
def test_what_s2_cannot_be_is_one_line(changes, said, s2, tmp_path):
    changed = with_config(s2["s2-v1.5-vicuna"], tmp_path / "changed", **changes)
    with pytest.raises(LlavaError) as error:
        load(str(changed))
    assert said in str(error.value) and "\n" not in str(error.value)


def test_s2_runs_everywhere(s2, s2_loaded, images, tmp_path):
    """The LoRA through generate.py with --model-base, merged by convert.py and run under
    mlx.launch -n 2, quantized to 8 bits, served: one answer (the picture encoded once)."""
    from serving import ask, start_server, user

    picture = images["wide"]
    base = ["--model", s2["s2lora-v1.5-vicuna"], "--model-base", s2["base-vicuna"]]
    question = ["--image", picture, "--prompt", QUESTION, "--max-tokens", "8"]
    generated = run_bounded([sys.executable, ROOT / "generate.py", *base, *question], timeout=300)
    assert generated.returncode == 0, generated.stderr
    model, processor = s2_loaded("s2lora-v1.5-vicuna")
    answer = generate(model, processor, QUESTION, [picture], max_tokens=8)
    assert generated.stdout.strip() == answer.text.strip() and answer.text.strip()

    merged, q8 = tmp_path / "merged", tmp_path / "q8"
    converted = run_bounded([sys.executable, ROOT / "convert.py", *base, "--out", merged], timeout=300)
    assert converted.returncode == 0, converted.stderr
    both = launch_two(ROOT / "generate.py", "--model", merged, *question, timeout=300)
    assert both.returncode == 0, both.stderr
    assert both.stdout == generated.stdout

    # the full S2 checkpoint quantized to 8 bits: as close as any 8-bit LLaVA-1.5 (test_convert.py)
    full = ["--model", s2["s2-v1.5-vicuna"]]
    converted = run_bounded([sys.executable, ROOT / "convert.py", *full, "--out", q8, "-q", "--q-bits", "8"], 300)
    assert converted.returncode == 0, converted.stderr
    source_model, source_processor = s2_loaded("s2-v1.5-vicuna")
    quantized_model, _ = load(str(q8))
    inputs = source_processor(source_processor.apply_template(QUESTION, 1), [picture])
    assert cosine(logits(quantized_model, inputs), logits(source_model, inputs)) >= 0.999
    options = dict(max_tokens=8, ignore_eos=True)
    want = generate(source_model, source_processor, QUESTION, [picture], **options).tokens
    assert generate(quantized_model, source_processor, QUESTION, [picture], **options).tokens == want

    server = start_server(merged, tmp_path / "server.log", env=environment())
    try:
        for _ in range(2):
            reply = ask(server, [user(QUESTION, picture)], max_tokens=8, temperature=0)
            assert reply.choices[0].message.content.strip() == answer.text.strip()
        assert server.health()["feature_cache_images"] == 1
    finally:
        assert server.stop() == 0, (tmp_path / "server.log").read_text()[-2000:]


def test_training_an_s2_checkpoint_is_one_line(s2, images, tmp_path):
    """Not built yet: said in one line, nothing written."""
    picture = images["wide"]
    data = tmp_path / "data.json"
    conversation = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]
    data.write_text(json.dumps([{"id": "a", "image": picture.name, "conversations": conversation}]))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", s2["s2-v1.5-vicuna"], "--data_path", data, "--image_folder", picture.parent]
    argv += ["--output_dir", out, "--version", "v1", "--lora_enable", "True"]
    result = run_bounded([sys.executable, "-m", "llava_mlx", "train", *argv], timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "LLaVA-1.5-S2 checkpoint: training the S2 tower's checkpoints is not built yet" in lines[0]
    assert not out.exists()
