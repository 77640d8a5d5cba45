"""Loading: any LLaVA checkpoint layout → one `LlavaModel` and its `Processor`.

Layouts read (see README): the original liuhaotian checkpoints (text fields at the top of
config.json, `mm_*` keys, the CLIP tower named by `mm_vision_tower`), llava-hf as on the
hub (transformers 4 names), transformers-5 `save_pretrained` output, pre-converted MLX
repos (llava-hf names, MLX conv layout, a `quantization` block) and this project's own
converted output. Config differences are settled in `read_config`, weight-name
differences in `sanitize`: nowhere else. Weights stay lazy (memory-mapped by `mx.load`).
"""

import glob
import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import distributed, validate
from .errors import LlavaError, warn
from .model import LlavaConfig, LlavaModel
from .quantization import module_entries, module_params
from .vision import layers_to_run

# Our own converted output says so in its config.json.
MLX_FORMAT = "llava_mlx"
# transformers' CLIPVisionConfig defaults, for fields a vision_config leaves out.
CLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    num_channels=3,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
)
# transformers' SiglipVisionConfig defaults (LLaVA-OneVision's tower).
SIGLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
    num_channels=3,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# LlavaOnevisionConfig's default: 384 … 2304 in both directions, (height, width).
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
# The model types of the llava-hf / transformers layouts, and what each adds to LLaVA-1.5.
HF_MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "llava_next_video")
# + the .bin files of LoRA and projector-only checkpoints (adapters.py), which ship no others
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"] + [
    "adapter_model.bin", "non_lora_trainables.bin", "mm_projector.bin"
]


def resolve(path_or_repo: str, what: str = "model", patterns=HUB_PATTERNS) -> Path:
    """A local directory, or a Hugging Face repo id fetched (or found in the cache)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1:
        raise LlavaError(f"{what} '{path_or_repo}' is not a directory nor a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_repo, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = "HF_HUB_OFFLINE is set" if offline else "no network"
        raise LlavaError(
            f"cannot download {what} '{path_or_repo}' ({reason}) and it is not in the local "
            f"cache; pass --{what.replace(' ', '-')} PATH to a local checkpoint"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise LlavaError(f"cannot download {what} '{path_or_repo}': {str(e).splitlines()[0]}") from None


def read_json(path: Path) -> dict:
    """A JSON object from `path`; one clear error for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LlavaError(f"missing {path.name} in {path.parent}") from None
    except IsADirectoryError:
        raise LlavaError(f"{path} is a directory, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise LlavaError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise LlavaError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise LlavaError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise LlavaError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def clip_vision_config(params: Optional[dict]) -> dict:
    """A CLIP vision config with transformers' defaults; the full CLIPConfig is unwrapped."""
    params = params.get("vision_config", params) if params else {}
    return {**CLIP_VISION_DEFAULTS, **params}


def siglip_vision_config(params: Optional[dict]) -> dict:
    return {**SIGLIP_VISION_DEFAULTS, **(params or {})}


def detect_layout(raw: dict) -> str:
    """'mlx' (ours), 'original' (liuhaotian) or 'llava-hf' (transformers 4/5, mlx-community)."""
    model_type = raw.get("model_type", "")
    if model_type == MLX_FORMAT:
        return "mlx"
    # liuhaotian's v1.5 configs say model_type 'llava' too: the mm_* keys tell them apart.
    if model_type in ("llava_llama", "llava_mistral") or "mm_vision_tower" in raw:
        return "original"
    if model_type in HF_MODEL_TYPES:
        return "llava-hf"
    raise LlavaError(
        f"unknown model type '{model_type}': not a LLaVA 1.5/1.6, OneVision or NeXT-Video checkpoint"
    )


def family_fields(raw: dict) -> dict:
    """What LLaVA-OneVision and LLaVA-NeXT-Video add to a llava-hf config (transformers 5
    defaults for what the config leaves out)."""
    model_type = raw.get("model_type")
    if model_type == "llava_onevision":
        return dict(
            vision_model_type="siglip",
            conventions="transformers",
            image_aspect_ratio=raw.get("vision_aspect_ratio", "anyres_max_9"),
            image_grid_pinpoints=validate.pinpoints(raw.get("image_grid_pinpoints", ONEVISION_PINPOINTS), "config.json"),
            patch_merge_type="spatial_unpad",
            several_images_flat=True,
            video_pool="bilinear",
            video_pool_stride=2,
            video_pool_after_projector=True,
            video_newline="one_token",
        )
    if model_type == "llava_next_video":
        mode = raw.get("spatial_pool_mode", "average")
        if mode not in ("average", "max"):
            raise LlavaError(f"spatial_pool_mode '{mode}' is not supported (average or max)")
        return dict(
            conventions="transformers",
            video_pool=mode,
            video_pool_stride=raw.get("spatial_pool_stride", 2),
            video_newline="no_token",
        )
    return {}


def read_config(raw: dict, tower_dir: Optional[Path]) -> Tuple[str, LlavaConfig]:
    """(layout, normalised config) from any layout's config.json."""
    layout, model_type = detect_layout(raw), raw.get("model_type", "")
    if layout == "mlx":
        return layout, LlavaConfig.from_dict(raw)
    if layout == "llava-hf":
        text = dict(raw.get("text_config") or {})
        text.setdefault("model_type", "qwen2" if model_type == "llava_onevision" else "llama")
        for key in ("vocab_size", "tie_word_embeddings"):  # some configs say these at the top only
            if key in raw:
                text.setdefault(key, raw[key])
        siglip = model_type == "llava_onevision"
        layer = raw.get("vision_feature_layer", -1 if siglip else -2)
        if not isinstance(layer, int):
            raise LlavaError(f"vision_feature_layer {layer} (several layers) is not supported")
        vision = raw.get("vision_config")
        next_ = model_type in ("llava_next", "llava_next_video")
        strategy = raw.get("vision_feature_select_strategy", "full" if siglip else "default")
        fields = dict(
            text_config=text,
            vision_config=(siglip_vision_config(vision) if siglip else clip_vision_config(vision)) if vision else {},
            projector_type="mlp2x_gelu",
            projector_bias=raw.get("multimodal_projector_bias", True),
            vision_feature_layer=layer,
            vision_feature_select="cls_patch" if strategy == "full" else "patch",
            image_aspect_ratio="anyres" if next_ else "pad",
            image_grid_pinpoints=validate.pinpoints(raw.get("image_grid_pinpoints", LLAVA_NEXT_PINPOINTS), "config.json") if next_ else None,
            patch_merge_type="spatial_unpad" if next_ else "flat",
            quantization=read_quantization(raw),
            llava_type=model_type,
        )
        return "llava-hf", LlavaConfig(**{**fields, **family_fields(raw)})
    if layout == "original":
        text = dict(raw, model_type=original_text_type(raw))
        tower = read_json(tower_dir / "config.json") if tower_dir else None
        if tower:
            validate.raw_config(tower, str(tower_dir / "config.json"))
        return "original", LlavaConfig(
            text_config=text,
            vision_config=clip_vision_config(tower) if tower else {},
            projector_type=raw.get("mm_projector_type", "linear"),
            vision_feature_layer=raw.get("mm_vision_select_layer", -2),
            vision_feature_select=raw.get("mm_vision_select_feature", "patch"),
            image_aspect_ratio=raw.get("image_aspect_ratio") or "square",
            image_grid_pinpoints=validate.pinpoints(raw.get("image_grid_pinpoints"), "config.json"),
            patch_merge_type=raw.get("mm_patch_merge_type", "flat"),
            max_length=raw.get("tokenizer_model_max_length"),
            quantization=read_quantization(raw),
        )


# The original code's LLaVA classes with a llama-architecture decoder (Vicuna, Mistral, Yi).
ORIGINAL_TYPES = ("llava_llama", "llava_mistral")
ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llava_llama", "LlavaMistralForCausalLM": "llava_mistral"}


def original_text_type(raw: dict) -> str:
    """llava_llama or llava_mistral; any other decoder (MPT, Qwen, Gemma ...) is refused by name.

    liuhaotian's LLaVA-1.5 configs say model_type 'llava': their `architectures` tell.
    """
    model_type, architectures = raw.get("model_type", ""), raw.get("architectures") or []
    if model_type in ORIGINAL_TYPES:
        return model_type
    known = [ORIGINAL_ARCHITECTURES[a] for a in architectures if a in ORIGINAL_ARCHITECTURES]
    if model_type in ("llava", "") and (known or not architectures):
        return known[0] if known else "llava_llama"
    name = "/".join(architectures) or model_type
    raise LlavaError(
        f"original LLaVA checkpoint of type '{model_type}' ({name}) is not supported: "
        "only the llama and mistral decoders (LlavaLlamaForCausalLM, LlavaMistralForCausalLM) are"
    )


# Name rewrites, first match wins: every layout's names → ours (llava-hf 4.x names).
RENAMES = [
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),  # original 1.6
    ("model.vision_tower.vision_model.", "vision_tower."),  # transformers >= 4.52
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),  # llava-hf, mlx-vlm
    ("vision_model.", "vision_tower."),  # a separate CLIP checkpoint
    ("model.mm_projector.", "multi_modal_projector."),  # original
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("model.image_newline", "image_newline"),
    ("model.", "language_model.model."),  # original decoder
    ("lm_head.", "language_model.lm_head."),
]
# Parameters the vision tower reads as plain arrays (never quantized modules).
READ_RAW = ("vision_tower.embeddings.position_embedding", "vision_tower.embeddings.patch_embedding")
DROPPED = (
    "text_model.",
    "visual_projection.",
    "text_projection.",
    "logit_scale",
    "vision_tower.post_layernorm.",
    "vision_tower.head.",  # SigLIP's attention-pooling head
)


def read_quantization(raw: dict) -> Optional[dict]:
    """The `quantization` block, its per-module entries (mixed precision) under our names."""
    block = raw.get("quantization")
    if not isinstance(block, dict):
        return block
    entries = module_entries(block)
    renamed = {rename(f"{k}.weight")[: -len(".weight")]: v for k, v in entries.items()}
    return {**{k: v for k, v in block.items() if k not in entries}, **renamed}


def rename(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if key.startswith("multi_modal_projector.") and key.split(".")[1].isdigit():
        index, rest = key.split(".", 2)[1:]  # original Sequential: 0, 2, 4 ... → linear_1, 2, 3
        key = f"multi_modal_projector.linear_{int(index) // 2 + 1}.{rest}"
    elif key in ("multi_modal_projector.weight", "multi_modal_projector.bias"):
        key = "multi_modal_projector.linear_1." + key.split(".")[-1]
    return key


def sanitize(weights: Dict[str, mx.array], config: LlavaConfig) -> Dict[str, mx.array]:
    """Weights of any layout under our names, in MLX layout, minus what is never run."""
    keep = layers_to_run(config.vision.num_hidden_layers, config.vision_feature_layer)
    out = {}
    for key, value in weights.items():
        key = rename(key)
        if key.startswith(DROPPED) or "position_ids" in key or "rotary_emb.inv_freq" in key:
            continue
        if key.startswith("vision_tower.encoder.layers.") and int(key.split(".")[3]) >= keep:
            continue  # past the selected layer
        if key == "vision_tower.embeddings.patch_embedding.weight" and value.shape[1] == config.vision.num_channels:
            value = value.transpose(0, 2, 3, 1)  # PyTorch (O, C, kh, kw) → MLX (O, kh, kw, C)
        out[key] = value
    if config.text_config["tie_word_embeddings"]:
        out.pop("language_model.lm_head.weight", None)
    for name in READ_RAW:
        if f"{name}.scales" in out:  # quantized by another tool: we read it as a plain array
            q = module_params(config.quantization or {}, name) or module_params({}, name)
            out[f"{name}.weight"] = mx.dequantize(
                out[f"{name}.weight"], out.pop(f"{name}.scales"), out.pop(f"{name}.biases"), **q
            )
    return out


def weight_files(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        if any(not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..") for n in names):
            raise LlavaError(f"{index} lists a weight file that is not a plain file name in {path}")
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise LlavaError(f"missing weight shard {missing[0]} in {path} (listed in {index.name})")
        return [path / n for n in names]
    return [Path(p) for p in sorted(glob.glob(str(path / "*.safetensors")))]


def load_weights(path: Path) -> Dict[str, mx.array]:
    """Every tensor of a checkpoint directory, lazily (safetensors are memory-mapped)."""
    files = weight_files(path)
    if not files:
        if glob.glob(str(path / "*.bin")):
            raise LlavaError(
                f"{path} has only PyTorch .bin weights; convert the checkpoint first "
                f"(python convert.py --model {path} --out DIR, with torch installed)"
            )
        raise LlavaError(f"no weights (*.safetensors) in {path}")
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as e:
            raise LlavaError(f"cannot read weights {file}: {e}") from None
    return weights


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


def ships_tower(weights) -> bool:
    """Whether a checkpoint's weight names include the vision tower (LLaVA-1.6 originals do,
    LLaVA-1.5 originals do not)."""
    return any("vision_tower." in k for k in weights)


def tower_location(raw: dict, vision_tower: Optional[str]) -> Optional[str]:
    """Where the original layout's CLIP tower lives: --vision-tower, else mm_vision_tower."""
    return vision_tower or raw.get("mm_vision_tower") or raw.get("vision_tower")


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
    this rank's shard of it (see distributed.py), evaluated."""
    from .adapters import check_base_fits, read_checkpoint

    raw, weights, lora = read_checkpoint(path, model_base, delta)
    validate.raw_config(raw, str(path / "config.json"))
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
            tower_dir = _cached_tower(location)
        if tower_dir is None and has_tower:
            config_file = path / "config.json"
            unread = f"the vision tower '{location}' named in {config_file} cannot be read" if location else (
                f"{config_file} names no vision tower"
            )
            warn(
                f"{unread}: guessing CLIP ViT-L/14-336 (hidden 1024, 24 layers, 336 px, CLIP's image "
                "mean and std); pass --vision-tower PATH_OR_REPO (vision_tower= in Python) to use the right one"
            )
    try:
        layout, config = read_config(raw, tower_dir)
    except ValueError as e:  # LlavaConfig's own checks (e.g. an unknown text model type)
        raise LlavaError(f"{path / 'config.json'}: {e}") from None
    validate.model_config(config, str(path / "config.json"))
    if layout == "original" and not has_tower:
        if tower_dir is None:
            raise LlavaError("this checkpoint ships no vision tower weights; pass --vision-tower PATH_OR_REPO")
        weights = {**load_weights(tower_dir), **weights}
    stored = dict(weights)  # as read from the files: a sharded rank reads its slices of these
    if lora is not None:
        weights = lora.merge(weights)  # into the float weights, before any quantization
    weights = sanitize(weights, config)
    model = LlavaModel(config)
    if config.quantization:
        # Each module as its weights are stored, with its own bits when the block has an entry.
        q = config.quantization
        nn.quantize(model, class_predicate=lambda p, m: f"{p}.scales" in weights and module_params(q, p) or False)
    if model_base is not None:
        check_base_fits(dict(tree_flatten(model.parameters())), weights, path, model_base)
    check_weights(model, weights)
    if group is not None:
        files = weight_files(path) + (weight_files(model_base) if model_base else [])
        weights = distributed.shard(model, weights, group, pipeline, stored, files)
    model.load_weights(list(weights.items()), strict=True)
    if not lazy or group is not None:
        mx.eval(model.parameters())
    model.eval()
    return model, config, tower_dir


def _cached_tower(location: str) -> Optional[Path]:
    """The named tower's config directory when it can be had (a path, the hub cache, or a
    download of its small JSON files), else None.

    LLaVA-1.6 ships its fine-tuned tower: the named one only supplies the vision config
    and the image processor's settings, which default to CLIP ViT-L/14-336's (the tower
    of every released LLaVA) when it is not at hand; the weights' shapes are checked.
    """
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(location, allow_patterns=["*.json"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError):
        return None


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
    from .adapters import tokenizer_dir
    from .processor import Processor

    path_or_repo = validate.path_argument(path_or_repo, "the model")
    if vision_tower is not None:
        vision_tower = validate.path_argument(vision_tower, "vision_tower")
    if model_base is not None:
        model_base = validate.path_argument(model_base, "model_base")
    path = resolve(path_or_repo)
    base = resolve(model_base, "model base") if model_base else None
    model, config, tower_dir = load_model(path, vision_tower, lazy, base, group=distributed.world(), pipeline=pipeline)
    tokenizer = tokenizer_dir(path, base)
    validate.checkpoint_files(tokenizer)
    return model, Processor.from_checkpoint(tokenizer, config, tower_dir)
