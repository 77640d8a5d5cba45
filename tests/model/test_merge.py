"""merge.py's pure functions on hand-worked cases (and torch's interpolate for the bilinear maths)."""

import mlx.core as mx
import numpy as np
import pytest

from llava_mlx import anyres, merge


def test_bilinear_weights_by_hand():
    # torch, align_corners=False: output i reads source (i + 0.5) · in / out − 0.5, clamped at 0
    assert np.allclose(merge.bilinear_weights(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    assert np.allclose(merge.bilinear_weights(3, 2), [[0.75, 0.25, 0], [0, 0.25, 0.75]])
    # 5 → ceil(5/2) = 3, OneVision's video pooling of an odd map (27 → 14 in the real model)
    assert np.allclose(
        merge.bilinear_weights(5, 3), [[2 / 3, 1 / 3, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1 / 3, 2 / 3]]
    )
    # upsampling clamps at both edges
    assert np.allclose(merge.bilinear_weights(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])


@pytest.mark.parametrize(
    "shape,size", [((7, 7), (4, 4)), ((40, 14), (35, 12)), ((27, 27), (14, 14)), ((9, 31), (5, 20))]
)
def test_resize_bilinear_matches_torch(shape, size):
    import torch

    grid = np.random.default_rng(0).standard_normal((*shape, 6)).astype(np.float32)
    ours = np.asarray(merge.resize_bilinear(mx.array(grid), *size))
    theirs = (
        torch.nn.functional.interpolate(
            torch.tensor(grid).permute(2, 0, 1)[None], list(size), mode="bilinear", align_corners=False
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert np.abs(ours - theirs).max() < 1e-5


def test_unpad_rounding_conventions():
    # an 11x55 image on a 31-row, 6-column map keeps 55 · (6 / 11) = 29.999999999999996 rows in
    # floating point: truncated to 29 (original, 1 row dropped each side), rounded to 30 (none)
    assert anyres.unpad_padding((11, 55), 31, 6, "truncate") == (1, 0)
    assert anyres.unpad_padding((11, 55), 31, 6, "round") == (0, 0)
    # 300x149 on 6x6: 149 · 6 / 300 = 2.98 → 2 rows kept by both (rounding is to 7 decimals only)
    truncated, rounded = (
        anyres.unpad_padding((300, 149), 6, 6, "truncate"),
        anyres.unpad_padding((300, 149), 6, 6, "round"),
    )
    assert truncated == rounded == (2, 0)


def test_downscale_threshold():
    # 40x14 over a 9 x 7² budget: ratio sqrt(560 / 441) = 1.127 > 1.1 → floor(40 / r) x floor(14 / r)
    assert anyres.downscaled_shape(40, 14, 9, 7) == (35, 12)
    # 38x14: ratio 1.098, kept
    assert anyres.downscaled_shape(38, 14, 9, 7) is None
    assert anyres.anyres_max_tiles("anyres_max_9") == 9
    assert anyres.anyres_max_tiles("anyres") is None


def test_spatial_unpad_by_hand():
    # base crop + 2x2 tiles of 2x2 features (dim 1); a 400x100 image keeps map rows 1..2
    base = np.arange(4.0)
    tiles = [np.arange(4.0) + 10 * (i + 1) for i in range(4)]
    features = mx.array(np.stack([base] + tiles)[..., None])
    newline = mx.array([99.0])
    out = merge.merge_spatial_unpad(features, newline, size=(400, 100), grid=(2, 2))
    assert np.asarray(out)[:, 0].tolist() == [0, 1, 2, 3, 12, 13, 22, 23, 99, 30, 31, 40, 41, 99]
    assert merge.image_positions((400, 100), 5, 2, "spatial_unpad", (2, 2), newline=True) == 14
    # without unpadding: the stitched map, row by row
    out = merge.merge_spatial(features, None, size=(400, 100), grid=(2, 2))
    assert np.asarray(out)[4:, 0].tolist() == [10, 11, 20, 21, 12, 13, 22, 23, 30, 31, 40, 41, 32, 33, 42, 43]


def test_the_next_codes_merges_by_hand():
    # base crop + 2 tiles side by side (cols 2, rows 1) of 2x2 features: the stitched map is
    # [[10, 11, 20, 21], [12, 13, 22, 23]]; its 2x2 maxima 13 and 23
    base = np.arange(4.0)
    features = mx.array(np.stack([base, np.arange(4.0) + 10, np.arange(4.0) + 20])[..., None])
    values = lambda out: np.asarray(out)[:, 0].tolist()  # noqa: E731
    out = merge.merge_spatial_maxpool(features, None, size=(200, 100), grid=(2, 1))
    assert values(out) == [0, 1, 2, 3, 13, 23]
    out = merge.merge_spatial_maxpool(features, None, size=(200, 100), grid=(2, 1), keep_base=False)
    assert values(out) == [13, 23]
    assert merge.image_positions((200, 100), 3, 2, "spatial_maxpool2x2", (2, 1)) == 6
    assert merge.image_positions((200, 100), 3, 2, "spatial_maxpool2x2", (2, 1), keep_base=False) == 2
    # nobase: the unpadded map and its newlines only (a 200x100 image fills both tiles: nothing cut)
    nl = mx.array([99.0])
    out = merge.merge_spatial_unpad(features, nl, size=(200, 100), grid=(2, 1), keep_base=False)
    assert values(out) == [10, 11, 20, 21, 99, 12, 13, 22, 23, 99]
    assert merge.image_positions((200, 100), 3, 2, "spatial_unpad", (2, 1), newline=True, keep_base=False) == 10
    assert values(merge.merge_spatial(features, None, size=(200, 100), grid=(2, 1), keep_base=False)) == [
        10, 11, 20, 21, 12, 13, 22, 23
    ]  # fmt: skip
    # an odd map (3 rows of 1-wide tiles stacked: 3x1 of 1x1 features) drops its last row and column
    odd = mx.array(np.array([0.0, 5, 6, 7]).reshape(4, 1, 1))
    assert values(merge.merge_spatial_maxpool(odd, None, size=(10, 30), grid=(1, 3))) == [0]
    assert merge.image_positions((10, 30), 4, 1, "spatial_maxpool2x2", (1, 3)) == 1


@pytest.mark.parametrize(
    "merge_type,kind,base",
    [
        ("flat", "flat", True),
        ("spatial", "spatial", True),
        ("spatial_unpad", "spatial_unpad", True),
        ("spatial_unpad_nobase", "spatial_unpad", False),
        ("spatial_maxpool2x2", "spatial_maxpool2x2", True),
        ("spatial_unpad_maxpool2x2", "spatial_maxpool2x2", True),  # the code tests maxpool2x2 first
        ("spatial_nobase", "spatial", False),
    ],
)
def test_merge_types_read_as_the_next_code(merge_type, kind, base):
    assert merge.merge_kind(merge_type) == (kind, base)


@pytest.mark.parametrize("merge_type", ["spatial_unpadded", "flat_unpad", "spatial_unpad_unpad", "unpad", ""])
def test_unknown_merge_types_are_refused(merge_type):
    with pytest.raises(ValueError, match="patch merge type"):
        merge.merge_kind(merge_type)


def test_flat_with_one_newline():
    features = mx.array(np.arange(6.0).reshape(1, 6, 1))
    out = merge.merge_flat(features, mx.array([-1.0]))
    assert np.asarray(out)[:, 0].tolist() == [0, 1, 2, 3, 4, 5, -1]
    assert merge.image_positions((10, 10), 1, 3, "spatial_unpad", newline=True) == 10  # 3² + 1


def test_pools_by_hand():
    frames = mx.array(np.arange(16.0).reshape(1, 4, 4, 1))
    assert np.asarray(merge.pool_average(frames, 2))[0, ..., 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert np.asarray(merge.pool_max(frames, 2))[0, ..., 0].tolist() == [[5, 7], [13, 15]]
    odd = mx.array(np.ones((2, 5, 5, 3)))
    assert merge.pool_average(odd, 2).shape == (2, 2, 2, 3)  # floor, as AvgPool2d
    assert merge.pool_bilinear(odd, 2).shape == (2, 3, 3, 3)  # ceil, as OneVision
    assert merge.pooled_side(27, "bilinear", 2) == 14 and merge.pooled_side(24, "average", 2) == 12


def test_newline_placements_by_hand():
    frames = mx.array(np.array([1.0, 2, 3, 4, 5, 6, 7, 8]).reshape(2, 2, 2, 1))  # 2 frames of 2x2
    nl = mx.array([0.0])
    flat = lambda position: np.asarray(merge.place_newlines(frames, nl, position))[:, 0].tolist()  # noqa: E731
    assert flat("no_token") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert flat("one_token") == [1, 2, 3, 4, 5, 6, 7, 8, 0]
    assert flat("frame") == [1, 2, 3, 4, 0, 5, 6, 7, 8, 0]
    assert flat("grid") == [1, 2, 0, 3, 4, 0, 5, 6, 0, 7, 8, 0]
    for position, n in (("no_token", 8), ("one_token", 9), ("frame", 10), ("grid", 12)):
        assert merge.video_positions(2, 4, "average", 2, position) == n


def test_frame_indices():
    assert merge.frame_indices(24, 6) == [0, 4, 9, 13, 18, 23]
    assert merge.frame_indices(3, 8) == [0, 1, 2]
    assert merge.frame_indices(10, 1) == [0]


def test_oriented_pinpoints():
    assert anyres.oriented_pinpoints([[336, 672]], "transformers") == [[672, 336]]
    assert anyres.oriented_pinpoints([[336, 672]], "original") == [[336, 672]]
