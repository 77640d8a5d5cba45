"""python -m llava_mlx convert --model llava-hf/llava-v1.6-mistral-7b-hf --out llava-v1.6-mistral-4bit -q"""

import argparse

from ..checkpoint.convert import DEFAULT_BITS, DTYPES, GROUP_SIZES, QUANT_BITS, convert, summary
from ..checkpoint.quantize import DEFAULT_GROUP_SIZE, RECIPES
from . import command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a LLaVA 1.5/1.6, OneVision or NeXT-Video checkpoint to MLX, optionally quantized.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local checkpoint directory or Hugging Face repo id")
    source.add_argument("--delta", help="delta weights (first LLaVA releases) to add to --model-base")
    p.add_argument("--model-base", help="base model of a LoRA, projector-only or --delta checkpoint")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the decoder (linears, lm_head, embeddings)")
    p.add_argument(
        "--q-bits", type=int, choices=QUANT_BITS, default=None, help=f"bits per weight (none: {DEFAULT_BITS})"
    )
    p.add_argument(
        "--q-group-size",
        type=int,
        choices=GROUP_SIZES,
        default=None,
        help=f"weights per quantization group (none: {DEFAULT_GROUP_SIZE})",
    )
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the float parameters (none: as stored)")
    p.add_argument("--quantize-vision", action="store_true", help="also quantize the vision tower and the projector")
    p.add_argument(
        "--quant-predicate",
        choices=list(RECIPES),
        help="mixed-precision recipe (mlx-lm's, implies -q): low bits for most layers, high bits for some",
    )
    p.add_argument("--vision-tower", default=None, help="CLIP tower path or repo id (original LLaVA-1.5 layout)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out once the new output is complete")
    return p


@command
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.model, args.delta = (args.delta, True) if args.delta is not None else (args.model, False)
    print(summary(convert(**vars(args))))
    return 0
