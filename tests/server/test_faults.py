"""One request can never take the server down.

Faults are injected into one request of a running batch (its logits processor raising, its
schema failing mid-answer, its picture failing to decode late, its logprobs failing): that
request ends with an OpenAI-shaped error, the other answers of the batch equal what they are
alone, and the next request is served. A fault of the model itself (MLX out of memory) stops
the engine, with the reason on /health and in every later answer. A tokenizer.json whose
decoder llguidance cannot read (Metaspace) serves logprobs and schemas through the official
client; one whose bytes cannot be read at all is a 400."""

import io
import json
import threading
from contextlib import contextmanager
from functools import partial

import openai
import pytest
from PIL import Image

from llava_mlx import generate

from conftest import SERVER_MODEL
from serving import TOKENS, ask, client, start_server, user

LONG = "Tell me a long story."
QUESTION = "What is in the image?"


def make_job(processor, message, max_tokens, prepared=True, **fields):
    from llava_mlx.server.engine import Job
    from llava_mlx.server.prompt import build_prompt
    from llava_mlx.server.request import Limits, parse_chat

    limits = Limits()
    chat = parse_chat(json.dumps({"messages": [message], "max_tokens": max_tokens, **fields}).encode(), limits)
    return Job(build_prompt(chat, processor, limits, lambda key: prepared), chat)


def outcome(job, timeout=120):
    """("text", the answer) or ("error", status, message)."""
    assert job.finished.wait(timeout), "the request was never answered"
    events = list(job.events.queue)
    errors = [e[1] for e in events if e[0] == "error"]
    if errors:
        return ("error", errors[0].status, errors[0].message)
    return ("text", "".join(e[2] for e in events if e[0] == "text"))


@contextmanager
def engine_of(model, processor):
    import mlx.core as mx

    from llava_mlx.server.engine import Engine, EngineOptions

    mx.eval(model.parameters())  # the lazily loaded weights, read in the thread that loaded them
    engine = Engine(lambda: (model, processor), EngineOptions(max_batch=8, prompt_cache_bytes=0))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


class Raising:
    """A logits processor (or anything called per step) that raises on its `at`-th call."""

    def __init__(self, inner, at, error):
        self.inner, self.at, self.error, self.calls = inner, at, error, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.inner(*args)


class LeavesItsSchema:
    """A schema's matcher that refuses the answer's third token, as a grammar engine gone wrong would."""

    def __init__(self, matcher):
        self.matcher, self.consumed = matcher, 0

    def consume_token(self, token):
        self.consumed += 1
        return self.consumed < 3 and self.matcher.consume_token(token)

    def __getattr__(self, name):
        return getattr(self.matcher, name)


def truncated_png(path) -> Image.Image:
    """A picture whose header reads but whose pixels fail to decode, when they are first needed."""
    data = path.read_bytes()
    return Image.open(io.BytesIO(data[: len(data) // 2]))


def inject(fault, engine, job, images):
    """Make `job` (already built) fail as `fault` says, inside the engine."""
    if fault in ("processor raises", "schema fails mid-answer"):
        constrain = engine.constrain

        def constrained(j):
            constrain(j)
            if j is job:
                if fault == "processor raises":
                    j.constraint = Raising(j.constraint, 4, RuntimeError("injected: a bug in the processor"))
                else:
                    j.constraint.matcher = LeavesItsSchema(j.constraint.matcher)

        engine.constrain = constrained
    elif fault == "picture fails late":
        key = job.prompt.image_keys[0]
        job.prompt.images[key] = truncated_png(images["wide"])  # its pixels were not prepared with the request
    elif fault == "logprobs fail":
        entries = engine.logprob_entries

        def failing(j, *args):
            if j is job and len(j.tokens) == 3:
                raise RuntimeError("injected: the logprobs failed")
            return entries(j, *args)

        engine.logprob_entries = failing


FAULTS = {
    # fault: (the faulty request's fields, its expected status, what its error says)
    "processor raises": ({"response_format": {"type": "json_object"}}, 500, "injected: a bug in the processor"),
    "schema fails mid-answer": ({"response_format": {"type": "json_object"}}, 400, "left its JSON schema"),
    "picture fails late": ({}, 400, "truncated or corrupt"),
    "logprobs fail": ({"logprobs": True}, 500, "injected: the logprobs failed"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_in_one_request_ends_that_request_only(fault, loaded, images):
    model, processor = loaded(SERVER_MODEL)
    fields, status, message = FAULTS[fault]
    expected = {
        "a": generate(model, processor, LONG, max_tokens=60).text,
        "c": generate(model, processor, QUESTION, [images["tall"]], max_tokens=TOKENS).text,
        "d": generate(model, processor, "And now?", [images["square"]], max_tokens=TOKENS).text,
    }
    with engine_of(model, processor) as engine:
        a = make_job(processor, user(LONG), 60)
        b = make_job(processor, user(QUESTION, images["wide"]), 40, prepared=fault != "picture fails late", **fields)
        c = make_job(processor, user(QUESTION, images["tall"]), TOKENS)
        inject(fault, engine, b, images)
        engine.submit(a)
        first = a.events.get(timeout=120)
        assert first[0] == "text"  # a is answering when b and c arrive
        engine.submit(b)
        engine.submit(c)
        got_b, got_c = outcome(b), outcome(c)
        a.events.queue.appendleft(first)
        got_a = outcome(a)
        d = make_job(processor, user("And now?", images["square"]), TOKENS)
        engine.submit(d)
        got_d = outcome(d)
        assert engine.failure is None and engine.thread.is_alive()
        stats = engine.stats()
    assert got_b[:2] == ("error", status) and message in got_b[2], got_b
    assert got_a == ("text", expected["a"]) and got_c == ("text", expected["c"]) and got_d == ("text", expected["d"])
    assert stats["failed"] == 1 and stats["running"] == 0


@contextmanager
def http_server(model, processor):
    """The server's HTTP side in this process, on a free loopback port, over a live engine."""
    from llava_mlx.server.http import App, Handler, Server
    from llava_mlx.server.request import Limits

    with engine_of(model, processor) as engine:
        app = App(engine, Limits(), "llava")
        httpd = Server(("127.0.0.1", 0), partial(Handler, app=app))
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
            yield engine, httpd
        finally:
            httpd.shutdown()
            httpd.server_close()


def health(url):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_fault_of_the_model_stops_the_engine_and_says_why(loaded):
    """MLX running out of memory in a decode step is no one request's fault: the engine stops,
    the answer under way and every later request get a 503 saying why, and /health says it."""
    model, processor = loaded(SERVER_MODEL)
    with http_server(model, processor) as (engine, httpd):
        api = openai.OpenAI(base_url=httpd.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert api.chat.completions.create(model="llava", messages=[user("Hi")], max_tokens=4).choices
        generator = engine.scheduler.generator
        generator.next = Raising(generator.next, 3, RuntimeError("[malloc] Unable to allocate 1073741824 bytes"))
        with pytest.raises(openai.APIStatusError) as failed:
            api.chat.completions.create(model="llava", messages=[user(LONG)], max_tokens=40)
        assert failed.value.status_code == 503 and "Unable to allocate" in failed.value.message
        status, body = health(httpd.url)
        assert status == 503 and body["status"] == "failed" and "Unable to allocate" in body["failure"]
        with pytest.raises(openai.APIStatusError) as later:
            api.chat.completions.create(model="llava", messages=[user("Hi")], max_tokens=4)
        assert later.value.status_code == 503 and "restart the server" in later.value.message


def test_a_tokenizer_whose_bytes_cannot_be_read_is_a_400(tokenizer_variants):
    from llava_mlx import load

    model, processor = load(str(tokenizer_variants["wordpiece"]))
    with http_server(model, processor) as (engine, httpd):
        api = openai.OpenAI(base_url=httpd.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for fields, param in (({"logprobs": True}, "logprobs"), ({"response_format": {"type": "json_object"}}, None)):
            with pytest.raises(openai.BadRequestError) as refused:
                api.chat.completions.create(model="llava", messages=[user("Hi")], max_tokens=4, **fields)
            assert "decoder (WordPiece)" in refused.value.message
            assert refused.value.body["param"] == (param or "response_format")
        assert api.chat.completions.create(model="llava", messages=[user("Hi")], max_tokens=4).choices
        assert health(httpd.url)[0] == 200


@pytest.fixture(scope="module")
def metaspace_server(tokenizer_variants, tmp_path_factory):
    server = start_server(tokenizer_variants["metaspace"], tmp_path_factory.mktemp("metaspace") / "server.log")
    yield server
    assert server.stop() == 0, server.log.read_text()[-2000:]


def test_metaspace_logprobs_and_schemas_through_the_official_client(metaspace_server, images):
    """The Metaspace decoder, which llguidance cannot read from tokenizer.json: logprobs and
    response_format are served (before: the engine stopped and the server exited)."""
    messages = [user(QUESTION, images["wide"])]
    r = ask(metaspace_server, messages, max_tokens=12, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") == r.choices[0].message.content
    n = {"type": "integer", "minimum": 0, "maximum": 99}
    schema = {"type": "object", "properties": {"n": n}, "required": ["n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    r = ask(metaspace_server, messages, max_tokens=30, response_format=fmt)
    assert isinstance(json.loads(r.choices[0].message.content)["n"], int) and r.choices[0].finish_reason == "stop"
    streamed = ask(metaspace_server, messages, max_tokens=30, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content
    assert metaspace_server.health()["status"] == "ok" and metaspace_server.proc.poll() is None
    assert client(metaspace_server).models.list().data
