"""Admitting a request without freezing the answers under way.

A newcomer's pictures go through the vision tower a few crops at a time (a video's frames a
few frames at a time) and its prompt is prefilled in chunks, each unit of work sized to a
time budget, and the engine runs a decode
step of the running answers between two units (as vLLM's chunked prefill and mlx-lm's
time-budgeted server loop do): a running stream pauses for one unit, never for the whole
admission. The budget follows the decode step (`DECODE_SHARE` steps' worth, at least
`--admission-budget`), so the newcomer's first token is late by about 1 / DECODE_SHARE of its
time alone. With no answer running nobody waits: each unit is as large as it can be.
"""

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .prompt import media_values

DECODE_SHARE = 8  # admission gets this many decode steps' worth of time per step
FIRST_CHUNK = 256  # positions of a prompt's first chunk, before any prefill was timed
MIN_CHUNK = 32  # smaller chunks waste more than they save


@dataclass
class Pace:
    """How much admission work fits a budget, from the last measured costs."""

    budget: float  # s of admission work between two decode steps
    max_positions: int  # --prefill-step-size: a chunk is never larger
    crop_seconds: Optional[float] = None  # one crop through the tower and projector, last measured
    position_seconds: Optional[float] = None  # one prefilled position, last measured
    last_chunk: int = 0  # positions of the chunk last measured, and its time
    last_seconds: float = 0.0

    def crops(self, left: int, alone: bool) -> int:
        """Crops to encode in the next unit (of `left` still to encode)."""
        if alone:
            return left
        if self.crop_seconds is None:
            return 1
        return max(1, min(left, int(self.budget / self.crop_seconds)))

    def positions(self, left: int, alone: bool) -> int:
        """Positions to prefill in the next chunk (of `left` still to prefill): the fewer of
        two predictions from the last chunk, one linear in the chunk's size and one quadratic
        (its attention's cost grows with the chunk and with what it attends to)."""
        if alone:
            return min(left, self.max_positions)
        if self.position_seconds is None:
            wanted = FIRST_CHUNK
        else:
            linear = self.budget / self.position_seconds
            wanted = int(min(linear, self.last_chunk * math.sqrt(self.budget / self.last_seconds)))
        return max(1, min(left, self.max_positions, max(MIN_CHUNK, wanted)))

    def follow(self, decode_seconds: Optional[float], floor: float):
        """Set the budget from the last decode step's time."""
        self.budget = max(floor, DECODE_SHARE * (decode_seconds or 0.0))


class Admission:
    """One request on its way into the batch: its images not in the feature cache, then its
    prompt's positions after the cached prefix, one budgeted unit per `step`."""

    def __init__(self, engine, job, features: Optional[list] = None):
        self.engine, self.job = engine, job
        self.encoded = {}  # image key -> features, this request's, held until its embeddings exist
        self.todo = deque()  # (key, crops, size) of the images still to encode
        self.parts = []  # the features of the current image's crops so far
        self.features = features  # given whole (lockstep: rank 0 encodes and shares)
        if features is None:
            p = job.prompt
            for key in dict.fromkeys(p.image_keys):
                if key in engine.features:
                    self.encoded[key] = engine.features.get([key], None)[0]
                else:
                    self.todo.append((key, *media_values(engine.processor, p, key)))

    def step(self, pace: Pace, alone: bool) -> bool:
        """One unit of work; True once the prompt is prefilled (its last position is left for
        the generator, whose first step decodes from it)."""
        self.engine.counters["admission_units"] += 1
        if self.todo:
            self._encode(pace, alone)
            return False
        job = self.job
        if job.embeddings is None:
            self._embed()
        total = job.embeddings.shape[0]
        if job.prefilled < total:
            n = pace.positions(total - job.prefilled, alone)
            tic = time.perf_counter()
            self.engine.model.language_model(
                None, cache=job.kv, input_embeddings=job.embeddings[None, job.prefilled : job.prefilled + n]
            )
            mx.eval([c.state for c in job.kv])
            pace.last_chunk, pace.last_seconds = n, max(time.perf_counter() - tic, 1e-6)
            pace.position_seconds = pace.last_seconds / n
            job.prefilled += n
        return job.prefilled == total

    def _encode(self, pace: Pace, alone: bool):
        model = self.engine.model
        key, values, size = self.todo[0]  # size None: a video, whose frames are the crops
        done = sum(part.shape[0] for part in self.parts)
        n = pace.crops(values.shape[0] - done, alone)
        tic = time.perf_counter()
        chunk = mx.array(values[done : done + n])
        crops = model.tower_features(chunk) if size is None else model.encode_images(chunk)
        mx.eval(crops)
        pace.crop_seconds = (time.perf_counter() - tic) / n
        self.parts.append(crops)
        if done + n == values.shape[0]:
            whole = mx.concatenate(self.parts) if len(self.parts) > 1 else crops
            merged = model.merge_video(whole) if size is None else model.merge_image(whole, size)
            mx.eval(merged)
            self.engine.features.put(key, merged)
            self.encoded[key] = merged
            self.parts = []
            self.todo.popleft()

    def _embed(self):
        job, p = self.job, self.job.prompt
        features = self.features if self.features is not None else [self.encoded[k] for k in p.image_keys]
        for feats, n in zip(features, p.image_lengths):
            if feats.shape[0] != n:
                raise RuntimeError(f"an image gave {feats.shape[0]} positions where {n} were expected")
        p.pixels, p.images, p.videos = {}, {}, {}
        self.encoded, self.features = {}, None
        # the positions to prefill: after the cached prefix, before the last (decoding starts there)
        job.embeddings = self.engine.model.embed(
            p.ids, image_features=features, start=job.cached, stop=len(p.keys) - 1
        )[0]
