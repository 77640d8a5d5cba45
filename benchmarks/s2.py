"""The S2 benchmark: what one LLaVA-1.5-S2 picture costs to encode (the tower at 336, 672 and
1008: 14 tiles through CLIP in one batch, merged, pooled, concatenated, projected) against one
plain LLaVA-1.5 picture (one 336 crop), on the released tower (CLIP ViT-L/14-336, the 23 layers
LLaVA runs) and a 7B's projector (to 4096), random weights. Each (picture kind, run) is its own
process, so that MLX's peak memory is the encode's alone.

    python bench.py --suite s2 [--dtype float16] [--blas ...]
    python -m benchmarks.s2 plain|s2 DTYPE REPEATS     (one worker: prints a JSON line)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from .checkpoints import ROOT
from .report import machine_rows
from .worker import child_env

KINDS = ("plain", "s2")
REPEATS = 2  # one S2 encode is minutes on a 2-core CPU
TEXT_WIDTH = 4096  # a 7B decoder's (Vicuna-7B)


def encoder(kind: str, dtype: str):
    """(tower, projector) as load() builds them for LLaVA-1.5 (kind 'plain') or LLaVA-1.5-S2."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from llava_mlx.projector import Projector
    from llava_mlx.s2 import S2Config, S2Tower
    from llava_mlx.vision import VisionConfig, VisionTower

    config = S2Config() if kind == "s2" else VisionConfig()  # CLIP ViT-L/14-336; S2 at 336,672,1008
    tower = (S2Tower if kind == "s2" else VisionTower)(config, -2)
    projector = Projector("mlp2x_gelu", config.feature_width, TEXT_WIDTH, True)
    for module in (tower, projector):
        module.update(tree_map(lambda p: p.astype(getattr(mx, dtype)), module.parameters()))
    return tower, projector, config


def worker(kind: str, dtype: str, repeats: int) -> dict:
    import mlx.core as mx

    tower, projector, config = encoder(kind, dtype)
    mx.eval(tower.parameters(), projector.parameters())
    side = config.input_size if kind == "s2" else config.image_size
    pixels = mx.random.normal((1, side, side, 3))
    weights = mx.get_peak_memory()
    mx.reset_peak_memory()
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        tic = time.perf_counter()
        features = tower(pixels)
        features = projector(features[:, 1:] if kind == "plain" else features)  # plain: 'patch' drops CLS
        mx.eval(features)
        times.append(time.perf_counter() - tic)
    return dict(
        seconds=min(times[1:]),
        peak_gb=mx.get_peak_memory() / 1e9,
        weights_gb=weights / 1e9,
        positions=features.shape[1],
        tower_passes=sum((s // config.s2_scales[0]) ** 2 for s in config.s2_scales) if kind == "s2" else 1,
    )


def run(a, root) -> dict:
    results = {}
    for kind in KINDS:
        command = [sys.executable, "-m", "benchmarks.s2", kind, a.dtype, str(REPEATS)]
        print(" ".join(command), flush=True)
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=child_env(a.blas), timeout=3600)
        if proc.returncode != 0:
            results[kind] = dict(error=(proc.stderr.strip().splitlines() or ["no output"])[-1][:200])
        else:
            results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {results[kind]}", flush=True)
    return dict(settings=dict(dtype=a.dtype, blas=a.blas, repeats=REPEATS), results=results)


def section(record: dict) -> list:
    st, r = record["settings"], record["results"]
    L = ["## S2: one LLaVA-1.5-S2 picture against one LLaVA-1.5 picture\n"]
    L += machine_rows(record)
    L += [
        "",
        "The encode of one picture, tower and projector: CLIP ViT-L/14-336 (the 23 layers LLaVA runs), random "
        f"weights in {st['dtype']}, the projector to a 7B's 4096. S2 runs the tower on every tile of its three "
        "scales (336, 672, 1008) in one batch, then merges, pools and concatenates them (s2.py). Best of "
        f"{st['repeats']} after a warm-up, each kind in its own process; peak is MLX's peak memory during the "
        "encodes, the weights (shown apart) included.\n",
        "| picture | tower passes | positions | encode s | peak GB (weights GB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, name in (("plain", "LLaVA-1.5 (336)"), ("s2", "LLaVA-1.5-S2 (336, 672, 1008)")):
        x = r.get(kind, {})
        if "error" in x:
            L.append(f"| {name} | could not run: {x['error']} | | | |")
            continue
        L.append(
            f"| {name} | {x['tower_passes']} | {x['positions']} | {x['seconds']:.2f} | "
            f"{x['peak_gb']:.2f} ({x['weights_gb']:.2f}) |"
        )
    if all("seconds" in r.get(k, {}) for k in KINDS):
        ratio = r["s2"]["seconds"] / r["plain"]["seconds"]
        L.append(
            f"\nOne S2 picture takes {ratio:.1f}× the time of a plain one ({r['s2']['tower_passes']} tower passes).\n"
        )
    return L


if __name__ == "__main__":
    kind, dtype, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(worker(kind, dtype, repeats)))
