"""The S2 tower's maths (s2.py): torch's bicubic and area resizes as tap tables, worked by hand
and against torch itself, and S2-Wrapper's chessboard order."""

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llava_mlx.s2 import area_taps, bicubic_taps, cubic, merge_chessboard, resize, split_chessboard


def test_cubic_kernel_by_hand():
    # Keys' kernel with A = -0.75 at the distances a 2x shrink samples (t = 0.5 from its floor)
    np.testing.assert_allclose(cubic(np.array([0.5, 1.5, 0.0, 1.0, 2.0])), [0.59375, -0.09375, 1, 0, 0])


def test_bicubic_taps_by_hand():
    """4 → 2: outputs sample positions 0.5 and 2.5; neighbours past the edge clamp to it."""
    indices, weights = bicubic_taps(4, 2)
    assert indices.tolist() == [[0, 0, 1, 2], [1, 2, 3, 3]]
    np.testing.assert_allclose(weights, [[-0.09375, 0.59375, 0.59375, -0.09375]] * 2)
    # so [a, b, c, d] → [0.5a + 0.59375b − 0.09375c, −0.09375b + 0.59375c + 0.5d]
    x = mx.array(np.array([1.0, 2.0, 4.0, 8.0], np.float32).reshape(1, 4, 1, 1))
    out = np.asarray(resize(mx.broadcast_to(x, (1, 4, 4, 1)), 2, bicubic_taps))[0, :, 0, 0]
    np.testing.assert_allclose(out, [0.5 + 1.1875 - 0.375, -0.1875 + 2.375 + 4.0], rtol=1e-6)


def test_area_taps_by_hand():
    """5 → 3: windows [0, 2), [1, 4), [3, 5) (adaptive average pooling), padded with weight 0."""
    indices, weights = area_taps(5, 3)
    assert indices.tolist() == [[0, 1, 2], [1, 2, 3], [3, 4, 4]]
    np.testing.assert_allclose(weights, [[0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0]])
    indices, weights = area_taps(72, 24)  # the released 1008 scale's map → 24 × 24: 3 × 3 blocks
    assert indices[5].tolist() == [15, 16, 17] and np.allclose(weights, 1 / 3)


@pytest.mark.parametrize(
    "mode,size_in,size_out",
    [("bicubic", 48, 16), ("bicubic", 30, 20), ("bicubic", 7, 19), ("area", 36, 12), ("area", 17, 5)],
)
def test_resize_is_torchs(mode, size_in, size_out):
    rng = np.random.default_rng(size_in * 100 + size_out)
    x = rng.normal(size=(2, 3, size_in, size_in)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=size_out, mode=mode).numpy().transpose(0, 2, 3, 1)
    taps = bicubic_taps if mode == "bicubic" else area_taps
    ours = np.asarray(resize(mx.array(x.transpose(0, 2, 3, 1)), size_out, taps))
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_chessboard_order():
    """Tiles go (row, column, picture): S2-Wrapper's '(nh nw b)'; merging puts them back."""
    x = mx.arange(2 * 4 * 4).reshape(2, 4, 4, 1)
    tiles = split_chessboard(x, 2)
    assert tiles.shape == (8, 2, 2, 1)
    # tile 1 is picture 1's top-left, tile 2 picture 0's top-right, tile 4 picture 0's bottom-left
    assert np.asarray(tiles[1, :, :, 0]).tolist() == [[16, 17], [20, 21]]
    assert np.asarray(tiles[2, :, :, 0]).tolist() == [[2, 3], [6, 7]]
    assert np.asarray(tiles[4, :, :, 0]).tolist() == [[8, 9], [12, 13]]
    assert mx.array_equal(merge_chessboard(tiles, 2), x)
