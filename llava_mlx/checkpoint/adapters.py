"""Checkpoints that need a base model: LoRA adapters, projector-only checkpoints, delta weights.

The original builder (llava/model/builder.py) loads them on top of a base language model:
- LoRA (`adapter_config.json`, `adapter_model.safetensors|.bin`, `non_lora_trainables.bin`):
  the base's weights with the LoRA checkpoint's LLaVA config, the non-LoRA weights (projector,
  anything trained in full) loaded over them, then every LoRA pair merged,
  W + (lora_alpha / r) · B·A (lora_alpha / sqrt(r) with `use_rslora`), as peft's
  `merge_and_unload` does.
- Projector-only (`mm_projector.bin` and a config, e.g. the pretraining checkpoints): the base
  with the checkpoint's config, and the projector over it.
- Delta weights (llava/model/apply_delta.py, the first releases): target = base + delta for
  every base weight; what the delta has beyond the base (the projector, extra embedding and
  lm_head rows) is kept as it is.

The original tells LoRA from projector-only by the model name ('lora' in it); here the files
tell. Everything is merged into the weights at load, under the checkpoint's own names, before
`load.sanitize` and before any quantization, so a merged model is an ordinary model. The base
is any layout the loader reads (a plain LLaMA/Mistral language model included); its tokenizer
is the one used, as in the original.
"""

import glob
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from ..errors import LlavaError
from .files import load_weights, read_json, read_tensors, tensor_files
from .layouts import detect_layout, rename
from .lora import LORA_CONFIG, non_lora_weights, read_lora

PROJECTOR = "mm_projector"


# Where merged rows may outnumber the base's (the delta's added tokens).
GROWING_ROWS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


def checkpoint_kind(path: Path) -> str:
    """'lora', 'projector' (only mm_projector weights) or 'full', from the files."""
    if (path / LORA_CONFIG).exists():
        return "lora"
    if tensor_files(path, PROJECTOR):
        others = set(glob.glob(str(path / "*.safetensors"))) | set(glob.glob(str(path / "*.bin")))
        if others <= {str(f) for f in tensor_files(path, PROJECTOR)}:
            return "projector"
    return "full"


def needs_base_error(path: Path, kind: str) -> LlavaError:
    if kind == "lora":
        source, key, what = LORA_CONFIG, "base_model_name_or_path", f"a LoRA adapter ({LORA_CONFIG})"
    else:
        source, key, what = "config.json", "_name_or_path", f"a projector-only checkpoint ({PROJECTOR} weights)"
    named = read_json(path / source).get(key) if (path / source).exists() else None
    hint = f" ('{named}' by its {source})" if named else ""
    return LlavaError(f"{path} is {what}: pass --model-base PATH_OR_REPO, the model it was trained from{hint}")


def apply_delta(delta: Dict[str, mx.array], base: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """base + delta where the base has the weight; the delta as it is elsewhere and in its extra rows."""
    index = {rename(k): k for k in base}
    out = {}
    for key, d in delta.items():
        name = rename(key)
        if name not in index:
            out[key] = d  # e.g. the projector: the delta holds it whole
            continue
        b = base[index[name]].astype(d.dtype)
        if d.shape == b.shape:
            out[key] = d + b
        elif name in GROWING_ROWS and d.ndim == 2 and d.shape[1] == b.shape[1] and d.shape[0] > b.shape[0]:
            out[key] = mx.concatenate([d[: b.shape[0]] + b, d[b.shape[0] :]])
        else:
            raise LlavaError(
                f"delta weight '{key}' has shape {tuple(d.shape)} but the base's is {tuple(b.shape)}: "
                "the base model does not fit these delta weights"
            )
    return out


def base_weights(base: Path) -> Dict[str, mx.array]:
    if not glob.glob(str(base / "*.safetensors")):  # e.g. a hub base that ships PyTorch .bin only
        raise LlavaError(
            f"the base model {base} has no safetensors weights; merge with convert.py, which reads .bin "
            f"(python convert.py --model CHECKPOINT --model-base BASE --out DIR)"
        )
    weights = load_weights(base)
    if any(k.endswith(".scales") for k in weights):
        raise LlavaError(f"the base model {base} is quantized: merge into its float weights, quantize afterwards")
    return weights


def over(base: Dict[str, mx.array], own: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The base's weights with the checkpoint's own in their place (names of any layout)."""
    names = {rename(k) for k in own}
    return {**{k: v for k, v in base.items() if rename(k) not in names}, **own}


def read_checkpoint(path: Path, model_base: Optional[Path] = None, delta: bool = False):
    """(config.json, weights, Lora or None) of any checkpoint kind; raw names, lazy."""
    kind = "delta" if delta else checkpoint_kind(path)
    if kind == "full" and model_base is not None:
        raise LlavaError(
            f"{path} is a full checkpoint: --model-base is for LoRA and projector-only checkpoints "
            "(delta weights: convert.py --delta DELTA --model-base BASE)"
        )
    if kind != "full" and model_base is None:
        if kind == "delta":
            raise LlavaError(f"delta weights {path} need their base: pass --model-base PATH_OR_REPO")
        raise needs_base_error(path, kind)
    # a peft adapter of a whole LLaVA model may come without config.json: the base's then
    config_dir = model_base if kind == "lora" and not (path / "config.json").exists() else path
    raw = read_json(config_dir / "config.json")
    detect_layout(raw)  # an unknown model type is said before any weight is read
    if kind == "full":
        return raw, load_weights(path), None
    base = base_weights(model_base)
    if kind == "delta":
        return raw, apply_delta(load_weights(path), base), None
    if kind == "projector":
        return raw, over(base, read_tensors(path, PROJECTOR)), None
    lora = read_lora(path)
    return raw, over(base, {**non_lora_weights(path), **lora.replaced}), lora


def tokenizer_dir(path: Path, model_base: Optional[Path], delta: bool = False) -> Path:
    """The base's tokenizer for LoRA and projector-only checkpoints (as the builder), else the checkpoint's."""
    return model_base if (model_base is not None and not delta) else path


def check_base_fits(expected: Dict[str, mx.array], weights: Dict[str, mx.array], path: Path, model_base: Path):
    """One line naming the base when its weights have other shapes than the checkpoint's config."""
    for key, param in expected.items():
        shape = param.shape
        if key in weights and tuple(weights[key].shape) != tuple(shape):
            raise LlavaError(
                f"the base model {model_base} does not fit {path}: weight '{key}' has shape "
                f"{tuple(weights[key].shape)}, the checkpoint's config.json implies {tuple(shape)}"
            )
