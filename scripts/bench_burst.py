"""A burst: N streamed requests sent at the same moment, each with a picture of its own, to a
server this script starts; prints each round's times to first token, sorted, and when the
last answer ended. What a chat front-end sees when several users ask at once (bench.py's
serving suite measures closed-loop clients instead).

    python scripts/bench_burst.py --model /tmp/bench-ckpt/llava-1.6-small-float32 \
        [--server-script server.py] [--blas /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3]

The checkpoint: `python bench.py --suite serving --keep DIR --build-only` builds bench.py's.
"""

import argparse
import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from openai import OpenAI
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(1000, 600), (336, 336), (800, 1200), (640, 480), (1280, 720), (480, 640), (900, 500), (500, 900)]


def picture(seed: int, size) -> str:
    """A JPEG data URI of random pixels: every request's picture differs (no feature-cache hits)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def start(script: str, model: str, blas) -> tuple:
    env = {**os.environ, **({"LD_PRELOAD": blas} if blas else {})}
    proc = subprocess.Popen(
        [sys.executable, script, "--model", model, "--port", "0"], stderr=subprocess.PIPE, text=True, env=env
    )
    for line in proc.stderr:
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if found:  # read the rest of its log, or a full pipe would stall the server
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(found.group(1))
    raise SystemExit(f"error: {script} exited with {proc.wait()} before serving")


def ask(client, url: str, tokens: int, sent: float) -> tuple:
    """(time to first token, time to the end), from `sent`."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Describe this image in detail."},
            ],
        }
    ]
    first = None
    for chunk in client.chat.completions.create(model="llava", messages=messages, max_tokens=tokens, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - sent
    return first, time.monotonic() - sent


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--server-script", default=str(ROOT / "server.py"))
    p.add_argument("--blas", default=None, help="a BLAS library to preload into the server (Linux)")
    p.add_argument("--clients", type=int, default=len(SIZES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    proc, port = start(args.server_script, args.model, args.blas)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        ask(client, picture(999_999, SIZES[0]), args.tokens, time.monotonic())  # warm-up
        for round_ in range(args.rounds):
            urls = [picture(round_ * 1000 + i, SIZES[i % len(SIZES)]) for i in range(args.clients)]
            sent = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(lambda url: ask(client, url, args.tokens, sent), urls))
            firsts = " ".join(f"{first:.2f}" for first, _ in sorted(results))
            print(
                f"round {round_}: TTFT sorted {firsts} s; last answer ended {max(end for _, end in results):.2f} s",
                flush=True,
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
