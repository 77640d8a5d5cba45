"""LoRA adapters, merged into the weights at load as peft's `merge_and_unload` does:
W + (lora_alpha / r) · B·A (lora_alpha / sqrt(r) with `use_rslora`), with peft's rules for
which modules are targets (`target_modules`, `layers_to_transform`, `alpha_pattern`)."""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx

from ..errors import LlavaError, warn
from .files import read_json, read_tensors
from .layouts import rename

LORA_CONFIG = "adapter_config.json"
ADAPTER = "adapter_model"
NON_LORA = "non_lora_trainables"
PEFT_PREFIX = "base_model.model."


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
                raise LlavaError(
                    f"the adapter {self.name} has LoRA weights for '{module}', which this model does not have"
                )
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
        warn(
            f"{path.name}: {len(skipped)} LoRA pair(s) outside target_modules left out, as peft does "
            f"(first: '{skipped[0]}')"
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
