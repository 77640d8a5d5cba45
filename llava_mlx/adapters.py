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
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx

from .errors import LlavaError
from .load import detect_layout, load_weights, read_json, rename

LORA_CONFIG = "adapter_config.json"
ADAPTER = "adapter_model"
NON_LORA = "non_lora_trainables"
PROJECTOR = "mm_projector"
PEFT_PREFIX = "base_model.model."
# Where merged rows may outnumber the base's (the delta's added tokens).
GROWING_ROWS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


# -- files --------------------------------------------------------------------------------
def tensor_files(path: Path, stem: str) -> list:
    """[`stem`.safetensors], else [`stem`.bin], else []."""
    return next(([path / f"{stem}{ext}"] for ext in (".safetensors", ".bin") if (path / f"{stem}{ext}").exists()), [])


def read_tensors(path: Path, stem: str) -> Dict[str, mx.array]:
    """Every tensor of `stem` in `path` (safetensors lazily; .bin through torch, which needs it)."""
    weights = {}
    for file in tensor_files(path, stem):
        if file.suffix == ".bin":
            from .convert import _torch_load, import_torch, to_mx

            torch = import_torch(f"{file} is PyTorch .bin weights")
            weights.update({k: to_mx(torch, v) for k, v in _torch_load(torch, file).items()})
        else:
            try:
                weights.update(mx.load(str(file)))
            except (RuntimeError, ValueError, OSError) as e:
                raise LlavaError(f"cannot read weights {file}: {e}") from None
    return weights


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


# -- LoRA ---------------------------------------------------------------------------------
def is_target(config: dict, module: str) -> bool:
    """peft's rule: a string is a regex matched whole; a list names modules or their last parts."""
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    found = module in targets or any(module.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers not in (None, []):
        patterns = config.get("layers_pattern") or [r"[^.]*"]
        patterns = [patterns] if isinstance(patterns, str) else patterns
        index = next((m for p in patterns if (m := re.match(rf".*\.{p}\.(\d+)\.", module))), None)
        layers = [layers] if isinstance(layers, int) else layers
        found = index is not None and int(index.group(1)) in layers
    return found


def scaling(config: dict, module: str, rank: int) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; alpha_pattern as peft matches it."""
    patterns = list(config.get("rank_pattern") or {}) + list(config.get("alpha_pattern") or {})
    key = next((p for p in patterns if re.match(rf".*\.{p}$", module)), module)
    alpha = (config.get("alpha_pattern") or {}).get(key, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@dataclass
class Lora:
    """The LoRA pairs of one adapter by module (its own names), and whole weights it replaces."""

    name: str
    pairs: Dict[str, Tuple[mx.array, mx.array, float, bool]] = field(default_factory=dict)  # A, B, scale, embedding
    replaced: Dict[str, mx.array] = field(default_factory=dict)  # modules_to_save, trained biases

    def merge(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """`weights` (any layout's names) with W + scale · B·A for every pair; lazy."""
        index = {rename(k): k for k in weights}
        weights = dict(weights)
        for module, (a, b, scale, embedding) in self.pairs.items():
            key = index.get(rename(f"{module}.weight"))
            if key is None:
                raise LlavaError(f"the adapter {self.name} has LoRA weights for '{module}', which this model does not have")
            w = weights[key]
            if not mx.issubdtype(w.dtype, mx.floating):
                raise LlavaError(f"'{module}' of the base is quantized: LoRA merges into a float base model only")
            delta = b.astype(mx.float32) @ a.astype(mx.float32)
            delta = (delta.T if embedding else delta) * scale
            if delta.shape != w.shape:
                raise LlavaError(
                    f"the adapter's LoRA update of '{module}' has shape {tuple(delta.shape)} but the base "
                    f"weight has {tuple(w.shape)}: the base model does not fit this adapter"
                )
            weights[key] = w + delta.astype(w.dtype)  # as peft: the update in float32, added in W's dtype
        return weights


def read_lora(path: Path) -> Lora:
    config = read_json(path / LORA_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise LlavaError(f"{path / LORA_CONFIG}: peft_type {config['peft_type']} is not supported (LoRA only)")
    for option in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(option):
            raise LlavaError(f"{path / LORA_CONFIG}: {option} adapters are not supported")
    tensors = read_tensors(path, ADAPTER)
    if not tensors:
        raise LlavaError(f"no {ADAPTER}.safetensors or {ADAPTER}.bin in {path}")
    tensors = {k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    lora, halves, skipped = Lora(path.name), {}, []
    for key, value in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_(A|B|embedding_A|embedding_B)(\.weight)?", key)
        if match is None:
            lora.replaced[key] = value
        else:
            halves.setdefault(match.group(1), {})[match.group(2)[-1]] = (value, "embedding" in match.group(2))
    for module, half in sorted(halves.items()):
        if set(half) != {"A", "B"}:
            raise LlavaError(f"the adapter {path.name} has only lora_{next(iter(half))} for '{module}'")
        (a, embedding), (b, _) = half["A"], half["B"]
        if a.ndim != 2:
            raise LlavaError(f"the adapter {path.name} has LoRA on a convolution ('{module}'), which is not supported")
        if not is_target(config, module):
            skipped.append(module)
            continue
        lora.pairs[module] = (a, b, scaling(config, module, a.shape[0]), embedding)
    if skipped:  # peft builds no LoRA layer there, so their weights go unused: we say so
        print(
            f"warning: {path.name}: {len(skipped)} LoRA pair(s) outside target_modules left out, as peft does "
            f"(first: '{skipped[0]}')",
            file=sys.stderr,
        )
    if not lora.pairs:
        raise LlavaError(f"the adapter {path.name} has no LoRA weights for its target_modules")
    return lora


def non_lora_weights(path: Path) -> Dict[str, mx.array]:
    """non_lora_trainables with the builder's prefix rule: drop 'base_model.', then 'model.' if
    the names start with 'model.model.'."""
    weights = read_tensors(path, NON_LORA)
    weights = {k[len("base_model.") :] if k.startswith("base_model.") else k: v for k, v in weights.items()}
    if any(k.startswith("model.model.") for k in weights):
        weights = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in weights.items()}
    return weights


# -- delta weights ------------------------------------------------------------------------
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


# -- the loader's entry points ------------------------------------------------------------
def base_weights(base: Path) -> Dict[str, mx.array]:
    if not glob.glob(str(base / "*.safetensors")):  # e.g. a hub base that ships PyTorch .bin only
        raise LlavaError(
            f"the base model {base} has no safetensors weights; merge with convert.py, which reads .bin "
            f"with torch (python convert.py --model CHECKPOINT --model-base BASE --out DIR)"
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
