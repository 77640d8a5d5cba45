"""The multimodal projector: `linear` or `mlp{N}x_gelu` (exact erf GELU, as in PyTorch)."""

import re

import mlx.core as mx
import mlx.nn as nn


def projector_depth(kind: str) -> int:
    if kind == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None:
        raise ValueError(f"unsupported projector type '{kind}' (expected linear or mlp<N>x_gelu)")
    return int(match.group(1))


class Projector(nn.Module):
    """Linear → (GELU → Linear) × (N−1), with layers named linear_1 … linear_N (llava-hf)."""

    def __init__(self, kind: str, vision_dim: int, text_dim: int, bias: bool = True):
        super().__init__()
        self.depth = projector_depth(kind)
        for i in range(self.depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(vision_dim if i == 0 else text_dim, text_dim, bias=bias))

    def __call__(self, x: mx.array) -> mx.array:
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(nn.gelu(x))
        return x
