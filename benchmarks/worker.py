"""One measured run of one implementation, in its own process.

    python -m benchmarks.worker IMPL --ckpt DIR --image A.png --warm-image B.png --prompt P --tokens N

Each (implementation, case) runs in a fresh subprocess so that load time, peak memory and
caches are not shared; the worker prints one `RESULT {json}` line. The implementations live
in worker_llava_mlx.py, worker_mlx_vlm.py, worker_transformers.py and roofline.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENS = 128
DEFAULT_REPEATS = 2  # measured runs per (implementation, case), after one warm-up; best of
MODULES = {
    "llava-mlx": "worker_llava_mlx",
    "mlx-vlm": "worker_mlx_vlm",
    "transformers": "worker_transformers",
    "roofline": "roofline",
}


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def timeline_stats(ttft, t_tokens, t0):
    n = len(t_tokens)
    decode_tps = (n - 1) / (t_tokens[-1] - t_tokens[0]) if n > 1 else float("nan")
    return dict(ttft=ttft, decode_tps=decode_tps, generated=n, total_time=t_tokens[-1] - t0)


def best(runs: list) -> dict:
    """Combine repeated measured runs: fastest times, highest rates, highest peak memory."""
    out = dict(runs[-1])
    for k, pick in (
        ("ttft", min),
        ("encode_time", min),
        ("total_time", min),
        ("decode_tps", max),
        ("own_decode_tps", max),
        ("own_prompt_tps", max),
        ("peak_memory", max),
    ):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = pick(vals)
    out["runs"] = len(runs)
    out["all_runs"] = {k: [r.get(k) for r in runs] for k in ("ttft", "encode_time", "decode_tps", "peak_memory")}
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("impl", choices=sorted(MODULES))
    p.add_argument("--ckpt")
    p.add_argument("--image")
    p.add_argument("--warm-image")
    p.add_argument("--prompt")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bytes", type=int, default=0)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    if a.repeats is None:
        a.repeats = 30 if a.impl == "roofline" else DEFAULT_REPEATS
    module = importlib.import_module(f"benchmarks.{MODULES[a.impl]}")
    res = module.run(a)
    print("RESULT " + json.dumps(res), flush=True)


def child_env(blas: str | None = None, **extra) -> dict:
    """The environment of a measured process: this one's, this checkout first on the path, and `blas`
    preloaded when given (only MLX processes get it: MLX's Linux wheel multiplies with the reference
    BLAS it bundles, while PyTorch's wheel brings MKL, whose sgemm_ a preload would replace)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra)
    if blas:
        env["LD_PRELOAD"] = " ".join(filter(None, [blas, os.environ.get("LD_PRELOAD")]))
    return env


def run_worker(args: list, timeout: float = 3600, blas: str | None = None) -> dict:
    """Run `python -m benchmarks.worker ARGS` with this interpreter; its result, or {"error": ...}."""
    env = child_env(blas if args[0] != "transformers" else None)
    cmd = [sys.executable, "-m", "benchmarks.worker", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": " | ".join(tail)[-600:] or f"exit code {proc.returncode}", "wall": wall}


if __name__ == "__main__":
    main()
