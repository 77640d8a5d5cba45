"""python -m llava_mlx generate --image view.jpg --prompt "What is in this image?" """

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .. import validate
from ..cache import SessionCache
from ..checkpoint.load import load
from ..constrain import schema_of
from ..distributed.group import is_main, label
from ..errors import LlavaError
from ..generation import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP,
    DEFAULT_TEMP,
    DEFAULT_TOP_P,
    GenerationResponse,
    stream_generate,
)
from ..video import DEFAULT_NUM_FRAMES
from . import command

DEFAULT_MODEL = "mlx-community/llava-v1.6-mistral-7b-4bit"

DEFAULT_PROMPT = "Describe this image."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Ask LLaVA about images and videos (MLX). The answer streams to stdout; token counts, "
        "speeds and peak memory go to stderr.",
        epilog="Placement: with the template on (the default), --prompt is the question and the images come "
        "first in the user's turn, unless the question holds one <image> per --image: then each image goes where "
        "its <image> is (likewise <video>); any other number of placeholders is an error. With --no-template, "
        "--prompt is used as written and must hold one <image> per --image and one <video> per --video.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="local checkpoint directory or Hugging Face repo id")
    p.add_argument("--image", nargs="+", default=[], help="image path(s) or http(s) URL(s)")
    p.add_argument("--video", nargs="+", default=[], help="video file(s) (LLaVA-OneVision, LLaVA-NeXT-Video)")
    p.add_argument(
        "--num-frames", type=int, default=DEFAULT_NUM_FRAMES, help="frames sampled uniformly from each video"
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question (with --no-template, the raw prompt)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="tokens to generate at most (-1: up to the context length)",
    )
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="sampling temperature (0: greedy)")
    p.add_argument(
        "--top-p",
        type=float,
        default=DEFAULT_TOP_P,
        help="nucleus sampling: keep the smallest set of tokens whose probability reaches this (1: off)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (none: a fresh one each run)")
    p.add_argument("--system", default=None, help="system prompt (replaces the template's)")
    p.add_argument("--no-template", action="store_true", help="use --prompt as written, <image> placeholders included")
    p.add_argument(
        "--vision-tower", default=None, help="CLIP tower path or repo id (original LLaVA-1.5 layout, which ships none)"
    )
    p.add_argument(
        "--model-base", default=None, help="base model of a LoRA or projector-only --model (path or repo id)"
    )
    p.add_argument("--chat", action="store_true", help="after --prompt (if given), read more questions from stdin")
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=DEFAULT_PREFILL_STEP,
        help="positions prefilled per step (bounds prefill memory)",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        choices=(4, 8),
        default=None,
        help="quantize the KV cache to this many bits (none: float)",
    )
    p.add_argument(
        "--max-kv-size", type=int, default=None, help="rotating KV cache of this many positions (none: unbounded)"
    )
    p.add_argument("--pipeline", action="store_true", help="under mlx.launch: pipeline- (not tensor-) parallel")
    structured = p.add_mutually_exclusive_group()
    structured.add_argument("--json", action="store_true", help="answer with one JSON object (compact)")
    structured.add_argument(
        "--json-schema", metavar="FILE", default=None, help="answer with JSON that keeps to this JSON schema file"
    )
    return p


def response_format(args) -> Optional[dict]:
    """--json / --json-schema as a response_format, the schema checked before the model loads."""
    if args.json:
        return {"type": "json_object"}
    if args.json_schema is None:
        return None
    path = validate.usable_path(args.json_schema, "--json-schema")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlavaError(f"cannot read the JSON schema {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlavaError(f"{path} is not JSON: {e}") from None
    return {"type": "json_schema", "json_schema": {"name": Path(path).stem, "schema": schema}}


def chat_questions(first: Optional[str], interactive: bool):
    """--prompt, then (with --chat) one question per line of stdin until EOF or 'q'."""
    if first is not None:
        yield first
    if not interactive:
        return
    while True:
        if sys.stdin.isatty():
            print(">> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError as e:
            raise LlavaError(f"stdin is not valid UTF-8 text (byte {e.start} of the line)") from None
        if not line or line.strip() in ("q", "quit", "exit"):
            return
        if line.strip():
            yield line.strip()


@command
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    options = dict(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        seed=args.seed,
        template=not args.no_template,
        system=args.system,
        prefill_step_size=args.prefill_step_size,
        kv_bits=args.kv_bits,
        max_kv_size=args.max_kv_size,
        videos=args.video,
        num_frames=args.num_frames,
        response_format=response_format(args),
    )
    schema_of(options["response_format"])
    first = None if (args.chat and args.prompt == DEFAULT_PROMPT) else args.prompt
    validate.generation_options(
        **{
            k: v
            for k, v in options.items()
            if k not in ("template", "system", "videos", "num_frames", "response_format")
        }
    )
    if first is not None:
        validate.prompt(first)
    model, processor = load(
        args.model, vision_tower=args.vision_tower, model_base=args.model_base, pipeline=args.pipeline
    )
    cache, history, response = SessionCache(), [], None
    shown = is_main(model)  # under mlx.launch the answer is printed once
    for question in chat_questions(first, args.chat):
        # The images belong to the first turn; later turns only prefill their new text.
        answer = []
        for response in stream_generate(
            model, processor, question, args.image, history=history, cache=cache, **options
        ):
            if shown:
                print(response.text, end="", flush=True)
            answer.append(response.text)
        if shown:
            print(flush=True)
        history.append((question, "".join(answer).strip()))
        report(response, label(model))
    return 0


def report(r: GenerationResponse, prefix: str = ""):
    print(
        f"{prefix}Prompt: {r.prompt_tokens} tokens ({r.image_positions} image positions), "
        f"{r.prompt_tps:.1f} tokens/s\n"
        f"{prefix}Generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s\n"
        f"{prefix}Peak memory: {r.peak_memory:.3f} GB",
        file=sys.stderr,
    )
