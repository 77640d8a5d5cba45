"""anyres.py against hand-worked cases (REFERENCE.md, 'LLaVA-1.6 / NeXT image')."""

import numpy as np
import pytest
from PIL import Image

from llava_mlx import anyres

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_worked_example_1000x600():
    # best (672, 672); resized to 672x404 (ceil(600*0.672) = 404), pasted at y = 134;
    # 48x48 map, new_h = int(600*48/1000) = 28, pad 10 -> 28x48 -> 576 + 28*49.
    assert anyres.select_best_resolution((1000, 600), PINPOINTS) == (672, 672)
    assert anyres.resized_size((1000, 600), (672, 672)) == (672, 404)
    assert anyres.unpad_padding((1000, 600), 48, 48) == (10, 0)
    assert anyres.unpadded_shape((1000, 600), 48, 48) == (28, 48)
    assert anyres.image_token_count((1000, 600), "anyres", PINPOINTS, "spatial_unpad") == 1948


def test_resize_and_pad_puts_odd_pixel_bottom():
    image = Image.new("RGB", (1000, 600), (255, 255, 255))
    padded = np.asarray(anyres.resize_and_pad(image, (672, 672)))
    rows = np.flatnonzero(padded[:, 336].sum(-1) > 0)
    # (672 - 404) // 2 = 134 black rows on top, 134 below (672 - 404 - 134).
    assert (rows[0], rows[-1]) == (134, 134 + 404 - 1)
    # 1000x333 into (1008, 336): 1008/1000 < 336/333 so the width is fitted and the
    # height rounds up, min(ceil(333 * 1.008), 336) = 336: nothing left to pad.
    wide = np.asarray(anyres.resize_and_pad(Image.new("RGB", (1000, 333), (255, 255, 255)), (1008, 336)))
    assert (wide.sum(-1) > 0).all()


def test_pinpoint_tie_keeps_first_listed():
    # 300x200 fits every pinpoint whole (effective 60000); (336, 672) and (672, 336) waste
    # the same 165792 pixels, so the first listed wins: one column, two rows.
    assert anyres.select_best_resolution((300, 200), PINPOINTS) == (336, 672)
    assert anyres.grid_shape((300, 200), PINPOINTS) == (1, 2)
    # 48x24 map; 300/200 > 24/48 -> new_h = int(200*24/300) = 16, pad 16 -> 16x24.
    assert anyres.image_token_count((300, 200), "anyres", PINPOINTS, "spatial_unpad") == 576 + 16 * 25


def test_unpad_truncates():
    # 24 * 211 / 337 = 15.026... rows -> 15 (truncated); pad (24 - 15) // 2 = 4 -> 16 rows kept.
    assert anyres.unpad_padding((337, 211), 24, 24) == (4, 0)
    # a tall image trims columns: 24 * 400 / 900 = 10.67 -> 10, pad 7 -> 10 columns... of 24.
    assert anyres.unpad_padding((400, 900), 48, 24) == (0, (24 - int(400 * 48 / 900)) // 2)


def test_tiles_row_by_row():
    image = Image.new("RGB", (672, 336))
    image.paste((255, 0, 0), (336, 0, 672, 336))
    tiles = anyres.divide_to_tiles(image, 336)
    assert [t.getpixel((0, 0)) for t in tiles] == [(0, 0, 0), (255, 0, 0)]
    tall = Image.new("RGB", (672, 672))
    tall.paste((0, 255, 0), (0, 336, 336, 672))  # bottom-left
    assert [t.getpixel((5, 5)) for t in anyres.divide_to_tiles(tall, 336)][2] == (0, 255, 0)


def test_expand_to_square_mean_colour_and_offset():
    assert anyres.mean_fill() == (122, 116, 104)
    image = Image.new("RGB", (301, 200), (255, 255, 255))
    square = np.asarray(anyres.expand_to_square(image, anyres.mean_fill()))
    assert square.shape == (301, 301, 3)
    assert tuple(square[0, 0]) == (122, 116, 104)
    rows = np.flatnonzero((square[:, 150] == 255).all(-1))
    assert (rows[0], rows[-1]) == (50, 249)  # (301 - 200) // 2 = 50 on top


def test_clip_preprocess_normalises_and_crops():
    image = Image.new("RGB", (672, 336), (122, 116, 104))
    pixels = anyres.clip_preprocess(image)
    assert pixels.shape == (336, 336, 3) and pixels.dtype == np.float32
    expected = (np.array([122, 116, 104]) / 255 - np.array(anyres.CLIP_MEAN)) / np.array(anyres.CLIP_STD)
    np.testing.assert_allclose(pixels[100, 100], expected, atol=1e-6)
    # the centre crop of a left-black / right-white image straddles the edge at column 168
    half = Image.new("RGB", (1008, 336))
    half.paste((255, 255, 255), (504, 0, 1008, 336))
    crop = anyres.clip_preprocess(half)
    assert crop[0, 167, 0] < 0 < crop[0, 168, 0]


@pytest.mark.parametrize(
    "size,aspect,count",
    [((500, 500), "pad", 576), ((1000, 600), "anyres", 1948), ((20, 30), "square", 576)],
)
def test_token_counts(size, aspect, count):
    assert anyres.image_token_count(size, aspect, PINPOINTS, "spatial_unpad") == count


def test_crops_of_anyres_image():
    crops = anyres.preprocess_image(Image.new("RGB", (1000, 600)), "anyres", PINPOINTS)
    assert crops.shape == (5, 336, 336, 3)
    assert anyres.preprocess_image(Image.new("RGB", (1000, 600)), "pad").shape == (1, 336, 336, 3)
