"""LLaVA: vision tower → projector → image merge → spliced into the decoder's embeddings.

Mirrors `encode_images` and `prepare_inputs_labels_for_multimodal` of the original code:
every crop of every image goes through the tower in one batch; LLaVA-1.5 ('flat') uses
the 576 features of its one crop; LLaVA-1.6 ('spatial_unpad') puts the base crop first,
then the tiles stitched into one map, unpadded, with `image_newline` after every row.
OneVision adds the 'anyres_max_N' downscale and NeXT-Video / OneVision add videos: the
merges are the table in merge.py, the towers the table below (CLIP, SigLIP).
"""

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .anyres import anyres_max_tiles, grid_shape, oriented_pinpoints
from .language import build_language_model, context_length, normalize_text_config
from .merge import IMAGE_MERGES, VIDEO_POOLS, image_positions, merge_kind, place_newlines, video_positions
from .projector import Projector
from .s2 import S2Config, S2Tower
from .siglip import SiglipConfig, SiglipTower
from .vision import VisionConfig, VisionTower

# The original code's LLaVA classes (Vicuna, Mistral, Yi are llama-architecture decoders), and
# the LLaVA-NeXT code's, which adds Qwen2 and Mixtral (lmms-lab's releases). Both codes' loaders
# cut the embeddings to len(tokenizer), both prompt with conversation.py (processor.py).
ORIGINAL_TYPES = ("llava_llama", "llava_mistral", "llava_qwen", "llava_mixtral")

# The original code's placeholder id for an image in `input_ids`; ours for a video.
IMAGE_PLACEHOLDER = -200
VIDEO_PLACEHOLDER = -201
# Vision towers by `vision_model_type`: (config class, module). 'clip_s2' selects the patch
# features itself (tile by tile), the others leave it to `tower_features`.
VISION_TOWERS = {
    "clip": (VisionConfig, VisionTower),
    "siglip": (SiglipConfig, SiglipTower),
    "clip_s2": (S2Config, S2Tower),
}


@dataclass
class LlavaConfig:
    """Normalised configuration: what every checkpoint layout is read into (and converted to)."""

    text_config: dict
    vision_config: dict = field(default_factory=dict)
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"  # 'patch' drops the class token; 'cls_patch' keeps it
    image_aspect_ratio: str = "pad"  # 'pad' (1.5), 'anyres' (1.6), 'square'
    image_grid_pinpoints: Optional[List[List[int]]] = None
    patch_merge_type: str = "flat"  # 'flat' (1.5), 'spatial_unpad' (1.6), 'spatial' (+ NeXT code's, merge_kind)
    max_length: Optional[int] = None  # the original's tokenizer_model_max_length
    quantization: Optional[dict] = None
    llava_type: str = "llava"  # the family member: llava, llava_next, llava_onevision, llava_next_video
    vision_model_type: str = "clip"  # 'clip', 'siglip' or 'clip_s2' (VISION_TOWERS)
    conventions: str = "original"  # anyres geometry of 'original' LLaVA or 'transformers' (merge.py)
    several_images_flat: bool = False  # OneVision: with several images, each is its base crop + newline
    video_pool: Optional[str] = None  # 'average', 'max' or 'bilinear'; None: no video support
    video_pool_stride: int = 2
    video_pool_after_projector: bool = False  # OneVision pools projected features, NeXT-Video tower features
    video_newline: str = "no_token"  # 'one_token' (OneVision), 'no_token' (NeXT-Video), 'frame', 'grid'
    image_processor: str = "checkpoint"  # settings from preprocessor_config.json, or 'siglip': the NeXT code's own
    image_start_end: bool = False  # mm_use_im_start_end: every <image> of a prompt as <im_start><image><im_end>
    builder_tokens: Optional[List[str]] = None  # what the original builder adds to the tokenizer (<im_patch> ...)
    conversation: Optional[str] = None  # the conversation template, where the config decides it (LLaVA v0)

    def __post_init__(self):
        self.text_config = normalize_text_config(self.text_config)
        if self.vision_model_type not in VISION_TOWERS:
            raise ValueError(f"unsupported vision tower '{self.vision_model_type}'")
        self.vision = VISION_TOWERS[self.vision_model_type][0].from_dict(self.vision_config)
        self.vision_config = asdict(self.vision)

    @classmethod
    def from_dict(cls, params: dict) -> "LlavaConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def uses_newline(self) -> bool:
        return "unpad" in self.patch_merge_type

    @property
    def context_length(self) -> int:
        limit = context_length(self.text_config)
        return min(limit, self.max_length) if self.max_length else limit

    @property
    def pinpoints(self):
        """The grid pinpoints as (width, height), whichever convention the config uses."""
        return oriented_pinpoints(self.image_grid_pinpoints, self.conventions)

    @property
    def uses_anyres(self) -> bool:
        return self.image_aspect_ratio == "anyres" or anyres_max_tiles(self.image_aspect_ratio) is not None

    def image_token_count(self, size, several: bool = False) -> int:
        """Positions an image of `size` (width, height) takes in the decoder's sequence
        (`several`: the prompt holds more than one image)."""
        side = self.vision.patches_per_side
        if self.vision_feature_select == "cls_patch" and self.vision_model_type == "clip":
            return self.crops(size) * (side**2 + 1)  # only meaningful with a flat merge
        crops = self.crops(size, several)
        grid = grid_shape(size, self.pinpoints, self.vision.image_size) if crops > 1 else None
        max_tiles = anyres_max_tiles(self.image_aspect_ratio)
        merge, rounding = self.image_merge, self.unpad_rounding
        return image_positions(size, crops, side, merge, grid, rounding, max_tiles, self.uses_newline, self.keeps_base)

    def crops(self, size, several: bool = False) -> int:
        if not self.uses_anyres or (several and self.several_images_flat):
            return 1
        cols, rows = grid_shape(size, self.pinpoints, self.vision.image_size)
        return 1 + cols * rows

    @property
    def image_merge(self) -> str:
        """The IMAGE_MERGES entry of a many-crop image."""
        return merge_kind(self.patch_merge_type)[0] if self.uses_anyres else "flat"

    @property
    def keeps_base(self) -> bool:
        """Whether a many-crop image's sequence starts with its base crop ('nobase' leaves it out)."""
        return merge_kind(self.patch_merge_type)[1]

    @property
    def unpad_rounding(self) -> str:
        return "round" if self.conventions == "transformers" else "truncate"

    def video_token_count(self, frames: int) -> int:
        """Positions a video of `frames` frames takes in the decoder's sequence."""
        return video_positions(
            frames, self.vision.patches_per_side, self.video_pool, self.video_pool_stride, self.video_newline
        )


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VISION_TOWERS[config.vision_model_type][1](config.vision, config.vision_feature_layer)
        self.multi_modal_projector = Projector(
            config.projector_type,
            config.vision.feature_width,
            config.text_config["hidden_size"],
            config.projector_bias,
        )
        self.language_model = build_language_model(config.text_config)
        if config.uses_newline:
            self.image_newline = mx.zeros((config.text_config["hidden_size"],))

    def tower_features(self, pixel_values: mx.array) -> mx.array:
        """The selected layer's features of every crop, (n_crops, patches, vision_dim)."""
        features = self.vision_tower(pixel_values)
        if self.config.vision_feature_select == "patch" and self.config.vision_model_type == "clip":
            features = features[:, 1:]
        return features

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """Projected features of every crop, (n_crops, patches, text_dim), in one batch."""
        return self.multi_modal_projector(self.tower_features(pixel_values))

    def merge_image(self, features: mx.array, size) -> mx.array:
        """The sequence of one image from the features of its crops (merge.py)."""
        config = self.config
        grid = grid_shape(size, config.pinpoints, config.vision.image_size) if features.shape[0] > 1 else None
        newline = self.image_newline if config.uses_newline else None
        return IMAGE_MERGES[config.image_merge](
            features,
            newline,
            size=size,
            grid=grid,
            rounding=config.unpad_rounding,
            max_tiles=anyres_max_tiles(config.image_aspect_ratio),
            keep_base=config.keeps_base,
        )

    def image_features(self, pixel_values: mx.array, image_sizes, several: bool = False) -> List[mx.array]:
        """One (positions, text_dim) array per image (`several`: the prompt holds more than one)."""
        sizes = [tuple(int(v) for v in s) for s in np.asarray(image_sizes).reshape(-1, 2)]
        counts = [self.config.crops(s, several) for s in sizes]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} crops but the image sizes need {sum(counts)}")
        features = self.encode_images(pixel_values)
        starts = np.cumsum([0] + counts)
        return [self.merge_image(features[starts[i] : starts[i + 1]], s) for i, s in enumerate(sizes)]

    def video_features(self, frames: mx.array) -> mx.array:
        """(positions, text_dim) of one video from its preprocessed frames (T, H, W, 3):
        tower → pooling (before or after the projector) → newlines (merge.py)."""
        if self.config.video_pool is None:
            raise ValueError(f"{self.config.llava_type} checkpoints take no video")
        return self.merge_video(self.tower_features(frames))

    def merge_video(self, features: mx.array) -> mx.array:
        """The sequence of one video from its frames' tower features (T, patches, vision_dim)."""
        config = self.config
        side = config.vision.patches_per_side
        pool = VIDEO_POOLS[config.video_pool]
        if config.video_pool_after_projector:
            features = self.multi_modal_projector(features)
        grid = pool(features.reshape(features.shape[0], side, side, -1), config.video_pool_stride)
        if not config.video_pool_after_projector:
            grid = self.multi_modal_projector(grid)
        newline = getattr(self, "image_newline", None)
        return place_newlines(grid, newline, config.video_newline)

    def embed(
        self,
        input_ids,
        pixel_values=None,
        image_sizes=None,
        image_features=None,
        pixel_values_videos=None,
        start: int = 0,
        stop: Optional[int] = None,
    ):
        """Text embeddings with each IMAGE_PLACEHOLDER / VIDEO_PLACEHOLDER replaced by that
        image's or video's features.

        `pixel_values_videos` is a list with one (frames, H, W, 3) array per video.
        `image_features` (one array per placeholder, in order) may be passed to reuse
        encoded images and videos. Returns (1, L, text_dim); with `start` / `stop`, only
        positions [start, stop) of the merged sequence are computed (a cached prefix is not).
        """
        ids = np.asarray(input_ids).reshape(-1)
        slots = np.flatnonzero((ids == IMAGE_PLACEHOLDER) | (ids == VIDEO_PLACEHOLDER))
        if image_features is None:
            image_features = (
                self.media_features(ids, pixel_values, image_sizes, pixel_values_videos) if len(slots) else []
            )
        if len(image_features) != len(slots):
            raise ValueError(f"the prompt has {len(slots)} image placeholders but {len(image_features)} images")
        embed_tokens = self.language_model.model.embed_tokens
        dtype = self.language_model.model.norm.weight.dtype
        # the merged sequence as runs: (token ids or features, its first position)
        runs, token, position = [], 0, 0
        for slot, feats in zip(slots, image_features):
            if slot > token:
                runs.append((ids[token:slot], position))
                position += slot - token
            runs.append((feats, position))
            position, token = position + feats.shape[0], slot + 1
        if token < len(ids):
            runs.append((ids[token:], position))
            position += len(ids) - token
        stop = position if stop is None else min(stop, position)
        pieces = []
        for run, first in runs:
            lo, hi = max(start - first, 0), min(stop - first, run.shape[0])
            if lo >= hi:
                continue
            if isinstance(run, np.ndarray):
                pieces.append(embed_tokens(mx.array(run[lo:hi])))
            else:
                pieces.append(run[lo:hi].astype(dtype))
        if not pieces:  # the whole range is cached already: nothing to prefill
            return mx.zeros((1, 0, self.config.text_config["hidden_size"]), dtype=dtype)
        return mx.concatenate(pieces)[None]

    def media_features(self, ids: np.ndarray, pixel_values, image_sizes, pixel_values_videos) -> List[mx.array]:
        """The features of every image and video placeholder of `ids`, in order. (Sharded over
        several ranks, distributed/shard.py has rank 0 compute them and share them.)"""
        is_image, is_video = ids == IMAGE_PLACEHOLDER, ids == VIDEO_PLACEHOLDER
        videos = list(pixel_values_videos if pixel_values_videos is not None else [])
        if len(videos) != int(is_video.sum()):
            raise ValueError(f"the prompt has {int(is_video.sum())} video placeholders but {len(videos)} videos")
        several = int(is_image.sum()) > 1
        images = iter(self.image_features(pixel_values, image_sizes, several) if is_image.any() else [])
        videos = iter(self.video_features(mx.array(v)) for v in videos)
        return [
            next(images) if ids[s] == IMAGE_PLACEHOLDER else next(videos) for s in np.flatnonzero(is_image | is_video)
        ]

    def __call__(
        self, input_ids, pixel_values=None, image_sizes=None, cache=None, image_features=None, pixel_values_videos=None
    ):
        """Logits (1, L, vocab) for the whole merged sequence, L counting every image position."""
        embeddings = self.embed(input_ids, pixel_values, image_sizes, image_features, pixel_values_videos)
        return self.language_model(None, cache=cache, input_embeddings=embeddings)

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self):
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.language_model)
