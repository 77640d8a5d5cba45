"""Per-module (mixed-precision) quantization, as mlx-lm and mlx-vlm write it.

A `quantization` block in config.json holds the defaults (`group_size`, `bits`, `mode`) and,
for a mixed-precision conversion (`--quant-predicate mixed_4_6` and friends), one entry per
module: `"language_model.model.layers.1.mlp.down_proj": {"group_size": 64, "bits": 6}`. An
entry `false` means the module stays in float. mlx-lm's and mlx-vlm's loaders read exactly
this, so our own mixed conversions record their bits the same way.

The recipes are mlx-lm's (`mlx_lm.convert.mixed_quant_predicate_builder`, after llama.cpp's
Q4_K_M): the low bits everywhere, the high bits for `lm_head` (and, as mlx-vlm does, the
embedding table) and for `v_proj` and `down_proj` in the first and last eighth of the layers
and every third layer between.

What `convert` quantizes: the decoder's linear layers, lm_head and embeddings; the vision tower
and projector only when asked; never the embeddings the tower reads as plain arrays.
"""

from collections import Counter
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..errors import LlavaError
from ..model import LlavaConfig, LlavaModel

# (low, high) bits of each recipe `convert.py --quant-predicate` takes.
RECIPES = {
    "mixed_2_6": (2, 6),
    "mixed_3_4": (3, 4),
    "mixed_3_6": (3, 6),
    "mixed_4_6": (4, 6),
    "mixed_4_8": (4, 8),
}

DEFAULT_MODE = "affine"

# Keys of the block that are not module entries.
BLOCK_FIELDS = ("group_size", "bits", "mode", "modules", "skipped", "recipe")


def module_entries(block: Optional[dict]) -> Dict[str, object]:
    """The per-module entries of a `quantization` block: {module path: dict or False}."""
    if not block:
        return {}
    return {k: v for k, v in block.items() if k not in BLOCK_FIELDS and isinstance(v, (dict, bool))}


def module_params(block: dict, path: str) -> Optional[dict]:
    """How module `path` is quantized according to `block`: {group_size, bits[, mode]} (its own
    entry over the block's defaults), or None when its entry says it stays in float."""
    entry = block.get(path, True)
    if entry is False:
        return None
    defaults = {"group_size": 64, "bits": 4, **{k: block[k] for k in ("group_size", "bits", "mode") if k in block}}
    overrides = (
        {k: v for k, v in entry.items() if k in ("group_size", "bits", "mode")} if isinstance(entry, dict) else {}
    )
    return {**defaults, **overrides}


def recipe_predicate(recipe: str, model: nn.Module, group_size: int) -> Callable[[str, nn.Module], dict]:
    """mlx-lm's per-module choice of bits for `recipe`: path, module → {group_size, bits, mode}.

    Two changes make the result what mlx-vlm's `--quant-predicate` writes, and what
    mlx-community publishes: the embedding table gets the high bits, like `lm_head` (mlx-lm
    leaves it at the low bits; with it high, the logits are closer to float32, see docs/convert.md),
    and `mixed_4_8`, which mlx-lm does not name, is its `mixed_4_6` choice of layers with 8
    high bits instead of 6. `model` must have `layers` (the decoder's) and `down_proj` modules.
    """
    from mlx_lm.convert import mixed_quant_predicate_builder

    low, high = RECIPES[recipe]
    predicate = mixed_quant_predicate_builder("mixed_4_6" if recipe == "mixed_4_8" else recipe, model, group_size)

    def params(path: str, module: nn.Module) -> dict:
        if path.endswith("embed_tokens"):
            path = "lm_head"  # the embedding table takes lm_head's bits, as in mlx-vlm's conversions
        chosen = dict(predicate(path, module))
        chosen["bits"] = high if chosen["bits"] > low else low
        return chosen

    return params


def recorded_entries(model: nn.Module, defaults: dict) -> Dict[str, dict]:
    """Per-module entries for the quantized modules of `model` when their bits or group sizes
    differ (a mixed-precision model); {} when every one uses `defaults`."""
    quantized = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", DEFAULT_MODE)}
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    uniform = all(
        (p["group_size"], p["bits"], p["mode"]) == (defaults["group_size"], defaults["bits"], DEFAULT_MODE)
        for p in quantized.values()
    )
    return {} if uniform else dict(sorted(quantized.items()))


def bits_summary(block: dict) -> str:
    """'4-bit' or, for a mixed block, '4/6-bit (13 at 4, 3 at 6 bits)'."""
    counts = Counter(e.get("bits", block["bits"]) for e in module_entries(block).values() if isinstance(e, dict))
    if len(counts) <= 1:
        return f"{block['bits']}-bit"
    bits = sorted(counts)
    detail = ", ".join(f"{counts[b]} at {b}" for b in bits)
    return f"{'/'.join(map(str, bits))}-bit ({detail} bits)"


# Quantized only with --quantize-vision.
VISION_PARTS = ("vision_tower.", "multi_modal_projector.")

# Never quantized: vision.py reads the patch and position embeddings' `.weight` directly.
NEVER_QUANTIZED = ("vision_tower.embeddings.",)

DEFAULT_GROUP_SIZE = 64


def quantize_choice(path: str, module: nn.Module, group_size: int, quantize_vision: bool) -> Optional[str]:
    """'quantize', 'skip' (input width not a multiple of the group size) or None (out of scope)."""
    if not hasattr(module, "to_quantized") or path.startswith(NEVER_QUANTIZED):
        return None
    if path.startswith(VISION_PARTS) and not quantize_vision:
        return None
    return "quantize" if module.weight.shape[-1] % group_size == 0 else "skip"


def quantize_model(
    model: nn.Module, bits: int, group_size: int, quantize_vision: bool, recipe: Optional[str] = None
) -> dict:
    """Quantize `model` in place (lazily); returns the config's `quantization` block.

    `recipe` (mixed_4_6 ...): each layer's bits are mlx-lm's choice for it, recorded per module
    in the block as mlx-lm and mlx-vlm record them; `bits` is then the recipe's low bits."""
    choices = {}
    mixed = recipe_predicate(recipe, model, group_size) if recipe else None

    def predicate(path, module):
        choice = quantize_choice(path, module, group_size, quantize_vision)
        if choice:
            choices[path] = choice
        if choice == "quantize" and mixed:
            return mixed(path, module)
        return choice == "quantize"

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    modules = sorted(p for p, c in choices.items() if c == "quantize")
    skipped = sorted(p for p, c in choices.items() if c == "skip")
    if not modules:
        widths = sorted({int(m.weight.shape[-1]) for p, m in model.named_modules() if p in choices})
        raise LlavaError(
            f"group size {group_size} divides the input width of no layer to quantize "
            f"(widths {', '.join(map(str, widths))}); choose another --q-group-size"
        )
    block = {"group_size": group_size, "bits": bits, "modules": modules, "skipped": skipped}
    if recipe:
        block["recipe"] = recipe
    return {**block, **recorded_entries(model, block)}


def quantized_modules(model: nn.Module) -> list:
    return sorted(p for p, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))


def existing_quantization(model: nn.Module, config: LlavaConfig) -> dict:
    """The block for an already-quantized checkpoint converted as it is."""
    modules = quantized_modules(model)
    group_size = config.quantization["group_size"]
    vision = any(p.startswith(VISION_PARTS) for p in modules)
    skipped = sorted(
        p for p, m in model.named_modules() if p not in modules and quantize_choice(p, m, group_size, vision) == "skip"
    )
    block = {"group_size": group_size, "bits": config.quantization["bits"], "modules": modules, "skipped": skipped}
    return {**block, **recorded_entries(model, block)}


def cast(model: nn.Module, dtype):
    """Float parameters to `dtype` (lazily); quantized uint32 weights stay as they are."""

    def to(value):
        return value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value

    model.update(tree_map(to, model.parameters()))


def estimate_bytes(
    config: LlavaConfig,
    bits: Optional[int] = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    quantize_vision: bool = False,
    dtype: str = "float16",
    quant_predicate: Optional[str] = None,
) -> int:
    """Bytes of the weights `convert` writes for `config`, computed from shapes alone.

    The model is built lazily (nothing is allocated or computed), cast and quantized
    exactly as `convert` does; MLX's quantized storage is the weight packed into uint32
    (`bits` per value) plus a scale and a bias in `dtype` per group of `group_size`.
    `bits=None`: unquantized. `quant_predicate`: a mixed recipe (then `bits` is its low bits).
    """
    config = LlavaConfig.from_dict({**config.to_dict(), "quantization": None})
    model = LlavaModel(config)
    cast(model, getattr(mx, dtype))
    if bits or quant_predicate:
        bits = RECIPES[quant_predicate][0] if quant_predicate else bits
        quantize_model(model, bits, group_size, quantize_vision, quant_predicate)
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
