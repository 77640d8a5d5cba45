"""The model to train, built as the original train() builds it (or the LLaVA-NeXT code's:
next_code.py says where that one differs).

It starts from a LLaVA checkpoint in the original layout, or from a plain language model (a
Vicuna, as scripts/v1_5/*.sh start) with `--vision_tower` and a fresh projector or one from
`--pretrain_mm_mlp_adapter`; the config it will be saved with is the one train() leaves
(initialize_vision_modules' mm_* keys, model_type llava_llama). What trains follows the
original's sequence of requires_grad changes: everything but the tower; --freeze_backbone
freezes the language model's body; --lora_enable leaves only LoRA (on every linear layer of
the language model but lm_head, as find_all_linear_names picks them) and the projector;
--tune_mm_mlp_adapter only the projector; --freeze_mm_mlp_adapter freezes the projector.
`--bits 4|8` quantizes the language model's linear layers (QLoRA) before LoRA is added.
"""

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from ..checkpoint.adapters import base_weights, checkpoint_kind
from ..checkpoint.files import load_weights, read_json, read_tensors
from ..checkpoint.hub import resolve
from ..checkpoint.layouts import detect_layout, pinpoints_of, read_config, rename, sanitize
from ..checkpoint.load import build_model, find_tower
from ..checkpoint.lora import non_lora_weights, read_lora
from ..errors import LlavaError, warn
from ..model import LlavaModel
from ..projector import Projector
from . import next_code
from .next_code import LLAMA_DECODERS, NEXT_SETTINGS, SETTINGS, code_of, next_config


@dataclass
class Trainable:
    model: LlavaModel
    raw: dict  # config.json as train() leaves it
    source: Path  # model_name_or_path's directory: its tokenizer
    tower_dir: Path
    parts: set  # what trains: lora, projector, lm_body (with image_newline), lm_head, tower
    lora: dict = field(default_factory=dict)  # r, alpha, dropout, targets
    code: str = "original"  # whose train() rules apply: 'original' or 'next' (next_code.py)


def mm_settings(args, tower: dict) -> dict:
    """The mm_* keys initialize_vision_modules and train() write into the config."""
    m, d, t = args.model, args.data, args.training
    vision = tower.get("vision_config", tower)
    return {
        "mm_vision_tower": m.vision_tower,
        "use_mm_proj": True,
        "mm_projector_type": m.mm_projector_type,
        "mm_hidden_size": vision["hidden_size"],
        "mm_vision_select_layer": m.mm_vision_select_layer,
        "mm_vision_select_feature": m.mm_vision_select_feature,
        "mm_patch_merge_type": m.mm_patch_merge_type,
        "image_aspect_ratio": d.image_aspect_ratio,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": t.model_max_length,
        "tune_mm_mlp_adapter": m.tune_mm_mlp_adapter,
        "freeze_mm_mlp_adapter": t.freeze_mm_mlp_adapter,
        "mm_use_im_start_end": m.mm_use_im_start_end,
        "mm_projector_lr": t.mm_projector_lr,
        "mm_use_im_patch_token": False,  # the <im_patch> token is not added (arguments.py warns)
        "model_type": "llava_llama",
        "use_cache": True,
    }


def settled(args, raw: dict, table: dict, tile: int, path: Path) -> dict:
    """The checkpoint's own settings, kept (a flag given that contradicts one is an error); a
    setting it lacks from its flag (the original's five always, the LLaVA-NeXT code's others
    only when given: an absent video setting stays absent)."""
    settings = {}
    for key, (group, name) in table.items():
        own, given = raw.get(key), getattr(getattr(args, group), name)
        if key == "image_grid_pinpoints":
            own_grid = pinpoints_of(own, tile) if own is not None else None
            given = pinpoints_of(given, tile) if given is not None else None
            contradicts = own_grid is not None and given != own_grid
        else:
            contradicts = own is not None and given != own
        if name in args.given and contradicts:
            shown = getattr(getattr(args, group), name)
            raise LlavaError(f"--{name} {shown} but {path} was trained with {own}")
        if name in args.given or (own is None and key in SETTINGS):
            settings[key] = given  # as the flag gives it (pinpoints as a list)
        elif own is not None:
            settings[key] = own
    return settings


def from_checkpoint(args, path: Path, raw: dict, code: str):
    """A LLaVA checkpoint of the original layout (liuhaotian's, or the LLaVA-NeXT code's): its
    own settings kept, the rest as train() sets them; the projector from
    --pretrain_mm_mlp_adapter when given, as initialize_vision_modules loads it."""
    if detect_layout(raw) != "original":
        raise LlavaError(
            f"{path} is a {detect_layout(raw)} checkpoint: the original train.py trains its own layout "
            "(liuhaotian's), the LLaVA-NeXT code's train() lmms-lab's; or a language model with --vision_tower"
        )
    if checkpoint_kind(path) != "full":
        raise LlavaError(f"{path} needs a base model: merge it first (python convert.py --model-base ...)")
    source = path / "config.json"
    weights = dict(load_weights(path))
    tower_dir = find_tower(raw, weights, args.model.vision_tower, source)
    tile = read_config(raw, tower_dir)[1].vision.image_size
    settings = settled(args, raw, NEXT_SETTINGS if code == "next" else SETTINGS, tile, path)
    if args.model.pretrain_mm_mlp_adapter:
        weights.update(projector_weights(Path(args.model.pretrain_mm_mlp_adapter)))
    model, config = build_model({**raw, **settings}, weights, tower_dir, source)
    if code == "original" and config.uses_anyres:
        raise LlavaError(f"{path} is a LLaVA-1.6 (anyres) checkpoint: the original train.py trains 'pad' and 'square'")
    if config.vision_model_type == "clip_s2":
        raise LlavaError(f"{path} is a LLaVA-1.5-S2 checkpoint: training the S2 tower's checkpoints is not built yet")
    width = config.vision.hidden_size
    if code == "next":
        config.several_images_flat = True  # its dataset pads each of a record's several pictures to one crop
        return model, next_config(args, {**raw, **settings}, width, config.text_config["model_type"]), tower_dir
    tower_name = args.model.vision_tower or raw.get("mm_vision_tower")
    raw = {**raw, **mm_settings(args, {"hidden_size": width}), **settings, "mm_vision_tower": tower_name}
    return model, raw, tower_dir


def from_language_model(args, path: Path, raw: dict):
    """A plain language model, the tower of --vision_tower, the projector fresh or from
    --pretrain_mm_mlp_adapter."""
    m = args.model
    if raw.get("model_type") not in LLAMA_DECODERS:
        raise LlavaError(
            f"{path} is a {raw.get('model_type')!r} model: the original train.py trains llama-architecture "
            "decoders (Vicuna, Llama, Mistral) as LlavaLlamaForCausalLM"
        )
    if not m.vision_tower:
        raise LlavaError(f"{path} is a language model: pass --vision_tower, the CLIP tower to train it with")
    tower_dir = resolve(m.vision_tower, "vision tower")
    raw = {**raw, **mm_settings(args, read_json(tower_dir / "config.json"))}
    weights = dict(base_weights(path))
    if m.pretrain_mm_mlp_adapter:
        weights.update(projector_weights(Path(m.pretrain_mm_mlp_adapter)))
    else:
        vision = raw["mm_hidden_size"]
        fresh = Projector(m.mm_projector_type, vision, raw["hidden_size"])  # torch's nn.Linear init, seeded
        weights.update({f"multi_modal_projector.{k}": v for k, v in tree_flatten(fresh.parameters())})
    tower_dir = find_tower(raw, weights, None, path / "config.json")
    model, _ = build_model(raw, weights, tower_dir, path / "config.json")
    return model, raw, tower_dir


def projector_weights(file: Path) -> dict:
    """The mm_projector weights of a pretraining stage's mm_projector.bin (or .safetensors)."""
    if not file.is_file():
        raise LlavaError(f"--pretrain_mm_mlp_adapter {file} is not a file")
    weights = {k: v for k, v in read_tensors(file.parent, file.stem).items() if "mm_projector" in k}
    if not weights:
        raise LlavaError(f"{file} holds no mm_projector weights")
    return {"model.mm_projector." + k.split("mm_projector.", 1)[1]: v for k, v in weights.items()}


def trained_parts(args) -> set:
    """What trains, in the order the original changes requires_grad."""
    parts = {"lm_body", "lm_head", "projector"}
    if args.model.freeze_backbone:
        parts -= {"lm_body"}
    if args.training.lora_enable:
        parts = {"lora", "projector"}
    if args.model.tune_mm_mlp_adapter:
        parts = {"projector"}
    if args.training.freeze_mm_mlp_adapter:
        parts -= {"projector"}
    if not parts:
        raise LlavaError("nothing would train: --freeze_mm_mlp_adapter with --tune_mm_mlp_adapter")
    return parts


def linear_layers(module: nn.Module, prefix: str) -> dict:
    return {
        f"{prefix}.{name}": m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    }


def lora_targets(model: LlavaModel, tower: bool) -> list:
    """find_all_linear_names gives the last names of the language model's linear layers but
    lm_head; peft wraps every module of those names (paths): with `tower`, the tower's too (the
    LLaVA-NeXT code builds it before peft: its q, k and v projections)."""
    layers = linear_layers(model.language_model, "language_model")
    names = {path.split(".")[-1] for path in layers} - {"lm_head"}
    if tower:
        layers.update(linear_layers(model.vision_tower, "vision_tower"))
    return [path for path in layers if path.split(".")[-1] in names]


def add_lora(model: LlavaModel, r: int, alpha: float, dropout: float, tower: bool) -> list:
    """LoRA layers (mlx-lm's LoRALinear, scale alpha / r as peft) on the targets; their paths."""
    modules = dict(model.named_modules())
    targets = lora_targets(model, tower)
    layers = [(n, LoRALinear.from_base(modules[n], r, dropout, alpha / r)) for n in targets]
    model.update_modules(tree_unflatten(layers))
    return targets


def load_adapter(model: LlavaModel, directory: Path, r: int, alpha: float):
    """Start LoRA from a peft adapter (A as (r, in), B as (out, r)) and, from one of this
    project's (or the original's) outputs, its non_lora_trainables too."""
    config = read_json(directory / "adapter_config.json") if (directory / "adapter_config.json").exists() else None
    if config is None:
        raise LlavaError(f"--resume_adapter {directory} holds no adapter_config.json")
    if config.get("r") != r or config.get("lora_alpha") != alpha:
        raise LlavaError(
            f"{directory} is an adapter of r {config.get('r')}, alpha {config.get('lora_alpha')}; "
            f"--lora_r {r}, --lora_alpha {alpha} given"
        )
    lora = read_lora(directory)
    modules = dict(model.named_modules())
    for name, (a, b, _, _) in lora.pairs.items():
        path = rename(name + ".weight")[: -len(".weight")]
        layer = modules.get(path)
        if layer is None and path.startswith("vision_tower.encoder.layers."):
            continue  # a tower layer past the one selected, which is not built here (its LoRA changes nothing)
        if not isinstance(layer, LoRALinear):
            raise LlavaError(f"{directory}: its LoRA module {name} is not a LoRA layer of this model")
        layer.lora_a, layer.lora_b = a.T.astype(mx.float32), b.T.astype(mx.float32)
    extra = non_lora_weights(directory)
    if extra:
        model.load_weights(list(ours(model, extra).items()), strict=False)


def ours(model: LlavaModel, weights: dict) -> dict:
    """Saved weights (the original layout's names, torch's layout) as the model's parameters."""
    return sanitize(weights, model.config)


def freeze_to(model: LlavaModel, parts: set):
    model.freeze()
    lm = model.language_model
    if "lm_body" in parts:
        lm.model.unfreeze()
        if "image_newline" in model:
            model.unfreeze(keys=["image_newline"], recurse=False)
    if "tower" in parts:
        model.vision_tower.unfreeze()
    if "lm_head" in parts and "lm_head" in lm:
        lm.lm_head.unfreeze()
    if "projector" in parts:
        model.multi_modal_projector.unfreeze()
    for part, module in (("lora", lm), ("tower_lora", model.vision_tower)):
        if part in parts:
            for _, layer in module.named_modules():
                if isinstance(layer, LoRALinear):
                    layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)


def build(args) -> Trainable:
    m, t = args.model, args.training
    mx.random.seed(t.seed)
    path = resolve(m.model_name_or_path)
    raw = read_json(path / "config.json")
    code = code_of(path, raw)
    args.for_code(code)
    parts = trained_parts(args) if code == "original" else next_code.trained_parts(args)
    llava = "mm_vision_tower" in raw or raw.get("model_type", "").startswith("llava")
    if llava:
        model, raw, tower_dir = from_checkpoint(args, path, raw, code)
    elif code == "next":
        raise LlavaError(
            f"{path} is a {raw.get('model_type')!r} language model: the LLaVA-NeXT code's first stage (a fresh "
            "projector over it) is not built here; fine-tune one of its LLaVA checkpoints"
        )
    else:
        model, raw, tower_dir = from_language_model(args, path, raw)
    if t.compute_dtype != "float32":
        model.set_dtype(getattr(mx, t.compute_dtype))
    lora = {}
    if t.bits != 16:  # QLoRA: the language model's linear layers quantized (lm_head too, as bitsandbytes is told)
        linears = [m for _, m in model.language_model.named_modules() if isinstance(m, nn.Linear)]
        group = next((g for g in (64, 32) if all(m.weight.shape[1] % g == 0 for m in linears)), None)
        if group is None:
            raise LlavaError(f"--bits {t.bits}: the language model's widths are not multiples of 32 (MLX's groups)")
        nn.quantize(model.language_model, group, t.bits, class_predicate=lambda p, mod: isinstance(mod, nn.Linear))
    if t.lora_enable:
        # the LLaVA-NeXT code builds the tower before peft unless its config says delay_load
        tower = code == "next" and not raw.get("delay_load", False)
        targets = add_lora(model, t.lora_r, t.lora_alpha, t.lora_dropout, tower)
        lora = dict(
            r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=sorted({n.split(".")[-1] for n in targets})
        )
        if not tower:
            parts -= {"tower_lora"}
        if t.resume_adapter:
            load_adapter(model, resolve(t.resume_adapter, "adapter"), t.lora_r, t.lora_alpha)
    elif t.resume_adapter:
        raise LlavaError("--resume_adapter starts LoRA: it needs --lora_enable True")
    freeze_to(model, parts)
    for name, value in tree_flatten(model.trainable_parameters()):  # master weights in float32
        if value.dtype != mx.float32:
            model.update(tree_unflatten([(name, value.astype(mx.float32))]))
    if m.mm_use_im_patch_token:
        warn(
            "--mm_use_im_patch_token True (train.py's default) adds an <im_patch> token no prompt uses, with a "
            "random vocabulary row: not added here (LLaVA-1.5's scripts pass False)"
        )
    return Trainable(model, raw, path, tower_dir, parts, lora, code)
