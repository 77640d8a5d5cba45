"""Reuse between calls: image features by image content, and the KV cache of the shared
prompt prefix. Re-asking about the same image neither re-encodes it nor re-runs the
positions the new prompt shares with what the cache already holds (the system prompt,
the image, earlier turns of a chat).
"""

import hashlib
from collections import OrderedDict
from typing import List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from PIL import Image

from .model import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

DEFAULT_MAX_IMAGES = 8


def image_key(image: Image.Image) -> str:
    """Identity of an image by content (pixels and size), not by file name."""
    digest = hashlib.sha1(image.tobytes())
    digest.update(repr(image.size).encode())
    return digest.hexdigest()


def video_key(frames) -> str:
    """Identity of a video's sampled uint8 frames by content."""
    digest = hashlib.sha1(frames.tobytes())
    digest.update(repr(frames.shape).encode())
    return "video:" + digest.hexdigest()


def in_prompt_order(input_ids, images: Tuple[list, list], videos: Tuple[list, list]) -> Tuple[list, list]:
    """(keys, features) of the images and the videos, in the order their placeholders appear."""
    image_items, video_items = iter(zip(*images)), iter(zip(*videos))
    items = [
        next(image_items) if token == IMAGE_PLACEHOLDER else next(video_items)
        for token in input_ids
        if token in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
    ]
    return [k for k, _ in items], [f for _, f in items]


def sequence_keys(input_ids, image_keys: List[str], features: list) -> list:
    """What each position of the merged sequence holds: a token id or (image or video, index).

    `features` are the images' and videos' features, or only their lengths (positions)."""
    keys, images = [], iter(zip(image_keys, features))
    for token in input_ids:
        if token in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
            key, feats = next(images)
            keys.extend((key, i) for i in range(feats if isinstance(feats, int) else feats.shape[0]))
        else:
            keys.append(int(token))
    return keys


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def make_kv_cache(model, max_kv_size: Optional[int] = None) -> list:
    """One KV cache per decoder layer; rotating (the first 4 positions kept, as mlx-lm does)
    when `max_kv_size` is given. mlx-lm's make_prompt_cache ignores max_kv_size for models
    with their own make_cache, llama's included."""
    if max_kv_size is None:
        return make_prompt_cache(model.language_model)
    return [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.language_model.layers]


class SessionCache:
    """Pass the same instance to successive `stream_generate` calls to reuse work."""

    def __init__(self, max_images: int = DEFAULT_MAX_IMAGES):
        self.max_images = max_images
        self.features: "OrderedDict[str, mx.array]" = OrderedDict()
        self.kv = None  # mlx-lm per-layer caches
        self.keys: list = []  # what `kv` holds, position by position
        self.kv_options = None

    def image_features(
        self, model, processor, images: List[Image.Image], several: bool = False
    ) -> Tuple[List[str], List[mx.array]]:
        """(keys, features) of RGB images, encoding only those not seen before (one batch).

        `several`: the prompt holds several images (OneVision encodes those differently).
        """
        mode = ":several" if several and model.config.several_images_flat else ""
        keys = [image_key(im) + mode for im in images]
        new = [(k, im) for k, im in zip(keys, images) if k not in self.features]
        new = list(OrderedDict(new).items())  # the same image twice is encoded once
        if new:
            pixels, sizes = processor.preprocess([im for _, im in new], several)
            encoded = model.image_features(mx.array(pixels), sizes, several)
            mx.eval(encoded)
            for (k, _), feats in zip(new, encoded):
                self.features[k] = feats
        return keys, self._recall(keys)

    def video_features(self, model, processor, videos: list) -> Tuple[List[str], List[mx.array]]:
        """(keys, features) of videos given as sampled uint8 frames (T, H, W, 3)."""
        keys = [video_key(v) for v in videos]
        for k, frames in zip(keys, videos):
            if k not in self.features:
                self.features[k] = model.video_features(mx.array(processor.preprocess_video(frames)))
                mx.eval(self.features[k])
        return keys, self._recall(keys)

    def _recall(self, keys: List[str]) -> List[mx.array]:
        """The features of `keys`, marked as recently used; the least recent beyond the limit go."""
        for k in keys:
            self.features.move_to_end(k)
        result = [self.features[k] for k in keys]
        while len(self.features) > self.max_images:
            self.features.popitem(last=False)
        return result

    def prefix(self, model, keys: list, kv_bits: Optional[int], max_kv_size: Optional[int]) -> Tuple[list, int]:
        """A KV cache holding the longest reusable prefix of `keys`, and its length.

        At least the last position is always left to run, to get its logits.
        """
        options = (kv_bits, max_kv_size)
        reuse = common_prefix(self.keys, keys) if self.kv is not None and options == self.kv_options else 0
        reuse = min(reuse, len(keys) - 1)
        if reuse > 0 and reuse < len(self.keys):
            if can_trim_prompt_cache(self.kv):
                trim_prompt_cache(self.kv, len(self.keys) - reuse)
            else:
                reuse = 0
        if reuse == 0:
            self.kv = make_kv_cache(model, max_kv_size)
        self.kv_options = options
        self.keys = keys[:reuse]
        return self.kv, reuse

    def record(self, keys: list, generated: List[int]):
        """Remember what the KV cache holds after a generation."""
        held = self.kv[0].offset if self.kv else 0
        self.keys = (keys + list(generated))[:held]
