"""Worker: llava-mlx through its public API (`load`, `stream_generate`)."""

from __future__ import annotations

import time

from .checkpoints import PREFILL_STEP_SIZE
from .worker import best, timeline_stats


def run(a) -> dict:
    import mlx.core as mx

    from llava_mlx import load, stream_generate

    t0 = time.perf_counter()
    model, processor = load(a.ckpt)
    mx.eval(model.parameters())
    load_time = time.perf_counter() - t0
    kw = dict(
        max_tokens=a.tokens, temperature=0.0, template=False, ignore_eos=True, prefill_step_size=PREFILL_STEP_SIZE
    )
    # warm-up on a different image of the same size (no feature/prefix cache hit on the measured run)
    for _ in stream_generate(model, processor, a.prompt, images=[a.warm_image], **{**kw, "max_tokens": 2}):
        pass

    def measure():
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        times, last, first = [], None, None
        for r in stream_generate(model, processor, a.prompt, images=[a.image], **kw):
            now = time.perf_counter()
            if r.token is None:
                continue
            if first is None:
                first = r
            if r.generation_tokens > len(times):  # the closing response repeats the last token
                times.append(now)
            last = r
        peak = mx.get_peak_memory()
        res = timeline_stats(times[0] - t0, times, t0)

        def get(name, default=None):
            return getattr(last, name, getattr(first, name, default))

        res.update(
            peak_memory=peak,
            encode_time=get("encode_time"),
            image_positions=get("image_positions"),
            prompt_positions=get("prompt_tokens"),
            own_prompt_tps=get("prompt_tps"),
            own_decode_tps=get("generation_tps"),
            own_ttft=get("ttft"),
            own_peak_memory_gb=get("peak_memory"),
            missing_fields=[
                f
                for f in ("encode_time", "image_positions", "ttft", "prompt_tokens", "peak_memory")
                if getattr(last, f, None) is None
            ],
        )
        return res

    res = best([measure() for _ in range(a.repeats)])
    res.update(load_time=load_time, memory_kind="mx.get_peak_memory")
    return res
