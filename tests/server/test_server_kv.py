"""`server.py --kv-bits`: a quantized KV cache, requests served one at a time through
stream_generate (as mlx-lm's server does), answers equal to generate(..., kv_bits=8)'s
through the official openai client; a head size the KV cannot be quantized with fails
the start-up with one line."""

import os
import subprocess
import sys

import pytest

from llava_mlx import load
from llava_mlx.cache import SessionCache
from llava_mlx.generation import stream_generate

from conftest import ROOT
from serving import ask, disconnect_twice, start_server, user

TOKENS = 16
KV_MODEL = "orig-gqa"  # llama with GQA, head size 32: MLX quantizes it in groups of 32


@pytest.fixture(scope="module")
def kv_server(variants, tmp_path_factory):
    log = tmp_path_factory.mktemp("kv-server") / "server.log"
    server = start_server(
        variants[KV_MODEL], log, "--kv-bits", "8", "--max-tokens", "600", "--prompt-cache-bytes", str(24 << 20)
    )
    yield server
    assert server.stop() == 0, server.log.read_text()[-2000:]


@pytest.fixture(scope="module")
def kv_model(variants):
    return load(str(variants[KV_MODEL]))


def reference(kv_model, question, images, **kwargs):
    """generate(..., kv_bits=8)'s answer: (text, finish, prompt length, completion tokens, cached)."""
    model, processor = kv_model
    steps = list(stream_generate(model, processor, question, images, max_tokens=TOKENS, kv_bits=8, **kwargs))
    last = steps[-1]
    return (
        "".join(s.text for s in steps),
        last.finish_reason,
        last.prompt_tokens,
        last.generation_tokens,
        last.cached_tokens,
    )


def test_plain_answer_equals_generate_with_kv_bits(kv_server, kv_model, images):
    assert kv_model[0].language_model.layers[0].self_attn.head_dim == 32
    text, finish, length, generated, _ = reference(kv_model, "What is in the image?", [images["wide"]])
    r = ask(kv_server, [user("What is in the image?", images["wide"])])
    assert r.choices[0].message.content == text and text.strip()
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == length and r.usage.completion_tokens == generated
    health = kv_server.health()
    assert health["kv_bits"] == 8 and health["max_batch"] == 1 and health["finished"] == 1


def test_streamed_answer_equals_generate_with_kv_bits(kv_server, kv_model, images):
    text, finish, length, generated, _ = reference(kv_model, "Describe it.", [images["tall"]])
    stream = ask(kv_server, [user("Describe it.", images["tall"])], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1  # really streamed, piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.prompt_tokens == length and chunks[-1].usage.completion_tokens == generated


def test_second_turn_reuses_the_quantized_prefix(kv_server, kv_model, images):
    """The second turn takes the first turn's quantized KV from the prompt cache, exactly
    as generate() does with one SessionCache, and answers as it does."""
    q1, q2 = "Name one shape, kv turn test.", "And its colour?"
    session = SessionCache()
    a1, _, length1, _, _ = reference(kv_model, q1, [images["odd2"]], cache=session)
    a2, _, _, _, cached = reference(kv_model, q2, [images["odd2"]], history=[(q1, a1)], cache=session)
    assert cached > length1
    messages = [user(q1, images["odd2"])]
    r1 = ask(kv_server, messages)
    assert r1.choices[0].message.content == a1
    messages += [{"role": "assistant", "content": a1}, user(q2)]
    r2 = ask(kv_server, messages)
    assert r2.choices[0].message.content == a2
    assert r2.usage.prompt_tokens_details.cached_tokens == cached


def test_stop_string_ends_the_answer(kv_server, kv_model, images):
    text, *_ = reference(kv_model, "What is in the image?", [images["square"]])
    stop = text.strip()[3:6]
    assert len(stop) == 3 and stop in text
    r = ask(kv_server, [user("What is in the image?", images["square"])], stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_disconnect_cancels_the_request(kv_server, images):
    """A streamed and a plain request whose clients go away are cancelled between tokens
    (both questions run to 600 tokens on this fixture), and the server goes on serving."""
    before, health = disconnect_twice(kv_server, images["tall"])
    assert health["cancelled"] - before["cancelled"] == 2
    assert health["running"] == 0 and health["waiting"] == 0
    assert health["generated_tokens"] == before["generated_tokens"]  # neither finished
    assert ask(kv_server, [user("What is in the image?", images["wide"])]).choices[0].message.content


def test_kv_bits_with_head_size_16_fails_at_start(checkpoints):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "server.py"),
            "--model",
            str(checkpoints["hf-v1.5-vicuna"]),
            "--port",
            "0",
            "--kv-bits",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: cannot quantize the KV cache: head size 16 is not a multiple of 32"
    ]
    assert proc.stdout == ""


def test_schema_logprobs_and_n_one_at_a_time(kv_server, kv_model, images):
    """The serial path serves the same fields: a schema's answer equals generate(kv_bits=8,
    response_format=...)'s; logprobs spell the answer; n seeded choices are each the answer
    that seed gives alone (the second on reuses the first's prompt KV)."""
    import json

    import jsonschema

    from schemas import SCHEMAS, as_format

    schema = SCHEMAS["nested objects"]
    messages = [user("As JSON.", images["tall"])]
    r = ask(kv_server, messages, max_tokens=120, response_format=as_format(schema))
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    model, processor = kv_model
    steps = stream_generate(
        model, processor, "As JSON.", [images["tall"]], max_tokens=120, kv_bits=8, response_format=schema
    )
    assert "".join(s.text for s in steps) == r.choices[0].message.content
    r = ask(kv_server, messages, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    # Each token's bytes are its SentencePiece piece's (this answer holds stray bytes, which
    # mlx-lm's detokenizer shows as U+FFFD, so the text cannot be compared byte for byte).
    ids = [
        s.token for s in stream_generate(model, processor, "As JSON.", [images["tall"]], max_tokens=TOKENS, kv_bits=8)
    ]
    pieces = processor.tokenizer._tokenizer.convert_ids_to_tokens(ids[: len(entries)])
    expected = [bytes([int(p[3:5], 16)]) if p.startswith("<0x") else p.replace("\u2581", " ").encode() for p in pieces]
    expected[0] = expected[0].removeprefix(b" ")  # the answer's text starts without the word-start space
    assert [bytes(e.bytes) for e in entries] == expected and len(entries) == r.usage.completion_tokens
    options = dict(max_tokens=10, temperature=1.0, seed=4)
    choices = [c.message.content for c in ask(kv_server, messages, n=3, **options).choices]
    assert choices == [
        ask(kv_server, messages, **{**options, "seed": 4 + i}).choices[0].message.content for i in range(3)
    ]
    assert len(set(choices)) == 3
