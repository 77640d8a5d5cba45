"""Reuse between calls: image features by image content, and the KV cache of the shared
prompt prefix. Re-asking about the same image neither re-encodes it nor re-runs the
positions the new prompt shares with what the cache already holds (the system prompt,
the image, earlier turns of a chat).
"""

import hashlib
from typing import List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from PIL import Image

from .features import DEFAULT_FEATURE_BYTES, FeatureCache
from .model import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER


def image_key(image: Image.Image) -> str:
    """Identity of an image by content (pixels and size), not by file name."""
    digest = hashlib.sha1(image.tobytes())
    digest.update(repr(image.size).encode())
    return digest.hexdigest()


SEVERAL = ":several"  # the key suffix of an image encoded as one of several (several_images_flat)


def image_keys(images: List[Image.Image], config) -> Tuple[List[str], bool]:
    """(keys, several) of a prompt's images: `several` when the checkpoint encodes an image
    that shares its prompt with others differently (one padded crop each), which its key says."""
    several = len(images) > 1 and config.several_images_flat
    return [image_key(im) + (SEVERAL if several else "") for im in images], several


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
    """Pass the same instance to successive `stream_generate` calls to reuse work: the features
    of the images and videos seen (features.py, at most `max_feature_bytes`) and the KV cache of
    the last prompt and answer."""

    def __init__(self, max_feature_bytes: int = DEFAULT_FEATURE_BYTES):
        self.features = FeatureCache(max_feature_bytes)
        self.kv = None  # mlx-lm per-layer caches
        self.keys: list = []  # what `kv` holds, position by position
        self.kv_options = None

    def image_features(self, model, processor, images: List[Image.Image]) -> Tuple[List[str], List[mx.array]]:
        """(keys, features) of the RGB images of one prompt, encoding only those not seen before
        (one batch; several in one prompt are encoded as the checkpoint encodes those)."""
        keys, several = image_keys(images, model.config)
        by_key = dict(zip(keys, images))

        def encode(missing):
            pixels, sizes = processor.preprocess([by_key[k] for k in missing], several)
            return model.image_features(mx.array(pixels), sizes, several)

        return keys, self.features.get(keys, encode)

    def video_features(self, model, processor, videos: list) -> Tuple[List[str], List[mx.array]]:
        """(keys, features) of videos given as sampled uint8 frames (T, H, W, 3)."""
        keys = [video_key(v) for v in videos]
        by_key = dict(zip(keys, videos))

        def encode(missing):
            return [model.video_features(mx.array(processor.preprocess_video(by_key[k]))) for k in missing]

        return keys, self.features.get(keys, encode)

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
