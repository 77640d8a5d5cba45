"""Structured outputs, logprobs and n choices through the official `openai` client on the live
server, each answer checked against the library's own `generate()`.

The tiny random fixture never writes JSON by itself (checked below): every answer that
parses and validates does so because the schema's mask held it there.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from typing import List, Literal, Optional

import jsonschema
import numpy as np
import pydantic
import pytest

from llava_mlx import generate
from llava_mlx.generation import stream_generate

from conftest import SERVER_MODEL
from schemas import SCHEMAS, as_format
from serving import ask, client, user

QUESTION = "Describe the picture as JSON."
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def server_model(loaded):
    return loaded(SERVER_MODEL)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_answer_keeps_to_its_schema(live_server, server_model, images, name):
    """Greedy and sampled answers parse, validate and end at the object's end ("stop"); the
    greedy one equals generate(response_format=...)'s."""
    schema = SCHEMAS[name]
    messages = [user(QUESTION, images["square"])]
    r = ask(live_server, messages, max_tokens=MAX_TOKENS, response_format=as_format(schema))
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    assert r.choices[0].finish_reason == "stop", text
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)  # compact
    model, processor = server_model
    alone = generate(model, processor, QUESTION, [images["square"]], max_tokens=MAX_TOKENS, response_format=schema)
    assert alone.text == text and alone.finish_reason == "stop"
    sampled = ask(
        live_server, messages, max_tokens=MAX_TOKENS, response_format=as_format(schema), temperature=1.0, seed=5
    )
    jsonschema.validate(json.loads(sampled.choices[0].message.content), schema)


def test_the_model_alone_writes_no_json(live_server, images):
    """What the schema tests stand on: without the mask, the same requests are not JSON."""
    for temperature in (0.0, 1.0):
        r = ask(live_server, [user(QUESTION, images["square"])], max_tokens=40, temperature=temperature, seed=5)
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.choices[0].message.content)


class Shelf(pydantic.BaseModel):
    kind: Literal["shelf", "table"]
    objects: List[Literal["cup", "pen", "book"]] = pydantic.Field(max_length=3)
    count: int = pydantic.Field(ge=0, le=9)
    note: Optional[str] = pydantic.Field(max_length=6)


def test_parse_with_a_pydantic_model_and_json_object(live_server, images):
    api = client(live_server)
    r = api.chat.completions.parse(
        model="llava", messages=[user(QUESTION, images["wide"])], max_tokens=MAX_TOKENS, response_format=Shelf
    )
    shelf = r.choices[0].message.parsed
    assert isinstance(shelf, Shelf) and r.choices[0].finish_reason == "stop"
    r = ask(live_server, [user(QUESTION, images["wide"])], max_tokens=30, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")  # an object, cut at max_tokens (an object's size is not bounded)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_constrained_and_free_requests_share_a_batch_and_equal_alone(live_server, images):
    names = ["enum", "nested objects", "pattern"]
    requests = [
        dict(messages=[user(f"{QUESTION} ({i})", images[image])], response_format=as_format(SCHEMAS[name]))
        for i, (name, image) in enumerate(zip(names, ["square", "tall", "odd1"]))
    ] + [dict(messages=[user(f"Free question {i}", images["odd2"])]) for i in range(3)]
    alone = [ask(live_server, max_tokens=MAX_TOKENS, **kw).choices[0].message.content for kw in requests]
    before = live_server.health()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda kw: ask(live_server, max_tokens=MAX_TOKENS, **kw), requests))
    assert [r.choices[0].message.content for r in together] == alone
    assert live_server.health()["batched_steps"] > before["batched_steps"]
    for name, text in zip(names, alone):
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def reported(model, processor, question, image, max_tokens, top):
    """generate()'s greedy tokens and OpenAI-style logprobs, from stream_generate's own."""
    steps = list(stream_generate(model, processor, question, [image], max_tokens=max_tokens))
    vocab = processor.tokenizer.vocab_size
    out = []
    for s in steps[:-1]:
        lp = np.asarray(s.logprobs, dtype=np.float64)[:vocab]
        lp = lp - np.log(np.exp(lp - lp.max()).sum()) - lp.max()
        out.append((s.token, lp[s.token], sorted(lp, reverse=True)[:top]))
    return "".join(s.text for s in steps), out


def test_logprobs_plain_and_streamed(live_server, server_model, images):
    messages = [user("What is in the picture?", images["square"])]
    plain = ask(live_server, messages, max_tokens=12).choices[0].message.content
    r = ask(live_server, messages, max_tokens=12, logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    assert choice.message.content == plain  # asking changes no greedy answer
    entries = choice.logprobs.content
    # the tokens spell the answer (the random fixture writes stray bytes: the text shows them as U+FFFD)
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") == plain
    text, expected = reported(*server_model, "What is in the picture?", images["square"], 12, 5)
    assert text == plain and len(entries) == len(expected)
    for e, (token, logprob, top) in zip(entries, expected):
        assert e.logprob == pytest.approx(logprob, abs=1e-4)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top, abs=1e-4)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)  # greedy: the likeliest
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    chunks = list(ask(live_server, messages, max_tokens=12, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-6)
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_n_choices_share_one_prefill_and_are_reproducible(live_server, images):
    messages = [user("Tell me a story about this.", images["tall"])]
    options = dict(max_tokens=16, temperature=1.0, seed=11)
    before = live_server.health()
    r = ask(live_server, messages, n=3, **options)
    after = live_server.health()
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3  # sampled independently
    assert r.usage.completion_tokens == sum(
        ask(live_server, messages, n=1, **{**options, "seed": 11 + i}).usage.completion_tokens for i in range(3)
    )
    assert [c.message.content for c in ask(live_server, messages, n=3, **options).choices] == texts  # seeded
    assert ask(live_server, messages, **options).choices[0].message.content == texts[0]
    assert after["requests"] - before["requests"] == 1 and after["finished"] - before["finished"] == 3
    chunks = list(ask(live_server, messages, n=3, stream=True, stream_options={"include_usage": True}, **options))
    streamed = {
        i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(3)
    }
    assert [streamed[i] for i in range(3)] == texts
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    json_answers = ask(live_server, messages, n=2, response_format=as_format(SCHEMAS["enum"]), **options)
    for c in json_answers.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMAS["enum"])
