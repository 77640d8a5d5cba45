"""Optimisation as LLaVATrainer over transformers' Trainer: AdamW with bias correction (torch's
update, mlx.optimizers' AdamW), its parameter groups (no weight decay on biases and norms; the
projector at --mm_projector_lr and, the LLaVA-NeXT code's, the tower at --mm_vision_tower_lr
when given), transformers' learning-rate schedules by optimizer step, and torch's clipping of
the global gradient norm.
"""

import math
from typing import Callable, Dict, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .next_code import lr_groups, rms_norms_exempt


def schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """transformers' get_scheduler lambdas: the factor of the base rate at optimizer step k (from 0)."""

    def warming(k: int):
        return k / max(1, warmup) if k < warmup else None

    def cosine(k: int) -> float:
        progress = (k - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    def linear(k: int) -> float:
        return max(0.0, (total - k) / max(1, total - warmup))

    after = {"cosine": cosine, "linear": linear, "constant_with_warmup": lambda k: 1.0}
    if kind == "constant":
        return lambda k: 1.0
    return lambda k: w if (w := warming(k)) is not None else after[kind](k)


def no_decay(model: nn.Module, rms_norms: bool = True) -> set:
    """Parameters kept from weight decay: biases, and every parameter of a norm in transformers'
    ALL_LAYERNORM_LAYERS: nn.LayerNorm, and LlamaRMSNorm, which modeling_llama adds to it
    (`rms_norms`: the decoder's RMSNorms are LlamaRMSNorms; Qwen2's and Mistral's are not added)."""
    kinds = (nn.RMSNorm, nn.LayerNorm) if rms_norms else (nn.LayerNorm,)
    norms = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    names = {name for name, _ in tree_flatten(model.trainable_parameters())}
    return {n for n in names if "bias" in n.split(".")[-1] or any(n.startswith(f"{norm}.") for norm in norms if norm)}


def optimizer(
    model: nn.Module, args, factor: Callable[[int], float], code: str = "original"
) -> Tuple[optim.Optimizer, Dict[str, float]]:
    """AdamW per LLaVATrainer.create_optimizer group (decayed or not; the rest, then each part
    with its own rate), each on the schedule; also each group's base rate."""
    t = args.training
    exempt = no_decay(model, rms_norms_exempt(code, model.config.text_config["model_type"]))
    special = lr_groups(args, code)

    def part_of(n: str):
        return next((name for name, prefix, _ in special if n.startswith(prefix)), None)

    def member(part, decayed: bool):
        return lambda n: part_of(n) == part and (n not in exempt) == decayed

    groups, rates = [], {}
    for part, lr in [(None, t.learning_rate)] + [(name, lr) for name, _, lr in special]:
        for kind, decayed, decay in (("decay", True, t.weight_decay), ("no decay", False, 0.0)):
            name = f"{kind}, {part}" if part else kind
            groups.append((name, member(part, decayed), decay))
            rates[name] = lr
    parts = []
    for name, _, decay in groups:
        base = rates[name]
        parts.append(
            optim.AdamW(
                learning_rate=lambda step, base=base: mx.array(base * factor(int(step))),
                betas=[t.adam_beta1, t.adam_beta2],
                eps=t.adam_epsilon,
                weight_decay=decay,
                bias_correction=True,
            )
        )
    filters = [lambda path, _, keep=keep: keep(path) for _, keep, _ in groups[:-1]]
    return optim.MultiOptimizer(parts, filters), rates


def global_norm(gradients) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(gradients)))


def clip(gradients, max_norm: float):
    """torch's clip_grad_norm_: scaled by min(1, max_norm / (norm + 1e-6)); (gradients, norm before)."""
    norm = global_norm(gradients)
    if not max_norm or max_norm <= 0:
        return gradients, norm
    scale = mx.minimum(1.0, max_norm / (norm + 1e-6))
    return tree_map(lambda g: g * scale.astype(g.dtype), gradients), norm
