"""`--kv-bits`: requests served one at a time through the library's own `stream_generate`.

mlx-lm's `BatchGenerator` cannot batch quantized KV caches, so mlx-lm's server generates
such requests one by one with `stream_generate(kv_bits=...)`; this engine does the same
with `llava_mlx.generation.stream_generate`, so an answer equals `generate(..., kv_bits=N)`'s.
Everything around the generation is the engine's (engine.py): the queue, stop strings,
usage, cancellation, errors, and the LRU prompt cache, which here holds quantized caches and
hands the longest cached prefix to `stream_generate` through its `SessionCache`.
"""

from ..cache import SessionCache
from ..generation import head_size, kv_group_size, stream_generate
from .request import ApiError


class SerialScheduler:
    # stream_generate preprocesses and encodes the images itself: the HTTP threads need not
    # prepare their pixels.
    encodes_images = False

    def __init__(self, engine):
        self.engine = engine
        self.session = SessionCache()  # the image features; its KV is set per request
        self.current = None  # the job being answered

    def loaded(self):
        # No batch; a head size the KV cannot be quantized with fails the start-up here.
        kv_group_size(head_size(self.engine.model.config.text_config), self.engine.options.kv_bits)

    def release(self):
        self.session = None

    def jobs(self) -> list:
        return [self.current] if self.current is not None else []

    def has_work(self) -> bool:
        return False  # a request runs whole inside start()

    def ready_for_more(self, job) -> bool:
        return True

    def stats(self) -> dict:
        return {"running": int(self.current is not None), "kv_bits": self.engine.options.kv_bits}

    def clear(self):
        pass  # nothing is kept between requests

    def forget(self, job):
        pass

    def drop(self, jobs: list):
        pass  # a cancellation is seen inside start()

    def step(self):
        pass

    def start(self, job):
        """Run the whole request now, its choices one after the other (the second one on
        reuses the first's prompt KV from the prompt cache): the engine serves one at a time."""
        for choice in job.choices:
            if job.cancelled.is_set() or self.engine.stopping.is_set():
                break
            self._answer(choice)
        p = job.prompt
        p.pixels, p.images, p.videos = {}, {}, {}

    def _answer(self, job):
        engine, p, chat = self.engine, job.prompt, job.chat
        # A copy of the cached prefix's KV, or None: stream_generate then starts a new one.
        kv, cached = engine.prompt_cache.fetch(p.keys)
        self.session.kv, self.session.keys = kv, p.keys[:cached]
        self.session.kv_options = (engine.options.kv_bits, None)
        steps = stream_generate(
            engine.model,
            engine.processor,
            p.text,
            [p.images[k] for k in p.image_keys if k in p.images],
            videos=[p.videos[k] for k in p.image_keys if k in p.videos],
            template=False,
            max_tokens=p.max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=job.seed,
            prefill_step_size=engine.options.prefill_step_size,
            kv_bits=engine.options.kv_bits,
            cache=self.session,
            response_format=chat.schema,  # a JSON schema itself, compiled once (constrain.Grammars)
        )
        failed, self.current = True, job
        try:
            for r in steps:
                if engine.stopping.is_set():
                    job.fail(ApiError(503, "the server is shutting down"))
                    break
                if job.cancelled.is_set():
                    engine.counters["cancelled"] += 1
                    break
                job.cached = r.cached_tokens
                if r.finish_reason is None or r.finish_reason == "stop":  # the final "stop" piece carries the EOS
                    job.tokens.append(r.token)
                engine.counters["decode_steps"] += r.finish_reason is None
                engine.counters["max_batch"] = 1
                # the final piece repeats the last token (or carries the EOS): it has no entry
                entries = engine.logprob_entries(job, r.logprobs, r.token, None) if r.finish_reason is None else []
                if engine.emit(job, r.text, r.finish_reason, entries):
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
            self.engine.prompt_cache.insert(keys, kv)
