"""Running the original LLaVA code (`.venv-orig`, made by scripts/setup_reference.sh) and
checking our pipeline against one of its cases: prompt, token ids, crops, image-token counts,
the logits of the whole merged sequence (within RTOL of max|logit|) and 16 greedy tokens."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from llava_mlx.generation import generate

from conftest import ROOT

REFERENCE_PYTHON = os.environ.get("LLAVA_REFERENCE_PYTHON", str(ROOT / ".venv-orig" / "bin" / "python"))
# The original code at the commit with the S2 tower, installed beside the release by
# scripts/setup_reference.sh: on PYTHONPATH it comes first.
S2_CODE = Path(REFERENCE_PYTHON).parent.parent / "s2"


RTOL = 1e-4  # of the largest |logit|


QUESTION = "What is in the image?"


def case_name(variant, images, raw=False):
    return f"{'raw-' if raw else ''}{variant}-{'+'.join(images) or 'text'}"


def run_original(jobs, out, timeout=1800, s2=False):
    """name -> npz of each job of tests/reference/run_original.py, in one run of the original code
    (`s2`: the S2 commit's)."""
    (out / "jobs.json").write_text(json.dumps(jobs))
    extra = {"PYTHONPATH": str(S2_CODE)} if s2 else {}
    result = subprocess.run(
        [REFERENCE_PYTHON, str(ROOT / "tests" / "reference" / "run_original.py"), str(out / "jobs.json"), str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **extra},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {job["name"]: dict(np.load(out / f"{job['name']}.npz")) for job in jobs}


def assert_logits_close(ours, ref):
    ours = np.asarray(ours, np.float32)[..., : ref.shape[-1]]  # llava-hf pads the vocabulary
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"max|Δlogit| / max|logit| = {err:.2e}", end=" ")  # shown with pytest -s
    assert err <= RTOL, f"max |diff| = {err:.2e} of max |logit|"


def check_case(model, processor, ref, images, prompt):
    assert prompt == str(ref["prompt"])
    inputs = processor(prompt, images)
    assert np.asarray(inputs["input_ids"])[0].tolist() == ref["input_ids"].tolist()
    if images:
        crops = np.asarray(inputs["pixel_values"]).transpose(0, 3, 1, 2)
        expected = np.concatenate([ref[f"pixel_values_{i}"] for i in range(len(images))])
        np.testing.assert_allclose(crops, expected, atol=1e-5)
        sizes = [tuple(s) for s in ref["image_sizes"].tolist()]
        several = len(sizes) > 1
        assert [model.config.image_token_count(s, several) for s in sizes] == ref["image_token_counts"].tolist()
    logits = model(**inputs)
    assert logits.shape[1] == ref["logits"].shape[0]
    assert_logits_close(logits[0], ref["logits"])
    result = generate(model, processor, prompt, images, max_tokens=16, template=False, ignore_eos=True)
    assert result.tokens == ref["greedy"].tolist()


TRICKY = [
    "A chat between a curious human. USER: ",
    "\nWhat is",
    " ASSISTANT: hi</s>USER: ok",
    "Describe",
    " in detail,  please.  ",
    "[INST] Hello [/INST]",
    "",
    "x",
    "</s>x",
    "a ▁b  \n\n c</s> </s>",
    "  two spaces",
    "<s>USER",
    "end</s>",
    "ünïcödé 1234 ☃ 🦙",
    "\t tab",
]
