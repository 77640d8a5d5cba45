"""The structured-output benchmark: what a JSON schema costs per generated token, and to compile.

Decode: this project's server answers the same requests (text questions, greedy, `--tokens`
new tokens, the prompt cache off so that neither kind reuses the other's KV) without and with
a schema, at 1 and 8 concurrent clients. The schema asks for more numbers than `--tokens` can
hold, so both kinds of answer stop at the same length and their tokens per second compare
like for like; with a picture's admission out of the way, the decode is what is measured.
Compile: llguidance's view of the checkpoint's vocabulary, then a nested schema's first
compile and its cached copy, in-process.
"""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoints import QUESTION, checkpoint_dir
from .load import run_level, user_turn
from .report import fmt, machine_rows, target_row
from .servers import Server, command, free_port

LEVELS = (1, 8)
REQUESTS = {1: 6, 8: 24}
TARGET = 0.10  # decode with a schema within 10% of without, at 8 clients
LONG_ANSWER = {  # more numbers than any --tokens: every answer runs to its length
    "type": "object",
    "properties": {"readings": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
    "required": ["readings"],
    "additionalProperties": False,
}
LONG_ANSWER["properties"]["readings"].update(minItems=400, maxItems=400)


def _item(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


NESTED = {  # a receipt as an app would ask for one: nested objects, arrays, enums, anyOf, patterns, $refs
    "$defs": {
        "money": _item(amount={"type": "number", "minimum": 0}, currency={"enum": ["USD", "EUR", "GBP", "JPY"]}),
        "line": _item(
            name={"type": "string", "maxLength": 40},
            quantity={"type": "integer", "minimum": 1, "maximum": 99},
            price={"$ref": "#/$defs/money"},
            category={"enum": ["food", "drink", "household", "other"]},
        ),
    },
    **_item(
        shop=_item(
            name={"type": "string", "maxLength": 60},
            address={"anyOf": [{"type": "string", "maxLength": 120}, {"type": "null"}]},
            phone={"anyOf": [{"type": "string", "pattern": r"^\+?[0-9 ()-]{6,20}$"}, {"type": "null"}]},
        ),
        date={"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        lines={"type": "array", "items": {"$ref": "#/$defs/line"}, "minItems": 1, "maxItems": 50},
        total={"$ref": "#/$defs/money"},
        paid={"enum": ["cash", "card", "other"]},
        signed={"type": "boolean"},
    ),
}


def schema_format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}


def compile_times(ckpt: Path) -> dict:
    """Seconds: the tokenizer's conversion, a nested schema's first compile, a cached copy."""
    from llava_mlx import load
    from llava_mlx.constrain import Grammars

    model, processor = load(str(ckpt))
    rows = model.config.text_config["vocab_size"]
    t0 = time.perf_counter()
    grammars = Grammars(processor.tokenizer, rows)
    t1 = time.perf_counter()
    grammars.matcher(NESTED)
    t2 = time.perf_counter()
    copies = 20
    for _ in range(copies):
        grammars.matcher(NESTED)
    t3 = time.perf_counter()
    return dict(vocabulary=rows, tokenizer=t1 - t0, first_compile=t2 - t1, cached=(t3 - t2) / copies)


def run(a, root: Path) -> dict:
    ckpt = checkpoint_dir(root, a.serve_family, a.shape, a.dtype)
    compiled = compile_times(ckpt)
    print(
        f"compile: tokenizer {compiled['tokenizer']:.3f}s, nested schema {compiled['first_compile']:.3f}s, "
        f"cached {compiled['cached'] * 1e6:.0f}us",
        flush=True,
    )
    cmd = command("llava-mlx", ckpt, free_port(), Path(a.server_script) if a.server_script else None)
    cmd += ["--prompt-cache-bytes", "0"]
    levels = {}
    with Server("llava-mlx", cmd, root / "constrained-server.log", blas=a.blas) as s:
        for extra in (None, schema_format(LONG_ANSWER)):  # warm-up: both paths, and the schema compiled
            run_level(s.base_url, s.model_id, [[user_turn(None, QUESTION)]], 1, 8, 60, a.request_timeout, extra)
        for clients in LEVELS:
            requests = [[user_turn(None, f"{QUESTION} (question {i})")] for i in range(REQUESTS[clients])]
            row = {}
            for kind, extra in (("free", None), ("schema", schema_format(LONG_ANSWER))):
                r = run_level(
                    s.base_url, s.model_id, requests, clients, a.tokens, a.level_time, a.request_timeout, extra
                )
                row[kind] = {k: v for k, v in r.items() if k != "replies"}
                print(
                    f"  {clients} client(s), {kind}: {r['answered']}/{r['requests']} answered, decode p50 "
                    f"{r['decode_tps_p50'] or 0:.1f} tok/s per request, {r['aggregate_tps'] or 0:.1f} tok/s aggregate",
                    flush=True,
                )
            levels[str(clients)] = row
    settings = dict(family=a.serve_family, shape=a.shape, dtype=a.dtype, tokens=a.tokens, blas=a.blas)
    return dict(settings=settings, compile=compiled, levels=levels, long_answer=LONG_ANSWER, nested=NESTED)


def section(record: dict) -> list:
    s, c = record["settings"], record["compile"]
    L = ["## Structured outputs: the cost of a JSON schema\n"]
    L += machine_rows(record)
    L += [
        "",
        f"This project's server, {s['family']} shape **{s['shape']}** {s['dtype']}, greedy, {s['tokens']} new tokens, "
        "text questions (the decode is what is measured; the prompt cache off), the same requests without and with "
        "a schema whose answer is longer than the token budget (so both run to the same length). Decode tok/s per "
        "request is measured from its first token to its last; aggregate is every token over the level's wall time.\n",
        "| clients | decode tok/s per request, free | with a schema | ratio | aggregate tok/s, free | with a schema "
        "| ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients, row in record["levels"].items():
        free, schema = row["free"], row["schema"]
        per = (schema["decode_tps_p50"] or 0) / free["decode_tps_p50"] if free["decode_tps_p50"] else None
        agg = (schema["aggregate_tps"] or 0) / free["aggregate_tps"] if free["aggregate_tps"] else None
        L.append(
            f"| {clients} | {fmt(free['decode_tps_p50'], '.1f')} | {fmt(schema['decode_tps_p50'], '.1f')} "
            f"| {fmt(per, '.2f', '×')} | {fmt(free['aggregate_tps'], '.1f')} | {fmt(schema['aggregate_tps'], '.1f')} "
            f"| {fmt(agg, '.2f', '×')} |"
        )
    L += [
        "",
        f"Compile (in-process, vocabulary of {c['vocabulary']:,} rows): llguidance's view of the tokenizer "
        f"{c['tokenizer'] * 1e3:.0f} ms once per model; a nested receipt schema (objects in arrays, `$ref`, `anyOf`, "
        f"patterns, enums) {c['first_compile'] * 1e3:.1f} ms on its first request; {c['cached'] * 1e6:.0f} µs "
        "for each request after (a copy of the compiled matcher).\n",
    ]
    eight = record["levels"].get("8")
    if eight and eight["free"]["decode_tps_p50"]:
        ratio = (eight["schema"]["decode_tps_p50"] or 0) / eight["free"]["decode_tps_p50"]
        row, _ = target_row(
            "decode with a schema within 10% of without, 8 clients",
            f"{ratio:.2f}× of free",
            ratio >= 1 - TARGET,
            f"{(ratio - (1 - TARGET)) * 100:+.0f} points",
        )
        L += ["| target | measured | met | margin |", "|---|---|---|---|", row, ""]
    return L
