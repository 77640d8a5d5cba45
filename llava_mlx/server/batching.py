"""The batching scheduler: continuous batching over mlx-lm's `BatchGenerator`.

A request's merged image+text sequence is prefilled by this project's own path (image
features from the feature cache or the vision tower, `model.embed`, the decoder over the
embeddings in chunks, starting from the KV of the longest cached prefix); its KV cache and
last token then join mlx-lm's `BatchGenerator`, which decodes every running request in one
batch (requests join and leave between steps). Admission work (a few crops through the
tower, or a prefill chunk, sized to a time budget: admission.py) and decode steps alternate,
so a newcomer's picture never stalls the running answers for more than one such unit.
"""

import copy
import logging
import time
from collections import deque

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_top_p, make_sampler

from ..cache import SEVERAL
from ..generation import vocabulary_sampler
from .admission import Admission, Pace
from .prompt import Prompt, media_values

log = logging.getLogger("llava_mlx.server")


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


def contained(job, fn, sampling: bool = False):
    """A request's own logits processor (or sampler, `sampling`) as the batch calls it, with
    its failures kept on the job instead of raised through the batch's step: the engine ends
    that request after the step (`_decode_step`) and the other rows go on as they would have
    alone. Until then the row's logits pass unchanged (a sampler: the likeliest token)."""

    def call(*args):
        if job.fault is None:
            try:
                return fn(*args)
            except Exception as e:
                job.fault = e
        return mx.argmax(args[-1], axis=-1) if sampling else args[-1]

    return call


class BatchScheduler:
    encodes_images = True  # the engine encodes; the HTTP threads prepare the pixels

    def __init__(self, engine):
        self.engine = engine
        self.prefilling: deque = deque()
        self.running: dict = {}  # the generator's uid → job
        self.generator = None
        self.stream = None  # the engine thread's default stream, once loaded
        self.greedy = None  # one sampler shared by every greedy request (one batched call)
        self.padded_vocab = 0  # the decoder's output rows (llava-hf pads past the tokenizer)
        self.pace = Pace(engine.options.admission_budget, engine.options.prefill_step_size)
        self.decode_seconds = None  # the last decode step's time, which the admission budget follows

    def loaded(self):
        engine = self.engine
        self.stream = mx.default_stream(mx.default_device())
        self.generator = self._new_generator()
        tokenizer = engine.processor.tokenizer
        self.padded_vocab = engine.model.config.text_config["vocab_size"]
        self.greedy = vocabulary_sampler(
            make_sampler(0.0),
            engine.processor.vocabulary,
            self.padded_vocab,
            tokenizer.eos_token_ids,
            renormalise=False,
        )

    def release(self):
        self.generator = None

    # -- what the engine asks ----------------------------------------------------------------
    def jobs(self) -> list:
        return [*self.prefilling, *self.running.values()]

    def has_work(self) -> bool:
        return bool(self.prefilling or self.running)

    def ready_for_more(self, job) -> bool:
        """Whether `job` (its n choices) can start now: nothing else prefilling, room in the batch."""
        return not self.prefilling and len(self.running) + len(job.choices) <= self.engine.options.max_batch

    def stats(self) -> dict:
        return {"running": len(self.prefilling) + len(self.running)}

    def clear(self):
        self.prefilling.clear()
        self.running.clear()

    def forget(self, job):
        """The job is over (answered or failed): it leaves the scheduler and the batch."""
        if job in self.prefilling:
            self.prefilling.remove(job)
        if self.running.pop(job.uid, None) is not None:
            self.generator.remove([job.uid])  # nothing when the generator ended it itself

    def drop(self, jobs: list):
        """Stop prefilling or decoding these cancelled jobs and free their KV."""
        dropped = {id(job) for job in jobs}
        self.prefilling = deque(job for job in self.prefilling if id(job) not in dropped)
        for job in jobs:
            job.kv = job.embeddings = job.admission = None
        gone = [uid for uid, job in self.running.items() if id(job) in dropped]
        if gone:
            self.generator.remove(gone)
            for uid in gone:
                del self.running[uid]
        self.engine.counters["cancelled"] += len(jobs)

    # -- starting a request --------------------------------------------------------------------
    def start(self, job):
        """The cached prefix's KV; the admission that encodes the images and prefills the rest
        unit by unit (admission.py)."""
        p = job.prompt
        self.engine.constrain(job)
        if not isinstance(p.keys[-1], int):
            raise RuntimeError("the prompt ends inside an image")
        kv, job.cached = self.engine.prompt_cache.fetch(p.keys)
        job.kv = kv if kv is not None else make_prompt_cache(self.engine.model.language_model)
        # Lockstep: rank 0 encodes the images whole and shares them, on every rank at once.
        features = None if self.engine.coordinator.budgets_admission else self._features(p)
        job.admission = Admission(self.engine, job, features)
        self.prefilling.append(job)

    def _features(self, p: Prompt) -> list:
        engine = self.engine
        local = lambda: engine.features.get(p.image_keys, lambda missing: self._encode(p, missing))  # noqa: E731
        return engine.coordinator.encode(engine, p, local)

    def _encode(self, p: Prompt, missing: list) -> list:
        """Features of the images and videos `missing` from the cache, the images in one batch."""
        model = self.engine.model
        inputs = {k: media_values(self.engine.processor, p, k) for k in missing}
        images = [k for k in missing if inputs[k][1] is not None]
        features = {}
        if images:
            values = mx.array(np.concatenate([inputs[k][0] for k in images]))
            several = any(k.endswith(SEVERAL) for k in images)  # the images of one prompt: all or none
            features = dict(zip(images, model.image_features(values, [inputs[k][1] for k in images], several)))
        return [features[k] if k in features else model.video_features(mx.array(inputs[k][0])) for k in missing]

    # -- one step: a unit of admission, then a decode step ----------------------------------------
    def step(self):
        if self.prefilling:
            job = self.prefilling[0]
            self.engine.guard(job, self._admit, job)
        if self.running:
            self._decode_step()

    def _admit(self, job):
        """One unit of the first waiting request's admission, sized to the pace's budget while
        answers are running (they decode between units), as large as it can be otherwise."""
        self.pace.follow(self.decode_seconds, self.engine.options.admission_budget)
        alone = not self.running or not self.engine.coordinator.budgets_admission
        if job.admission.step(self.pace, alone):
            self.prefilling.popleft()
            job.admission = None
            self._insert(job)

    def _insert(self, job):
        """The prefilled prompt's choices join the batch: n choices, n copies of its KV."""
        choices = job.choices
        caches = [job.kv] + [copy.deepcopy(job.kv) for _ in choices[1:]]
        uids = self.generator.insert(
            [[job.prompt.keys[-1]]] * len(choices),
            max_tokens=[job.prompt.max_tokens] * len(choices),
            caches=caches,
            samplers=[self._sampler(choice) for choice in choices],
            logits_processors=[
                [contained(choice, choice.constraint)] if choice.constraint else [] for choice in choices
            ],
        )
        job.kv = job.embeddings = None
        for choice, uid in zip(choices, uids):
            choice.uid, choice.cached = uid, job.cached
            choice.detokenizer = self.engine.processor.tokenizer.detokenizer
            self.running[uid] = choice

    def _sampler(self, job):
        """Greedy requests share one sampler (one batched call); others get their own."""
        chat = job.chat
        if chat.temperature == 0:
            return self.greedy
        if job.seed is not None:
            base = seeded_sampler(chat.temperature, chat.top_p, job.seed)
        else:
            base = make_sampler(chat.temperature, chat.top_p if chat.top_p < 1 else 0.0)
        tokenizer = self.engine.processor.tokenizer
        vocabulary = self.engine.processor.vocabulary
        sampler = vocabulary_sampler(base, vocabulary, self.padded_vocab, tokenizer.eos_token_ids)
        return contained(job, sampler, sampling=True)

    def _decode_step(self):
        """One decode step of every running answer. What fails in a request's own part of the
        step (its sampler, its schema, its logprobs, its text) ends that request only; the
        step itself failing is a fault of the model (MLX out of memory, a lost rank): it
        raises, and the engine stops."""
        engine, counters = self.engine, self.engine.counters
        tic = time.perf_counter()
        responses = self.generator.next()[1]
        self.decode_seconds = time.perf_counter() - tic
        if responses:
            counters["decode_steps"] += 1
            counters["batched_steps"] += len(responses) > 1
            counters["max_batch"] = max(counters["max_batch"], len(responses))
        for r in responses:
            job = self.running.get(r.uid)
            if job is None:
                continue
            if job.fault is not None:
                engine.fail_job(job, job.fault)
            else:
                engine.guard(job, self._took, job, r)

    def _took(self, job, r):
        """A running answer's token from the step: its text, logprobs, end."""
        engine = self.engine
        job.tokens.append(r.token)
        if r.finish_reason != "stop":
            job.detokenizer.add_token(r.token)
        if r.finish_reason is not None:
            job.detokenizer.finalize()
        entries = engine.logprob_entries(job, r.logprobs, r.token, r.finish_reason)
        engine.emit(job, job.detokenizer.last_segment, r.finish_reason, entries)
        if r.finish_reason is not None:
            self._remember(job, r.prompt_cache)

    def _remember(self, job, cache):
        """Keep a finished request's KV (prompt and answer) for later requests to share."""
        keys = job.prompt.keys + job.tokens
        if cache[0].offset != len(keys):
            log.warning("not caching a KV of %d positions for %d keys", cache[0].offset, len(keys))
            return
        self.engine.prompt_cache.insert(keys, cache)

    def _new_generator(self) -> BatchGenerator:
        options = self.engine.options
        return BatchGenerator(
            self.engine.model.language_model,
            stop_tokens=[[t] for t in self.engine.processor.tokenizer.eos_token_ids],
            completion_batch_size=options.max_batch,
            prefill_batch_size=options.max_batch,
            prefill_step_size=options.prefill_step_size,
            stream=self.stream,
        )
