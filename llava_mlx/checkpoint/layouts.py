"""Every checkpoint layout → one `LlavaConfig` and one set of weight names.

Layouts read (docs/checkpoints.md): the original liuhaotian checkpoints (text fields at the top
of config.json, `mm_*` keys, the CLIP tower named by `mm_vision_tower`), llava-hf as on the hub
(transformers 4 names), transformers-5 `save_pretrained` output, pre-converted MLX repos
(llava-hf names, MLX conv layout, a `quantization` block) and this project's own converted
output. Config differences are settled in `read_config`, weight-name differences in the
`RENAMES` table and `sanitize`: nowhere else.
"""

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx

from ..errors import LlavaError, warn
from ..merge import NEWLINES, VIDEO_POOLS
from ..model import ORIGINAL_TYPES, LlavaConfig
from ..s2 import scales_of
from ..vision import layers_to_run
from . import validate
from .files import read_json
from .quantize import module_entries, module_params

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

# google/siglip-so400m-patch14-384, the tower the LLaVA-NeXT code's releases name, when it cannot be read
RELEASED_SIGLIP = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_attention_heads=16,
    num_hidden_layers=27,
    image_size=384,
    patch_size=14,
)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# LlavaOnevisionConfig's default: 384 … 2304 in both directions, (height, width).
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

# The model types of the llava-hf / transformers layouts, and what each adds to LLaVA-1.5.
HF_MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "llava_next_video")


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
    if model_type in ORIGINAL_TYPES or "mm_vision_tower" in raw:
        return "original"
    if model_type in HF_MODEL_TYPES:
        return "llava-hf"
    raise LlavaError(f"unknown model type '{model_type}': not a LLaVA 1.5/1.6, OneVision or NeXT-Video checkpoint")


def family_fields(raw: dict) -> dict:
    """What LLaVA-OneVision, LLaVA-NeXT-Video and LLaVA-Interleave add to a llava-hf config
    (transformers 5 defaults for what the config leaves out)."""
    model_type = raw.get("model_type")
    if model_type == "llava_onevision":
        return dict(
            vision_model_type="siglip",
            conventions="transformers",
            image_aspect_ratio=raw.get("vision_aspect_ratio", "anyres_max_9"),
            image_grid_pinpoints=validate.pinpoints(
                raw.get("image_grid_pinpoints", ONEVISION_PINPOINTS), "config.json"
            ),
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
    if (raw.get("vision_config") or {}).get("model_type") == "siglip_vision_model":
        # LLaVA-Interleave (llava-hf/llava-interleave-qwen-*): released through transformers,
        # whose SigLIP image processor squashes each image to the tower's square, no padding.
        return dict(vision_model_type="siglip", conventions="transformers", image_aspect_ratio="square")
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
        vision = raw.get("vision_config")
        # SigLIP: OneVision's tower, and LLaVA-Interleave's (`llava` with a SigLIP vision_config)
        siglip = model_type == "llava_onevision" or (vision or {}).get("model_type") == "siglip_vision_model"
        layer = raw.get("vision_feature_layer", -1 if siglip else -2)
        if not isinstance(layer, int):
            raise LlavaError(f"vision_feature_layer {layer} (several layers) is not supported")
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
            image_grid_pinpoints=validate.pinpoints(
                raw.get("image_grid_pinpoints", LLAVA_NEXT_PINPOINTS), "config.json"
            )
            if next_
            else None,
            patch_merge_type="spatial_unpad" if next_ else "flat",
            quantization=read_quantization(raw),
            llava_type=model_type,
        )
        return "llava-hf", LlavaConfig(**{**fields, **family_fields(raw)})
    if layout == "original":
        text_type = original_text_type(raw)
        text = dict(raw, model_type=text_type)
        tower = read_json(tower_dir / "config.json") if tower_dir else None
        if tower:
            validate.raw_config(tower, str(tower_dir / "config.json"))
        fields = dict(
            text_config=text,
            vision_config=clip_vision_config(tower) if tower else {},
            projector_type=raw.get("mm_projector_type", "linear"),
            vision_feature_layer=raw.get("mm_vision_select_layer", -2),
            vision_feature_select=raw.get("mm_vision_select_feature", "patch"),
            image_aspect_ratio=raw.get("image_aspect_ratio") or "square",
            patch_merge_type=raw.get("mm_patch_merge_type", "flat"),
            max_length=raw.get("tokenizer_model_max_length"),
            quantization=read_quantization(raw),
            llava_type=text_type,
            conversation="llava_v0" if llava_v0(raw) else None,
            # lmms-lab's Qwen2 releases (OneVision, LLaVA-Video, Interleave) were trained with several
            # images in a sample padded to one crop each (train.py), as the OneVision tutorial runs them
            several_images_flat=text_type == "llava_qwen",
        )
        fields.update(next_siglip_fields(tower) if next_siglip(raw) else s2_fields(raw, fields["vision_config"]))
        fields.update(image_token_fields(raw))
        has_newline = "unpad" in fields["patch_merge_type"]
        fields.update(next_video_fields(raw, has_newline) if next_video(raw, text_type) else {})
        if "image_grid_pinpoints" not in fields:
            tile = LlavaConfig(**fields).vision.image_size
            fields["image_grid_pinpoints"] = pinpoints_of(raw.get("image_grid_pinpoints"), tile)
        return "original", LlavaConfig(**fields)


def next_siglip(raw: dict) -> bool:
    """Whether the LLaVA-NeXT code builds this checkpoint's tower as SigLIP: a name with
    'siglip' in it that is not a local path (any existing path is built as CLIP there)."""
    name = str(raw.get("mm_vision_tower") or raw.get("vision_tower") or "")
    return "siglip" in name.lower() and not Path(name).expanduser().exists()


def next_siglip_fields(tower: Optional[dict]) -> dict:
    """The LLaVA-NeXT code's SigLIP tower: the encoder's last layer deleted and the hidden state
    of the one before used (no post-layernorm, no head, mm_vision_select_* unread), images
    preprocessed by its own SigLIP processor (squashed to 384², mean = std = 0.5)."""
    vision = siglip_vision_config((tower or {}).get("vision_config", tower) if tower else RELEASED_SIGLIP)
    vision["num_hidden_layers"] -= 1
    return dict(
        vision_config=vision,
        vision_model_type="siglip",
        vision_feature_layer=-1,
        vision_feature_select="cls_patch",
        image_processor="siglip",
    )


def image_token_fields(raw: dict) -> dict:
    """The tokens both codes' builders add to the tokenizer before cutting the embeddings to
    it: <im_patch> unless mm_use_im_patch_token is false (its default is true), <im_start> and
    <im_end> with mm_use_im_start_end, which also wraps every <image> of a prompt in them."""
    start_end = bool(raw.get("mm_use_im_start_end"))
    tokens = ["<im_patch>"] if raw.get("mm_use_im_patch_token", True) else []
    tokens += ["<im_start>", "<im_end>"] if start_end else []
    return dict(image_start_end=start_end, builder_tokens=tokens or None)


def llava_v0(raw: dict) -> bool:
    """A LLaVA v0 config: model_type 'llama' with LLaVA's mm_* keys (before the code had its own
    model types), which the original's auto_upgrade (consolidate.py) rewrites to 'llava'."""
    return raw.get("model_type") == "llama" and "mm_vision_tower" in raw


def s2_fields(raw: dict, vision: dict) -> dict:
    """`s2: true` (LLaVA-1.5-S2): both codes build their CLIP tower as CLIPVisionTowerS2, at
    the scales of `s2_scales` (its default "336,672,1008" when the config leaves it out). A
    SigLIP tower ignores the key there, and so here."""
    if not raw.get("s2"):
        return {}
    try:
        scales = scales_of(raw.get("s2_scales") or "336,672,1008")
    except (TypeError, ValueError):
        raise LlavaError(
            f"s2_scales {raw.get('s2_scales')!r} in config.json is not a list of sizes like '336,672,1008'"
        )
    return dict(vision_model_type="clip_s2", vision_config={**vision, "s2_scales": scales})


def next_video(raw: dict, text_type: str) -> bool:
    """Whether the checkpoint comes from the LLaVA-NeXT code, which runs videos: it names a
    SigLIP tower, has the video pooling setting that code reads (the original code has none),
    or is one of its own types."""
    return next_siglip(raw) or "mm_spatial_pool_mode" in raw or text_type in NEXT_ONLY_TYPES


def next_video_fields(raw: dict, has_newline: bool) -> dict:
    """Videos as the LLaVA-NeXT code runs them: each frame's projected features pooled 2 x 2 by
    `mm_spatial_pool_mode` (its get_2dPool is called with its default stride, whatever
    mm_spatial_pool_stride says), then newlines by `mm_newline_position`; `image_newline` exists
    only with an 'unpad' merge type: without it 'one_token' adds nothing and 'grid' / 'frame' fail."""
    if raw.get("add_faster_video"):
        raise LlavaError("add_faster_video (slow-fast frames) is not supported: no release sets it")
    pool = raw.get("mm_spatial_pool_mode", "bilinear")
    newline = raw.get("mm_newline_position", "one_token")  # the code's default
    if pool not in VIDEO_POOLS or newline not in NEWLINES:
        raise LlavaError(f"mm_spatial_pool_mode {pool!r} or mm_newline_position {newline!r} in config.json is unknown")
    if not has_newline and newline in ("grid", "frame"):
        raise LlavaError(
            f"mm_newline_position {newline!r} needs image_newline, which a checkpoint without an 'unpad' "
            "mm_patch_merge_type does not have (the LLaVA-NeXT code fails on its videos too)"
        )
    return dict(
        video_pool=pool,
        video_pool_stride=2,
        video_pool_after_projector=True,
        video_newline=newline if has_newline else "no_token",
    )


def pinpoints_of(value, tile: int):
    """image_grid_pinpoints as a list of [width, height]: a list, its string, or the LLaVA-NeXT
    code's range string."""
    if isinstance(value, str) and "x" in value:
        return grid_range(value, tile)
    return validate.pinpoints(value, "config.json")


def grid_range(text: str, tile: int) -> list:
    """The LLaVA-NeXT code's pinpoints string "(1x1),...,(6x6)": every (i, j) from the first
    pair to the last, times the tile size, as (width, height)."""
    pairs = re.findall(r"\((\d+)x(\d+)\)", text)
    if not pairs:
        raise LlavaError(f"image_grid_pinpoints {text[:60]!r} in config.json is not '(1x1),...,(NxM)'")
    (i0, j0), (i1, j1) = [tuple(map(int, p)) for p in (pairs[0], pairs[-1])]
    return [[i * tile, j * tile] for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]


NEXT_ONLY_TYPES = ("llava_qwen", "llava_mixtral")

ORIGINAL_ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llava_llama",
    "LlavaMistralForCausalLM": "llava_mistral",
    "LlavaQwenForCausalLM": "llava_qwen",
    "LlavaMixtralForCausalLM": "llava_mixtral",
}


def original_text_type(raw: dict) -> str:
    """llava_llama, llava_mistral, llava_qwen or llava_mixtral; any other decoder (MPT, Gemma ...)
    is refused by name.

    liuhaotian's LLaVA-1.5 configs say model_type 'llava': their `architectures` tell.
    """
    model_type, architectures = raw.get("model_type", ""), raw.get("architectures") or []
    if model_type in ORIGINAL_TYPES:
        return model_type
    if llava_v0(raw):
        warn(
            "config.json says model_type 'llama' with LLaVA's mm_* keys (a LLaVA v0 checkpoint): read as the "
            "original's auto_upgrade makes it (llava, LlavaLlamaForCausalLM), prompted with its llava_v0 template"
        )
        return "llava_llama"
    known = [ORIGINAL_ARCHITECTURES[a] for a in architectures if a in ORIGINAL_ARCHITECTURES]
    if model_type in ("llava", "") and (known or not architectures):
        return known[0] if known else "llava_llama"
    name = "/".join(architectures) or model_type
    raise LlavaError(
        f"original LLaVA checkpoint of type '{model_type}' ({name}) is not supported: "
        f"only the llama, mistral, qwen2 and mixtral decoders ({', '.join(ORIGINAL_ARCHITECTURES)}) are"
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
        if key == "image_newline" and not config.uses_newline:
            continue  # saved by the LLaVA-NeXT code whatever the merge type; only 'unpad' ones read it
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


def ships_tower(weights) -> bool:
    """Whether a checkpoint's weight names include the vision tower (LLaVA-1.6 originals do,
    LLaVA-1.5 originals do not)."""
    return any("vision_tower." in k for k in weights)


def tower_location(raw: dict, vision_tower: Optional[str]) -> Optional[str]:
    """Where the original layout's CLIP tower lives: --vision-tower, else mm_vision_tower."""
    return vision_tower or raw.get("mm_vision_tower") or raw.get("vision_tower")
