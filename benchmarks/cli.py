"""Benchmark llava-mlx against mlx-vlm and transformers on synthetic checkpoints.

    python bench.py                                   # both suites: offline, then serving
    python bench.py --suite offline                   # llava-mlx, mlx-vlm, transformers; one request at a time
    python bench.py --suite serving --clients 1,4,8   # this project's server vs mlx-vlm's, concurrent clients
    python bench.py --suite constrained               # a JSON schema's cost per token (1 and 8 clients), compile time
    python bench.py --suite admission --baseline-script OLD/server.py  # pauses while a newcomer is admitted
    python bench.py --suite train                     # fine-tuning against mlx-vlm's trainer
    python bench.py --suite s2                        # one LLaVA-1.5-S2 picture's encode against a plain one
    python bench.py --shape 7b --dtype float16        # real LLaVA-1.5-7B / 1.6-Mistral-7B shapes (Apple silicon)

Nothing is downloaded: random-weight checkpoints in the llava-hf layout are written to a
temporary directory (or --keep DIR). Every implementation and server runs in its own process.
Set up the peers with scripts/setup_bench.sh. Writes OUT/benchmarks.md, benchmarks.json and
the charts; running one suite keeps the other suite's last figures on the page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("TRANSFORMERS_VERBOSITY", "error"),
):
    os.environ.setdefault(_k, _v)

from . import admission, constrained, offline, report, report_offline, report_serving, s2, serving, train  # noqa: E402  (after the environment above)
from .checkpoints import DTYPE_BYTES, SHAPES, checkpoint_dir  # noqa: E402
from .servers import SERVERS  # noqa: E402
from .worker import DEFAULT_REPEATS, DEFAULT_TOKENS  # noqa: E402

SUITES = ("offline", "serving", "constrained", "admission", "train", "s2")
# Each suite's page section, in the page's order.
RENDERERS = {
    "offline": report_offline,
    "serving": report_serving,
    "constrained": constrained,
    "admission": admission,
    "train": train,
    "s2": s2,
}


def csv(kind):
    return lambda s: [kind(x.strip()) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--suite", choices=SUITES + ("all",), default="all")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="new tokens per request")
    p.add_argument("--out", default="docs", help="directory for benchmarks.md / .json and the charts")
    p.add_argument("--keep", default=None, help="build checkpoints here and keep them (default: temp dir)")
    p.add_argument("--build-only", action="store_true", help="only build the checkpoints (use with --keep)")
    p.add_argument("--dry-run", action="store_true", help="print shapes and sizes, write nothing")
    p.add_argument(
        "--blas",
        default=None,
        help="a BLAS library to preload into every MLX process (Linux: "
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3); transformers keeps PyTorch's MKL",
    )
    g = p.add_argument_group("offline suite")
    g.add_argument("--peers", default="mlx-vlm,transformers", help="comma-separated: mlx-vlm,transformers (or 'none')")
    g.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="measured runs per case (best of)")
    g.add_argument("--cases", type=csv(str), default=["llava-1.5", "llava-1.6"])
    g.add_argument("--no-ours", action="store_true", help="skip llava-mlx (peers only)")
    g = p.add_argument_group("serving suite")
    g.add_argument("--servers", type=csv(str), default=list(SERVERS), help="comma-separated: " + ",".join(SERVERS))
    g.add_argument("--server-script", default=None, help="this project's server.py (default: the one beside bench.py)")
    g.add_argument("--serve-family", choices=["llava-1.5", "llava-1.6"], default="llava-1.6")
    g.add_argument("--clients", type=csv(int), default=[1, 4, 8], help="concurrency levels")
    g.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    g.add_argument("--chats", type=int, default=3, help="two-turn chats for the cached second turn")
    g.add_argument("--level-time", type=float, default=600, help="no request starts later than this into a level, s")
    g.add_argument("--request-timeout", type=float, default=120, help="client timeout per request, s")
    g = p.add_argument_group("admission suite")
    g.add_argument("--baseline-script", default=None, help="an earlier server.py to measure in the same run (before)")
    a = p.parse_args(argv)
    unknown = sorted(set(a.servers) - set(SERVERS))
    if unknown:
        p.error(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(SERVERS)}")
    if a.blas and not Path(a.blas).is_file():
        p.error(f"--blas {a.blas}: no such file")
    if a.requests < 1 or a.chats < 0 or not a.clients or min(a.clients) < 1:
        p.error("--requests and every --clients level must be at least 1, --chats at least 0")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    suites = SUITES if a.suite == "all" else (a.suite,)
    peers = [] if a.peers in ("", "none") else [x.strip() for x in a.peers.split(",") if x.strip()]
    impls = ([] if a.no_ours else ["llava-mlx"]) + [x for x in offline.IMPLS[1:] if x in peers]
    if a.dry_run:
        offline.describe(a)
        return
    if a.shape == "7b" and a.dtype == "float32":
        print("warning: 7b in float32 needs ~28 GB per checkpoint", flush=True)
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="llava-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    command = "python bench.py " + " ".join(argv)
    out = Path(a.out)
    try:
        if a.build_only:
            t = time.perf_counter()
            tok = None
            for family in sorted(set(a.cases) | {a.serve_family}):
                d = checkpoint_dir(root, family, a.shape, a.dtype, tokenizer_src=tok)
                tok = tok or d
            print(f"checkpoints built in {time.perf_counter() - t:.1f}s under {root}", flush=True)
            return
        if "offline" in suites:
            offline.describe(a)
            record = report.stamp(offline.run(a, root, impls), command)
            page = report.write(out, "offline", record, RENDERERS)
            meta = offline.cases_meta(a.cases, a.shape, a.dtype)
            results = {tuple(k.split("|")): v for k, v in record["results"].items()}
            from .report_offline import evaluate_targets

            print("\n".join(evaluate_targets(record["settings"], results, record["roofline"], meta)[1]))
            print(f"wrote {page} and {out / 'benchmark.png'}", flush=True)
        if "serving" in suites:
            record = report.stamp(serving.run(a, root), command)
            page = report.write(out, "serving", record, RENDERERS)
            from .report_serving import evaluate_targets

            print("\n".join(evaluate_targets(record)[1]))
            print(f"wrote {page} and {out / 'benchmark-serving.png'}", flush=True)
        if "admission" in suites:
            record = report.stamp(admission.run(a, root), command)
            print(f"wrote {report.write(out, 'admission', record, RENDERERS)}", flush=True)
        if "constrained" in suites:
            record = report.stamp(constrained.run(a, root), command)
            print(f"wrote {report.write(out, 'constrained', record, RENDERERS)}", flush=True)
        if "train" in suites:
            record = report.stamp(train.run(a, root), command)
            print(f"wrote {report.write(out, 'train', record, RENDERERS)}", flush=True)
        if "s2" in suites:
            record = report.stamp(s2.run(a, root), command)
            print(f"wrote {report.write(out, 's2', record, RENDERERS)}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
