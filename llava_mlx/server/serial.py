"""`--kv-bits`: requests served one at a time through the library's own `stream_generate`.

mlx-lm's `BatchGenerator` cannot batch quantized KV caches, so mlx-lm's server generates
such requests one by one with `stream_generate(kv_bits=...)`; this engine does the same
with `llava_mlx.generate.stream_generate`, so an answer equals `generate(..., kv_bits=N)`'s.
Everything around the generation is the batching engine's (server_engine.py): the queue,
stop strings, usage, cancellation, errors, and the LRU prompt cache, which here holds
quantized caches and hands the longest cached prefix to `stream_generate` through its
`SessionCache`.
"""

from typing import Optional

from .cache import SessionCache
from .generate import head_size, kv_group_size, stream_generate
from .server_engine import Engine, Job
from .server_request import ApiError


class SerialEngine(Engine):
    def __init__(self, load_fn, options):
        super().__init__(load_fn, options)
        self.session = SessionCache()  # the image features; its KV is set per request
        self.current: Optional[Job] = None

    def is_cached(self, key: str) -> bool:
        # stream_generate preprocesses and encodes the images itself: the HTTP threads
        # need not prepare their pixels.
        return True

    def stats(self) -> dict:
        return {**super().stats(), "running": int(self.current is not None), "kv_bits": self.options.kv_bits}

    def _new_generator(self):
        # No batch; a head size the KV cannot be quantized with fails the start-up here.
        kv_group_size(head_size(self.model.config.text_config), self.options.kv_bits)
        return None

    def _start(self, job: Job):
        """Run the whole request now: the engine serves one at a time."""
        p, chat = job.prompt, job.chat
        self.busy = True
        # A copy of the cached prefix's KV, or None: stream_generate then starts a new one.
        kv, cached = self.prompt_cache.fetch(p.keys)
        self.session.kv, self.session.keys = kv, p.keys[:cached]
        self.session.kv_options = (self.options.kv_bits, None)
        steps = stream_generate(
            self.model,
            self.processor,
            p.text,
            [p.images[k] for k in p.image_keys],
            template=False,
            max_tokens=p.max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=chat.seed,
            prefill_step_size=self.options.prefill_step_size,
            kv_bits=self.options.kv_bits,
            cache=self.session,
        )
        p.pixels, p.images = {}, {}
        failed, self.current = True, job
        try:
            for r in steps:
                if self.stopping.is_set():
                    job.fail(ApiError(503, "the server is shutting down"))
                    break
                if job.cancelled.is_set():
                    self.counters["cancelled"] += 1
                    break
                job.cached = r.cached_tokens
                if r.finish_reason is None or r.finish_reason == "stop":  # the final "stop" piece carries the EOS
                    job.tokens.append(r.token)
                self.counters["decode_steps"] += r.finish_reason is None
                self.counters["max_batch"] = 1
                if self._emit(job, r.text, r.finish_reason):
                    break
            failed = False
        finally:
            self.current = None
            steps.close()  # stream_generate records what the KV holds
            self._remember_session(keep=not failed)

    def _remember_session(self, keep: bool):
        """Keep the request's KV (prompt and answer) in the LRU for later requests."""
        kv, keys = self.session.kv, self.session.keys
        self.session.kv, self.session.keys = None, []
        if keep and kv and kv[0].offset == len(keys):
            self.prompt_cache.insert(keys, kv)
