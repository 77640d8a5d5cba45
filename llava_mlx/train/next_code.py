"""The LLaVA-NeXT code's train() (lmms-lab's OneVision and LLaVA-Video fine-tuning scripts),
where it differs from the original's: which checkpoints it trains, the settings and config
keys it leaves, what trains (`--mm_tunable_parts`, or its legacy flags), its optimizer's groups.

The checkpoint decides whose rules apply (`code_of`): the LLaVA-NeXT code's for its own layout
(Qwen2 and Mixtral decoders, a SigLIP tower, its video or tuning keys in config.json, a Llama-3
byte-level tokenizer), the original's for liuhaotian's checkpoints and for the plain Llama /
Vicuna / Mistral language models its scripts start from.
"""

import ast
import json
from pathlib import Path

from ..checkpoint.layouts import detect_layout, next_video, original_text_type
from ..errors import LlavaError

# config.json keys only the LLaVA-NeXT code's train() writes
NEXT_KEYS = (
    "mm_tunable_parts",
    "mm_newline_position",
    "mm_spatial_pool_mode",
    "mm_spatial_pool_stride",
    "mm_vision_tower_lr",
    "vision_tower_pretrained",
    "add_faster_video",
    "image_crop_resolution",
    "add_time_instruction",
    "force_sample",
    "use_pos_skipping",
)
LLAMA_DECODERS = ("llama", "mistral")  # what the original's LlavaLlamaForCausalLM loads
TUNABLE = {"mm_vision_tower": {"tower"}, "mm_mlp_adapter": {"projector"}, "mm_language_model": {"lm_body", "lm_head"}}
# Settings a LLaVA checkpoint has of its own (config key: the flag's group and name).
SETTINGS = {
    "mm_projector_type": ("model", "mm_projector_type"),
    "mm_vision_select_layer": ("model", "mm_vision_select_layer"),
    "mm_vision_select_feature": ("model", "mm_vision_select_feature"),
    "mm_patch_merge_type": ("model", "mm_patch_merge_type"),
    "image_aspect_ratio": ("data", "image_aspect_ratio"),
}
NEXT_SETTINGS = {
    **SETTINGS,
    "image_grid_pinpoints": ("data", "image_grid_pinpoints"),
    "mm_newline_position": ("model", "mm_newline_position"),
    "mm_spatial_pool_mode": ("model", "mm_spatial_pool_mode"),
    "mm_spatial_pool_stride": ("model", "mm_spatial_pool_stride"),
}


def byte_level(path: Path) -> bool:
    """Whether the tokenizer at `path` is byte-level BPE (Llama-3's, Qwen2's) with no tokenizer.model."""
    file = path / "tokenizer.json"
    if (path / "tokenizer.model").exists() or not file.exists():
        return False
    try:
        decoder = json.loads(file.read_text(encoding="utf-8")).get("decoder") or {}
    except (OSError, ValueError):
        return False
    return "ByteLevel" in json.dumps(decoder)


def code_of(path: Path, raw: dict) -> str:
    """'next' or 'original': whose train() trains the model at `path` (config.json's `raw`)."""
    if "mm_vision_tower" in raw or str(raw.get("model_type", "")).startswith("llava"):
        if detect_layout(raw) != "original":
            return "original"  # llava-hf layouts: refused by the builder, in the original's words
        text_type = original_text_type(raw)
        if next_video(raw, text_type) or any(k in raw for k in NEXT_KEYS) or byte_level(path):
            return "next"
        return "original"
    return "original" if raw.get("model_type") in LLAMA_DECODERS else "next"


def tunable_parts(text: str) -> list:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for part in parts:
        if part not in TUNABLE:
            what = "the vision resampler is not built here" if part == "mm_vision_resampler" else "unknown"
            raise LlavaError(f"--mm_tunable_parts {text}: {part} ({what}); of {', '.join(TUNABLE)}")
    return parts


def trained_parts(args) -> set:
    """What trains, as train() sets requires_grad: `--mm_tunable_parts` (LoRA then takes the
    language model's place, and always trains), else its legacy flags over everything but the
    tower. `lm_body` includes image_newline; `tower_lora` is the LoRA peft puts in the tower."""
    m, t = args.model, args.training
    if m.mm_tunable_parts is not None:
        parts = set()
        for part in tunable_parts(m.mm_tunable_parts):
            parts |= TUNABLE[part] if not (part == "mm_language_model" and t.lora_enable) else set()
        parts |= {"lora", "tower_lora"} if t.lora_enable else set()  # every lora_ parameter restored
    else:
        parts = {"lm_body", "lm_head", "projector"}
        if m.freeze_backbone:
            parts -= {"lm_body"}
        if t.lora_enable:
            parts = {"lora", "projector"}  # peft freezes the rest; the existing projector is unfrozen again
        if m.tune_mm_mlp_adapter:
            parts = {"projector"} | ({"lora", "tower_lora"} if t.lora_enable else set())
            if m.unfreeze_mm_vision_tower and not t.lora_enable:
                raise LlavaError(
                    "--tune_mm_mlp_adapter saves the projector alone: the tower --unfreeze_mm_vision_tower "
                    "trains would not be saved (use --mm_tunable_parts mm_vision_tower,mm_mlp_adapter)"
                )
        if t.freeze_mm_mlp_adapter:
            parts -= {"projector"}
        if m.unfreeze_mm_vision_tower:
            parts |= {"tower"}
    if not parts:
        raise LlavaError("nothing would train: see --mm_tunable_parts, --tune_mm_mlp_adapter, --freeze_mm_mlp_adapter")
    return parts


def literal(text):
    """A value of the code's other fields, given as text."""
    try:
        return ast.literal_eval(str(text))
    except (ValueError, SyntaxError):
        return text


def next_config(args, raw: dict, vision_width: int, decoder: str) -> dict:
    """config.json as the LLaVA-NeXT code's train() and initialize_vision_modules leave it
    (`raw`: the checkpoint's, its settings already settled)."""
    m, t = args.model, args.training
    other = {name: literal(text) for name, text in args.next_other.items()}
    tuning = (
        {"mm_tunable_parts": m.mm_tunable_parts}
        if m.mm_tunable_parts is not None
        else {
            "tune_mm_mlp_adapter": m.tune_mm_mlp_adapter,
            "tune_mm_vision_resampler": False,
            "freeze_mm_mlp_adapter": t.freeze_mm_mlp_adapter,
            "freeze_mm_vision_resampler": False,
            "unfreeze_mm_vision_tower": m.unfreeze_mm_vision_tower,
        }
    )
    return {
        **raw,
        "mm_vision_tower": m.vision_tower or raw.get("mm_vision_tower"),
        "vision_tower_pretrained": other.get("vision_tower_pretrained"),
        "use_mm_proj": True,
        "mm_hidden_size": vision_width,  # the tower's own (the code's SigLIP tower says 1152 whatever it loaded)
        "image_crop_resolution": None,
        "image_split_resolution": None,
        # the code loads Mistral's and Mixtral's tokenizers padding left (the same losses here)
        "tokenizer_padding_side": "left" if decoder in ("mistral", "mixtral") else "right",
        "tokenizer_model_max_length": t.model_max_length,
        "add_faster_video": False,
        "faster_token_stride": other.get("faster_token_stride", 10),
        "add_time_instruction": other.get("add_time_instruction", False),
        "force_sample": other.get("force_sample", False),
        "use_pos_skipping": False,
        "pos_skipping_range": other.get("pos_skipping_range", 4096),
        **tuning,
        "mm_use_im_start_end": False,
        "mm_projector_lr": t.mm_projector_lr,
        "mm_vision_tower_lr": t.mm_vision_tower_lr,
        "mm_use_im_patch_token": False,  # the <im_patch> token is not added (build.py warns)
        "use_cache": True,
    }


def lr_groups(args, code: str) -> list:
    """(name, parameter prefix, learning rate) of the parts LLaVATrainer gives their own rate."""
    t = args.training
    groups = [("projector", "multi_modal_projector.", t.mm_projector_lr)]
    if code == "next":
        groups.append(("vision tower", "vision_tower.", t.mm_vision_tower_lr))
    return [g for g in groups if g[2] is not None]


def rms_norms_exempt(code: str, decoder: str) -> bool:
    """Whether the decoder's RMSNorms are exempt from weight decay: transformers lists only
    LlamaRMSNorm in ALL_LAYERNORM_LAYERS; the original builds every decoder as Llama, the
    LLaVA-NeXT code Qwen2, Mistral and Mixtral with their own (decayed) norms."""
    return code == "original" or decoder == "llama"
