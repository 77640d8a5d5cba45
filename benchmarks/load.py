"""The serving load: streamed chat requests with the official `openai` client, as an app sends them.

`run_level` keeps `clients` threads busy (each sends its next request as soon as its previous
answer ends) until the level's requests are all sent or its time is up; `second_turn` asks a
question about an image, then a follow-up with the first answer in the history. Requests are
never retried: a failure counts.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Reply:
    ok: bool
    started: float  # perf_counter at the request
    ended: float
    ttft: float | None = None  # request → first content token
    tokens: int = 0  # generated: usage.completion_tokens, else content chunks
    tokens_from_usage: bool = False
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None


def data_uri(image_path) -> str:
    """The picture as a JPEG data URI (quality 90), how an app attaches a photo."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(image_path).convert("RGB").save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def user_turn(image_uri: str | None, question: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_uri}}] if image_uri else []
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}


def client(base_url: str, timeout: float):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="benchmark", max_retries=0, timeout=timeout)


def open_stream(api, model: str, messages: list, max_tokens: int, extra: dict | None = None):
    """A streamed, greedy chat completion with usage at its end (`extra`: more body fields)."""
    return api.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        **(extra or {}),
    )


def ask(api, model: str, messages: list, max_tokens: int, extra: dict | None = None) -> Reply:
    """One streamed, greedy request (`extra`: more body fields, e.g. response_format); never raises."""
    t0 = time.perf_counter()
    r = Reply(ok=False, started=t0, ended=t0)
    chunks, text = 0, []
    try:
        for ch in open_stream(api, model, messages, max_tokens, extra):
            if ch.usage is not None:
                r.tokens, r.tokens_from_usage = ch.usage.completion_tokens, True
                r.prompt_tokens = ch.usage.prompt_tokens
                details = getattr(ch.usage, "prompt_tokens_details", None)
                r.cached_tokens = getattr(details, "cached_tokens", None) if details is not None else None
            for choice in ch.choices or []:
                if choice.delta is not None and choice.delta.content:
                    if r.ttft is None:
                        r.ttft = time.perf_counter() - t0
                    chunks += 1
                    text.append(choice.delta.content)
                if choice.finish_reason:
                    r.finish_reason = choice.finish_reason
        if not r.tokens_from_usage:
            r.tokens = chunks
        r.ok = r.ttft is not None and r.finish_reason is not None
        if not r.ok:
            r.error = "stream ended without " + ("content" if r.ttft is None else "a finish_reason")
    except Exception as e:  # every client-side failure is a measured outcome, reported per request
        r.error = f"{type(e).__name__}: {e}"[:300]
    r.ended = time.perf_counter()
    r.text = "".join(text)
    return r


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def summarize(replies: list, not_sent: int, wall: float) -> dict:
    ok = [r for r in replies if r.ok]
    ttfts = [r.ttft for r in ok]
    tokens = sum(r.tokens for r in ok)
    # after the first token: (tokens - 1) in the time from the first token to the end
    decoding = [(r.tokens - 1, r.ended - r.started - r.ttft) for r in ok]
    decode = [n / t for n, t in decoding if n > 0 and t > 0]
    errors = sorted({r.error for r in replies if not r.ok})
    return dict(
        requests=len(replies) + not_sent,
        answered=len(ok),
        failed=len(replies) - len(ok),
        not_sent=not_sent,
        wall=wall,
        generated_tokens=tokens,
        aggregate_tps=tokens / wall if wall > 0 else None,
        ttft_p50=percentile(ttfts, 50),
        decode_tps_p50=percentile(decode, 50),
        ttft_p95=percentile(ttfts, 95),
        tokens_per_request=tokens / len(ok) if ok else None,
        # share of a request spent before its first token: what batching decode cannot overlap
        prefill_share=sum(r.ttft for r in ok) / sum(r.ended - r.started for r in ok) if ok else None,
        stopped_early=sum(1 for r in ok if r.finish_reason == "stop"),
        prompt_tokens=[r.prompt_tokens for r in ok],
        tokens_from_usage=all(r.tokens_from_usage for r in ok),
        errors=errors[:5],
        replies=[{k: v for k, v in asdict(r).items() if k != "text"} for r in replies],
    )


def run_level(
    base_url: str,
    model: str,
    requests: list,
    clients: int,
    max_tokens: int,
    time_limit: float,
    request_timeout: float,
    extra: dict | None = None,
) -> dict:
    """`clients` closed-loop clients share `requests` (message lists); none starts one after `time_limit` s."""
    api = client(base_url, request_timeout)
    lock = threading.Lock()
    queue = list(enumerate(requests))
    replies = [None] * len(requests)
    start = time.perf_counter()

    def worker():
        while True:
            with lock:
                if not queue or time.perf_counter() - start > time_limit:
                    return
                i, messages = queue.pop(0)
            replies[i] = ask(api, model, messages, max_tokens, extra)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:  # bounded: a request ends by its own timeout
        t.join(timeout=time_limit + request_timeout + 30)
    done = [r for r in replies if r is not None]
    wall = (max(r.ended for r in done) - min(r.started for r in done)) if done else 0.0
    return summarize(done, len(requests) - len(done), wall)


def second_turn(
    base_url: str, model: str, image_uris: list, questions: tuple, max_tokens: int, request_timeout: float
) -> dict:
    """For each image: ask, then follow up with the answer in the history (one client, one after another)."""
    api = client(base_url, request_timeout)
    chats = []
    for uri in image_uris:
        first_msgs = [user_turn(uri, questions[0])]
        first = ask(api, model, first_msgs, max_tokens)
        chat = dict(first=asdict(first))
        if first.ok:
            follow = first_msgs + [{"role": "assistant", "content": first.text}, user_turn(None, questions[1])]
            chat["second"] = asdict(ask(api, model, follow, max_tokens))
        chats.append(chat)
    firsts = [c["first"] for c in chats if c["first"]["ok"]]
    seconds = [c["second"] for c in chats if c.get("second", {}).get("ok")]
    return dict(
        chats=len(chats),
        answered_first=len(firsts),
        answered_second=len(seconds),
        ttft_first=percentile([c["ttft"] for c in firsts], 50),
        ttft_second=percentile([c["ttft"] for c in seconds], 50),
        prompt_first=percentile([c["prompt_tokens"] for c in firsts if c["prompt_tokens"] is not None], 50),
        prompt_second=percentile([c["prompt_tokens"] for c in seconds if c["prompt_tokens"] is not None], 50),
        cached_second=percentile([c["cached_tokens"] for c in seconds if c["cached_tokens"] is not None], 50),
        errors=sorted({c[k]["error"] for c in chats for k in ("first", "second") if k in c and c[k]["error"]})[:5],
        detail=[{k: {f: v for f, v in c[k].items() if f != "text"} for k in c} for c in chats],
    )
