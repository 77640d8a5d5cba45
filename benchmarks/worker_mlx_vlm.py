"""Worker: mlx-vlm through its Python API (`mlx_vlm.load`, `mlx_vlm.stream_generate`)."""

from __future__ import annotations

import time

from .checkpoints import PREFILL_STEP_SIZE
from .worker import best, timeline_stats


def _mlx_vlm_compat(processor):
    """mlx-vlm 0.7.10's LLaVA processors forward the tokenizer's `padding` / `padding_side` kwargs to the
    image processor, which transformers >= 5.2x rejects (strict ImagesKwargs). Drop them there; nothing
    else about mlx-vlm is changed."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return

    class _Strip:
        def __init__(self, inner):
            self._inner = inner

        def __call__(self, *args, **kw):
            for k in ("padding", "padding_side", "add_special_tokens"):
                kw.pop(k, None)
            return self._inner(*args, **kw)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    processor.image_processor = _Strip(ip)


def run(a) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_vlm import load, stream_generate

    t0 = time.perf_counter()
    model, processor = load(a.ckpt)
    mx.eval(model.parameters())
    load_time = time.perf_counter() - t0
    _mlx_vlm_compat(processor)
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    # EOS ignored: stream_generate stops only when tokenizer.stopping_criteria(token) is true
    tokenizer.stopping_criteria = lambda *args, **kwargs: False
    image_id = model.config.image_token_index
    probe = {}
    orig = model.get_input_embeddings

    def timed_embeddings(input_ids=None, pixel_values=None, **kw):
        t = time.perf_counter()
        out = orig(input_ids, pixel_values, **kw)
        mx.eval(out.inputs_embeds)
        probe["encode_time"] = time.perf_counter() - t
        ids = np.array(input_ids)
        probe["input_ids_len"] = int(ids.shape[-1])
        probe["image_tokens_in_ids"] = int((ids == image_id).sum())
        probe["prompt_positions"] = int(out.inputs_embeds.shape[1])
        probe["image_positions"] = int(out.inputs_embeds.shape[1] - (ids != image_id).sum())
        return out

    model.get_input_embeddings = timed_embeddings
    kw = dict(max_tokens=a.tokens, temperature=0.0, prefill_step_size=PREFILL_STEP_SIZE)
    for _ in stream_generate(model, processor, a.prompt, image=[a.warm_image], **{**kw, "max_tokens": 2}):
        pass

    def measure():
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        times, last = [], None
        for r in stream_generate(model, processor, a.prompt, image=[a.image], **kw):
            now = time.perf_counter()
            if r.token is None:
                continue
            if not times or r.generation_tokens > len(times):
                times.append(now)
            last = r
        peak = mx.get_peak_memory()
        res = timeline_stats(times[0] - t0, times, t0)
        res.update(
            peak_memory=peak,
            own_prompt_tps=last.prompt_tps,
            own_decode_tps=last.generation_tps,
            own_prompt_tokens=last.prompt_tokens,
            **probe,
        )
        return res

    res = best([measure() for _ in range(a.repeats)])
    res.update(load_time=load_time, memory_kind="mx.get_peak_memory")
    return res
