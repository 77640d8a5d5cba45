"""What the engine runs for a checked request: its prompt in the checkpoint's template, its
images and videos fetched (data: URIs, http(s) URLs bounded in time and size), decoded within
the pixel limits and keyed by content, the context checked, and the pixels of those whose
features are not cached. Runs in the HTTP threads and never touches MLX; bad media is an
`ApiError` naming the message part."""

import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..cache import SEVERAL, image_keys, in_prompt_order, sequence_keys, video_key
from ..errors import LlavaError
from ..fetch import fetch
from ..processor import MAX_PIXELS, load_image
from ..video import decode_frames
from .request import ApiError, Chat, Limits


@dataclass
class Prompt:
    """What the engine needs: token ids, the images' and videos' keys (in prompt order), the
    pixels of those not cached."""

    ids: List[int]
    image_keys: List[str]  # images and videos, in the order of their placeholders
    image_lengths: List[int]
    pixels: Dict[str, tuple]  # key -> (pixel_values, (width, height) or None for a video), not cached
    images: Dict[str, Image.Image]  # key -> image, all of them
    keys: list  # the merged sequence, position by position
    max_tokens: int
    text: str  # the prompt in the chat template, one <image> per image, one <video> per video
    videos: Dict[str, np.ndarray] = field(default_factory=dict)  # key -> sampled uint8 frames (T, H, W, 3)

    @property
    def image_positions(self) -> int:
        return sum(self.image_lengths)


# -- images ---------------------------------------------------------------------------
def media_bytes(where: str, url: str, limits: Limits, kind: str = "image") -> bytes:
    """The bytes of a data: URI or an http(s) URL of an image (or a video); any other scheme is
    refused."""
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64") or not header[5:].startswith(f"{kind}/"):
            raise ApiError(400, f"{where}: a data URI must be data:{kind}/...;base64,...", "messages")
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the {kind}'s base64 data is invalid", "messages") from None
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ApiError(
            400,
            f"{where}: {kind} URL scheme {scheme or 'none'!r} is not allowed (use https:// or a data: URI)",
            "messages",
        )
    try:
        public_only = not limits.private_image_urls
        return fetch(url, f"the {kind} URL", limits.image_url_timeout, limits.max_body_bytes, public_only)
    except LlavaError as e:
        raise ApiError(400, f"{where}: {e}", "messages") from None


def decode_video(where: str, data: bytes, limits: Limits) -> np.ndarray:
    """`limits.num_frames` uint8 RGB frames (T, H, W, 3) of a video's bytes, each frame within
    the pixel limit."""
    try:
        frames = decode_frames(data, limits.num_frames, name=f"the video of {where}")
    except LlavaError as e:
        raise ApiError(400, str(e), "messages") from None
    height, width = frames[0].shape[:2]
    if width * height > min(limits.max_image_pixels, MAX_PIXELS):
        raise ApiError(400, f"{where}: the video's frames are {width}x{height}, over the pixel limit", "messages")
    if len({f.shape for f in frames}) != 1:
        raise ApiError(400, f"{where}: the video's frames change size", "messages")
    return np.stack(frames)


def decode_image(where: str, data: bytes, limits: Limits) -> Image.Image:
    """An RGB image from bytes, its size checked against the limit before decoding."""
    try:
        with warnings.catch_warnings():  # our own limit applies, below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(
            400, f"{where}: the image has more than {limits.max_image_pixels:,} pixels (--max-image-pixels)", "messages"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(400, f"{where}: not an image, or a corrupt one", "messages") from None
    width, height = image.size
    limit = min(limits.max_image_pixels, MAX_PIXELS)
    if width * height > limit:
        raise ApiError(
            400, f"{where}: the image is {width}x{height}, more than {limit:,} pixels (--max-image-pixels)", "messages"
        )
    try:
        return load_image(image)
    except LlavaError as e:
        raise ApiError(400, f"{where}: {e}", "messages") from None
    except Exception as e:  # Pillow's decoders raise many types on malformed files
        raise ApiError(400, f"{where}: cannot decode the image ({type(e).__name__})", "messages") from None


# -- the prompt -----------------------------------------------------------------------
def build_prompt(chat: Chat, processor, limits: Limits, needs_pixels: Callable[[str], bool]) -> Prompt:
    """Token ids in the checkpoint's chat template, images and videos fetched and keyed by
    content, the context checked, and the pixels of those whose features are not cached."""
    images = [decode_image(where, media_bytes(where, url, limits), limits) for where, url in chat.image_urls]
    videos = [decode_video(where, media_bytes(where, url, limits, "video"), limits) for where, url in chat.video_urls]
    history, (question, _) = chat.turns[:-1], chat.turns[-1]
    if chat.raw:
        text = question
    else:
        text = processor.apply_template(question, chat.image_counts, chat.system, history, chat.video_counts or 0)
    try:
        ids = processor.encode_prompt(text, len(images), len(videos))
    except LlavaError as e:
        raise ApiError(400, str(e), "messages") from None
    config = processor.config
    (picture_keys, several), video_keys = image_keys(images, config), [video_key(v) for v in videos]
    keys, lengths = in_prompt_order(
        ids,
        (picture_keys, [config.image_token_count(im.size, several) for im in images]),
        (video_keys, [config.video_token_count(v.shape[0]) for v in videos]),
    )
    merged = sequence_keys(ids, keys, lengths)
    context = config.context_length
    if len(merged) >= context:
        raise ApiError(
            400,
            f"the prompt is {len(merged)} positions long ({sum(lengths)} of them for {len(keys)} image(s) and "
            f"video(s)) and the context is {context}: no room for an answer",
            "messages",
            "context_length_exceeded",
        )
    by_key, by_video = dict(zip(picture_keys, images)), dict(zip(video_keys, videos))
    pixels = {key: pixel_values(processor, im, several) for key, im in by_key.items() if needs_pixels(key)}
    pixels.update({key: (processor.preprocess_video(v), None) for key, v in by_video.items() if needs_pixels(key)})
    max_tokens = min(chat.max_tokens, context - len(merged))
    return Prompt(ids, keys, lengths, pixels, by_key, merged, max_tokens, text, by_video)


def media_values(processor, p: Prompt, key: str) -> tuple:
    """(pixel values, (width, height)) of an image of `p`, (frames, None) of a video: those
    prepared with the request, or (evicted from the feature cache since) made again."""
    if key in p.pixels:
        return p.pixels[key]
    if key in p.videos:
        return processor.preprocess_video(p.videos[key]), None
    return pixel_values(processor, p.images[key], key.endswith(SEVERAL))


def pixel_values(processor, image: Image.Image, several: bool = False) -> tuple:
    """(crops, (width, height)) of one image, as the vision tower takes them (`several`: as
    one of several in its prompt)."""
    values, sizes = processor.preprocess([image], several)
    return values, tuple(int(v) for v in sizes[0])
