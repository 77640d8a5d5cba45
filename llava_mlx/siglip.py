"""SigLIP vision tower (LLaVA-OneVision), run only up to the layer the model selects.

SigLIP differs from CLIP in what surrounds the encoder: no class token, a patch
embedding with a bias, no pre-layernorm, and a post-layernorm and attention-pooling head
that LLaVA never uses (OneVision takes the last encoder layer's hidden state, before
`post_layernorm`). The encoder layers are CLIP's (`vision.EncoderLayer`), with the
activation and epsilon of the config.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .vision import Encoder, VisionConfig, layers_to_run, patch_embed


@dataclass
class SiglipConfig(VisionConfig):
    # SigLIP so400m-patch14-384: the tower of every released LLaVA-OneVision checkpoint.
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    image_size: int = 384
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.patches_per_side**2, config.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = patch_embed(pixels, self.patch_embedding.weight, self.patch_size) + self.patch_embedding.bias
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
