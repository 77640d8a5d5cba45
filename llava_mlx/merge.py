"""How the features of an image's crops, or a video's frames, become one sequence.

A small table of pure functions over (rows, cols, dim) feature grids, shared by every
model type:

    IMAGE_MERGES  'flat'           every crop's features in order (LLaVA-1.5, several
                                   OneVision images: base crop then one newline)
                  'spatial_unpad'  base crop, then the tiles stitched into one map, the
                                   padding dropped, a newline after every row (LLaVA-1.6)
                                   with `max_tiles` N ('anyres_max_N', OneVision) the
                                   unpadded map is first resized bilinearly when it
                                   exceeds N tiles' worth of features
                  'spatial'        base crop, then the stitched map as it is
                  'spatial_maxpool2x2'  base crop, then the stitched map max-pooled 2 x 2
                                   (the LLaVA-NeXT code)
                  `keep_base=False` ('nobase' in the LLaVA-NeXT code's merge type) leaves
                  the base crop out of a many-crop image
    VIDEO_POOLS   'average' / 'max'  stride × stride pooling (LLaVA-NeXT-Video, before
                                   the projector), 'bilinear' halving (OneVision, after it)
    NEWLINES      'grid' (after each row), 'frame' (after each frame), 'one_token' (once
                  at the end: OneVision), 'no_token' (NeXT-Video)

Two conventions exist for the anyres geometry: the original LLaVA code's (pinpoints as
(width, height), unpadding truncates) and transformers' (pinpoints as (height, width),
unpadding rounds). LLaVA 1.5/1.6 follow the original; OneVision and NeXT-Video were
released through transformers and follow it.
"""

import math
from typing import Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .anyres import downscaled_shape, unpad_padding, unpadded_shape

Size = Tuple[int, int]  # (width, height)


# -- bilinear resizing, as torch's interpolate(mode='bilinear', align_corners=False) ----
def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation weights.

    Torch maps output index i to source (i + 0.5) · n_in / n_out − 0.5, clamped at 0,
    and blends floor(source) with the next index (the last one repeats at the edge). It
    does this arithmetic in float32, and so do we: the blend factors then match its own.
    """
    f32 = np.float32
    weights = np.zeros((n_out, n_in), np.float32)
    scale = f32(n_in) / f32(n_out)
    for i in range(n_out):
        source = max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
        low = min(int(source), n_in - 1)
        high = min(low + 1, n_in - 1)
        frac = f32(source - f32(low))
        weights[i, low] += f32(1.0) - frac
        weights[i, high] += frac
    return weights


def resize_bilinear(grid: mx.array, height: int, width: int) -> mx.array:
    """(..., H, W, D) → (..., height, width, D), separably: rows, then columns."""
    rows = mx.array(bilinear_weights(grid.shape[-3], height)).astype(grid.dtype)
    cols = mx.array(bilinear_weights(grid.shape[-2], width)).astype(grid.dtype)
    grid = mx.einsum("hH,...HWd->...hWd", rows, grid)
    return mx.einsum("wW,...hWd->...hwd", cols, grid)


# -- image merges -----------------------------------------------------------------------
def stitch(tiles: mx.array, rows: int, cols: int) -> mx.array:
    """(rows·cols, side, side, D) tiles in row order → one (rows·side, cols·side, D) map."""
    _, side, _, dim = tiles.shape
    grid = tiles.reshape(rows, cols, side, side, dim).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * side, cols * side, dim)


def with_newlines(grid: mx.array, newline: mx.array) -> mx.array:
    """(H, W, D) → (H·(W+1), D): the newline embedding after every row."""
    height, _, dim = grid.shape
    column = mx.broadcast_to(newline.astype(grid.dtype), (height, 1, dim))
    return mx.concatenate([grid, column], axis=1).reshape(-1, dim)


def merge_flat(features: mx.array, newline: Optional[mx.array] = None, **_) -> mx.array:
    """(crops, patches, D) → every crop in order; `newline` (if given) once at the end."""
    flat = features.reshape(-1, features.shape[-1])
    return flat if newline is None else mx.concatenate([flat, newline[None].astype(flat.dtype)])


def merge_spatial_unpad(
    features: mx.array,
    newline: Optional[mx.array],
    size: Size,
    grid: Tuple[int, int],
    rounding: str = "truncate",
    max_tiles: Optional[int] = None,
    keep_base: bool = True,
) -> mx.array:
    """Base crop, then the tiles' map unpadded (and with `max_tiles`, downscaled), newlines.

    `grid` is (cols, rows) of tiles; `features` (1 + rows·cols, side², D), base first.
    An image with one crop only (no tiles) is its base features then one newline.
    """
    if features.shape[0] == 1:
        return merge_flat(features, newline)
    side, dim = math.isqrt(features.shape[1]), features.shape[-1]
    cols, rows = grid
    tiles = stitched_tiles(features, grid)
    pad_y, pad_x = unpad_padding(size, rows * side, cols * side, rounding)
    tiles = tiles[pad_y : rows * side - pad_y, pad_x : cols * side - pad_x]
    if max_tiles is not None:
        shape = downscaled_shape(tiles.shape[0], tiles.shape[1], max_tiles, side)
        if shape is not None:
            tiles = resize_bilinear(tiles, *shape)
    tail = tiles.reshape(-1, dim) if newline is None else with_newlines(tiles, newline)
    return after_base(features, tail, keep_base)


def after_base(features: mx.array, tail: mx.array, keep_base: bool) -> mx.array:
    """A many-crop image's sequence: its base crop's features, unless left out, then `tail`."""
    return mx.concatenate([features[0], tail]) if keep_base else tail


def stitched_tiles(features: mx.array, grid: Tuple[int, int]) -> mx.array:
    """The tiles after the base crop, (1 + rows·cols, side², D), as one (rows·side, cols·side, D) map."""
    side, dim = math.isqrt(features.shape[1]), features.shape[-1]
    cols, rows = grid
    return stitch(features[1:].reshape(rows * cols, side, side, dim), rows, cols)


def merge_spatial(
    features: mx.array, newline: Optional[mx.array], size: Size, grid: Tuple[int, int], keep_base: bool = True, **_
) -> mx.array:
    """Base crop, then the tiles stitched into one map, row by row, nothing dropped, no newline."""
    if features.shape[0] == 1:
        return merge_flat(features, newline)
    tail = stitched_tiles(features, grid).reshape(-1, features.shape[-1])
    return after_base(features, tail, keep_base)


def merge_spatial_maxpool(
    features: mx.array, newline: Optional[mx.array], size: Size, grid: Tuple[int, int], keep_base: bool = True, **_
) -> mx.array:
    """Base crop, then the stitched map's maximum over each 2 x 2 block (torch's max_pool2d(2):
    an odd last row or column is dropped), no newline."""
    if features.shape[0] == 1:
        return merge_flat(features, newline)
    tail = pool_max(stitched_tiles(features, grid)[None], 2)[0].reshape(-1, features.shape[-1])
    return after_base(features, tail, keep_base)


IMAGE_MERGES = {
    "flat": merge_flat,
    "spatial": merge_spatial,
    "spatial_unpad": merge_spatial_unpad,
    "spatial_maxpool2x2": merge_spatial_maxpool,
}
MERGE_OPTIONS = ("unpad", "maxpool2x2", "nobase")  # the words after 'spatial' in a merge type


def merge_kind(merge_type: str) -> Tuple[str, bool]:
    """(IMAGE_MERGES entry, whether the base crop is kept) of a many-crop image, as the LLaVA-NeXT
    code reads `mm_patch_merge_type`: 'maxpool2x2' wins over 'unpad', 'nobase' drops the base."""
    words = merge_type.split("_")
    if merge_type == "flat":
        return "flat", True
    if words[0] != "spatial" or not set(words[1:]) <= set(MERGE_OPTIONS) or len(set(words)) != len(words):
        raise ValueError(f"patch merge type '{merge_type}' is not flat or spatial[_{'|_'.join(MERGE_OPTIONS)}]")
    kind = "spatial_maxpool2x2" if "maxpool2x2" in words else "spatial_unpad" if "unpad" in words else "spatial"
    return kind, "nobase" not in words


def image_positions(
    size: Size,
    crops: int,
    side: int,
    merge: str,
    grid=None,
    rounding="truncate",
    max_tiles=None,
    newline=False,
    keep_base=True,
) -> int:
    """Positions `IMAGE_MERGES[merge]` produces, from the shapes alone (`newline`: whether
    a newline embedding is passed to the merge)."""
    if merge == "flat" or crops == 1:
        return crops * side * side + (1 if newline else 0)
    base = side * side if keep_base else 0
    cols, rows = grid
    if merge == "spatial":
        return base + rows * cols * side * side
    if merge == "spatial_maxpool2x2":
        return base + (rows * side // 2) * (cols * side // 2)
    height, width = unpadded_shape(size, rows * side, cols * side, rounding)
    if max_tiles is not None:
        height, width = downscaled_shape(height, width, max_tiles, side) or (height, width)
    return base + height * (width + (1 if newline else 0))


# -- video ------------------------------------------------------------------------------
def pool_average(frames: mx.array, stride: int) -> mx.array:
    """(T, H, W, D) → (T, H // s, W // s, D): mean of each s x s block (torch AvgPool2d)."""
    t, h, w, d = frames.shape
    h, w = h // stride, w // stride
    blocks = frames[:, : h * stride, : w * stride].reshape(t, h, stride, w, stride, d)
    return blocks.mean(axis=(2, 4))


def pool_max(frames: mx.array, stride: int) -> mx.array:
    """(T, H, W, D) → (T, H // s, W // s, D): max of each s x s block (torch MaxPool2d)."""
    t, h, w, d = frames.shape
    h, w = h // stride, w // stride
    blocks = frames[:, : h * stride, : w * stride].reshape(t, h, stride, w, stride, d)
    return blocks.max(axis=(2, 4))


def pool_bilinear(frames: mx.array, stride: int) -> mx.array:
    """(T, H, W, D) → (T, ceil(H / s), ceil(W / s), D), bilinear (OneVision's apply_pooling)."""
    _, h, w, _ = frames.shape
    return resize_bilinear(frames, math.ceil(h / stride), math.ceil(w / stride))


VIDEO_POOLS = {"average": pool_average, "max": pool_max, "bilinear": pool_bilinear}


def pooled_side(side: int, mode: str, stride: int) -> int:
    return math.ceil(side / stride) if mode == "bilinear" else side // stride


def place_newlines(frames: mx.array, newline: Optional[mx.array], position: str) -> mx.array:
    """(T, h, w, D) pooled frames → one sequence, newlines placed as `position` says."""
    t, h, w, d = frames.shape
    if position == "grid":
        return with_newlines(frames.reshape(t * h, w, d), newline)
    flat = frames.reshape(-1, d)
    if position == "one_token":
        return mx.concatenate([flat, newline[None].astype(flat.dtype)])
    if position == "frame":
        column = mx.broadcast_to(newline.astype(flat.dtype), (t, 1, d))
        return mx.concatenate([frames.reshape(t, h * w, d), column], axis=1).reshape(-1, d)
    return flat


NEWLINES = ("grid", "frame", "one_token", "no_token")


def video_positions(frames: int, side: int, mode: str, stride: int, position: str) -> int:
    """Positions a video of `frames` frames takes once pooled and its newlines placed."""
    pooled = pooled_side(side, mode, stride)
    extra = {"grid": frames * pooled, "frame": frames, "one_token": 1}.get(position, 0)
    return frames * pooled * pooled + extra


def frame_indices(total: int, count: int) -> Sequence[int]:
    """`count` frame indices spread uniformly over `total` frames, first and last included,
    truncated to integers (the LLaVA-NeXT code's `np.linspace(..., dtype=int)`); all frames
    when there are no more than `count`."""
    if count >= total:
        return list(range(total))
    return [int(i) for i in np.linspace(0, total - 1, count, dtype=int)]
