"""Generation, layered as in mlx-lm: a step generator (mlx-lm's own, fed the merged
embeddings) → `stream_generate` (text pieces, timing, memory) → `generate` (one shot),
and the `generate.py` command line.

The loop is lazy and bounded: the image features are computed once, the prompt is
prefilled in chunks into a KV cache (no L x L mask is materialised), and each decode
step's graph is scheduled before the previous token is read back (mlx-lm's generate_step).
"""

import time
from dataclasses import dataclass, field
from typing import Generator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import generate_step as lm_generate_step
from mlx_lm.sample_utils import make_sampler

from . import validate
from .cache import SessionCache, in_prompt_order, sequence_keys
from .constrain import schema_of, schema_processor
from .distributed.group import agree_seed, is_main, settle
from .distributed.share import shared_features
from .errors import LlavaError
from .logprobs import vocabulary_mask
from .processor import load_image
from .video import as_video_list, load_video

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_PREFILL_STEP = 2048


@dataclass
class GenerationResponse:
    """One streamed piece of the answer, with running statistics."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, MLX's own counter
    image_positions: int
    encode_time: float  # s, vision tower + projector
    ttft: float  # s, from the call to the first token
    cached_tokens: int = 0  # prompt positions whose KV came from the session cache
    logprobs: Optional[mx.array] = None  # of this step, over the whole vocabulary
    finish_reason: Optional[str] = None


@dataclass
class GenerationResult:
    text: str
    tokens: List[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    image_positions: int = 0
    encode_time: float = 0.0
    ttft: float = 0.0
    finish_reason: Optional[str] = None


def prepare_prompt(
    processor, prompt: str, num_images: int, template: bool, system=None, history=(), num_videos: int = 0
) -> str:
    """The prompt to tokenise: as written, or the question in the chat template (images first,
    or where the question's own `<image>` placeholders put them: `Processor.apply_template`)."""
    if not template:
        return prompt
    return processor.apply_template(prompt, num_images, system, history, num_videos)


def vocabulary_sampler(sampler, vocabulary: int, rows: int, eos_ids=(), renormalise: bool = True):
    """Never pick ids past the tokenizer's base vocabulary, except the end-of-turn ids
    (`logprobs.vocabulary_mask`).

    llava-hf pads the embeddings (32000 -> 32064 rows) and adds `<image>` and `<pad>`:
    ids the original model, with its 32000 rows, could not produce. The kept ids are
    renormalised, so top-p sees their own distribution; a greedy sampler
    (`renormalise=False`) needs no renormalising, the argmax being the same.
    """
    allowed = vocabulary_mask(vocabulary, rows, eos_ids)
    if allowed is None:
        return sampler
    mask = mx.where(allowed, 0.0, -float("inf"))

    def sample(logprobs):
        kept = logprobs + mask
        return sampler(kept - mx.logsumexp(kept, axis=-1, keepdims=True) if renormalise else kept)

    return sample


def head_size(text_config: dict) -> int:
    """Attention head size (mlx-lm's qwen2 keeps no `head_dim` attribute)."""
    return text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"]


def kv_group_size(head_dim: int, kv_bits: Optional[int]) -> int:
    """The largest MLX quantization group that divides the attention head size."""
    for group in (64, 32):
        if head_dim % group == 0:
            return group
    if kv_bits:
        raise LlavaError(f"cannot quantize the KV cache: head size {head_dim} is not a multiple of 32")
    return 64


def stream_generate(
    model,
    processor,
    prompt: str,
    images: Sequence = (),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    seed: Optional[int] = None,
    template: bool = True,
    system: Optional[str] = None,
    history: Sequence = (),
    ignore_eos: bool = False,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    kv_bits: Optional[int] = None,
    max_kv_size: Optional[int] = None,
    cache: Optional[SessionCache] = None,
    videos: Sequence = (),
    num_frames: Optional[int] = None,
    response_format: Optional[dict] = None,
) -> Generator[GenerationResponse, None, None]:
    """Yield the answer piece by piece (`.text`), with timing and peak memory.

    `template=False` uses `prompt` as written (one `<image>` per image, one `<video>` per
    video); otherwise the question is put in the checkpoint's chat template, images and
    videos first, after the earlier turns in `history` [(question, answer), ...]. A video
    is a file path, a uint8 array (T, H, W, 3) or a list of PIL images; a file gives
    `num_frames` frames sampled uniformly (8 when None), frames given are used as given
    unless `num_frames` is passed. Passing the same `cache` (SessionCache) to successive
    calls reuses encoded images and videos and the KV cache of the shared prefix.

    `response_format` holds the answer to a JSON schema: OpenAI's {"type": "json_object"}
    or {"type": "json_schema", "json_schema": {"schema": ...}}, or a JSON schema itself
    (constrain.py); the answer is compact JSON that ends with the object.
    """
    start = time.perf_counter()
    images, history = validate.generation_inputs(prompt, images, system, history, cache)
    validate.generation_options(max_tokens, temperature, top_p, seed, prefill_step_size, kv_bits, max_kv_size)
    schema = schema_of(response_format, bare_schema=True)
    seed = agree_seed(model, seed)
    if seed is not None:
        mx.random.seed(seed)
    local = is_main(model)  # sharded: only rank 0 reads the media
    images = [load_image(im) for im in images] if local else images
    videos = as_video_list(videos)
    text = prepare_prompt(processor, prompt, len(images), template, system, history, len(videos))
    ids = processor.encode_prompt(text, len(images), len(videos))
    videos = [load_video(v, num_frames) for v in videos] if local else videos
    cache = cache if cache is not None else SessionCache()

    tic = time.perf_counter()
    image_keys, features = shared_features(
        model,
        lambda: in_prompt_order(
            ids,
            cache.image_features(model, processor, images),
            cache.video_features(model, processor, videos),
        ),
    )
    encode_time = time.perf_counter() - tic
    keys = sequence_keys(ids, image_keys, features)
    length, context = len(keys), model.config.context_length
    if length > context:
        raise LlavaError(f"the prompt is {length} positions long (images included) but the context is {context}")
    max_tokens = min(max_tokens, context - length) if max_tokens >= 0 else context - length

    rows = model.config.text_config["vocab_size"]
    constraint = schema_processor(processor, rows, schema)
    kv, reused = cache.prefix(model, keys, kv_bits, max_kv_size)
    embeddings = model.embed(ids, image_features=features, start=reused)[0]
    steps = lm_generate_step(
        mx.zeros((length - reused,), dtype=mx.int32),
        model.language_model,
        max_tokens=max_tokens,
        sampler=vocabulary_sampler(
            make_sampler(temperature, top_p if top_p < 1.0 else 0.0),
            processor.vocabulary,
            rows,
            processor.tokenizer.eos_token_ids,
            renormalise=temperature > 0,
        ),
        logits_processors=[constraint] if constraint else None,
        prompt_cache=kv,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size(head_size(model.config.text_config), kv_bits),
        quantized_kv_start=0,
        input_embeddings=embeddings,
    )
    tokenizer = processor.tokenizer
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    image_positions = length - (len(ids) - len(images) - len(videos))
    ttft, prompt_tps, tic, token, logprobs, generated = 0.0, 0.0, start, None, None, []

    def response(text, finish=None):
        n = len(generated) - (finish == "stop")
        elapsed = time.perf_counter() - tic
        return GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=length,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / elapsed if elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            image_positions=image_positions,
            encode_time=encode_time,
            ttft=ttft,
            cached_tokens=reused,
            logprobs=logprobs,
            finish_reason=finish,
        )

    finish = "length"
    try:
        for token, logprobs in steps:
            if not generated:
                ttft = time.perf_counter() - start
                prompt_tps = (length - reused) / ttft
                tic = time.perf_counter()
            generated.append(token)
            if token in tokenizer.eos_token_ids and not ignore_eos:
                finish = "stop"
                break
            detokenizer.add_token(token)
            yield response(detokenizer.last_segment)
        detokenizer.finalize()
        yield response(detokenizer.last_segment, finish)
    finally:
        cache.record(keys, generated)
        settle(model)


def generate(model, processor, prompt: str, images: Sequence = (), **kwargs) -> GenerationResult:
    """The whole answer at once; takes the same options as `stream_generate`."""
    pieces, tokens, last = [], [], None
    for last in stream_generate(model, processor, prompt, images, **kwargs):
        pieces.append(last.text)
        if last.finish_reason is None:
            tokens.append(last.token)
    return GenerationResult(
        text="".join(pieces),
        tokens=tokens,
        prompt_tokens=last.prompt_tokens,
        prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps,
        peak_memory=last.peak_memory,
        image_positions=last.image_positions,
        encode_time=last.encode_time,
        ttft=last.ttft,
        finish_reason=last.finish_reason,
    )
