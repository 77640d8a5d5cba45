"""Every input checked where it enters: the CLIs, `load`, `generate` / `stream_generate`,
the processor and `convert`. Each check raises one clear error naming the input (a
`LlavaTypeError` / `LlavaValueError`, i.e. a LlavaError that is also a TypeError /
ValueError), so nothing deeper has to cope with a wrong type, a NaN or a negative size.
"""

import math
import os
from numbers import Integral, Real
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .errors import LlavaTypeError, LlavaValueError

KV_BITS = (4, 8)


# -- scalars ------------------------------------------------------------------------------
def integer(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise LlavaTypeError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise LlavaValueError(f"{name} must be {bounds}, not {value}")
    return int(value)


def number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise LlavaTypeError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise LlavaValueError(f"{name} must be a finite number, not {value}")
    return float(value)


def text(value, name: str) -> str:
    """A str that is valid Unicode (no lone surrogates: what invalid UTF-8 in argv becomes)."""
    if not isinstance(value, str):
        raise LlavaTypeError(f"{name} must be a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LlavaValueError(f"{name} is not valid UTF-8 text (bad character at position {e.start})") from None
    return value


def path_argument(value, name: str) -> str:
    """A local path or repo id given as str or os.PathLike, not empty, and one the file system
    can look up (see `usable_path`)."""
    if not isinstance(value, (str, os.PathLike)):
        raise LlavaTypeError(f"{name} must be a str or a path, not {type(value).__name__}")
    value = text(os.fspath(value), name)
    if not value.strip():
        raise LlavaValueError(f"{name} is empty")
    usable_path(value, name)
    return value


def usable_path(value: str, name: str) -> Path:
    """`value` as a Path the file system can look up: a missing file is fine (the caller says
    what is missing), but a name too long for it, a NUL byte or a permission error is one
    clear error here rather than an OSError wherever the path is first touched."""
    try:
        os.stat(os.path.expanduser(value))
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError) as e:
        shown = value if len(value) <= 80 else f"{value[:60]}… ({len(value):,} characters)"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise LlavaValueError(f"{name} {shown!r}: {reason}") from None
    return Path(value).expanduser()


# -- generation -----------------------------------------------------------------------------
def prompt(value, name: str = "the prompt") -> str:
    if not text(value, name).strip():
        raise LlavaValueError(f"{name} is empty")
    return value


def history(value) -> list:
    """[(question, answer), ...] of str."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise LlavaTypeError(f"history must be a list of (question, answer) pairs, not {type(value).__name__}")
    turns = []
    for i, turn in enumerate(value):
        if isinstance(turn, (str, bytes, dict)) or not hasattr(turn, "__len__") or len(turn) != 2:
            raise LlavaTypeError(f"history[{i}] must be a (question, answer) pair, not {turn!r:.60}")
        turns.append((text(turn[0], f"history[{i}] question"), text(turn[1], f"history[{i}] answer")))
    return turns


def image_list(images) -> list:
    """`images` as a list: None, one image (path, URL, PIL image, NumPy array, encoded
    bytes) or a sequence of them."""
    if images is None:
        return []
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, bytes, bytearray)):
        return [images]
    if not hasattr(images, "__iter__") or isinstance(images, (dict, set, frozenset)):
        raise LlavaTypeError(f"images must be an image or a list of images, not {type(images).__name__}")
    images = list(images)
    for i, image in enumerate(images):
        if not isinstance(image, (str, os.PathLike, Image.Image, np.ndarray, bytes, bytearray)):
            raise LlavaTypeError(
                f"images[{i}] is a {type(image).__name__}: pass a path, an http(s) URL, a PIL image, "
                "a NumPy array (height, width, 3) of uint8 or the encoded bytes of an image file"
            )
    return images


def image_array(array: np.ndarray) -> Image.Image:
    """A PIL image from an app's pixel array: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8."""
    if array.dtype != np.uint8:
        raise LlavaTypeError(
            f"an image array must be uint8 (0..255), not {array.dtype}; e.g. (pixels * 255).astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise LlavaValueError(f"an image array must be (height, width[, 3 or 4]), not {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise LlavaValueError(f"the image array is empty ({array.shape})")
    return Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA by shape


def generation_inputs(prompt_, images, system, history_, cache):
    """(images as a list, history as a list) after checking every argument's type."""
    from .cache import SessionCache

    prompt(prompt_)
    if system is not None:
        text(system, "system")
    if cache is not None and not isinstance(cache, SessionCache):
        raise LlavaTypeError(f"cache must be a SessionCache, not {type(cache).__name__}")
    return image_list(images), history(history_)


def generation_options(max_tokens, temperature, top_p, seed, prefill_step_size, kv_bits, max_kv_size):
    integer(max_tokens, "max_tokens", -1)  # -1: up to the context length
    if number(temperature, "temperature") < 0:
        raise LlavaValueError(f"temperature must be >= 0 (0: greedy), not {temperature}")
    if not 0.0 < number(top_p, "top_p") <= 1.0:
        raise LlavaValueError(f"top_p must be in (0, 1] (1: off), not {top_p}")
    if seed is not None:
        integer(seed, "seed", 0, 2**64 - 1)
    integer(prefill_step_size, "prefill_step_size", 1)
    if kv_bits is not None and integer(kv_bits, "kv_bits") not in KV_BITS:
        raise LlavaValueError(f"kv_bits must be {' or '.join(map(str, KV_BITS))}, not {kv_bits}")
    if max_kv_size is not None:
        integer(max_kv_size, "max_kv_size", 1)
        if kv_bits is not None:
            raise LlavaValueError(
                "kv_bits and max_kv_size cannot be combined: MLX's rotating KV cache is not quantized"
            )
