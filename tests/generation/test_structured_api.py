"""Structured outputs in the Python API and the CLI: a schema (OpenAI's response_format or
the schema itself) holds the answer; bad schemas are one clear error, before any work."""

import json

import jsonschema
import pytest

from llava_mlx import LlavaError, generate, stream_generate
from llava_mlx.cli.generate import main
from llava_mlx.constrain import allowed, schema_of

from conftest import SERVER_MODEL
from helpers import expect_error, run_cli
from schemas import SCHEMAS, as_format

MODEL = SERVER_MODEL


def test_the_bitmask_is_read_lowest_bit_first():
    import numpy as np

    words = np.array([[0b1011, 1 << 31, 0]], dtype=np.uint32).view(np.int32)
    row = np.asarray(allowed(words, 70))[0]
    assert row.shape == (70,) and np.flatnonzero(row).tolist() == [0, 1, 3, 63]


def test_response_format_shapes():
    schema = SCHEMAS["enum"]
    assert schema_of(None) is None and schema_of({"type": "text"}) is None
    assert schema_of({"type": "json_object"}) == {"type": "object"}
    assert schema_of(as_format(schema)) == schema
    assert schema_of(schema, bare_schema=True) == schema
    with pytest.raises(LlavaError, match="type 'object' is not one of"):
        schema_of(schema)  # a bare schema is the API's shorthand, not OpenAI's response_format


@pytest.mark.parametrize("name", ["nested objects", "anyOf with null", "top-level array"])
def test_generate_and_stream_generate_keep_to_the_schema(loaded, images, name):
    model, processor = loaded(MODEL)
    schema = SCHEMAS[name]
    for fmt in (schema, as_format(schema)):
        r = generate(model, processor, "As JSON, please.", [images["wide"]], max_tokens=120, response_format=fmt)
        jsonschema.validate(json.loads(r.text), schema)
        assert r.finish_reason == "stop"
    pieces = list(
        stream_generate(
            model,
            processor,
            "As JSON, please.",
            [images["wide"]],
            max_tokens=120,
            response_format=schema,
            temperature=0.8,
            seed=2,
        )
    )
    jsonschema.validate(json.loads("".join(p.text for p in pieces)), schema)
    free = generate(model, processor, "As JSON, please.", [images["wide"]], max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)  # without the mask the fixture writes no JSON


@pytest.mark.parametrize(
    "fmt, fragment",
    [
        ({"type": "json_schema"}, "needs a 'json_schema' object"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
        ({"type": "xml"}, "not a valid JSON schema"),  # not a format type: taken as a schema, and not one
        ("json", "must be an object"),
        ({"type": "object", "properties": {"a": {"minimum": "x"}}}, "not a valid JSON schema at properties/a/minimum"),
        ({"not": {"type": "string"}}, "cannot be enforced"),
    ],
)
def test_bad_schemas_are_clear_errors(loaded, fmt, fragment):
    model, processor = loaded(MODEL)
    with pytest.raises(LlavaError, match=fragment):
        generate(model, processor, "hi", max_tokens=4, response_format=fmt)


def test_cli_json_schema_and_json(checkpoints, images, tmp_path, capsys):
    schema = SCHEMAS["array of objects"]
    (tmp_path / "shelf.json").write_text(json.dumps(schema))
    model = ["--model", str(checkpoints[MODEL]), "--image", str(images["square"]), "--max-tokens", "120"]
    result = run_cli(*model, "--prompt", "The shelf as JSON.", "--json-schema", str(tmp_path / "shelf.json"))
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)
    result = run_cli(*model, "--max-tokens", "12", "--prompt", "As JSON.", "--json")
    assert result.returncode == 0 and result.stdout.startswith("{")

    (tmp_path / "bad.json").write_text('{"type": "object", "properties": {"a": 5}}')
    (tmp_path / "broken.json").write_text("{not json")
    expect_error(capsys, main, model + ["--json-schema", str(tmp_path / "bad.json")], "not a valid JSON schema")
    expect_error(capsys, main, model + ["--json-schema", str(tmp_path / "broken.json")], "is not JSON")
    expect_error(capsys, main, model + ["--json-schema", str(tmp_path / "missing.json")], "cannot read the JSON schema")
