"""LLaVA: vision tower → projector → image merge → spliced into the decoder's embeddings.

Mirrors `encode_images` and `prepare_inputs_labels_for_multimodal` of the original code:
every crop of every image goes through the tower in one batch; LLaVA-1.5 ('flat') uses
the 576 features of its one crop; LLaVA-1.6 ('spatial_unpad') puts the base crop first,
then the tiles stitched into one map, unpadded, with `image_newline` after every row.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .anyres import grid_shape, image_token_count, unpad_padding
from .language import build_language_model, context_length, normalize_text_config
from .projector import Projector
from .vision import VisionConfig, VisionTower

# The original code's placeholder id for an image in `input_ids`.
IMAGE_PLACEHOLDER = -200


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
    patch_merge_type: str = "flat"  # 'flat' (1.5), 'spatial_unpad' (1.6), 'spatial'
    max_length: Optional[int] = None  # the original's tokenizer_model_max_length
    quantization: Optional[dict] = None

    def __post_init__(self):
        self.text_config = normalize_text_config(self.text_config)
        self.vision = VisionConfig.from_dict(self.vision_config)
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

    def image_token_count(self, size) -> int:
        """Positions an image of `size` (width, height) takes in the decoder's sequence."""
        if self.vision_feature_select == "cls_patch":  # only meaningful with a flat merge
            return self.crops(size) * (self.vision.patches_per_side**2 + 1)
        return image_token_count(
            size,
            self.image_aspect_ratio,
            self.image_grid_pinpoints,
            self.patch_merge_type,
            self.vision.image_size,
            self.vision.patches_per_side,
        )

    def crops(self, size) -> int:
        if self.image_aspect_ratio != "anyres":
            return 1
        cols, rows = grid_shape(size, self.image_grid_pinpoints, self.vision.image_size)
        return 1 + cols * rows


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision, config.vision_feature_layer)
        self.multi_modal_projector = Projector(
            config.projector_type,
            config.vision.hidden_size,
            config.text_config["hidden_size"],
            config.projector_bias,
        )
        self.language_model = build_language_model(config.text_config)
        if config.uses_newline:
            self.image_newline = mx.zeros((config.text_config["hidden_size"],))

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """Projected features of every crop, (n_crops, patches, text_dim), in one batch."""
        features = self.vision_tower(pixel_values)
        if self.config.vision_feature_select == "patch":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def merge_image(self, features: mx.array, size) -> mx.array:
        """The sequence of one image from the features of its crops (original merge)."""
        config = self.config
        if config.image_aspect_ratio != "anyres" or config.patch_merge_type == "flat":
            return features.reshape(-1, features.shape[-1])
        base, dim = features[0], features.shape[-1]
        if features.shape[0] == 1:
            return mx.concatenate([base, self.image_newline[None]]) if config.uses_newline else base
        side = config.vision.patches_per_side
        cols, rows = grid_shape(size, config.image_grid_pinpoints, config.vision.image_size)
        grid = features[1:].reshape(rows, cols, side, side, dim).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * side, cols * side, dim)
        if config.uses_newline:
            pad_y, pad_x = unpad_padding(size, rows * side, cols * side)
            grid = grid[pad_y : rows * side - pad_y, pad_x : cols * side - pad_x]
            newline = mx.broadcast_to(self.image_newline.astype(grid.dtype), (grid.shape[0], 1, dim))
            grid = mx.concatenate([grid, newline], axis=1)
        return mx.concatenate([base, grid.reshape(-1, dim)])

    def image_features(self, pixel_values: mx.array, image_sizes) -> List[mx.array]:
        """One (positions, text_dim) array per image."""
        sizes = [tuple(int(v) for v in s) for s in np.asarray(image_sizes).reshape(-1, 2)]
        counts = [self.config.crops(s) for s in sizes]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} crops but the image sizes need {sum(counts)}"
            )
        features = self.encode_images(pixel_values)
        starts = np.cumsum([0] + counts)
        return [self.merge_image(features[starts[i] : starts[i + 1]], s) for i, s in enumerate(sizes)]

    def embed(self, input_ids, pixel_values=None, image_sizes=None, image_features=None) -> mx.array:
        """Text embeddings with each IMAGE_PLACEHOLDER replaced by that image's features.

        `image_features` (from `image_features`) may be passed to reuse encoded images.
        Returns (1, L, text_dim).
        """
        ids = np.asarray(input_ids).reshape(-1)
        slots = np.flatnonzero(ids == IMAGE_PLACEHOLDER)
        if image_features is None:
            image_features = [] if len(slots) == 0 else self.image_features(pixel_values, image_sizes)
        if len(image_features) != len(slots):
            raise ValueError(f"the prompt has {len(slots)} image placeholders but {len(image_features)} images")
        embed_tokens = self.language_model.model.embed_tokens
        dtype = self.language_model.model.norm.weight.dtype
        pieces, start = [], 0
        for slot, feats in zip(slots, image_features):
            if slot > start:
                pieces.append(embed_tokens(mx.array(ids[start:slot])))
            pieces.append(feats.astype(dtype))
            start = slot + 1
        if start < len(ids):
            pieces.append(embed_tokens(mx.array(ids[start:])))
        return mx.concatenate(pieces)[None]

    def __call__(self, input_ids, pixel_values=None, image_sizes=None, cache=None, image_features=None):
        """Logits (1, L, vocab) for the whole merged sequence, L counting every image position."""
        embeddings = self.embed(input_ids, pixel_values, image_sizes, image_features)
        return self.language_model(None, cache=cache, input_embeddings=embeddings)

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self):
        return self.language_model.make_cache()
