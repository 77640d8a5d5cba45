"""Structured outputs: answers held to a JSON schema by llguidance's token masks.

`response_format` is OpenAI's: {"type": "text"}, {"type": "json_object"} or {"type":
"json_schema", "json_schema": {"name", "schema", "strict"}}; the Python API also takes a
JSON schema itself. The schema is checked against its meta-schema (jsonschema) and compiled
by llguidance (the JSON-schema engine of llama.cpp and vLLM, no dependencies) once per
schema and tokenizer; each answer gets a copy of the compiled matcher. Before every
sampling step the matcher's mask sets the logits of the tokens the schema cannot take next
to -inf, on the MLX side, whatever the sampler does after. The JSON is compact (no
whitespace between tokens), so an object whose size is bounded ends with its last brace and
the end-of-turn token: finish_reason "stop".
"""

import dataclasses
import functools
import json
import threading
from collections import OrderedDict
from typing import Optional

import mlx.core as mx
import numpy as np

from .errors import LlavaError, LlavaValueError
from .token_bytes import TokenTable, token_table

COMPILED_SCHEMAS = 64  # compiled matchers kept per tokenizer, least recently used dropped
# Compact JSON: the answer cannot pad itself with whitespace until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


FORMAT_TYPES = ("text", "json_object", "json_schema")


def schema_of(response_format, bare_schema: bool = False, name: str = "response_format") -> Optional[dict]:
    """The JSON schema a response_format asks for; None for free text. With `bare_schema`
    (the Python API), a JSON schema itself is taken too. Raises LlavaValueError naming what
    is wrong (`name`: what the caller calls the field)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise LlavaValueError(f"{name} must be an object")
    kind = response_format.get("type")
    if kind not in FORMAT_TYPES:
        if bare_schema:
            return checked_schema(response_format)
        raise LlavaValueError(f"{name} type {kind!r} is not one of {', '.join(FORMAT_TYPES)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise LlavaValueError(f"{name} of type json_schema needs a 'json_schema' object")
    if "schema" not in spec:
        raise LlavaValueError(f"{name} json_schema needs json_schema.schema (the JSON schema)")
    if spec.get("strict") not in (None, True, False):
        raise LlavaValueError(f"{name} json_schema.strict must be true or false")
    return checked_schema(spec["schema"])


def checked_schema(schema) -> dict:
    """`schema` if it is a valid JSON Schema that the engine can enforce (checked once per
    schema: a request that repeats one finds its verdict cached)."""
    if not isinstance(schema, dict):
        raise LlavaValueError("the JSON schema must be an object")
    try:
        grammar_for(schema_key(schema))
    except RecursionError:
        raise LlavaValueError("the JSON schema nests too deeply") from None
    return schema


@functools.lru_cache(maxsize=COMPILED_SCHEMAS)
def grammar_for(key: str) -> str:
    """llguidance's grammar for the schema `key` (schema_key), checked against the JSON Schema
    meta-schema first; LlavaValueError (not cached) for what is invalid or cannot be enforced."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for
    from llguidance import LLMatcher

    schema = json.loads(key)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "the top level"
        raise LlavaValueError(f"not a valid JSON schema at {where}: {e.message}") from None
    grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise LlavaValueError(f"the JSON schema cannot be enforced: {messages[0].splitlines()[0]}")
    return grammar


def schema_key(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


class Grammars:
    """One tokenizer's compiled schemas. Compiling takes from milliseconds to a second for
    deep schemas; copying a compiled matcher takes microseconds. Thread-safe: the server
    compiles in its HTTP threads (llguidance releases the GIL), off the engine thread."""

    def __init__(self, tokenizer, rows: int):
        from llguidance import LLTokenizer, TokenizerWrapper

        self.rows = rows
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        # llguidance reads the vocabulary from our table (token_bytes.py), not from
        # tokenizer.json: it knows only some of the decoders a tokenizer.json may have.
        table = grammar_table(token_table(tokenizer._tokenizer), rows)
        try:
            self.tokenizer = LLTokenizer(TokenizerWrapper(table), eos_token=self.eos_ids)
        except ValueError as e:
            raise LlavaError(f"the grammar engine cannot take this tokenizer's vocabulary: {e}") from None
        self.compiled: "OrderedDict[str, object]" = OrderedDict()
        self.lock = threading.Lock()

    def matcher(self, schema: dict):
        """A fresh matcher for `schema`, compiled once."""
        from llguidance import LLMatcher

        key = schema_key(schema)
        with self.lock:
            compiled = self.compiled.get(key)
            if compiled is not None:
                self.compiled.move_to_end(key)
                return compiled.deep_copy()
        compiled = LLMatcher(self.tokenizer, grammar_for(key), log_level=0)
        if compiled.is_error():
            raise LlavaValueError(f"the JSON schema cannot be enforced: {compiled.get_error().splitlines()[0]}")
        with self.lock:
            self.compiled[key] = compiled
            while len(self.compiled) > COMPILED_SCHEMAS:
                self.compiled.popitem(last=False)
        return compiled.deep_copy()


def grammar_table(table: TokenTable, rows: int) -> TokenTable:
    """The table as llguidance takes it: one entry per row of the decoder's output (the rows
    past the tokenizer spell nothing), and a token that starts with the byte 0xFF (never part
    of UTF-8 text, a byte-fallback piece) spells nothing, 0xFF being llguidance's mark of a
    special token's name."""
    tokens = [b"" if data.startswith(b"\xff") else data for data in table.tokens]
    return dataclasses.replace(table, tokens=tokens + [b""] * (rows - len(tokens)))


def grammars(processor, rows: int) -> Grammars:
    """The processor's `Grammars`, made on first use (building llguidance's view of the
    vocabulary takes a few milliseconds to a second)."""
    with _MAKING:
        made = getattr(processor, "_grammars", None)
        if made is None or made.rows != rows:
            made = processor._grammars = Grammars(processor.tokenizer, rows)
    return made


_MAKING = threading.Lock()


def allowed(bitmask: np.ndarray, rows: int) -> mx.array:
    """llguidance's bitmask (32 tokens per int32, lowest bit first) as a boolean row."""
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:rows]
    return mx.array(bits.astype(bool))[None]


class SchemaProcessor:
    """An mlx-lm logits processor, `(tokens, logits) -> logits`, for one answer.

    Called once per step with the tokens so far: from the second call on, the last of
    them is the token sampled at the step before, which the matcher takes first. The
    step's logits are set computing (`async_eval`) before the mask is, so the decoder and
    llguidance work at the same time.
    """

    def __init__(self, matcher, rows: int):
        self.matcher, self.rows = matcher, rows
        self.started = False
        self.bitmask = np.full((1, (rows + 31) // 32), -1, dtype=np.int32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            token = tokens[-1].item()
            if not self.matcher.consume_token(token):
                raise LlavaError(f"the answer left its JSON schema at token {token}: {self.matcher.get_error()}")
        self.started = True
        mx.async_eval(logits)
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        return mx.where(allowed(self.bitmask, logits.shape[-1]), logits, -mx.inf)


def schema_processor(processor, rows: int, schema: Optional[dict]) -> Optional[SchemaProcessor]:
    """The logits processor holding an answer to `schema`; None for free text."""
    if schema is None:
        return None
    return SchemaProcessor(grammars(processor, rows).matcher(schema), rows)
