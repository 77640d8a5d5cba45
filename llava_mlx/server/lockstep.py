"""Serving one model sharded over the ranks of `mlx.launch`, as mlx-lm's server does.

    mlx.launch --hostfile hosts.json --backend ring -- python server.py --model M [--pipeline]

Rank 0 alone listens for HTTP. Every rank runs this engine, and every iteration begins with
rank 0 sharing what changed (`share_object`): the requests that start now (their prompt's
ids and keys, their options), the ones cancelled since, and how many steps to run before the
next exchange (as mlx-lm's server does its decode steps in a time budget, then shares once);
rank 0 encodes the images and shares their features (`shared_features`). The batch's tokens
are sent once every rank is known to have taken part (`check_ranks`, once per batch). All
ranks then start, prefill, insert, step and drop the same requests in the same order, so the
sharded decoder's collectives pair up. Everything else is decided the same way on every rank
from the same tokens (EOS, stop strings, max_tokens, the prompt cache's inserts and hits), so
it need not be shared.
"""

import dataclasses
import logging
import random
import time

from ..distributed.group import group_of, settle
from ..distributed.share import check_ranks, share_object, shared_features
from ..errors import LlavaError
from .engine import Changes, Job, LocalCoordinator
from .prompt import Prompt

log = logging.getLogger("llava_mlx.server")
BATCH_SECONDS = 0.1  # decode steps between two exchanges (and their tokens held), while nothing waits to start
MIN_BATCH_STEPS = 4  # even when steps are slow: an exchange per token costs what batching saves
MAX_BATCH_STEPS = 64


class LockstepCoordinator(LocalCoordinator):
    # An engine that stopped (a lost rank: no way on) ends the whole launch.
    exits_on_failure = True
    # Admission in whole units, as every rank must cut the prompt into the same chunks (the
    # sharded decoder's collectives pair up) and time differs from rank to rank; rank 0
    # encodes a newcomer's images whole and shares them, every rank waiting in that exchange.
    budgets_admission = False

    def __init__(self):
        self.group = None
        self.main = True  # rank 0: serves HTTP and decides; the others follow
        self.halted = False  # rank 0 told this rank to stop
        self.serial = 0  # rank 0 numbers the requests it starts; followers know them by it
        self.started: dict = {}  # rank 0: serial → its job, between deciding and starting
        self.step_seconds = BATCH_SECONDS  # rank 0: a decode step's time, last measured
        self.batch_start = 0.0
        self.exchanges = 0

    def joined(self, engine):
        model = engine.model
        self.group = group_of(model)
        if self.group is None:
            raise LlavaError(
                "launched as one rank of several, but this process is the only one: "
                "run it under mlx.launch with -n 2 or more"
            )
        self.main = self.group.rank() == 0
        if not self.main:
            self.idle_wait = 0  # a follower waits in the exchange instead
        layers = model.config.text_config["num_hidden_layers"]
        if model.sharding.mode == "pipeline" and layers % self.group.size() and engine.options.prompt_cache_bytes:
            # Ranks holding different numbers of layers would evict different prompt-cache
            # entries (the LRU is bounded in bytes) and then reuse different prefixes.
            log.warning("%d layers do not divide over %d ranks: the prompt cache is off", layers, self.group.size())
            engine.prompt_cache.lru.max_bytes = 0

    def finish(self, engine):
        if self.main:  # the followers wait for this before they leave
            share_object(self.group, {"stop": True})
        settle(engine.model)

    def failed(self, e: Exception) -> str:
        if not isinstance(e, RuntimeError):
            return super().failed(e)
        lost = str(e).splitlines()[0]
        log.error("%s: the engine stops; restart the whole launch", lost)
        return f"lost a rank: {lost}"

    def batch_started(self, engine):
        engine.held = []  # sent once check_ranks says every rank took part
        self.batch_start = time.perf_counter()

    def batch_ended(self, engine, worked: int):
        # A rank lost mid-step may leave zeros in the all-reduces without an error: make sure
        # every rank took part in the batch before any of its tokens is sent.
        check_ranks(self.group)
        engine.send_held()
        if self.main and worked:
            self.step_seconds = (time.perf_counter() - self.batch_start) / worked

    # -- each iteration: rank 0's changes, applied on every rank in the same order --------
    def stats(self) -> dict:
        return {"exchanges": self.exchanges}

    def changes(self, engine) -> Changes:
        change = share_object(self.group, self._decide(engine) if self.main else None)
        self.exchanges += 1
        self.halted = bool(change.get("stop"))
        if self.halted:
            return Changes(stop=True)
        cancel = set(change["cancel"])  # a request's serial: all its choices
        engine.scheduler.drop([job for job in engine.scheduler.jobs() if job.serial in cancel])
        start = []
        for serial, prompt, chat in change["start"]:
            job = self.started.pop(serial) if self.main else Job(prompt, chat)
            for choice in job.choices:
                choice.serial = serial
            start.append(job)
        return Changes(start=start, steps=change["steps"])

    def _decide(self, engine) -> dict:
        """Rank 0: the requests to start now (as the engine picks them), those cancelled, and
        how many steps every rank runs before the next exchange: as many as fit
        `BATCH_SECONDS` (at least MIN_BATCH_STEPS) while answers only decode, one while
        anything waits to start."""
        cancel = sorted({job.serial for job in engine.scheduler.jobs() if job.cancelled.is_set()})
        self.started, start = {}, []
        for job in engine.admissible():
            if job.chat.temperature > 0 and job.chat.seed is None:
                job.chat.seed = random.randrange(2**31)  # every rank samples the same tokens
            self.serial += 1
            self.started[self.serial] = job
            # What the followers need: no pixels, images or videos (rank 0 encodes them).
            start.append((self.serial, dataclasses.replace(job.prompt, pixels={}, images={}, videos={}), job.chat))
        quiet = not start and not engine.waiting and engine.inbox.empty()
        fit = int(BATCH_SECONDS / self.step_seconds)
        steps = max(MIN_BATCH_STEPS, min(MAX_BATCH_STEPS, fit)) if quiet else 1
        return {"cancel": cancel, "start": start, "steps": steps}

    def encode(self, engine, prompt: Prompt, encode) -> list:
        """Rank 0 encodes (from its feature cache) and shares; a failure fails the request on
        every rank (an unexpected one too, so that the ranks stay in step)."""

        def on_rank_0():
            try:
                return prompt.image_keys, encode()
            except LlavaError:
                raise
            except Exception as e:
                log.exception("encoding the images failed")
                raise LlavaError(f"encoding the images failed: {type(e).__name__}: {e}") from e

        return shared_features(engine.model, on_rank_0)[1]
