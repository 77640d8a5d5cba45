"""The S2 multi-scale CLIP tower of LLaVA-1.5-S2 (the original code's `CLIPVisionTowerS2`
over S2-Wrapper's `forward`, bfshi/llava-v1.5-*-s2-lora).

The processor hands over one square picture at the largest scale (1008 for the released
336,672,1008). For every scale the picture is resized with torch's bicubic interpolation (no
antialias, even when shrinking), cut into a chessboard of tiles of the smallest scale (the
tower's own size), and every tile of every scale goes through the tower in one batch (14
tiles at the released scales). Each scale's tile maps are put back together, shrunk to the
smallest scale's map by area interpolation (adaptive average pooling) and the scales are
concatenated channel-wise: the projector sees `hidden_size × len(scales)` channels, the
decoder the 576 positions of a plain LLaVA-1.5 picture.

The resizes are pure functions over (output index, taps) tables, tested against hand-worked
cases and torch.
"""

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import mlx.core as mx
import numpy as np

from .vision import VisionConfig, VisionTower

BICUBIC_A = -0.75  # torch's cubic convolution coefficient (Keys' A)


@dataclass
class S2Config(VisionConfig):
    s2_scales: List[int] = field(default_factory=lambda: [336, 672, 1008])

    def __post_init__(self):
        self.s2_scales = sorted(int(s) for s in self.s2_scales)

    @property
    def feature_width(self) -> int:
        return self.hidden_size * len(self.s2_scales)

    @property
    def input_size(self) -> int:
        """The side of the picture the processor makes (its resize and crop)."""
        return self.s2_scales[-1]


def scales_of(value) -> List[int]:
    """The config's `s2_scales`: "336,672,1008" (the original's string) or a list."""
    items = value.split(",") if isinstance(value, str) else value
    return sorted(int(s) for s in items)


def cubic(t: np.ndarray, a: float = BICUBIC_A) -> np.ndarray:
    """Keys' cubic convolution kernel at distance |t| (0 beyond 2)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_taps(size_in: int, size_out: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (size_out, 4): torch's `interpolate(mode='bicubic',
    align_corners=False)` along one axis. Output i samples input position
    (i + 0.5) · in/out − 0.5, the 4 neighbours clamped to the edge, never antialiased."""
    position = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    first = np.floor(position)
    offsets = np.arange(-1, 3)
    indices = np.clip(first[:, None] + offsets, 0, size_in - 1).astype(np.int32)
    weights = cubic(position[:, None] - (first[:, None] + offsets))
    return indices, weights.astype(np.float32)


def area_taps(size_in: int, size_out: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (size_out, taps): torch's `interpolate(mode='area')`, which is
    adaptive average pooling: output i averages inputs floor(i·in/out) … ceil((i+1)·in/out) − 1.
    Shorter windows are padded with weight 0."""
    starts = [(i * size_in) // size_out for i in range(size_out)]
    ends = [math.ceil((i + 1) * size_in / size_out) for i in range(size_out)]
    taps = max(e - s for s, e in zip(starts, ends))
    indices = np.zeros((size_out, taps), np.int32)
    weights = np.zeros((size_out, taps), np.float32)
    for i, (s, e) in enumerate(zip(starts, ends)):
        indices[i] = np.minimum(np.arange(s, s + taps), size_in - 1)
        weights[i, : e - s] = 1.0 / (e - s)
    return indices, weights


def resample(x: mx.array, axis: int, taps: Tuple[np.ndarray, np.ndarray]) -> mx.array:
    """Each output row along `axis` of x as the weighted sum of its taps' input rows."""
    indices, weights = taps
    gathered = mx.take(x, mx.array(indices.reshape(-1)), axis=axis)
    shape = list(x.shape)
    shape[axis : axis + 1] = list(indices.shape)
    gathered = gathered.reshape(shape)
    w_shape = [1] * len(shape)
    w_shape[axis : axis + 2] = list(weights.shape)
    return (gathered * mx.array(weights).reshape(w_shape).astype(x.dtype)).sum(axis=axis + 1)


def resize(x: mx.array, size: int, make_taps) -> mx.array:
    """(B, H, W, C) → (B, size, size, C), rows then columns (both separable)."""
    if x.shape[1] == size:
        return x  # at scale 1 both sample every pixel exactly (bicubic's weights are 0, 1, 0, 0)
    x = resample(x, 1, make_taps(x.shape[1], size))
    return resample(x, 2, make_taps(x.shape[2], size))


def split_chessboard(x: mx.array, n: int) -> mx.array:
    """(B, n·h, n·w, C) → (n·n·B, h, w, C), tiles ordered (row, column, picture) as S2-Wrapper's."""
    B, H, W, C = x.shape
    x = x.reshape(B, n, H // n, n, W // n, C).transpose(1, 3, 0, 2, 4, 5)
    return x.reshape(n * n * B, H // n, W // n, C)


def merge_chessboard(x: mx.array, n: int) -> mx.array:
    """The inverse of split_chessboard."""
    N, h, w, C = x.shape
    x = x.reshape(n, n, N // (n * n), h, w, C).transpose(2, 0, 3, 1, 4, 5)
    return x.reshape(N // (n * n), n * h, n * w, C)


class S2Tower(VisionTower):
    """CLIP at every scale of `s2_scales`; returns (B, patches, hidden_size × scales), the
    patch features only: S2 selects 'patch' inside each tile, before the maps are merged."""

    def __call__(self, pixels: mx.array) -> mx.array:
        config = self.config
        split = config.s2_scales[0]
        side = config.patches_per_side
        pixels = pixels.astype(self.pre_layrnorm.weight.dtype)
        splits = [scale // split for scale in config.s2_scales]
        tiles = [split_chessboard(resize(pixels, scale, bicubic_taps), n) for scale, n in zip(config.s2_scales, splits)]
        counts = [t.shape[0] for t in tiles]
        # every tile of every scale in one pass through the tower
        features = super().__call__(mx.concatenate(tiles))[:, 1:]
        maps, start = [], 0
        for n, count in zip(splits, counts):
            grid = features[start : start + count].reshape(count, side, side, -1)
            maps.append(resize(merge_chessboard(grid, n), side, area_taps))
            start += count
        merged = mx.concatenate(maps, axis=-1)
        return merged.reshape(merged.shape[0], side * side, -1)
