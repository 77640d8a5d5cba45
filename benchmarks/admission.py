"""The admission benchmark: does a running answer freeze when someone sends a picture?

For each case (a LLaVA-1.6 picture, a LLaVA-OneVision picture, a OneVision video) and each
server (this project's, and with `--baseline-script` an earlier one, in the same run): answer A
streams a long text answer; request B arrives with a fresh picture (or clip) once A is under
way. Measured as a user feels it, from the streamed chunks' arrival times: A's pauses while B is
admitted (median, p95, max) against A's gaps with no newcomer, B's time to first token against
its time alone, and the tokens per second of A and B together (before against after). Each
repeated with fresh media (no feature or prompt cache can help).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoints import ROOT, checkpoint_dir, make_image
from .constrained import LONG_ANSWER
from .load import client, data_uri, open_stream, user_turn
from .report import machine_rows
from .servers import Server, command, free_port

REPEATS = 3
STORY = "Give me four hundred readings."
STORY_TOKENS = 1500
# A's answer is held to a schema that needs more tokens than that: a random-weight model stops
# at its end-of-turn token whenever it happens to draw it, and A must outlast B's admission.
LONG = {"response_format": {"type": "json_schema", "json_schema": {"name": "readings", "schema": LONG_ANSWER}}}
NEWCOMER_TOKENS = 16
CASES = {
    # name: (checkpoint, media kind, size (width, height))
    "llava-1.6 picture": ("llava-1.6", "image", (1000, 600)),
    "llava-onevision picture": ("onevision", "image", (1000, 600)),
    "llava-onevision video": ("onevision", "video", (320, 240)),
}
TARGETS = dict(pause=0.25, ttft=1.2)  # pause ≤ 0.25 × TTFT alone; TTFT ≤ 1.2 × alone


def make_clip(path: Path, seed: int, size=(320, 240), frames: int = 32) -> Path:
    """A deterministic MP4 of moving blocks, different for every seed (PyAV)."""
    import av

    width, height = size
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (6, 3))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            image = np.full((height, width, 3), colours[0], np.uint8)
            for k, colour in enumerate(colours[1:]):
                x, y = (t * (3 + k) + 40 * k) % (width - 40), (20 + 35 * k) % (height - 40)
                image[y : y + 40, x : x + 40] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def media_message(kind: str, path: Path) -> dict:
    if kind == "image":
        return user_turn(data_uri(path), "What is in this picture?")
    import base64

    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
    return {"role": "user", "content": parts}


def stream(api, model: str, messages: list, max_tokens: int, out: dict, extra=None):
    """Stream one greedy answer; `out` gets its start, the arrival time of every content chunk
    (time.monotonic: the same clock in every process), and its tokens."""
    out["start"], out["arrivals"] = time.monotonic(), []
    for chunk in open_stream(api, model, messages, max_tokens, extra):
        if chunk.choices and chunk.choices[0].delta.content:
            out["arrivals"].append(time.monotonic())
        if chunk.usage is not None:
            out["tokens"] = chunk.usage.completion_tokens
    out["end"] = time.monotonic()


def stream_elsewhere(base_url: str, model: str, messages: list, max_tokens: int, results):
    """`stream` in a process of its own, whose result is put on `results` (a multiprocessing
    queue): the newcomer's request, built and sent in this process, cannot delay reading it."""
    out = {}
    stream(client(base_url, 300), model, messages, max_tokens, out, LONG)
    results.put(out)


def running(base_url: str) -> bool:
    """Whether the server is answering a request (its /health)."""
    import json
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.loads(r.read())["running"] > 0


def gaps(arrivals: list, since: float = 0.0, until: float = float("inf")) -> list:
    """The waits between consecutive chunks that ended within [since, until]."""
    return [b - a for a, b in zip(arrivals, arrivals[1:]) if since <= b <= until]


def stats(values: list) -> dict:
    if not values:
        return dict(median=None, p95=None, max=None)
    return dict(median=float(np.median(values)), p95=float(np.percentile(values, 95)), max=float(np.max(values)))


def measure(base_url: str, model: str, kind: str, media: list) -> dict:
    """One server, one case: alone figures, then with a newcomer, over the media given."""
    api = client(base_url, 300)
    story = [user_turn(None, STORY)]
    alone_story = {}
    stream(api, model, story, STORY_TOKENS, alone_story, LONG)  # also warms the text path
    alone_gaps = gaps(alone_story["arrivals"])
    alone_ttft, together, pauses, ttfts = [], [], [], []
    for i, path in enumerate(media):
        if i % 2 == 0:  # alone first on even pictures, together on odd: no picture is seen twice
            b = {}
            stream(api, model, [media_message(kind, path)], NEWCOMER_TOKENS, b)
            alone_ttft.append(b["arrivals"][0] - b["start"])
            continue
        b, message = {}, [media_message(kind, path)]
        results = multiprocessing.get_context("spawn").Queue()
        runner = multiprocessing.get_context("spawn").Process(
            target=stream_elsewhere, args=(base_url, model, story, STORY_TOKENS, results)
        )
        runner.start()
        while not running(base_url):  # A has started
            time.sleep(0.01)
        time.sleep(0.3)
        stream(api, model, message, NEWCOMER_TOKENS, b)
        a = results.get(timeout=300)
        runner.join(timeout=30)
        admitted = b["arrivals"][0]
        pauses += gaps(a["arrivals"], b["start"], admitted + 0.05)
        ttfts.append(admitted - b["start"])
        together.append((a["tokens"] + b["tokens"]) / (max(a["end"], b["end"]) - a["start"]))
    return dict(
        gaps_alone=stats(alone_gaps),
        pauses=stats(pauses),
        ttft_alone=float(np.median(alone_ttft)),
        ttft_together=float(np.median(ttfts)),
        tokens_per_s_alone=alone_story["tokens"] / (alone_story["end"] - alone_story["start"]),
        tokens_per_s_together=float(np.median(together)),
    )


def family_checkpoints(root: Path) -> dict:
    """The test suite's LLaVA-OneVision fixture (released geometry: SigLIP 384/14, anyres_max_9)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.build_family import build_family

    return build_family(root / "family")


def run(a, root: Path) -> dict:
    ckpts = {"llava-1.6": checkpoint_dir(root, "llava-1.6", a.shape, a.dtype)}
    ckpts["onevision"] = family_checkpoints(root)["hub-onevision"]
    scripts = {"after": Path(a.server_script) if a.server_script else None}
    if a.baseline_script:
        scripts = {"before": Path(a.baseline_script), **scripts}
    results = {}
    for case, (ckpt, kind, size) in CASES.items():
        n = 2 * REPEATS + 1
        if kind == "image":
            media = [make_image(size, 3000 + i, root / f"adm-{ckpt}-{i}.png") for i in range(n)]
        else:
            media = [make_clip(root / f"adm-{i}.mp4", 4000 + i, size) for i in range(n)]
        for which, script in scripts.items():
            cmd = command("llava-mlx", ckpts[ckpt], free_port(), script) + ["--prompt-cache-bytes", "0"]
            cmd += ["--max-tokens", str(STORY_TOKENS)]
            print(f"{case}, {which}: {' '.join(cmd)}", flush=True)
            try:
                with Server("llava-mlx", cmd, root / f"admission-{which}.log", blas=a.blas) as s:
                    stream(client(s.base_url, 300), s.model_id, [media_message(kind, media[-1])], 4, {})  # warm-up
                    r = measure(s.base_url, s.model_id, kind, media[:-1])
            except Exception as e:  # an older server may not take this case (no video before)
                r = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            results.setdefault(case, {})[which] = r
            print(f"  {r}", flush=True)
    settings = dict(shape=a.shape, dtype=a.dtype, blas=a.blas, repeats=REPEATS, story_tokens=STORY_TOKENS)
    settings.update(baseline=a.baseline_script, cases={k: list(v) for k, v in CASES.items()})
    return dict(settings=settings, results=results)


def _ms(x):
    return "–" if x is None else f"{x * 1e3:.0f}"


def section(record: dict) -> list:
    st = record["settings"]
    L = ["## Admission: a running answer while a newcomer's picture is admitted\n"]
    L += machine_rows(record)
    L += [
        "",
        f"Answer A streams {st['story_tokens']} tokens (greedy, text, held to a JSON schema that outlasts them, "
        "so that a random-weight model cannot end it early); request B arrives with a fresh picture or "
        "clip once A is under way. A's pauses are the waits between its streamed chunks while B is admitted; "
        "its gaps alone, with no newcomer. B's TTFT alone and with A running; the tokens per second of A and B "
        f"together, from A's request to the last answer's end. Medians over {st['repeats']} newcomers per case, the "
        "prompt cache off. LLaVA-1.6 is the benchmark's small-shape checkpoint; LLaVA-OneVision is the test "
        "suite's fixture (SigLIP 384/14 and anyres_max_9 as released; tiny widths). `before` is "
        f"`{st.get('baseline') or 'not run'}` (whole admission), `after` this server.\n",
        "| case | server | A's gaps alone, median / max ms | A's pauses with B, median / p95 / max ms | B's TTFT "
        "alone s | B's TTFT with A s | max pause / TTFT alone | TTFT with / alone | A alone, A + B tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, servers in record["results"].items():
        for which, r in servers.items():
            if "error" in r:
                L.append(f"| {case} | {which} | could not run: {r['error'][:110]} | | | | | | |")
                continue
            g, p = r["gaps_alone"], r["pauses"]
            ratio = p["max"] / r["ttft_alone"] if p["max"] is not None else None
            slow = r["ttft_together"] / r["ttft_alone"]
            paused = "–" if ratio is None else f"{ratio:.2f} {'✅' if ratio <= TARGETS['pause'] else '❌'}"
            L.append(
                f"| {case} | {which} | {_ms(g['median'])} / {_ms(g['max'])} | {_ms(p['median'])} / {_ms(p['p95'])} "
                f"/ {_ms(p['max'])} | {r['ttft_alone']:.2f} | {r['ttft_together']:.2f} | "
                f"{paused} | "
                f"{slow:.2f}× {'✅' if slow <= TARGETS['ttft'] else '❌'} | "
                f"{r['tokens_per_s_alone']:.0f}, {r['tokens_per_s_together']:.0f} |"
            )
    L += [
        "",
        f"Targets: the longest pause ≤ {TARGETS['pause']} × B's TTFT alone; B's TTFT ≤ {TARGETS['ttft']} × alone. "
        "(Pauses are between streamed chunks: the server sends what gathered every 20 ms at most.)\n",
    ]
    return L
