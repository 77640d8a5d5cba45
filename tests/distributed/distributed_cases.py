"""Run by test_distributed.py under `mlx.launch -n 2`: every case of a plan on this rank.

    mlx.launch -n 2 --backend ring -- python tests/distributed/distributed_cases.py PLAN.json OUTDIR

A case loads a checkpoint sharded (tensor or pipeline parallel), computes the logits of the
whole merged sequence of a raw prompt with one image, greedy-generates 16 tokens and
measures the bytes this rank holds. Each rank writes OUTDIR/rank<r>.json, and rank 0 the
logits as OUTDIR/<case>.npy. Nothing is printed to stdout.
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from llava_mlx import generate, load
from llava_mlx.cache import SessionCache
from llava_mlx.distributed.group import group_of
from llava_mlx.distributed.share import shared_features
from llava_mlx.processor import load_image


def held_bytes(model, prefix: str) -> int:
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith(prefix))


def run(case: dict, out: Path, rank: int) -> dict:
    model, processor = load(case["model"], pipeline=case["mode"] == "pipeline")
    group = group_of(model)
    ids = processor.encode_prompt(case["raw_prompt"], len(case["images"]))
    images = [load_image(path) for path in case["images"]]
    _, features = shared_features(model, lambda: SessionCache().image_features(model, processor, images))
    logits = model(mx.array(ids), image_features=features)[0].astype(mx.float32)
    mx.eval(logits)
    if rank == 0:
        np.save(out / f"{case['name']}.npy", np.array(logits))
    result = generate(model, processor, case["question"], images=case["images"], max_tokens=16, ignore_eos=True)
    return dict(
        size=group.size(),
        mode=model.sharding.mode,
        tokens=result.tokens,
        text=result.text,
        layer_bytes=held_bytes(model, "language_model.model.layers."),
        vision_bytes=held_bytes(model, "vision_tower.") + held_bytes(model, "multi_modal_projector."),
        peak_memory=result.peak_memory,
    )


def main(plan_path: str, out_dir: str):
    out = Path(out_dir)
    plan = json.loads(Path(plan_path).read_text())
    rank = int(os.environ["MLX_RANK"])
    results = {case["name"]: run(case, out, rank) for case in plan}
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
