"""SigLIP vision tower (LLaVA-OneVision), run only up to the layer the model selects.

SigLIP differs from CLIP in what surrounds the encoder: no class token, a patch
embedding with a bias, no pre-layernorm, and a post-layernorm and attention-pooling head
that LLaVA never uses (OneVision takes the last encoder layer's hidden state, before
`post_layernorm`). The encoder layers are CLIP's (`vision.EncoderLayer`), with the
activation and epsilon of the config.
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from .vision import Encoder, layers_to_run


@dataclass
class SiglipConfig:
    # SigLIP so400m-patch14-384: the tower of every released LLaVA-OneVision checkpoint.
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, params: dict) -> "SiglipConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.patches_per_side**2, config.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        # pixels (B, H, W, C); the stride == kernel convolution as a matmul over patches.
        B, H, W, C = pixels.shape
        p = self.patch_size
        patches = pixels.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(B, (H // p) * (W // p), p * p * C)
        weight = self.patch_embedding.weight  # (D, p, p, C)
        x = patches @ weight.reshape(weight.shape[0], -1).T + self.patch_embedding.bias
        return x + self.position_embedding.weight


class SiglipTower(nn.Module):
    """SigLIP vision transformer truncated at `select_layer`; returns that hidden state."""

    def __init__(self, config: SiglipConfig, select_layer: int = -1):
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = Encoder(config, layers_to_run(config.num_hidden_layers, select_layer))

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.embeddings(pixels.astype(self.embeddings.position_embedding.weight.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return x
