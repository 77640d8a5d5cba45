"""The engine: one thread owns MLX and runs every request, in one loop.

Each iteration the coordinator says which waiting requests start now and which running ones
were cancelled (`LocalCoordinator` here; `LockstepCoordinator` in lockstep.py shares rank 0's
choice with every rank under mlx.launch), then the scheduler does one step of work: the
batching scheduler (batching.py) a unit of admission work and a decode step of every running answer,
the serial one (serial.py, `--kv-bits`) a whole request at a time. HTTP threads talk to the
engine only through queues: `submit` a `Job`, read its `events`.
"""

import gc
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx

from ..constrain import schema_processor
from ..errors import LlavaError
from ..features import FeatureCache
from ..logprobs import LogprobReporter
from ..token_bytes import token_table
from .batching import BatchScheduler
from .cache import PromptCache
from .prompt import Prompt
from .request import ApiError, Chat

log = logging.getLogger("llava_mlx.server")


@dataclass(eq=False)  # a job is itself: `job in queue` compares identities, never fields (arrays among them)
class Job:
    """One choice of a request on its way through the engine. A request for n choices is
    its first choice's job, whose `siblings` are the others: they share the prompt (and
    its prefill), the events queue and the cancellation. `events` carries the answers back:
    ("text", index, str, logprob entries), then ("done", index, finish_reason, usage) for
    each choice, or ("error", ApiError) once."""

    prompt: Prompt
    chat: Chat
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # "done" or "error" is queued
    index: int = 0  # which choice
    siblings: list = field(default_factory=list)  # the other choices (first choice only)
    first: Optional["Job"] = None  # the request's first choice (the others only)
    constraint: object = None  # its schema's logits processor (constrain.py), made in the engine
    admission: object = None  # its admission.Admission while its images are encoded and its prompt prefilled
    kv: Optional[list] = None
    embeddings: Optional[mx.array] = None
    prefilled: int = 0
    cached: int = 0
    uid: Optional[int] = None  # the batch generator's
    serial: Optional[int] = None  # rank 0's number for it under mlx.launch (lockstep.py)
    detokenizer: object = None
    tokens: List[int] = field(default_factory=list)  # generated, EOS included
    unsent: str = ""  # text held back while it may be the start of a stop string
    fault: Optional[Exception] = None  # raised by its own sampler or schema inside a batch step (batching.py)

    def __post_init__(self):
        if self.index == 0 and not self.siblings:
            self.siblings = [
                Job(self.prompt, self.chat, self.events, self.cancelled, index=i, first=self)
                for i in range(1, self.chat.n)
            ]

    @property
    def choices(self) -> list:
        return [self, *self.siblings]

    @property
    def seed(self) -> Optional[int]:
        return self.chat.seed_of(self.index)

    def cancel(self):
        self.cancelled.set()

    def fail(self, error: ApiError):
        """End the whole request with `error`: one error event, every choice finished, the
        other choices cancelled (the engine drops them at its next iteration)."""
        self.cancelled.set()
        self.events.put(("error", error))
        for job in (self.first or self).choices:
            job.finished.set()


@dataclass
class EngineOptions:
    max_batch: int = 8
    max_queue: int = 64
    prefill_step_size: int = 2048
    prompt_cache_bytes: int = 2 << 30
    feature_cache_bytes: int = 1 << 30
    kv_bits: Optional[int] = None  # quantized KV: requests are served one at a time (serial.py)
    admission_budget: float = 0.05  # s: the least admission work between two decode steps (admission.py)


def held_back(text: str, stops: List[str]) -> int:
    """How many trailing characters of `text` could begin a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


@dataclass
class Changes:
    """What starts and what stops in one iteration, as the coordinator decides it."""

    start: list = field(default_factory=list)
    cancel: list = field(default_factory=list)
    stop: bool = False  # rank 0 told every rank to stop (lockstep only)
    steps: int = 1  # scheduler steps before the next iteration's changes (lockstep: a batch of them)


class LocalCoordinator:
    """One process: the engine decides alone."""

    main = True  # this process serves HTTP
    budgets_admission = True  # a newcomer is admitted in units sized to a time budget (admission.py)
    idle_wait = 0.1  # s an idle engine waits for a request before its next iteration
    # An engine that stopped on a fault of the model leaves the server up, saying why on
    # /health (503) and to every request, for a supervisor or a person to restart it.
    exits_on_failure = False

    def joined(self, engine: "Engine"):
        """Called once the model is loaded, before the first iteration."""

    def changes(self, engine: "Engine") -> Changes:
        # The cancelled go first, so that a cancelled prefill makes room at once.
        engine.scheduler.drop([job for job in engine.scheduler.jobs() if job.cancelled.is_set()])
        return Changes(start=engine.admissible())

    def encode(self, engine: "Engine", prompt: Prompt, encode) -> list:
        """The features of `prompt`'s images from `encode()` (here: run here)."""
        return encode()

    def stats(self) -> dict:
        return {}

    def batch_started(self, engine: "Engine"):
        """Called before an iteration's steps."""

    def batch_ended(self, engine: "Engine", worked: int):
        """Called after an iteration's steps, `worked` of which did work."""

    def failed(self, e: Exception) -> str:
        log.exception("the engine stopped on a fault of the model; /health says so until the server is restarted")
        return f"{type(e).__name__}: {e}"

    def finish(self, engine: "Engine"):
        """Called when the loop ended without a failure."""


class Engine:
    def __init__(self, load_fn, options: EngineOptions, scheduler_type=BatchScheduler, coordinator=None):
        self.load_fn, self.options = load_fn, options
        self.coordinator = coordinator or LocalCoordinator()
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
        self.worked_since_idle = False  # MLX's buffer cache is given back once idle
        self.counters = dict(
            requests=0,
            finished=0,
            cancelled=0,
            failed=0,
            decode_steps=0,
            batched_steps=0,
            max_batch=0,
            generated_tokens=0,
            admission_units=0,
        )
        self.memory = dict(peak_memory_gb=0.0, active_memory_gb=0.0)
        self.reporter = None  # LogprobReporter, made when a request first asks for logprobs
        self.held: Optional[list] = None  # (job, event) sent at the batch's end, not at once (lockstep.py)
        self.scheduler = scheduler_type(self)
        self.thread = threading.Thread(target=self._run, name="llava-engine", daemon=True)

    # -- used by the HTTP threads ----------------------------------------------------------
    def start(self):
        """Load the model in the engine thread; raise its load error here."""
        self.thread.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def needs_pixels(self, key: str) -> bool:
        """Whether the HTTP thread should prepare this image's pixels with the request."""
        return self.scheduler.encodes_images and key not in self.features

    def submit(self, job: Job):
        with self.lock:
            if self.closed or not self.thread.is_alive():
                raise ApiError(503, self.closed or "the generation engine has stopped; restart the server")
            if self.inbox.qsize() + len(self.waiting) >= self.options.max_queue:
                raise ApiError(
                    429, f"the server is busy: {self.options.max_queue} requests are already waiting (--max-queue)"
                )
            self.counters["requests"] += 1
            self.inbox.put(job)

    def stats(self) -> dict:
        """Counters for /health (read from an HTTP thread while the engine works: nothing here
        iterates the engine's collections)."""
        return {
            **self.counters,
            "waiting": self.inbox.qsize() + len(self.waiting),
            "prompt_cache_entries": len(self.prompt_cache),
            "prompt_cache_bytes": self.prompt_cache.nbytes,
            "prompt_cache_hits": self.prompt_cache.hits,
            "feature_cache_images": len(self.features),
            **self.scheduler.stats(),
            **self.coordinator.stats(),
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
            self.model = self.processor = None
            self.scheduler.release()
            gc.collect()

    # -- the engine thread ---------------------------------------------------------------
    def _run(self):
        try:
            self.model, self.processor = self.load_fn()
            self.coordinator.joined(self)
            self.scheduler.loaded()
        except Exception as e:  # reported by start() in the main thread
            self.load_error = e
            return
        finally:
            self.ready.set()
        try:
            while not self.stopping.is_set():
                changes = self.coordinator.changes(self)
                if changes.stop:
                    self.stopping.set()
                    break
                self.scheduler.drop(changes.cancel)
                for job in changes.start:
                    self.worked_since_idle = True
                    self.guard(job, self.scheduler.start, job)
                self.coordinator.batch_started(self)
                worked = 0  # steps that did work (not an idle wait)
                for _ in range(changes.steps):
                    worked += self.scheduler.has_work()
                    self._work()
                    if not self.scheduler.has_work():
                        break
                self.coordinator.batch_ended(self, worked)
        except Exception as e:
            self.failure = self.coordinator.failed(e)
        finally:
            self._close(
                f"the generation engine stopped ({self.failure}); restart the server"
                if self.failure
                else "the server is shutting down"
            )
        if self.failure is None:
            self.coordinator.finish(self)

    def _work(self):
        """One step of the scheduler's work, or (idle) a short wait for a request."""
        if self.scheduler.has_work():
            self.worked_since_idle = True
            self.scheduler.step()
        else:
            if self.worked_since_idle:  # idle now: give MLX's buffer cache back to the system
                mx.clear_cache()
            self.worked_since_idle = False
            if not self.waiting and self.coordinator.idle_wait:  # else the next iteration starts one at once
                try:
                    self.waiting.append(self.inbox.get(timeout=self.coordinator.idle_wait))
                except queue.Empty:
                    pass
        self.memory.update(peak_memory_gb=mx.get_peak_memory() / 1e9, active_memory_gb=mx.get_active_memory() / 1e9)

    def _close(self, reason: str):
        """Take no more requests, and end every one not yet answered with a 503."""
        with self.lock:
            self.closed = reason
        self._take_inbox()
        for job in [*self.waiting, *self.scheduler.jobs()]:
            if not job.finished.is_set():
                job.fail(ApiError(503, reason))
        self.waiting.clear()
        self.scheduler.clear()

    def admissible(self) -> list:
        """The waiting request that starts now, if any; cancelled ones dropped.

        One at a time, once the scheduler is ready for it: starting a request encodes its
        images, so starting all that arrive together would hold the first one's first token
        until every image had gone through the tower."""
        self._take_inbox()
        while self.waiting and self.scheduler.ready_for_more(self.waiting[0]):
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

    def guard(self, job: Job, fn, *args):
        """Run one request's own work (its start, an admission unit, its share of a step's
        results): whatever it raises ends that request only (`fail_job`)."""
        try:
            fn(*args)
        except Exception as e:
            self.fail_job(job, e)

    def fail_job(self, job: Job, e: Exception):
        """End `job`'s request with an OpenAI-shaped error and free its state; the engine and
        every other request go on. A LlavaError says what the request asked that cannot be
        done (400); anything else is a bug, logged with its traceback (500)."""
        if isinstance(e, LlavaError):
            error = ApiError(400, str(e))
        else:
            log.error("a request failed in the engine", exc_info=e)
            error = ApiError(500, f"internal error: {type(e).__name__}: {e}")
        self.scheduler.forget(job)
        job.kv = job.embeddings = job.admission = None
        self.counters["failed"] += 1
        if not job.finished.is_set():
            job.fail(error)

    def emit(self, job: Job, text: str, finish: Optional[str], entries=()) -> bool:
        """Send new text (up to any stop string) and its tokens' logprob entries; True if
        the job is over."""
        stops = job.chat.stop
        if stops:
            text, job.unsent = job.unsent + text, ""
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
            elif finish is None:
                keep = held_back(text, stops)
                text, job.unsent = text[: len(text) - keep], text[len(text) - keep :]
        if text or entries:
            self._send(job, ("text", job.index, text, list(entries)))
        if finish is None:
            return False
        self.scheduler.forget(job)
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
        self._send(job, ("done", job.index, finish, usage))
        return True

    def _send(self, job: Job, event: tuple):
        """Put an event on its job's queue, or hold it there until the batch ends."""
        if self.held is not None:
            self.held.append((job, event))
            return
        job.events.put(event)
        if event[0] == "done":
            job.finished.set()

    def send_held(self):
        """Send what the batch held, in order."""
        held, self.held = self.held or [], None
        for job, event in held:
            self._send(job, event)

    def logprob_entries(self, job: Job, logprobs, token: int, finish: Optional[str]) -> list:
        """The logprobs entry of a token just generated, if the request asked for them (none
        for the end of turn, which is no part of the answer)."""
        if not job.chat.logprobs or (finish == "stop" and token in self.processor.tokenizer.eos_token_ids):
            return []
        if self.reporter is None:
            rows = self.model.config.text_config["vocab_size"]
            table = token_table(self.processor.tokenizer._tokenizer)
            self.reporter = LogprobReporter(self.processor.tokenizer, self.processor.vocabulary, table.tokens, rows)
        return [self.reporter.entry(logprobs, token, job.chat.top_logprobs, first=len(job.tokens) == 1)]

    def constrain(self, job: Job):
        """Each choice's schema processor (the schema compiled once, in the HTTP thread)."""
        rows = self.model.config.text_config["vocab_size"]
        for choice in job.choices:
            choice.constraint = schema_processor(self.processor, rows, job.chat.schema)
