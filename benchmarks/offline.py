"""The offline benchmark: llava-mlx, mlx-vlm and transformers on one image, one request at a time.

Each (implementation, case) runs in its own worker process (worker.py); the roofline worker
measures what decode could reach on the same MLX backend. Returns the suite's record for
report.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import (
    QUESTION,
    checkpoint_dir,
    decode_bytes_per_token,
    make_image,
    model_config,
    tensor_specs,
    weight_bytes,
)
from .report import fmt, mb
from .worker import run_worker

IMPLS = ("llava-mlx", "mlx-vlm", "transformers")


@dataclass
class Case:
    name: str
    family: str  # llava-1.5 | llava-1.6
    image_size: tuple  # (W, H)
    prompt: str
    reference_positions: int  # image positions in the original LLaVA code


CASES = [
    Case("LLaVA-1.5, one 640x480 image", "llava-1.5", (640, 480), f"USER: <image>\n{QUESTION} ASSISTANT:", 576),
    Case(
        "LLaVA-1.6, one 1000x600 image (5 crops)", "llava-1.6", (1000, 600), f"[INST] <image>\n{QUESTION} [/INST]", 1948
    ),
]


def cases_meta(families, shape: str, dtype: str) -> dict:
    """Config, weight bytes and decoder bytes per token of each case's checkpoint."""
    meta = {}
    for c in CASES:
        if c.family in families:
            cfg = model_config(c.family, shape, dtype)
            meta[c.family] = dict(
                cfg=cfg, weight_bytes=weight_bytes(cfg, dtype), decode_bytes=decode_bytes_per_token(cfg, dtype)
            )
    return meta


def run(a, root: Path, impls: list) -> dict:
    """Measure every implementation on every selected case; the suite's record."""
    cases = [c for c in CASES if c.family in a.cases]
    meta = cases_meta(a.cases, a.shape, a.dtype)
    tok_dir, ckpts, images = None, {}, {}
    for i, c in enumerate(cases):
        ckpts[c.family] = checkpoint_dir(root, c.family, a.shape, a.dtype, tokenizer_src=tok_dir)
        tok_dir = tok_dir or ckpts[c.family]
        images[c.family] = (
            str(make_image(c.image_size, 100 + i, root / f"{c.family}.png")),
            str(make_image(c.image_size, 200 + i, root / f"{c.family}-warm.png")),
        )
    roof = {}
    for c in cases:
        m = meta[c.family]
        r = run_worker(
            [
                "roofline",
                "--dtype",
                a.dtype,
                "--bytes",
                str(m["decode_bytes"]),
                "--hidden",
                str(m["cfg"]["text_config"]["hidden_size"]),
            ],
            blas=a.blas,
        )
        roof[c.family] = r
        print(
            f"roofline {c.family}: {r.get('bandwidth', 0) / 1e9:.2f} GB/s ({r.get('form', r.get('error'))})", flush=True
        )
    results = {}
    for c in cases:
        for impl in impls:
            print(f"running {impl} on {c.name} ...", flush=True)
            r = run_worker(
                [
                    impl,
                    "--ckpt",
                    str(ckpts[c.family]),
                    "--image",
                    images[c.family][0],
                    "--warm-image",
                    images[c.family][1],
                    "--prompt",
                    c.prompt,
                    "--tokens",
                    str(a.tokens),
                    "--dtype",
                    a.dtype,
                    "--repeats",
                    str(a.repeats),
                ],
                blas=a.blas,
            )
            results[f"{c.family}|{impl}"] = r
            if "error" in r:
                print(f"  {impl}: ERROR {r['error']}", flush=True)
            else:
                print(
                    f"  {impl}: load {r['load_time']:.2f}s encode {fmt(r.get('encode_time'), '.3f')}s "
                    f"ttft {r['ttft']:.3f}s decode {r['decode_tps']:.1f} tok/s peak {mb(r.get('peak_memory'))} "
                    f"image positions {r.get('image_positions')} (wall {r['wall']:.0f}s)",
                    flush=True,
                )
    settings = dict(
        shape=a.shape,
        dtype=a.dtype,
        tokens=a.tokens,
        impls=impls,
        repeats=a.repeats,
        cases=[c.family for c in cases],
        blas=a.blas,
    )
    return dict(settings=settings, roofline=roof, results=results)


def describe(a) -> None:
    """--dry-run: shapes and sizes of the checkpoints the offline suite would build."""
    for family, m in cases_meta(a.cases, a.shape, a.dtype).items():
        print(
            f"{family}: {len(tensor_specs(m['cfg']))} tensors, weights {mb(m['weight_bytes'])}, "
            f"decoder bytes/token {mb(m['decode_bytes'])}",
            flush=True,
        )
