"""The server against the official `openai` client on 127.0.0.1: answers equal generate()'s
(plain, streamed, multi-turn), continuous batching of prompts of different lengths, the
prompt cache, cancellation on disconnect, a bounded load test, and every bad input."""

import base64
import http.client
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import openai
import pytest
from PIL import Image

from llava_mlx.cache import common_prefix, image_key, sequence_keys
from llava_mlx.generation import stream_generate
from llava_mlx.processor import load_image

from conftest import ROOT, SERVER_MODEL
from helpers import free_port
from serving import TOKENS, ask, client, data_uri, disconnect_twice, reference, request_with_body, responses_to, user

SIZES = ["square", "wide", "tall", "tiny", "odd1", "odd2"]  # six image sizes, six prompt lengths


def test_plain_answer_equals_generate(live_server, loaded, images):
    text, tokens, finish, length = reference(loaded, "What is in the image?", [images["wide"]])
    r = ask(live_server, [user("What is in the image?", images["wide"])])
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == length > 1948  # image positions counted
    assert r.usage.completion_tokens == len(tokens) - (finish == "stop")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_streamed_answer_equals_generate(live_server, loaded, images):
    text, tokens, finish, length = reference(loaded, "Describe it.", [images["tall"]])
    stream = ask(
        live_server, [user("Describe it.", images["tall"])], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1  # really streamed, piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == length


def merged_keys(loaded, question, image, history):
    """The merged sequence of a prompt, from the library's own functions."""
    model, processor = loaded(SERVER_MODEL)
    ids = processor.encode_prompt(processor.apply_template(question, 1, None, history), 1)
    picture = load_image(image)
    return sequence_keys(ids, [image_key(picture)], [model.config.image_token_count(picture.size)])


def test_multi_turn_equals_generate_and_reuses_the_prefix(live_server, loaded, images):
    q1, q2, q3 = "Name one shape you see, turn test.", "And its colour?", "Anything else?"
    history, messages = [], []
    previous, previous_prompt = [], 0  # the keys and prompt length of the turn before
    for turn, question in enumerate([q1, q2, q3]):
        text, tokens, _, length = reference(loaded, question, [images["odd2"]], history=history)
        messages.append(user(question, images["odd2"]) if turn == 0 else user(question))
        r = ask(live_server, messages)
        assert r.choices[0].message.content == text
        assert r.usage.prompt_tokens == length
        keys = merged_keys(loaded, question, images["odd2"], history)
        if turn == 0:
            assert r.usage.prompt_tokens_details.cached_tokens < 50  # at most the system prompt
        else:
            # the whole previous turn (its image, question and answer) came from the cache
            expected = min(common_prefix(previous, keys), len(keys) - 1)
            assert expected >= previous_prompt
            assert r.usage.prompt_tokens_details.cached_tokens == expected
        previous, previous_prompt = keys + tokens, len(keys)
        history.append((question, text))
        messages.append({"role": "assistant", "content": text})


def test_concurrent_requests_batch_and_equal_one_by_one(live_server, loaded, images):
    requests = [[user(f"Question {i}: what is this?", images[name])] for i, name in enumerate(SIZES)]
    first = [ask(live_server, messages, max_tokens=24) for messages in requests]  # caches the images and prompts
    assert len({r.usage.prompt_tokens for r in first}) == 6  # six different prompt lengths
    before = live_server.health()
    tic = time.perf_counter()
    alone = [ask(live_server, messages, max_tokens=24).choices[0].message.content for messages in requests]
    one_by_one = time.perf_counter() - tic  # as warm as the concurrent run below
    assert alone == [r.choices[0].message.content for r in first]
    middle = live_server.health()
    tic = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda m: ask(live_server, m, max_tokens=24), requests))
    concurrent = time.perf_counter() - tic
    after = live_server.health()
    assert [r.choices[0].message.content for r in together] == alone
    for (i, name), r in zip(enumerate(SIZES), together):
        assert (
            r.choices[0].message.content
            == reference(loaded, f"Question {i}: what is this?", [images[name]], max_tokens=24)[0]
        )
    tokens = sum(r.usage.completion_tokens for r in together)
    steps_alone = middle["decode_steps"] - before["decode_steps"]
    steps_together = after["decode_steps"] - middle["decode_steps"]
    # one by one, each decode step makes one token; together, steps make several
    assert steps_alone == tokens
    assert after["batched_steps"] > middle["batched_steps"] and after["max_batch"] > 1
    assert steps_together < tokens
    print(
        f"6 requests: one by one {one_by_one:.2f} s, {steps_alone} decode steps; "
        f"together {concurrent:.2f} s, {steps_together} steps; largest batch {after['max_batch']}"
    )


def test_disconnect_cancels_the_request(live_server, images):
    """A streamed and a plain request whose clients go away are cancelled, their KV freed."""
    before, health = disconnect_twice(live_server, images["square"])
    assert health["cancelled"] - before["cancelled"] == 2
    assert health["running"] == 0 and health["waiting"] == 0
    assert health["generated_tokens"] - before["generated_tokens"] < 2 * 600  # neither ran to the end


# -- bad input ---------------------------------------------------------------------------------
def raw(server, method, path, body=b"", headers=None, timeout=60):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def post(server, body, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw(server, "POST", "/v1/chat/completions", data, **kwargs)


def assert_openai_error(status, body, expected_status, fragment):
    assert status == expected_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error["message"]


class SlowImages(http.server.BaseHTTPRequestHandler):
    """A loopback image host: /slow never finishes in time, /to-disk redirects to file://,
    anything else is a 404."""

    def do_GET(self):
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                return  # the server gave up, as it should
        elif self.path == "/to-disk":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def png_uri(image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def bomb_png(width=30000, height=30000) -> bytes:
    """A valid PNG header claiming width x height: nothing is spent making it."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def image_message(url, text="What is it?"):
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
            }
        ]
    }


def nested_arrays(depth: int) -> dict:
    schema = {"type": "array"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def bad_requests(images, image_host):
    png = images["square"].read_bytes()
    text = {"role": "user", "content": "hi"}
    return {
        "invalid JSON": (b'{"messages": [', 400, "not valid JSON"),
        "JSON nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, 400, "nests too deeply"),
        "a lone surrogate": (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "not valid Unicode"),
        "seed past 64 bits": ({"messages": [text], "seed": 2**64, "temperature": 0.5}, 400, "'seed' is"),
        "negative seed": ({"messages": [text], "seed": -1, "temperature": 0.5}, 400, "'seed' is"),
        "not an object": (b"[1, 2]", 400, "JSON object"),
        "missing messages": ({"model": "x"}, 400, "'messages'"),
        "messages not a list": ({"messages": "hi"}, 400, "'messages'"),
        "empty messages": ({"messages": []}, 400, "'messages'"),
        "message not an object": ({"messages": ["hi"]}, 400, "messages[0] must be an object"),
        "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role is 'tool'"),
        "missing content": ({"messages": [{"role": "user"}]}, 400, "content"),
        "content wrong type": ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        "unknown part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "'audio'"),
        "text not a string": (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            400,
            "text must be a string",
        ),
        "image placeholder in text": ({"messages": [{"role": "user", "content": "see <image>"}]}, 400, "<image>"),
        "assistant first": ({"messages": [{"role": "assistant", "content": "x"}, text]}, 400, "must answer a user"),
        "two user messages": ({"messages": [text, text]}, 400, "two user messages"),
        "system not first": (
            {"messages": [text, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}, text]},
            400,
            "only come first",
        ),
        "ends with assistant": ({"messages": [text, {"role": "assistant", "content": "a"}]}, 400, "last message"),
        "image in assistant": (
            {
                "messages": [
                    text,
                    {
                        "role": "assistant",
                        "content": [{"type": "image_url", "image_url": {"url": data_uri(images["square"])}}],
                    },
                    text,
                ]
            },
            400,
            "only user messages",
        ),
        "temperature wrong type": ({"messages": [text], "temperature": "hot"}, 400, "'temperature' must be a number"),
        "temperature out of range": ({"messages": [text], "temperature": 3}, 400, "'temperature' is 3"),
        "top_p zero": ({"messages": [text], "top_p": 0}, 400, "'top_p' is 0"),
        "max_tokens zero": ({"messages": [text], "max_tokens": 0}, 400, "'max_tokens' is 0"),
        "max_tokens over limit": ({"messages": [text], "max_tokens": 100000}, 400, "--max-tokens"),
        "max_tokens float": (
            {"messages": [text], "max_completion_tokens": 1.5},
            400,
            "'max_completion_tokens' must be an integer",
        ),
        "n=9": ({"messages": [text], "n": 9}, 400, "'n' is 9"),
        "a schema nested 900 deep": (
            {"messages": [text], "response_format": schema_format(nested_arrays(900))},
            400,
            "nests too deeply",
        ),
        "seed wrong type": ({"messages": [text], "seed": "x"}, 400, "'seed' must be an integer"),
        "stop wrong type": ({"messages": [text], "stop": [1]}, 400, "'stop'"),
        "stream wrong type": ({"messages": [text], "stream": "yes"}, 400, "'stream'"),
        "stream_options wrong type": ({"messages": [text], "stream_options": 1}, 400, "'stream_options'"),
        "model wrong type": ({"messages": [text], "model": 5}, 400, "'model'"),
        "logprobs wrong type": ({"messages": [text], "logprobs": 1}, 400, "'logprobs' must be true or false"),
        "top_logprobs without logprobs": ({"messages": [text], "top_logprobs": 2}, 400, "needs 'logprobs'"),
        "top_logprobs over 20": (
            {"messages": [text], "logprobs": True, "top_logprobs": 21},
            400,
            "'top_logprobs' is 21",
        ),
        "tools": ({"messages": [text], "tools": [{"type": "function"}]}, 400, "not trained to call tools"),
        "response_format unknown type": (
            {"messages": [text], "response_format": {"type": "xml"}},
            400,
            "type 'xml' is not one of",
        ),
        "response_format not an object": ({"messages": [text], "response_format": "json"}, 400, "must be an object"),
        "json_schema without schema": (
            {"messages": [text], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            400,
            "needs json_schema.schema",
        ),
        "json_schema without json_schema": (
            {"messages": [text], "response_format": {"type": "json_schema"}},
            400,
            "needs a 'json_schema' object",
        ),
        "not a JSON schema": (
            {"messages": [text], "response_format": schema_format({"type": "object", "properties": {"a": 5}})},
            400,
            "not a valid JSON schema at properties/a",
        ),
        "a schema type that does not exist": (
            {"messages": [text], "response_format": schema_format({"type": "thing"})},
            400,
            "not a valid JSON schema",
        ),
        "a schema the engine cannot enforce": (
            {"messages": [text], "response_format": schema_format({"not": {"type": "string"}})},
            400,
            "cannot be enforced",
        ),
        "bad base64": (image_message("data:image/png;base64,!!!notbase64"), 400, "base64"),
        "data URI not an image type": (image_message("data:text/plain;base64,aGVsbG8="), 400, "data:image/"),
        "not an image": (
            image_message("data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()),
            400,
            "not an image",
        ),
        "truncated image": (
            image_message("data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()),
            400,
            "image",
        ),
        "unreachable URL": (
            image_message(f"http://127.0.0.1:{free_port()}/a.png"),
            400,
            "cannot download the image URL",
        ),
        "image URL 404": (image_message(image_host + "/missing"), 400, "HTTP 404"),
        "slow image URL": (image_message(image_host + "/slow"), 400, "within 2 s"),
        "redirect to the disk": (image_message(image_host + "/to-disk"), 400, "only http(s) URLs"),
        "file URL": (image_message("file:///etc/passwd"), 400, "scheme 'file' is not allowed"),
        "ftp URL": (image_message("ftp://example.com/a.png"), 400, "scheme 'ftp' is not allowed"),
        "no scheme": (image_message("/etc/passwd"), 400, "is not allowed"),
        "too many images": (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_uri(images["tiny"])}}] * 4,
                    }
                ]
            },
            400,
            "at most 3 per request",
        ),
        "over the pixel limit": (
            image_message(png_uri(Image.new("RGB", (2500, 1700)))),
            400,
            "2500x1700, more than 4,000,000 pixels",
        ),
        "pixel bomb": (
            image_message("data:image/png;base64," + base64.b64encode(bomb_png()).decode()),
            400,
            "more than 4,000,000 pixels",
        ),
        "over the context": (
            {"messages": [{"role": "user", "content": "word " * 5000}]},
            400,
            "and the context is 4096",
        ),
    }


BAD_CASES = [
    "invalid JSON",
    "JSON nested 100,000 deep",
    "a lone surrogate",
    "seed past 64 bits",
    "negative seed",
    "not an object",
    "missing messages",
    "messages not a list",
    "empty messages",
    "message not an object",
    "unknown role",
    "missing content",
    "content wrong type",
    "unknown part",
    "text not a string",
    "image placeholder in text",
    "assistant first",
    "two user messages",
    "system not first",
    "ends with assistant",
    "image in assistant",
    "temperature wrong type",
    "temperature out of range",
    "top_p zero",
    "max_tokens zero",
    "max_tokens over limit",
    "max_tokens float",
    "n=9",
    "a schema nested 900 deep",
    "seed wrong type",
    "stop wrong type",
    "stream wrong type",
    "stream_options wrong type",
    "model wrong type",
    "logprobs wrong type",
    "top_logprobs without logprobs",
    "top_logprobs over 20",
    "tools",
    "response_format unknown type",
    "response_format not an object",
    "json_schema without schema",
    "json_schema without json_schema",
    "not a JSON schema",
    "a schema type that does not exist",
    "a schema the engine cannot enforce",
    "bad base64",
    "data URI not an image type",
    "not an image",
    "truncated image",
    "unreachable URL",
    "image URL 404",
    "slow image URL",
    "redirect to the disk",
    "file URL",
    "ftp URL",
    "no scheme",
    "too many images",
    "over the pixel limit",
    "pixel bomb",
    "over the context",
]


@pytest.fixture(scope="module")
def bad(images, image_host):
    cases = bad_requests(images, image_host)
    assert list(cases) == BAD_CASES
    return cases


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_an_openai_4xx(live_server, bad, case):
    body, status, fragment = bad[case]
    assert_openai_error(*post(live_server, body), status, fragment)


def test_context_error_gives_the_numbers(live_server, bad):
    status, body = post(live_server, bad["over the context"][0])
    assert body["error"]["code"] == "context_length_exceeded"
    assert "5001 positions" in body["error"]["message"] or "positions long" in body["error"]["message"]


def test_openai_client_reads_the_errors(live_server, images):
    with pytest.raises(openai.BadRequestError, match="base64"):
        ask(
            live_server,
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
        )
    with pytest.raises(openai.BadRequestError, match="not stored"):
        client(live_server).responses.create(model="llava", input="hi", previous_response_id="resp_1")


def test_body_size_route_and_method_errors(live_server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()
    assert_openai_error(*post(live_server, big), 413, "over the limit of 4,194,304")
    assert_openai_error(*raw(live_server, "GET", "/v2/nothing"), 404, "no route GET /v2/nothing")
    assert_openai_error(*raw(live_server, "GET", "/v1/chat/completions"), 405, "takes POST")
    assert_openai_error(*raw(live_server, "DELETE", "/v1/models"), 405, "takes GET")
    headers = {"Content-Type": "application/json", "Origin": "https://evil.example"}
    assert_openai_error(
        *post(live_server, {"messages": [{"role": "user", "content": "hi"}]}, headers=headers), 403, "not allowed"
    )
    status, body = raw(live_server, "GET", "/v1/models")
    assert status == 200 and body["data"][0]["object"] == "model"
    status, body = raw(
        live_server,
        "POST",
        "/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode(),
    )
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_api_key_busy_server_and_cors(checkpoints, tmp_path):
    """A second server: --api-key (401), one batch slot and one queue slot (429), CORS, and
    a SIGTERM while it answers."""
    from serving import start_server

    server = start_server(
        checkpoints[SERVER_MODEL],
        tmp_path / "log",
        "--api-key",
        "s3cret",
        "--max-tokens",
        "400",
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--allowed-origins",
        "https://app.example",
    )
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
        assert_openai_error(*raw(server, "POST", "/v1/chat/completions", body), 401, "API key")
        wrong = {"Content-Type": "application/json", "Authorization": "Bearer nope"}
        assert_openai_error(*raw(server, "POST", "/v1/chat/completions", body, wrong), 401, "API key")
        # refused before its body is read: the body is not taken for a next request
        statuses = responses_to(server.port, request_with_body("POST", "/v1/chat/completions"))
        assert statuses == ["401"]
        # without --allow-private-image-urls, an image URL on this machine is not fetched
        local = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{server.port}/"}}],
        }
        keyed = {"Content-Type": "application/json", "Authorization": "Bearer s3cret"}
        refused = json.dumps({"messages": [local], "max_tokens": 4}).encode()
        assert_openai_error(*raw(server, "POST", "/v1/chat/completions", refused, keyed), 400, "non-public address")
        two = json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode()
        assert_openai_error(*raw(server, "POST", "/v1/chat/completions", two, keyed), 400, "at most --max-batch (1)")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert (
            good.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            ).usage.completion_tokens
            > 0
        )
        assert server.health()["status"] == "ok"  # health needs no key

        def long_request(i):
            try:
                good.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=400
                )
                return 200
            except openai.RateLimitError as e:
                assert "busy" in e.message
                return 429

        with ThreadPoolExecutor(5) as pool:
            statuses = list(pool.map(long_request, range(5)))
        assert statuses.count(429) >= 2 and statuses.count(200) >= 1  # 2 slots: the others are turned away
        assert server.health()["running"] == 0

        allowed = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("OPTIONS", "/v1/chat/completions", headers=allowed)
        response = connection.getresponse()
        assert response.status == 204 and response.getheader("Access-Control-Allow-Origin") == "https://app.example"
        connection.close()
        cors = {"Content-Type": "application/json", "Authorization": "Bearer s3cret", "Origin": "https://app.example"}
        assert raw(server, "POST", "/v1/chat/completions", body, cors)[0] == 200
        cors["Origin"] = "https://other.example"
        assert_openai_error(*raw(server, "POST", "/v1/chat/completions", body, cors), 403, "not allowed")

        # SIGTERM while an answer streams: the stream ends with an OpenAI-shaped error event
        # (not a cut connection), and the server exits 0.
        chunks = iter(
            good.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "A long story"}], max_tokens=400, stream=True
            )
        )
        while not next(chunks).choices[0].delta.content:  # the answer has begun
            pass
        server.proc.terminate()
        with pytest.raises(openai.APIError) as stopped:
            for chunk in chunks:  # 400 tokens take far longer than stopping
                assert chunk.choices[0].finish_reason is None
        assert stopped.value.message == "the server is shutting down"
    finally:
        assert server.stop() == 0


def test_server_command_line_errors(checkpoints, tmp_path):
    """A bad model or a taken port: one line on stderr, exit code 1."""

    def run(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "server.py"), *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        )

    missing = run("--model", str(tmp_path / "absent"))
    assert (
        missing.returncode == 1
        and missing.stderr.strip().startswith("error: ")
        and "is not a directory" in missing.stderr
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run("--model", str(checkpoints[SERVER_MODEL]), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 1 and "cannot listen on 127.0.0.1" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1 and "Traceback" not in busy.stderr


def test_stop_strings_and_seeds(live_server, loaded, images):
    text, *_ = reference(loaded, "What is here?", [images["odd1"]], max_tokens=24)
    cut = text[len(text) // 2 : len(text) // 2 + 2]
    r = ask(live_server, [user("What is here?", images["odd1"])], max_tokens=24, stop=[cut])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[: text.index(cut)]
    streamed = ask(live_server, [user("What is here?", images["odd1"])], max_tokens=24, stop=cut, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(cut)]
    sampled = [ask(live_server, [user("Say anything.")], max_tokens=12, temperature=1.0, seed=7) for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content


def test_load(live_server, loaded, images, bad):
    """8 client threads, 60 valid requests mixed with 30 malformed ones."""
    cases = [
        ("What is in the image?", "tiny"),
        ("Describe it.", "odd1"),
        ("Colours?", "tie_wide"),
        ("Shapes?", "square"),
    ]
    expected = {c: reference(loaded, c[0], [images[c[1]]], max_tokens=8)[0] for c in cases}
    malformed = [v for k, v in bad.items() if k != "slow image URL"]  # each takes the 2 s timeout
    jobs = [("ok", cases[i % len(cases)]) for i in range(60)] + [
        ("bad", malformed[i % len(malformed)]) for i in range(30)
    ]
    jobs = [jobs[(i * 37) % len(jobs)] for i in range(len(jobs))]  # interleaved, deterministically
    before = live_server.rss_mb()

    def run(job):
        kind, case = job
        if kind == "ok":
            status, body = post(live_server, {"messages": [user(case[0], images[case[1]])], "max_tokens": 8})
            return status == 200 and body["choices"][0]["message"]["content"] == expected[case]
        status, body = post(live_server, case[0])
        return 400 <= status < 500 and "error" in body

    tic = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.perf_counter() - tic
    assert all(results), [j for j, ok in zip(jobs, results) if not ok][:3]
    health = live_server.health()
    assert live_server.proc.poll() is None and health["status"] == "ok"
    assert health["running"] == 0 and health["waiting"] == 0
    assert 0 < health["prompt_cache_bytes"] <= 24 << 20
    after = live_server.rss_mb()
    assert after - before < 400, (before, after)
    print(
        f"load: 90 requests in {elapsed:.1f} s; RSS {before:.0f} -> {after:.0f} MB; "
        f"prompt cache {health['prompt_cache_bytes'] / 1e6:.1f} MB in {health['prompt_cache_entries']} entries"
    )


def test_images_in_later_turns_are_templated_where_they_appear(loaded):
    """Per-turn image counts: [n, 0, ...] is generate()'s prompt; [0, 1] puts the image in turn 2."""
    for name in (SERVER_MODEL, "orig-v1.6-vicuna", "hf-v1.6-mistral"):  # chat templates and the original's
        _, processor = loaded(name)
        history = [("First?", "An answer.")]
        assert processor.apply_template("Next?", [1, 0], None, history) == processor.apply_template(
            "Next?", 1, None, history
        )
        later = processor.apply_template("Next?", [0, 1], None, history)
        assert later.count("<image>") == 1 and later.index("<image>") > later.index("An answer.")


def test_requests_start_in_turn_each_after_the_one_before_is_prefilled(loaded, images):
    """Three requests waiting together: the engine starts the second one (and so encodes its
    image) only once the first is prefilled (starting all at once held the first answer until
    every image had gone through the tower), and the answers still equal generate()'s."""
    from llava_mlx.server.engine import Engine, EngineOptions, Job
    from llava_mlx.server.prompt import build_prompt
    from llava_mlx.server.request import Limits, parse_chat

    model, processor = loaded(SERVER_MODEL)
    mx.eval(model.parameters())  # lazily loaded: read here, in the thread that loaded them, not the engine's
    engine = Engine(lambda: (model, processor), EngineOptions(max_batch=8, prompt_cache_bytes=0))
    names, jobs, order = ["wide", "tall", "odd1"], [], []
    for name in names:
        body = json.dumps({"messages": [user("What is in the image?", images[name])], "max_tokens": TOKENS}).encode()
        chat = parse_chat(body, Limits())
        jobs.append(Job(build_prompt(chat, processor, Limits(), lambda key: True), chat))
        engine.inbox.put(jobs[-1])  # before the engine runs: all three wait together
    which = {id(job.prompt): names[i] for i, job in enumerate(jobs)}
    scheduler = engine.scheduler
    start, insert = scheduler.start, scheduler._insert

    def starting(job):
        order.append(f"start {which[id(job.prompt)]}")
        start(job)

    def inserting(job):
        order.append(f"prefilled {which[id(job.prompt)]}")
        insert(job)

    scheduler.start, scheduler._insert = starting, inserting
    engine.start()
    try:
        for job in jobs:
            assert job.finished.wait(120)
    finally:
        engine.stop()
    assert order == [f"{step} {name}" for name in names for step in ("start", "prefilled")]
    for name, job in zip(names, jobs):
        events = list(job.events.queue)
        text, *_ = reference(loaded, "What is in the image?", [images[name]])
        assert "".join(e[2] for e in events if e[0] == "text") == text and events[-1][0] == "done"


def test_completions_take_the_raw_prompt(live_server, loaded):
    """POST /v1/completions with the official client: the prompt as written (no template, no
    images), plain and streamed, equal to stream_generate(template=False); its own bad input."""
    model, processor = loaded(SERVER_MODEL)
    prompt = "USER: Tell me about a red square. ASSISTANT:"
    steps = list(stream_generate(model, processor, prompt, [], max_tokens=TOKENS, template=False))
    text, finish = "".join(s.text for s in steps), steps[-1].finish_reason
    generated = len(steps) - 1  # the last response closes the stream (its EOS, if any, is not counted)
    api = client(live_server)
    r = api.completions.create(model="llava", prompt=prompt, max_tokens=TOKENS)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish and r.choices[0].index == 0
    assert r.usage.prompt_tokens == steps[-1].prompt_tokens and r.usage.completion_tokens == generated
    chunks = list(
        api.completions.create(
            model="llava", prompt=[prompt], max_tokens=TOKENS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated
    assert api.completions.create(model="llava", prompt=prompt).usage.completion_tokens <= 16  # OpenAI's default
    for body, fragment in (
        ({"prompt": "USER: <image>\nWhat is it? ASSISTANT:"}, "images are not part of /v1/completions"),
        ({"prompt": ["one", "two"]}, "'prompt' must be a non-empty string"),
        ({"prompt": ""}, "'prompt' must be a non-empty string"),
        ({"prompt": "hi", "echo": True}, "'echo' is not supported"),
        ({"prompt": "hi", "suffix": "!"}, "'suffix' is not supported"),
        ({"prompt": "hi", "n": 9}, "'n' is 9"),
        ({"prompt": "hi", "logprobs": 2}, "'logprobs' is served by /v1/chat/completions"),
        ({"prompt": "hi", "response_format": {"type": "json_object"}}, "not part of /v1/completions"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "'prompt' must be"),
    ):
        assert_openai_error(*raw(live_server, "POST", "/v1/completions", json.dumps(body).encode()), 400, fragment)
