"""Caching and chunking change nothing: same logits (float32, 1e-5) and tokens as a cold,
single-pass run. Also the memory bound of a LLaVA-1.6 generation with a five-crop image."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llava_mlx.cache import SessionCache
from llava_mlx.generation import stream_generate

from conftest import ROOT

TOL = 1e-5
NAME = "hf-v1.6-vicuna"


def run(model, processor, question, images, **kwargs):
    """(tokens, stacked logprobs, last response) of a greedy 12-token answer."""
    steps = list(stream_generate(model, processor, question, images, max_tokens=12, ignore_eos=True, **kwargs))
    tokens = [r.token for r in steps[:-1]]
    logprobs = np.stack([np.asarray(r.logprobs) for r in steps[:-1]])
    return tokens, logprobs, steps[-1]


def assert_same(a, b):
    assert a[0] == b[0]
    assert np.abs(a[1] - b[1]).max() <= TOL * np.abs(b[1]).max()


def test_chunked_prefill_equals_single_pass(loaded, images):
    model, processor = loaded(NAME)
    cold = run(model, processor, "What is here?", [images["wide"]], prefill_step_size=4096)
    chunked = run(model, processor, "What is here?", [images["wide"]], prefill_step_size=100)
    assert cold[2].prompt_tokens > 1948
    assert_same(chunked, cold)


def test_cached_image_and_reused_prefix(loaded, images, monkeypatch):
    model, processor = loaded(NAME)
    cache = SessionCache()
    first = run(model, processor, "What is here?", [images["wide"]], cache=cache)
    encoded = []
    original = model.image_features
    monkeypatch.setattr(model, "image_features", lambda *a, **k: encoded.append(1) or original(*a, **k))
    second = run(model, processor, "And what colour is it?", [images["wide"]], cache=cache)
    assert encoded == []  # same image content: not encoded again
    # the system prompt and all 1948 image positions came from the KV cache
    assert second[2].cached_tokens >= 1948
    monkeypatch.undo()
    cold = run(model, processor, "And what colour is it?", [images["wide"]])
    assert cold[2].cached_tokens == 0
    assert_same(second, cold)
    again = run(model, processor, "What is here?", [images["wide"]], cache=cache)
    assert_same(again, first)


def test_different_image_is_not_confused(loaded, images):
    model, processor = loaded(NAME)
    cache = SessionCache()
    run(model, processor, "What is here?", [images["wide"]], cache=cache)
    other = run(model, processor, "What is here?", [images["tall"]], cache=cache)
    cold = run(model, processor, "What is here?", [images["tall"]])
    assert other[2].cached_tokens < 100  # only the text before the image is shared
    assert_same(other, cold)


def test_chat_session_matches_single_prompts(checkpoints, loaded, images):
    """--chat through stdin answers as the equivalent single prompts (history included)."""
    questions = ["What is in the image?", "Describe the colours.", "Anything else?"]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            "--model",
            str(checkpoints[NAME]),
            "--image",
            str(images["wide"]),
            "--chat",
            "--max-tokens",
            "10",
        ],
        input="\n".join(questions) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    model, processor = loaded(NAME)
    history, expected = [], ""
    for question in questions:
        answer = "".join(
            r.text
            for r in stream_generate(model, processor, question, [images["wide"]], max_tokens=10, history=history)
        )
        expected += answer + "\n"
        history.append((question, answer.strip()))
    assert result.stdout == expected
    assert result.stderr.count("Peak memory") == 3


def test_peak_memory_bound(loaded, images):
    """Peak <= weights + KV cache + max(10%, 64 MB) for a five-crop LLaVA-1.6 image.

    MLX's CPU backend has no fused attention: a prefill chunk materialises its
    (heads x chunk x keys) scores, 62 MB for this model at the default 2048 (Metal's fused
    kernel does not). So the bound is checked with 512-position chunks.
    """
    model, processor = loaded(NAME)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    mx.clear_cache()
    mx.reset_peak_memory()
    *_, last = run(model, processor, "What is here?", [images["wide"]], prefill_step_size=512)
    text = model.config.text_config
    positions = last.prompt_tokens + 12
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    kv = 2 * text["num_hidden_layers"] * positions * text["num_key_value_heads"] * head_dim * 4
    assert last.image_positions == 1948
    assert last.peak_memory * 1e9 <= weights + kv + max(0.1 * (weights + kv), 64e6)


def test_kv_bits_needs_a_quantizable_head_size(loaded, images):
    from llava_mlx import LlavaError

    model, processor = loaded(NAME)  # head size 16: below MLX's smallest group (32)
    with pytest.raises(LlavaError, match="head size 16"):
        run(model, processor, "What is here?", [images["wide"]], kv_bits=8)


def test_rotating_kv_cache(loaded, images):
    """--max-kv-size: larger than the sequence changes nothing; smaller still generates."""
    model, processor = loaded(NAME)
    cold = run(model, processor, "What is here?", [images["wide"]])
    assert_same(run(model, processor, "What is here?", [images["wide"]], max_kv_size=4096), cold)
    tokens, _, last = run(model, processor, "What is here?", [images["wide"]], max_kv_size=1024)
    assert len(tokens) == 12 and last.prompt_tokens > 1024
