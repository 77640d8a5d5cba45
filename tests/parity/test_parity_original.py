"""Parity with the ORIGINAL LLaVA code (haotian-liu/LLaVA, llava-torch 1.2.2.post1), float32.

The reference runs in its own virtual environment (transformers 4.37.2), made by
scripts/setup_reference.sh; one subprocess computes every case. For each case the prompt
string, token ids, crops, image-token counts, the logits of the whole merged sequence
(within 1e-4 of the largest |logit|) and 16 greedy tokens must match. The llava-hf and
transformers-5 layouts hold the same weights as the original ones, so they must give the
original's answers too: this port follows the original for every layout.
"""

import json
import os
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT
from reference.original import (
    QUESTION,
    REFERENCE_PYTHON,
    TRICKY,
    assert_logits_close,
    case_name,
    check_case,
    run_original,
)

ALL_IMAGES = [
    "square",
    "wide",
    "tall",
    "tiny",
    "huge",
    "odd1",
    "odd2",
    "tie_wide",
    "tie_tall",
    "tie_square",
    "unpad_wide",
    "unpad_tall",
]
CASES = (
    [("v1.5-vicuna", "llava_v1", [im]) for im in ["square", "wide", "tall", "tiny", "huge", "odd1", "odd2"]]
    + [("v1.6-vicuna", "llava_v1", [im]) for im in ALL_IMAGES]
    + [("v1.6-mistral", "mistral_instruct", [im]) for im in ["wide", "tall", "tiny", "odd2", "tie_wide", "unpad_tall"]]
    + [("v1.6-vicuna", "llava_v1", ["wide", "tall"]), ("v1.5-vicuna", "llava_v1", ["odd1", "square"])]
)
# Raw prompts: text glued to <image> (chunked tokenisation matters) and no image at all.
RAW = [
    ("v1.6-vicuna", "USER: <image>What is it? ASSISTANT:", ["odd1"]),
    ("v1.5-vicuna", "Describe<image> in detail, please.", ["wide"]),
    ("v1.6-mistral", "[INST] Hello there, how are you? [/INST]", []),
]


@pytest.fixture(scope="session")
def original(checkpoints, images, tmp_path_factory):
    """name -> reference npz (computed once by the original code)."""
    if not os.path.exists(REFERENCE_PYTHON):
        pytest.fail(
            f"the original-LLaVA reference environment is missing ({REFERENCE_PYTHON}): "
            "run `bash scripts/setup_reference.sh` (or set LLAVA_REFERENCE_PYTHON)"
        )
    jobs = [
        {
            "name": case_name(variant, ims),
            "checkpoint": str(checkpoints[f"orig-{variant}"]),
            "images": [str(images[i]) for i in ims],
            "question": QUESTION,
            "conv_mode": mode,
            "new_tokens": 16,
        }
        for variant, mode, ims in CASES
    ] + [
        {
            "name": case_name(variant, ims, raw=True),
            "checkpoint": str(checkpoints[f"orig-{variant}"]),
            "images": [str(images[i]) for i in ims],
            "prompt": prompt,
            "new_tokens": 16,
        }
        for variant, prompt, ims in RAW
    ]
    return run_original(jobs, tmp_path_factory.mktemp("original"))


@pytest.mark.parametrize("variant,mode,ims", CASES, ids=[case_name(v, i) for v, _, i in CASES])
def test_original_layout(variant, mode, ims, original, loaded, images):
    model, processor = loaded(f"orig-{variant}")
    ref = original[case_name(variant, ims)]
    prompt = processor.apply_template(QUESTION, len(ims))  # the family template, as the original
    check_case(model, processor, ref, [images[i] for i in ims], prompt)


@pytest.mark.parametrize("variant,prompt,ims", RAW, ids=[case_name(v, i, True) for v, _, i in RAW])
def test_raw_prompts(variant, prompt, ims, original, loaded, images):
    model, processor = loaded(f"orig-{variant}")
    check_case(model, processor, original[case_name(variant, ims, True)], [images[i] for i in ims], prompt)


SAME_WEIGHTS = [
    ("hf-v1.5-vicuna", "v1.5-vicuna", ["odd1"]),
    ("hf-v1.5-vicuna", "v1.5-vicuna", ["wide"]),
    ("tf5-v1.5-vicuna", "v1.5-vicuna", ["tall"]),
    ("hf-v1.6-vicuna", "v1.6-vicuna", ["tie_wide"]),
    ("hf-v1.6-vicuna", "v1.6-vicuna", ["unpad_wide"]),
    ("hf-v1.6-vicuna", "v1.6-vicuna", ["wide", "tall"]),
    ("hf-v1.6-mistral", "v1.6-mistral", ["tiny"]),
    ("tf5-v1.6-mistral", "v1.6-mistral", ["unpad_tall"]),
    ("tf5-v1.6-mistral", "v1.6-mistral", ["odd2"]),
]


@pytest.mark.parametrize("name,variant,ims", SAME_WEIGHTS, ids=[f"{n}-{'+'.join(i)}" for n, _, i in SAME_WEIGHTS])
def test_other_layouts_follow_the_original(name, variant, ims, original, loaded, images):
    """The ties, the unpad rounding, 'pad' for 1.5, chunked tokenisation: as the original."""
    model, processor = loaded(name)
    ref = original[case_name(variant, ims)]
    check_case(model, processor, ref, [images[i] for i in ims], str(ref["prompt"]))


def test_chunked_prefill_matches_one_pass(original, loaded, images):
    """Prefill in chunks of 256 (KV cache, no L x L mask) gives the one-pass logits."""
    from mlx_lm.models.cache import make_prompt_cache

    model, processor = loaded("orig-v1.6-vicuna")
    ref = original[case_name("v1.6-vicuna", ["wide"])]
    inputs = processor(str(ref["prompt"]), [images["wide"]])
    embeddings = model.embed(**inputs)
    cache = make_prompt_cache(model.language_model)
    chunks = []
    for start in range(0, embeddings.shape[1], 256):
        chunks.append(model.language_model(None, cache=cache, input_embeddings=embeddings[:, start : start + 256]))
    chunked = mx.concatenate(chunks, axis=1)[0]
    one_pass = model(**inputs)[0]
    assert np.abs(np.asarray(chunked) - np.asarray(one_pass)).max() <= 1e-5 * np.abs(np.asarray(one_pass)).max()
    assert_logits_close(chunked, ref["logits"])


@pytest.mark.parametrize(
    "name,source",
    [
        ("orig-v1.6-vicuna", "orig-v1.6-vicuna"),
        ("orig-v1.6-mistral", "orig-v1.6-mistral"),
        ("hf-v1.5-vicuna", "orig-v1.5-vicuna"),
        ("hf-v1.6-mistral", "orig-v1.6-mistral"),
    ],
)
def test_tokenisation_matches_original(name, source, checkpoints, loaded, tmp_path):
    """Special tokens, spaces, bytes: Vicuna's slow legacy=False rules, Mistral's fast ones."""
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(TRICKY))
    if not os.path.exists(REFERENCE_PYTHON):
        pytest.fail(f"missing reference environment {REFERENCE_PYTHON}: run `bash scripts/setup_reference.sh`")
    result = subprocess.run(
        [
            REFERENCE_PYTHON,
            str(ROOT / "tests" / "reference" / "tokenize_original.py"),
            str(checkpoints[source]),
            str(strings),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = json.loads(result.stdout.strip().splitlines()[-1])
    _, processor = loaded(name)
    assert [processor.tokenize(s) for s in TRICKY] == expected


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_multi_turn_templates_match_original(system, tmp_path):
    """The family templates, several turns deep, as llava/conversation.py renders them."""
    from llava_mlx.processor import family_prompt

    turns = [["<image>\nWhat is it?", "A cat."], ["And its colour?", "Grey, mostly."], ["Thanks!", None]]
    spec = tmp_path / "turns.json"
    spec.write_text(json.dumps({"system": system, "turns": turns}))
    if not os.path.exists(REFERENCE_PYTHON):
        pytest.fail(f"missing reference environment {REFERENCE_PYTHON}: run `bash scripts/setup_reference.sh`")
    result = subprocess.run(
        [REFERENCE_PYTHON, str(ROOT / "tests" / "reference" / "conversation_original.py"), str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = json.loads(result.stdout.strip().splitlines()[-1])
    for family, prompt in expected.items():
        assert family_prompt(family, turns, system) == prompt, family
