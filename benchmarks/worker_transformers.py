"""Worker: transformers / PyTorch float32 (`AutoModelForImageTextToText.generate`)."""

from __future__ import annotations

import os
import time

from .checkpoints import IMAGE_TOKEN_ID
from .worker import best, maxrss_bytes, rss_bytes, timeline_stats


def run(a) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(os.cpu_count() or 1)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(a.ckpt, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(a.ckpt)
    load_time = time.perf_counter() - t0
    inner = getattr(model, "model", model)
    enc = {"t": 0.0, "start": None}
    inner.vision_tower.register_forward_pre_hook(lambda m, i: enc.__setitem__("start", time.perf_counter()))

    def proj_done(m, i, o):
        enc["t"] += time.perf_counter() - enc["start"]

    inner.multi_modal_projector.register_forward_hook(proj_done)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(image_path, n):
        img = Image.open(image_path).convert("RGB")
        t = time.perf_counter()
        inputs = processor(images=img, text=a.prompt, return_tensors="pt")
        clock = Clock()
        enc["t"] = 0.0
        with torch.inference_mode():
            model.generate(
                **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock, pad_token_id=32001
            )
        return t, inputs, clock.times[1:]  # first put() is the prompt

    run(a.warm_image, 2)
    image_id = getattr(model.config, "image_token_id", None) or getattr(
        model.config, "image_token_index", IMAGE_TOKEN_ID
    )

    def measure():
        t0, inputs, times = run(a.image, a.tokens)
        ids = inputs["input_ids"][0]
        res = timeline_stats(times[0] - t0, times, t0)
        res.update(
            encode_time=enc["t"], image_positions=int((ids == image_id).sum()), prompt_positions=int(ids.shape[-1])
        )
        return res

    res = best([measure() for _ in range(a.repeats)])
    res.update(
        load_time=load_time,
        peak_memory=maxrss_bytes() - rss0,
        memory_kind="peak RSS - RSS before load",
        torch_threads=torch.get_num_threads(),
    )
    return res
