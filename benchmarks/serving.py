"""The serving benchmark: this project's server against mlx-vlm's, under 1, 4 and 8 concurrent clients.

For each server in turn, on the same checkpoint and pictures: start it on a free loopback port,
warm it up with two requests, run each concurrency level (the same requests, every picture a
different one and the sizes mixed so that concurrent prompts differ in length), then the cached
second turn, and stop it. Returns the suite's record for report.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoints import QUESTION, checkpoint_dir, make_image
from .load import data_uri, run_level, second_turn, user_turn
from .servers import Server, command, free_port, source

# Mixed sizes: 1 to 5 LLaVA-1.6 crops, landscape and portrait; cycled so that neighbours differ.
IMAGE_SIZES = [(1000, 600), (336, 336), (800, 1200), (640, 480), (1280, 720), (480, 640)]
FOLLOW_UP = "What stands out in the lower half?"
WARMUP_REQUESTS = 2


def pictures(root: Path, n: int, seed0: int) -> list:
    """`n` distinct pictures (no feature cache can hit between them), sizes cycled, as data URIs."""
    out = []
    for i in range(n):
        size = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        path = make_image(size, seed0 + i, root / f"serve-{seed0 + i}-{size[0]}x{size[1]}.png")
        out.append(data_uri(path))
    return out


def workload(root: Path, levels: list, requests: int, chats: int) -> dict:
    """The requests every server gets, identical across servers."""

    def ask(uri):
        return [user_turn(uri, QUESTION)]

    return dict(
        warmup=[ask(u) for u in pictures(root, WARMUP_REQUESTS, 5000)],
        levels={c: [ask(u) for u in pictures(root, requests, 1000 * (k + 1))] for k, c in enumerate(levels)},
        chats=pictures(root, chats, 9000),
    )


def measure_server(name: str, ckpt: Path, work: dict, a, root: Path) -> dict:
    cmd = command(name, ckpt, free_port(), Path(a.server_script) if a.server_script else None)
    print(f"starting {name}: {' '.join(cmd)}", flush=True)
    res = dict(command=" ".join(cmd), levels={})
    with Server(name, cmd, root / f"{name}-server.log", blas=a.blas) as s:
        res["startup_time"] = s.startup_time
        for messages in work["warmup"]:
            r = run_level(s.base_url, s.model_id, [messages], 1, a.tokens, a.level_time, a.request_timeout)
            if r["failed"]:
                print(f"  warm-up request failed: {r['errors']}", flush=True)
        s.peak_rss(reset=True)
        for clients, requests in work["levels"].items():
            r = run_level(s.base_url, s.model_id, requests, clients, a.tokens, a.level_time, a.request_timeout)
            r["peak_rss"] = s.peak_rss(reset=True)
            res["levels"][str(clients)] = r
            print(
                f"  {clients} client(s): {r['answered']}/{r['requests']} answered, "
                f"{r['aggregate_tps'] or 0:.1f} tok/s aggregate, TTFT p50 {r['ttft_p50'] or 0:.2f}s "
                f"p95 {r['ttft_p95'] or 0:.2f}s, wall {r['wall']:.1f}s"
                + (f"; errors: {r['errors'][:2]}" if r["errors"] else ""),
                flush=True,
            )
        if work["chats"]:
            res["second_turn"] = t = second_turn(
                s.base_url, s.model_id, work["chats"], (QUESTION, FOLLOW_UP), a.tokens, a.request_timeout
            )
            print(
                f"  second turn: TTFT {t['ttft_first'] or 0:.2f}s → {t['ttft_second'] or 0:.2f}s, "
                f"cached {t['cached_second']} of {t['prompt_second']} prompt tokens",
                flush=True,
            )
        res["alive_at_end"] = s.proc.poll() is None
    return res


def run(a, root: Path) -> dict:
    ckpt = checkpoint_dir(root, a.serve_family, a.shape, a.dtype)
    t = time.perf_counter()
    work = workload(root, a.clients, a.requests, a.chats)
    print(
        f"serving workload: {len(a.clients)} levels × {a.requests} requests, {a.chats} two-turn chats, "
        f"{a.tokens} tokens each (pictures in {time.perf_counter() - t:.1f}s)",
        flush=True,
    )
    servers = {}
    for name in a.servers:
        try:
            servers[name] = measure_server(name, ckpt, work, a, root)
        except (RuntimeError, TimeoutError, OSError) as e:  # a server that cannot start is a result, not a crash
            servers[name] = dict(error=str(e)[:600])
            print(f"  {name}: ERROR {e}", flush=True)
    settings = dict(
        family=a.serve_family,
        shape=a.shape,
        dtype=a.dtype,
        tokens=a.tokens,
        clients=a.clients,
        requests=a.requests,
        chats=a.chats,
        image_sizes=IMAGE_SIZES,
        servers=a.servers,
        level_time=a.level_time,
        request_timeout=a.request_timeout,
        question=QUESTION,
        follow_up=FOLLOW_UP,
        warmup=WARMUP_REQUESTS,
        blas=a.blas,
        server_source=source(Path(a.server_script) if a.server_script else None),
    )
    return dict(settings=settings, servers=servers)
