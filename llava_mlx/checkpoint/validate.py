"""Checkpoint files and configs checked before anything parses them half-way: the small JSON
files, config.json's nested types and sizes, the pinpoints, the image settings, and where a
conversion may write. One clear `LlavaError` naming the file and the field."""

import ast
import math
import re
from numbers import Integral, Real
from pathlib import Path
from typing import List, Optional

from ..errors import LlavaError, LlavaValueError
from ..merge import merge_kind
from ..projector import projector_depth
from ..validate import integer, number, path_argument
from ..vision import ACTIVATIONS
from .files import read_json

ASPECT_RATIOS = ("pad", "anyres", "square")

ANYRES_MAX = re.compile(r"anyres_max_[1-9][0-9]*")  # LLaVA-OneVision: anyres, then at most N tiles' worth

FEATURE_SELECTS = ("patch", "cls_patch")

# llava-hf's vision_feature_select_strategy: 'default' drops the class token, 'full' keeps it.
SELECT_STRATEGIES = (None, "default", "full")

# JSON files of a checkpoint that we or transformers read: each must be a JSON object.
CHECKPOINT_JSON = (
    "config.json",
    "model.safetensors.index.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def checkpoint_files(path: Path):
    """The small files of a checkpoint directory, before anything parses them half-way."""
    for name in CHECKPOINT_JSON:
        if (path / name).exists():
            read_json(path / name)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise LlavaError(f"no tokenizer in {path} (tokenizer.json, tokenizer.model or vocab.json)")
    model_file = path / "tokenizer.model"
    if model_file.exists():
        import sentencepiece as spm

        try:
            spm.SentencePieceProcessor(model_proto=model_file.read_bytes())
        except (RuntimeError, OSError) as e:
            raise LlavaError(f"{model_file} is not a SentencePiece model ({str(e).splitlines()[0][:80]})") from None


def pinpoints(value, where: str):
    """image_grid_pinpoints as a list; configs sometimes hold it as a string."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise LlavaError(
                f"image_grid_pinpoints in {where} is not a list of [width, height]: {value[:60]!r}"
            ) from None
    return value


def raw_config(raw: dict, where: str):
    """config.json's nested fields have the types the layouts give them."""
    for key in ("text_config", "vision_config", "quantization", "rope_scaling", "rope_parameters"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise LlavaError(f"'{key}' in {where} must be an object, not {type(raw[key]).__name__}")
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(raw.get("text_config"), dict) and raw["text_config"].get(key) is not None:
            if not isinstance(raw["text_config"][key], dict):
                raise LlavaError(f"'text_config.{key}' in {where} must be an object")
    layer = raw.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise LlavaError(f"vision_feature_layer {layer} (several layers) is not supported")
    for key in ("vision_feature_layer", "mm_vision_select_layer"):
        if key in raw:
            integer(raw[key], f"{key} in {where}")
    if raw.get("vision_feature_select_strategy") not in SELECT_STRATEGIES:
        raise LlavaError(
            f"vision_feature_select_strategy '{raw['vision_feature_select_strategy']}' in {where} is not "
            "'default' or 'full'"
        )


def _positive(config: dict, keys, where: str):
    for key in keys:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise LlavaError(f"{where} {key} must be a positive integer, not {value!r}")


def model_config(config, where: str):
    """The normalised LlavaConfig describes a model that can be built and run."""
    t, v = config.text_config, config.vision_config
    text_sizes = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    )
    _positive(t, text_sizes, f"{where}: text")
    if t.get("head_dim") is not None:
        _positive(t, ("head_dim",), f"{where}: text")
    elif t["hidden_size"] % t["num_attention_heads"]:
        raise LlavaError(
            f"{where}: text hidden_size {t['hidden_size']} is not a multiple of its {t['num_attention_heads']} heads"
        )
    if t["num_attention_heads"] % t["num_key_value_heads"]:
        raise LlavaError(f"{where}: text num_attention_heads is not a multiple of num_key_value_heads")
    for key in ("rms_norm_eps", "rope_theta"):
        if number(t[key], f"{where}: text {key}") <= 0:
            raise LlavaError(f"{where}: text {key} must be positive, not {t[key]}")
    _positive(
        v,
        (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "num_channels",
        ),
        f"{where}: vision",
    )
    if v["hidden_size"] % v["num_attention_heads"]:
        raise LlavaError(f"{where}: vision hidden_size {v['hidden_size']} is not a multiple of its heads")
    if v["patch_size"] > v["image_size"]:  # any other size works: the convolution drops what is left over
        raise LlavaError(f"{where}: vision patch_size {v['patch_size']} is larger than image_size {v['image_size']}")
    if v["hidden_act"] not in ACTIVATIONS:
        raise LlavaError(f"{where}: vision hidden_act '{v['hidden_act']}' is not one of {', '.join(ACTIVATIONS)}")
    layers = v["num_hidden_layers"]
    integer(config.vision_feature_layer, f"{where}: vision feature layer", -layers - 1, layers)
    try:
        projector_depth(config.projector_type)
    except ValueError as e:
        raise LlavaError(f"{where}: {e}") from None
    for name, value, known in (
        ("vision feature select", config.vision_feature_select, FEATURE_SELECTS),
        ("image_aspect_ratio", config.image_aspect_ratio, ASPECT_RATIOS),
    ):
        if value not in known and not (known is ASPECT_RATIOS and ANYRES_MAX.fullmatch(str(value))):
            raise LlavaError(f"{where}: {name} '{value}' is not supported ({', '.join(known)}, anyres_max_N)")
    try:
        merge_kind(str(config.patch_merge_type))
    except ValueError as e:
        raise LlavaError(f"{where}: {e}") from None
    if config.vision_model_type == "clip_s2":
        s2(config, where)
    if config.uses_anyres:
        grid(config.image_grid_pinpoints, v["image_size"], where)
    if config.video_pool is not None:
        integer(config.video_pool_stride, f"{where}: spatial_pool_stride", 1)
    if config.max_length is not None:
        integer(config.max_length, f"{where}: tokenizer_model_max_length", 1)
    q = config.quantization
    if q is not None:
        integer(q.get("bits"), f"{where}: quantization bits", 1, 8)
        integer(q.get("group_size"), f"{where}: quantization group_size", 1)


def s2(config, where: str):
    """S2: the tower runs on tiles of its own size, so every scale is a multiple of it and the
    smallest is it; S2 takes one square picture ('pad' or 'square') and its patch features."""
    scales, tile = config.vision.s2_scales, config.vision.image_size
    if not scales or scales[0] != tile or any(s % tile for s in scales):
        raise LlavaError(
            f"{where}: s2_scales {scales} must be multiples of the tower's image size {tile}, the smallest "
            "equal to it (the tower runs on tiles of that size)"
        )
    if config.uses_anyres:
        raise LlavaError(
            f"{where}: S2 with image_aspect_ratio '{config.image_aspect_ratio}' is not supported "
            "(no release combines them)"
        )
    if config.vision_feature_select != "patch":
        raise LlavaError(
            f"{where}: S2 with mm_vision_select_feature '{config.vision_feature_select}' is not supported "
            "(the original code fails on it: the class token breaks its square feature maps)"
        )


def grid(points, tile: int, where: str):
    """anyres pinpoints: [width, height] pairs, each a positive multiple of the tile."""
    ok = isinstance(points, (list, tuple)) and len(points) > 0
    for p in points if ok else ():
        ok = ok and isinstance(p, (list, tuple)) and len(p) == 2
        ok = ok and all(isinstance(s, Integral) and not isinstance(s, bool) and s > 0 and s % tile == 0 for s in p)
    if not ok:
        raise LlavaError(
            f"{where}: image_grid_pinpoints must be [width, height] pairs of multiples of {tile}, "
            f"not {str(points)[:60]}"
        )


def image_settings(settings: dict, where: str) -> dict:
    """Resize / crop sizes positive, 3 means, 3 positive standard deviations."""
    for key in ("size", "crop"):
        if settings[key] < 1:
            raise LlavaError(f"{where}: the image {key} must be positive, not {settings[key]}")
    for key in ("mean", "std"):
        values = settings[key]
        if len(values) != 3 or not all(isinstance(x, Real) and math.isfinite(x) for x in values):
            raise LlavaError(f"{where}: image_{key} must be 3 numbers, not {list(values)}")
    if min(settings["std"]) <= 0:
        raise LlavaError(f"{where}: image_std must be positive, not {list(settings['std'])}")
    return settings


def output_dir(out, sources: List[Optional[Path]]) -> Path:
    """--out: not empty, not the current directory or one of its parents, and neither the
    checkpoint being converted nor one of its parents (replacing it would destroy it)."""
    out = Path(path_argument(out, "--out")).expanduser()
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise LlavaValueError(f"--out {out} is the current directory or one of its parents; name a new directory")
    for source in sources:
        if source is None:
            continue
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise LlavaValueError(
                f"--out {out} holds the checkpoint being converted ({source}); choose another directory"
            )
    return out.absolute()
