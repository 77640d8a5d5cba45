"""Video input: a file (decoded with PyAV, `num_frames` frames sampled uniformly), or frames
already decoded (a uint8 array (T, H, W, 3) or a list of PIL images, used as given) →
preprocessed as the checkpoint's `video_preprocessor_config.json` says.

Memory stays bounded for long videos: the frame indices are chosen before decoding, only
those frames are converted to RGB, and decoding stops after the last one.
"""

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from . import validate
from .anyres import clip_preprocess
from .errors import LlavaError, warn
from .merge import frame_indices

DEFAULT_NUM_FRAMES = 8
VIDEO_TOKEN = "<video>"


def _open(source):
    """A PyAV container of a file path or of a video's bytes (the server's uploads)."""
    import io

    import av

    return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def count_frames(source) -> int:
    """Frames in the first video stream (a path or bytes): from the header when it says, else by
    counting packets (demuxing only, no decoding; raw streams such as .h264 have no count)."""
    with _open(source) as container:
        if not container.streams.video:
            raise LlavaError("it has no video stream")
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def decode_frames(source, num_frames: int, name: Optional[str] = None) -> List[np.ndarray]:
    """`num_frames` RGB frames, uniformly spread, of the video file at path `source` or of the
    video in bytes `source` (`name` says which video in errors)."""
    import av

    name = name or f"video {source}"
    if not isinstance(source, bytes) and not validate.usable_path(source, "video").is_file():
        raise LlavaError(f"video not found: {source}")
    try:
        wanted = set(frame_indices(count_frames(source), num_frames))
        last = max(wanted) if wanted else -1
        frames = []
        with _open(source) as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if index >= last:
                    break
    except av.FFmpegError as e:
        raise LlavaError(f"cannot read {name}: not a video or corrupt ({type(e).__name__})") from None
    except LlavaError as e:
        raise LlavaError(f"cannot read {name}: {e}") from None
    if not frames:
        raise LlavaError(f"{name} has no frames")
    return frames


def load_video(source, num_frames: Optional[int] = None) -> np.ndarray:
    """uint8 frames (T, H, W, 3) of a video path, array or list of PIL images.

    A file gives `num_frames` frames sampled uniformly (DEFAULT_NUM_FRAMES when None); frames
    given as an array or a list of pictures are used as given, as the LLaVA-NeXT code and
    transformers take them, unless `num_frames` is passed: then they are sampled too (and a
    warning says how many of them were dropped)."""
    if num_frames is not None and num_frames < 1:
        raise LlavaError(f"the number of frames must be at least 1 (got {num_frames})")
    if isinstance(source, (str, Path)):
        frames = decode_frames(str(source), num_frames or DEFAULT_NUM_FRAMES)
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
            raise LlavaError(
                f"a video array must be uint8 (frames, height, width, 3), got {source.dtype} {source.shape}"
            )
        if source.shape[0] == 0 or source.shape[1] == 0 or source.shape[2] == 0:
            raise LlavaError(f"the video array {source.shape} has no frames")
        frames = [source[i] for i in given_frames(source.shape[0], num_frames)]
    elif isinstance(source, (list, tuple)) and all(isinstance(f, Image.Image) for f in source):
        if not source:
            raise LlavaError("the video has no frames (an empty list of images)")
        frames = [np.asarray(source[i].convert("RGB")) for i in given_frames(len(source), num_frames)]
    else:
        raise LlavaError(
            f"a video is a file path, a uint8 array (frames, height, width, 3) or a list of PIL images, "
            f"not {type(source).__name__}"
        )
    if len({f.shape for f in frames}) != 1:
        raise LlavaError("the frames of a video must all have the same size")
    return np.stack(frames)


def given_frames(count: int, num_frames: Optional[int]) -> list:
    """The indices of the frames given to use: all of them, or `num_frames` sampled uniformly
    when it is passed (said once when that drops some)."""
    if num_frames is None:
        return list(range(count))
    indices = frame_indices(count, num_frames)
    if len(indices) < count:
        warn(f"num_frames={num_frames}: {len(indices)} of the {count} frames given are used, sampled uniformly")
    return indices


def preprocess_frames(frames: np.ndarray, settings: dict) -> np.ndarray:
    """float32 (T, H, W, 3): each frame resized to a square (OneVision) or on its shortest
    edge then centre-cropped (NeXT-Video), BICUBIC, scaled to 0..1 and normalised."""
    out = []
    for frame in frames:
        image = Image.fromarray(frame)
        if settings["square"]:
            image = image.resize((settings["size"], settings["size"]), Image.BICUBIC)
        out.append(clip_preprocess(image, settings["size"], settings["crop"], settings["mean"], settings["std"]))
    return np.stack(out)


def as_video_list(videos: Optional[Sequence]) -> list:
    """One video or several → a list of videos (a path, an array and a list of PIL images are one)."""
    if videos is None:
        return []
    if isinstance(videos, (str, Path, np.ndarray)):
        return [videos]
    videos = list(videos)
    if videos and all(isinstance(v, Image.Image) for v in videos):
        return [videos]
    return videos
