"""The batching engine: one thread owns MLX and runs every request.

A request's merged image+text sequence is prefilled by this project's own path (image
features from the cache or the vision tower, `model.embed`, the decoder over the
embeddings in chunks, starting from the KV of the longest cached prefix); its KV cache and
last token then join mlx-lm's `BatchGenerator`, which decodes every running request in
one batch (continuous batching: requests join and leave between steps). Requests start in
turn, each once the one before has been prefilled, and prefill chunks and decode steps
alternate, so a long new prompt never stalls the running answers for more than one chunk.
HTTP threads talk to the engine only through queues.
"""

import gc
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_top_p, make_sampler

from .errors import LlavaError
from .generate import vocabulary_sampler
from .server_cache import FeatureCache, PromptCache
from .server_request import ApiError, Chat, Prompt, pixel_values

log = logging.getLogger("llava_mlx.server")


@dataclass
class Job:
    """One request on its way through the engine; `events` carries its answer back:
    ("text", str), then ("done", finish_reason, usage) or ("error", ApiError)."""

    prompt: Prompt
    chat: Chat
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    over: threading.Event = field(default_factory=threading.Event)  # "done" or "error" is queued
    kv: Optional[list] = None
    embeddings: Optional[mx.array] = None
    prefilled: int = 0
    cached: int = 0
    uid: Optional[int] = None
    detokenizer: object = None
    tokens: List[int] = field(default_factory=list)  # generated, EOS included
    held: str = ""  # text held back while it may be the start of a stop string

    def cancel(self):
        self.cancelled.set()

    def fail(self, error: ApiError):
        self.events.put(("error", error))
        self.over.set()


@dataclass
class EngineOptions:
    max_batch: int = 8
    max_queue: int = 64
    prefill_step_size: int = 2048
    prompt_cache_bytes: int = 2 << 30
    feature_cache_bytes: int = 1 << 30
    kv_bits: Optional[int] = None  # quantized KV: requests are served one at a time (server_serial.py)


def seeded_sampler(temperature: float, top_p: float, seed: int):
    """Sampling from a request's own random key: the same seed gives the same answer
    whatever else shares the batch."""
    state = [mx.random.key(seed)]

    def sample(logprobs):
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        state[0], key = mx.random.split(state[0])
        return mx.random.categorical(logprobs * (1 / temperature), key=key)

    return sample


def held_back(text: str, stops: List[str]) -> int:
    """How many trailing characters of `text` could begin a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


class Engine:
    idle_wait = 0.1  # s an idle engine waits for a request before its next iteration
    fatal: tuple = ()  # errors in a decode step that end the engine instead of failing the batch
    def __init__(self, load_fn, options: EngineOptions):
        self.load_fn, self.options = load_fn, options
        self.inbox: "queue.Queue[Job]" = queue.Queue()
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.lock = threading.Lock()  # HTTP threads submit concurrently
        self.load_error: Optional[Exception] = None
        self.failure: Optional[str] = None  # why the engine ended on its own, if it did
        self.closed: Optional[str] = None  # why it takes no more requests, once it does not
        self.model = self.processor = None
        self.features = FeatureCache(options.feature_cache_bytes)
        self.prompt_cache = PromptCache(options.prompt_cache_bytes)
        self.waiting: deque = deque()
        self.busy = False
        self.prefilling: deque = deque()
        self.running: dict = {}
        self.counters = dict(requests=0, finished=0, cancelled=0, failed=0, decode_steps=0, batched_steps=0,
                             max_batch=0, generated_tokens=0)
        self.memory = dict(peak_memory_gb=0.0, active_memory_gb=0.0)
        self.thread = threading.Thread(target=self._run, name="llava-engine", daemon=True)

    # -- used by the HTTP threads ----------------------------------------------------------
    def start(self):
        """Load the model in the engine thread; raise its load error here."""
        self.thread.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def is_cached(self, key: str) -> bool:
        return key in self.features

    def submit(self, job: Job):
        with self.lock:
            if self.closed or not self.thread.is_alive():
                raise ApiError(503, self.closed or "the generation engine has stopped; restart the server")
            if self.inbox.qsize() + len(self.waiting) >= self.options.max_queue:
                raise ApiError(429, f"the server is busy: {self.options.max_queue} requests are already waiting (--max-queue)")
            self.counters["requests"] += 1
            self.inbox.put(job)

    def stats(self) -> dict:
        return {
            **self.counters,
            "running": len(self.running) + len(self.prefilling),
            "waiting": self.inbox.qsize() + len(self.waiting),
            "prompt_cache_entries": len(self.prompt_cache),
            "prompt_cache_bytes": self.prompt_cache.nbytes,
            "prompt_cache_hits": self.prompt_cache.hits,
            "feature_cache_images": len(self.features.entries),
            **self.memory,
        }

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            # Stuck in MLX (a collective whose peer died can wait forever): answer what waits.
            log.warning("the engine did not stop within 10 s")
            self._close("the server is shutting down")
        else:
            # Free the model's arrays now: left to the interpreter's shutdown, right after
            # the engine thread ended, they sometimes abort the process (MLX 0.32, CPU).
            self.model = self.processor = self.generator = None
            gc.collect()

    # -- the engine thread ---------------------------------------------------------------
    def _run(self):
        try:
            self.model, self.processor = self._load()
            self.stream = mx.default_stream(mx.default_device())
            self.generator = self._new_generator()
            vocab = self.processor.tokenizer.vocab_size
            self.rows = self.model.config.text_config["vocab_size"]
            self.greedy = vocabulary_sampler(make_sampler(0.0), vocab, self.rows, self.processor.tokenizer.eos_token_ids)
        except Exception as e:  # reported by start() in the main thread
            self.load_error = e
            return
        finally:
            self.ready.set()
        try:
            while not self.stopping.is_set():
                self._drop_cancelled()
                self._admit()
                self._work()
        except Exception as e:
            self.failure = self._failed(e)
        finally:
            self._close(f"the generation engine stopped ({self.failure}); restart the server" if self.failure else "the server is shutting down")

    def _failed(self, e: Exception) -> str:
        """What to say when the engine ends on error `e` (the server then exits)."""
        log.exception("the engine failed")
        return f"{type(e).__name__}: {e}"

    def _close(self, reason: str):
        """Take no more requests, and end every one not yet answered with a 503."""
        with self.lock:
            self.closed = reason
        self._take_inbox()
        for job in [*self.waiting, *self.prefilling, *self.running.values()]:
            if not job.over.is_set():
                job.fail(ApiError(503, reason))
        self.waiting.clear()
        self.prefilling.clear()
        self.running.clear()

    def _load(self):
        return self.load_fn()

    def _work(self):
        """One prefill chunk and one decode step, or a short wait for a request."""
        self.busy = self.busy or bool(self.prefilling or self.running)
        if self.prefilling:
            self._prefill_step()
        if self.running:
            self._decode_step()
        elif not self.prefilling:
            if self.busy:  # idle now: give MLX's buffer cache back to the system
                mx.clear_cache()
            self.busy = False
            if not self.waiting:  # else the next iteration starts one of them at once
                try:
                    self.waiting.append(self.inbox.get(timeout=self.idle_wait))
                except queue.Empty:
                    pass
        self.memory.update(peak_memory_gb=mx.get_peak_memory() / 1e9, active_memory_gb=mx.get_active_memory() / 1e9)

    def _new_generator(self) -> BatchGenerator:
        eos = self.processor.tokenizer.eos_token_ids
        n = self.options.max_batch
        return BatchGenerator(
            self.model.language_model,
            stop_tokens=[[t] for t in eos],
            completion_batch_size=n,
            prefill_batch_size=n,
            prefill_step_size=self.options.prefill_step_size,
            stream=self.stream,
        )

    def _admit(self):
        for job in self._admissible():
            self._guard(job, self._start, job)

    def _admissible(self) -> list:
        """The waiting request that starts now, if any; cancelled ones dropped.

        One at a time, once the one before has been prefilled: starting a request encodes
        its images, so starting all that arrive together would hold the first one's first
        token until every image had gone through the tower."""
        self._take_inbox()
        while self.waiting and not self.prefilling and len(self.running) < self.options.max_batch:
            job = self.waiting.popleft()
            if job.cancelled.is_set():
                self.counters["cancelled"] += 1
                continue
            return [job]
        return []

    def _take_inbox(self):
        """Move what the HTTP threads submitted to the waiting line."""
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _guard(self, job: Job, fn, *args):
        """Run one job's step; a failure fails that job only."""
        try:
            fn(*args)
        except LlavaError as e:
            self._abandon(job, ApiError(400, str(e)))
        except Exception as e:
            log.exception("request failed in the engine")
            self._abandon(job, ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    def _abandon(self, job: Job, error: ApiError):
        if job in self.prefilling:
            self.prefilling.remove(job)
        job.kv = job.embeddings = None
        self.counters["failed"] += 1
        job.fail(error)

    def _start(self, job: Job):
        """Image features (cached by content), the cached prefix, the embeddings to prefill."""
        p = job.prompt
        features = self._features(p)
        for feats, n in zip(features, p.image_lengths):
            if feats.shape[0] != n:
                raise RuntimeError(f"an image gave {feats.shape[0]} positions where {n} were expected")
        p.pixels, p.images = {}, {}
        if not isinstance(p.keys[-1], int):
            raise RuntimeError("the prompt ends inside an image")
        kv, job.cached = self.prompt_cache.fetch(p.keys)
        job.kv = kv if kv is not None else make_prompt_cache(self.model.language_model)
        embeddings = self.model.embed(p.ids, image_features=features)[0]
        job.embeddings = embeddings[job.cached : len(p.keys) - 1]
        self.prefilling.append(job)

    def _features(self, p: Prompt) -> list:
        return self.features.get(self.model, p.image_keys, p.pixels, lambda k: pixel_values(self.processor, p.images[k]))

    def _prefill_step(self):
        job = self.prefilling[0]
        self._guard(job, self._prefill_chunk, job)

    def _prefill_chunk(self, job: Job):
        total = job.embeddings.shape[0]
        if job.prefilled < total:
            end = min(job.prefilled + self.options.prefill_step_size, total)
            with mx.stream(self.stream):
                self.model.language_model(None, cache=job.kv, input_embeddings=job.embeddings[None, job.prefilled : end])
                mx.eval([c.state for c in job.kv])
            job.prefilled = end
        if job.prefilled == total:
            self.prefilling.popleft()
            (job.uid,) = self.generator.insert(
                [[job.prompt.keys[-1]]], max_tokens=[job.prompt.max_tokens], caches=[job.kv], samplers=[self._sampler(job.chat)]
            )
            job.kv = job.embeddings = None
            job.detokenizer = self.processor.tokenizer.detokenizer
            self.running[job.uid] = job

    def _sampler(self, chat: Chat):
        """Greedy requests share one sampler (one batched call); others get their own."""
        if chat.temperature == 0:
            return self.greedy
        if chat.seed is not None:
            base = seeded_sampler(chat.temperature, chat.top_p, chat.seed)
        else:
            base = make_sampler(chat.temperature, chat.top_p if chat.top_p < 1 else 0.0)
        tokenizer = self.processor.tokenizer
        return vocabulary_sampler(base, tokenizer.vocab_size, self.rows, tokenizer.eos_token_ids)

    def _decode_step(self):
        try:
            responses = self._next_responses()
        except self.fatal:
            raise
        except Exception as e:
            log.exception("the batch failed")
            for job in self.running.values():
                job.fail(ApiError(500, f"internal error in the batch: {type(e).__name__}: {e}"))
            self.counters["failed"] += len(self.running)
            self.running.clear()
            self.generator = self._new_generator()
            return
        if responses:
            self.counters["decode_steps"] += 1
            self.counters["batched_steps"] += len(responses) > 1
            self.counters["max_batch"] = max(self.counters["max_batch"], len(responses))
        for r in responses:
            job = self.running[r.uid]
            job.tokens.append(r.token)
            if r.finish_reason != "stop":
                job.detokenizer.add_token(r.token)
            if r.finish_reason is not None:
                job.detokenizer.finalize()
            if self._emit(job, job.detokenizer.last_segment, r.finish_reason) and r.finish_reason is None:
                self.generator.remove([r.uid])  # a stop string ended it
            if r.finish_reason is not None:
                self._remember(job, r.prompt_cache)

    def _next_responses(self) -> list:
        return self.generator.next()[1]

    def _emit(self, job: Job, text: str, finish: Optional[str]) -> bool:
        """Send new text (up to any stop string); True if the job is over."""
        stops = job.chat.stop
        if stops:
            text, job.held = job.held + text, ""
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
            elif finish is None:
                keep = held_back(text, stops)
                text, job.held = text[: len(text) - keep], text[len(text) - keep :]
        if text:
            job.events.put(("text", text))
        if finish is None:
            return False
        self.running.pop(job.uid, None)
        self.counters["finished"] += 1
        n = len(job.tokens) - (job.tokens[-1] in self.processor.tokenizer.eos_token_ids and finish == "stop")
        self.counters["generated_tokens"] += n
        length = len(job.prompt.keys)
        usage = {
            "prompt_tokens": length,
            "completion_tokens": n,
            "total_tokens": length + n,
            "prompt_tokens_details": {"cached_tokens": job.cached},
        }
        job.events.put(("done", finish, usage))
        job.over.set()
        return True

    def _remember(self, job: Job, cache):
        """Keep a finished request's KV (prompt and answer) for later requests to share."""
        keys = job.prompt.keys + job.tokens
        if cache[0].offset != len(keys):
            log.warning("not caching a KV of %d positions for %d keys", cache[0].offset, len(keys))
            return
        self.prompt_cache.insert(keys, cache)

    def _drop_cancelled(self):
        self._drop([job for job in [*self.prefilling, *self.running.values()] if job.cancelled.is_set()])

    def _drop(self, jobs: list):
        """Stop prefilling or decoding these jobs and free their KV."""
        dropped = {id(job) for job in jobs}
        self.prefilling = deque(job for job in self.prefilling if id(job) not in dropped)
        for job in jobs:
            job.kv = job.embeddings = None
        gone = [uid for uid, job in self.running.items() if id(job) in dropped]
        if gone:
            self.generator.remove(gone)
            for uid in gone:
                del self.running[uid]
        self.counters["cancelled"] += len(jobs)
