"""Image preprocessing for LLaVA 1.5 ('pad') and 1.6 ('anyres'), in NumPy + Pillow.

Pure functions that follow the original LLaVA code (llava/mm_utils.py, llava_arch.py)
step for step. Sizes are (width, height), as PIL's `Image.size` and the original use.
Where transformers differs (unpad rounding, pinpoint orientation, pad offset) we follow
the original: the checkpoints were trained with it.
"""

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Size = Tuple[int, int]  # (width, height)


def select_best_resolution(size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The pinpoint (width, height) that keeps the most of the image, then wastes least.

    Ties keep the first listed candidate (strict comparisons, as in the original).
    """
    width, height = size
    best, best_effective, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / width, h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (w, h), effective, waste
    return best


def resized_size(size: Size, target: Size) -> Size:
    """Size of the image scaled to fit `target`, rounding the free side up (original)."""
    width, height = size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def resize_and_pad(image: Image.Image, target: Size) -> Image.Image:
    """Fit `image` into `target` keeping its aspect; pad with black, odd pixel right/bottom."""
    new_w, new_h = resized_size(image.size, target)
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((target[0] - new_w) // 2, (target[1] - new_h) // 2))
    return canvas


def divide_to_tiles(image: Image.Image, tile: int) -> List[Image.Image]:
    """Square tiles, row by row (outer loop y, inner loop x)."""
    width, height = image.size
    return [image.crop((x, y, x + tile, y + tile)) for y in range(0, height, tile) for x in range(0, width, tile)]


def expand_to_square(image: Image.Image, fill: Tuple[int, int, int]) -> Image.Image:
    """Paste the image centred on a square canvas of its longer side (LLaVA-1.5 'pad')."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_fill(mean: Sequence[float] = CLIP_MEAN) -> Tuple[int, int, int]:
    """The padding colour of 'pad': the normalisation mean in 0..255, truncated."""
    return tuple(int(m * 255) for m in mean)


def clip_preprocess(
    image: Image.Image,
    size: int = 336,
    crop: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """CLIPImageProcessor: shortest edge → `size` (BICUBIC), centre crop, /255, normalise.

    Returns float32 (crop, crop, 3), channels last as MLX convolutions want.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:
        image = image.resize(new_size, Image.BICUBIC)
    width, height = image.size
    top, left = (height - crop) // 2, (width - crop) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop {crop} is larger than the resized image {image.size}")
    pixels = np.asarray(image, dtype=np.uint8)[top : top + crop, left : left + crop]
    scaled = (pixels * (1 / 255)).astype(np.float32)
    return ((scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def anyres_crops(image: Image.Image, pinpoints, tile: int = 336) -> List[Image.Image]:
    """LLaVA-1.6 crops: the squashed base image, then the tiles of the padded best fit."""
    best = select_best_resolution(image.size, pinpoints)
    tiles = divide_to_tiles(resize_and_pad(image, best), tile)
    return [image.resize((tile, tile))] + tiles


def grid_shape(size: Size, pinpoints, tile: int = 336) -> Tuple[int, int]:
    """(columns, rows) of tiles for an image of `size`."""
    w, h = select_best_resolution(size, pinpoints)
    return w // tile, h // tile


def image_token_count(
    size: Size,
    aspect: str,
    pinpoints=None,
    merge: str = "flat",
    tile: int = 336,
    patches: int = 24,
) -> int:
    """Positions one image takes in the language model's sequence."""
    base = patches * patches
    if aspect != "anyres":
        return base
    cols, rows = grid_shape(size, pinpoints, tile)
    if merge == "flat" or not merge.startswith("spatial"):
        return base * (1 + rows * cols)
    if "unpad" not in merge:
        return base * (1 + rows * cols)
    h, w = unpadded_shape(size, rows * patches, cols * patches)
    return base + h * (w + 1)


def preprocess_image(
    image: Image.Image,
    aspect: str,
    pinpoints=None,
    size: int = 336,
    crop: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    squash: bool = False,
) -> np.ndarray:
    """All crops of one RGB image as float32 (n_crops, crop, crop, 3). `squash`: a lone crop
    is the image resized to crop x crop, aspect not kept (SigLIP's image processor), instead
    of its shortest edge resized and the centre cropped (CLIP's)."""
    if aspect == "pad":
        crops = [expand_to_square(image, mean_fill(mean))]
    elif aspect == "anyres":
        crops = anyres_crops(image, pinpoints, crop)
    elif squash:
        crops = [image.resize((crop, crop), Image.BICUBIC)]
    else:
        crops = [image]
    return np.stack([clip_preprocess(c, size, crop, mean, std) for c in crops])


# -- feature-map geometry (also what merge.py's MLX merges use) ------------------------
def oriented_pinpoints(pinpoints, conventions: str):
    """Pinpoints as (width, height) whatever the convention (transformers lists (h, w))."""
    if conventions == "transformers" and pinpoints is not None:
        return [[h, w] for w, h in pinpoints]
    return pinpoints


def unpad_padding(size: Size, rows: int, cols: int, rounding: str = "truncate") -> Tuple[int, int]:
    """(rows, columns) of padding to drop from each side of a rows x cols feature map.

    'truncate' (original) and 'round' (transformers: `int(round(x, 7))`) differ by whole rows.
    """
    width, height = size
    settle = int if rounding == "truncate" else (lambda x: int(round(x, 7)))
    if width / height > cols / rows:
        new_h = settle(height * (cols / width))
        return (rows - new_h) // 2, 0
    new_w = settle(width * (rows / height))
    return 0, (cols - new_w) // 2


def unpadded_shape(size: Size, rows: int, cols: int, rounding: str = "truncate") -> Tuple[int, int]:
    """(height, width) of the feature map once the padding is dropped."""
    pad_y, pad_x = unpad_padding(size, rows, cols, rounding)
    return rows - 2 * pad_y, cols - 2 * pad_x


def downscaled_shape(height: int, width: int, max_tiles: int, side: int) -> Optional[Tuple[int, int]]:
    """The (height, width) 'anyres_max_N' shrinks a map to, or None when it is kept.

    ratio = sqrt(h·w / (N·side²)); only beyond 1.1 is the map resized, to floor(h / ratio)
    by floor(w / ratio) (transformers' pack_image_features).
    """
    ratio = math.sqrt(height * width / (max_tiles * side**2))
    if ratio <= 1.1:
        return None
    return int(height // ratio), int(width // ratio)


def anyres_max_tiles(aspect: str) -> Optional[int]:
    """N of 'anyres_max_N', None for other aspect settings."""
    return int(aspect[len("anyres_max_") :]) if aspect.startswith("anyres_max_") else None
