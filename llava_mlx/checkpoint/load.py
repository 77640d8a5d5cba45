"""`load`: any LLaVA checkpoint → one `LlavaModel` and its `Processor`.

Wiring only: the files are read by files.py, the layout mapped by layouts.py, the checkpoint
kinds that need a base by adapters.py, and the decoder sharded by distributed/shard.py under
mlx.launch. Weights stay lazy (memory-mapped by `mx.load`).
"""

from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import validate as arguments
from ..distributed.group import world
from ..distributed.shard import shard
from ..errors import LlavaError, warn
from ..language import sanitize_decoder
from ..model import LlavaModel
from . import validate
from .adapters import check_base_fits, read_checkpoint, tokenizer_dir
from .files import file_slices, load_weights, weight_files
from .hub import cached_tower, resolve
from .layouts import detect_layout, next_siglip, read_config, sanitize, ships_tower, tower_location
from .preprocessing import load_processor
from .quantize import module_params


def check_weights(model: nn.Module, weights: Dict[str, mx.array]):
    """Every parameter present with its expected shape, and nothing unknown."""
    expected = dict(tree_flatten(model.parameters()))
    for key, param in expected.items():
        if key not in weights:
            raise LlavaError(f"missing weight '{key}' in the checkpoint")
        if tuple(weights[key].shape) != tuple(param.shape):
            raise LlavaError(
                f"weight '{key}' has shape {tuple(weights[key].shape)} but the config implies "
                f"{tuple(param.shape)}: the checkpoint and its config.json disagree"
            )
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise LlavaError(f"unexpected weight '{unknown[0]}' ({len(unknown)} in all) for this config")


def load_model(
    path: Path,
    vision_tower: Optional[str] = None,
    lazy: bool = True,
    model_base: Optional[Path] = None,
    delta: bool = False,
    group=None,
    pipeline: bool = False,
):
    """(model, config, tower_dir) from a local checkpoint directory; LoRA, projector-only and
    delta checkpoints (adapters.py) with their local `model_base`; with a distributed `group`,
    this rank's shard of it (see distributed/shard.py), evaluated."""
    raw, weights, lora = read_checkpoint(path, model_base, delta)
    source = path / "config.json"
    validate.raw_config(raw, str(source))
    tower_dir = find_tower(raw, weights, vision_tower, source)
    model, config = build_model(raw, weights, tower_dir, source, lora, lazy, model_base, group, pipeline)
    return model, config, tower_dir


def find_tower(raw: dict, weights: dict, vision_tower: Optional[str], source: Path) -> Optional[Path]:
    """The separately named vision tower of an original-layout checkpoint (its directory), if it needs one."""
    path = source.parent
    tower_dir, has_tower = None, ships_tower(weights)
    if vision_tower and detect_layout(raw) != "original":
        raise LlavaError(
            f"--vision-tower applies only to original (liuhaotian) checkpoints; {path} is a "
            f"{detect_layout(raw)} checkpoint with its own tower"
        )
    if detect_layout(raw) == "original":
        location = tower_location(raw, vision_tower)
        tower_dir = resolve(location, "vision tower") if (location and (vision_tower or not has_tower)) else None
        if tower_dir is None and location:
            tower_dir = cached_tower(location)
        if tower_dir is None and has_tower:
            config_file = path / "config.json"
            unread = (
                f"the vision tower '{location}' named in {config_file} cannot be read"
                if location
                else (f"{config_file} names no vision tower")
            )
            guess = (
                "google/siglip-so400m-patch14-384's geometry (hidden 1152, 27 layers, 384 px / 14)"
                if next_siglip(raw)
                else "CLIP ViT-L/14-336 (hidden 1024, 24 layers, 336 px, CLIP's image mean and std)"
            )
            warn(
                f"{unread}: guessing {guess}; pass --vision-tower PATH_OR_REPO (vision_tower= in Python) "
                "to use the right one"
            )
    return tower_dir


def build_model(
    raw: dict,
    weights: dict,
    tower_dir: Optional[Path],
    source: Path,
    lora=None,
    lazy: bool = True,
    model_base: Optional[Path] = None,
    group=None,
    pipeline: bool = False,
):
    """(model, config) of a config.json's contents (`source`: where it was read, for errors)
    and the checkpoint's weights under their own names: the tower's weights added when the
    layout names it, LoRA merged, sanitized, quantized as stored, checked, sharded over `group`."""
    try:
        layout, config = read_config(raw, tower_dir)
    except ValueError as e:  # LlavaConfig's own checks (e.g. an unknown text model type)
        raise LlavaError(f"{source}: {e}") from None
    validate.model_config(config, str(source))
    if layout == "original" and not ships_tower(weights):
        if tower_dir is None:
            raise LlavaError("this checkpoint ships no vision tower weights; pass --vision-tower PATH_OR_REPO")
        weights = {**load_weights(tower_dir), **weights}
    stored = dict(weights)  # as read from the files: a sharded rank reads its slices of these
    if lora is not None:
        weights = lora.merge(weights)  # into the float weights, before any quantization
    model = LlavaModel(config)
    weights = sanitize_decoder(model.language_model, sanitize(weights, config))
    if config.quantization:
        # Each module as its weights are stored, with its own bits when the block has an entry.
        q = config.quantization
        nn.quantize(model, class_predicate=lambda p, m: f"{p}.scales" in weights and module_params(q, p) or False)
    if model_base is not None:
        check_base_fits(dict(tree_flatten(model.parameters())), weights, source.parent, model_base)
    check_weights(model, weights)
    if group is not None:
        files = weight_files(source.parent) + (weight_files(model_base) if model_base else [])
        weights = shard(model, weights, group, pipeline, file_slices(stored, files))
    model.load_weights(list(weights.items()), strict=True)
    if not lazy or group is not None:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def load(
    path_or_repo: str,
    vision_tower: Optional[str] = None,
    lazy: bool = True,
    model_base: Optional[str] = None,
    pipeline: bool = False,
):
    """Load a LLaVA checkpoint (local directory or Hugging Face repo id).

    Returns `(model, processor)`. `vision_tower` overrides the CLIP tower of the original
    layout (a path or repo id): LLaVA-1.5 checkpoints ship without one. `model_base` (a path
    or repo id) is the language model a LoRA or projector-only checkpoint was trained from:
    the LoRA is merged into its weights at load. Under `mlx.launch` with several ranks the
    decoder is sharded over them: tensor parallel, or pipeline parallel with `pipeline=True`
    (no effect in a single process).
    """
    path_or_repo = arguments.path_argument(path_or_repo, "the model")
    if vision_tower is not None:
        vision_tower = arguments.path_argument(vision_tower, "vision_tower")
    if model_base is not None:
        model_base = arguments.path_argument(model_base, "model_base")
    path = resolve(path_or_repo)
    base = resolve(model_base, "model base") if model_base else None
    model, config, tower_dir = load_model(path, vision_tower, lazy, base, group=world(), pipeline=pipeline)
    tokenizer = tokenizer_dir(path, base)
    validate.checkpoint_files(tokenizer)
    processor = load_processor(tokenizer, config, tower_dir)
    rows = config.text_config["vocab_size"]
    if config.builder_tokens and processor.vocabulary > rows:
        warn(
            f"with the tokens the original builder adds ({', '.join(config.builder_tokens)}) the tokenizer "
            f"holds {processor.vocabulary} tokens, the embeddings {rows} rows: the builder gives the others "
            "untrained (random) rows; here they have none and are never picked"
        )
    return model, processor
