"""POST /v1/responses with the official Python client, and once with the official JavaScript
client (npm `openai`), against the live server: answers equal chat completions' (and so
generate()'s), streamed events, JSON schemas, what it refuses."""

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import openai
import pytest

from schemas import SCHEMAS, as_format
from serving import ask, client, data_uri, user

JS_CLIENT = "openai@7"  # the official JavaScript client, from the npm registry


def image_input(question, image) -> list:
    parts = [{"type": "input_image", "image_url": data_uri(image)}, {"type": "input_text", "text": question}]
    return [{"role": "user", "content": parts}]


def test_text_and_image_inputs_answer_as_chat_completions(live_server, images):
    api = client(live_server)
    chat = ask(live_server, [{"role": "user", "content": "Hello there"}], max_tokens=12)
    r = api.responses.create(model="llava", input="Hello there", max_output_tokens=12)
    assert r.output_text == chat.choices[0].message.content and r.object == "response"
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens

    chat = ask(
        live_server,
        [{"role": "system", "content": "Be brief."}, user("What is it?", images["tall"])],
        max_tokens=10,
    )
    r = api.responses.create(
        model="llava", instructions="Be brief.", input=image_input("What is it?", images["tall"]), max_output_tokens=10
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"


def test_streamed_events(live_server, images):
    api = client(live_server)
    whole = api.responses.create(model="llava", input=image_input("Describe it.", images["odd1"]), max_output_tokens=14)
    events = list(
        api.responses.create(
            model="llava", input=image_input("Describe it.", images["odd1"]), max_output_tokens=14, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_text_format_json_schema(live_server, images):
    schema = SCHEMAS["nested objects"]
    r = client(live_server).responses.create(
        model="llava",
        input=image_input("Describe the picture as JSON.", images["square"]),
        max_output_tokens=120,
        text={"format": {"type": "json_schema", "name": "receipt", "schema": schema, "strict": True}},
    )
    jsonschema.validate(json.loads(r.output_text), schema)
    chat = ask(
        live_server,
        [user("Describe the picture as JSON.", images["square"])],
        max_tokens=120,
        response_format=as_format(schema),
    )
    assert r.output_text == chat.choices[0].message.content and r.status == "completed"


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"previous_response_id": "resp_1"}, "not stored"),
        ({"store": True}, "not stored"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "not trained to call tools"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "only message items"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "'input_file'"),
        ({"max_output_tokens": 0}, "'max_output_tokens' is 0"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "json_schema.schema"),
        ({"text": {"format": {"type": "yaml"}}}, "'yaml'"),
        ({"input": []}, "'input'"),
    ],
)
def test_what_it_refuses(live_server, fields, fragment):
    body = {"model": "llava", "input": "hi", **fields}
    with pytest.raises(openai.BadRequestError, match=fragment):
        client(live_server).responses.create(**body)


JS_SCRIPT = r"""
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });
const whole = await client.responses.create({ model: "llava", input: "Hello there", max_output_tokens: 12 });
let streamed = "";
const stream = await client.responses.create({
  model: "llava", input: "Hello there", max_output_tokens: 12, stream: true,
});
const kinds = [];
for await (const event of stream) {
  kinds.push(event.type);
  if (event.type === "response.output_text.delta") streamed += event.delta;
}
const chat = await client.chat.completions.create({
  model: "llava", messages: [{ role: "user", content: "Hello there" }], max_tokens: 12,
});
let error = null;
try {
  await client.responses.create({ model: "llava", input: "hi", previous_response_id: "resp_1" });
} catch (e) {
  error = { status: e.status, message: e.message };
}
console.log(JSON.stringify({ text: whole.output_text, streamed, kinds, chat: chat.choices[0].message.content, error }));
"""


@pytest.fixture(scope="session")
def js_client(tmp_path_factory) -> Path:
    """A directory with the official JavaScript client installed (npm, from its registry)."""
    npm = shutil.which("npm")
    assert npm and shutil.which("node"), "node and npm are needed (Debian: apt install nodejs npm)"
    where = tmp_path_factory.mktemp("js-client")
    (where / "package.json").write_text('{"type": "module", "private": true}')
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", JS_CLIENT], cwd=where, check=True, timeout=300
    )
    return where


def test_the_javascript_client(live_server, js_client):
    (js_client / "check.mjs").write_text(JS_SCRIPT)
    out = subprocess.run(
        ["node", "check.mjs", live_server.url + "/v1"], cwd=js_client, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == result["streamed"] == result["chat"]
    assert result["kinds"][0] == "response.created" and result["kinds"][-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert result["error"]["status"] == 400 and "not stored" in result["error"]["message"]
