"""CLIP ViT vision tower, run only up to the layer LLaVA selects.

LLaVA takes the hidden state of `mm_vision_select_layer` (-2: the output of the
second-to-last layer) before `post_layernorm`, so the layers after it and the final
norm are never built, loaded or run.
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn


@dataclass
class VisionConfig:
    # CLIP ViT-L/14-336: the tower of every released LLaVA 1.5/1.6 checkpoint.
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, params: dict) -> "VisionConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @property
    def patches_per_side(self) -> int:
        # floor, as the unpadded patch convolution: 384 / 14 → 27
        return self.image_size // self.patch_size

    @property
    def feature_width(self) -> int:
        """Channels of the features the projector takes."""
        return self.hidden_size


def layers_to_run(num_layers: int, select_layer: int) -> int:
    """Encoder layers needed for hidden state `select_layer` (index 0 is the embeddings)."""
    return select_layer if select_layer >= 0 else num_layers + 1 + select_layer


ACTIVATIONS = {
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(num_layers)]


def patch_embed(pixels: mx.array, weight: mx.array, patch: int) -> mx.array:
    """(B, H, W, C) pixels → (B, patches, D) through a stride == kernel convolution, run as a
    matmul over unfolded patches (what the CPU and GPU backends run fastest).
    `weight` is (D, p, p, C), MLX's conv layout. As the unpadded convolution does, the pixels
    past the last whole patch are never read: SigLIP so400m's 384 / 14 gives 27 × 27 patches and
    leaves 6 rows and columns unused."""
    B, H, W, C = pixels.shape
    rows, cols = H // patch, W // patch
    if (rows * patch, cols * patch) != (H, W):
        pixels = pixels[:, : rows * patch, : cols * patch]
    patches = pixels.reshape(B, rows, patch, cols, patch, C).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(B, rows * cols, patch * patch * C)
    return patches @ weight.reshape(weight.shape[0], -1).T


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = mx.zeros((config.hidden_size,))
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=False,
        )
        self.position_embedding = nn.Embedding(config.patches_per_side**2 + 1, config.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = patch_embed(pixels, self.patch_embedding.weight, self.patch_size)
        B = x.shape[0]
        cls = mx.broadcast_to(self.class_embedding, (B, 1, x.shape[-1])).astype(x.dtype)
        return mx.concatenate([cls, x], axis=1) + self.position_embedding.weight


class VisionTower(nn.Module):
    """CLIP vision transformer truncated at `select_layer`; returns that hidden state."""

    def __init__(self, config: VisionConfig, select_layer: int = -2):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config, layers_to_run(config.num_hidden_layers, select_layer))

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.pre_layrnorm(self.embeddings(pixels.astype(self.pre_layrnorm.weight.dtype)))
        for layer in self.encoder.layers:
            x = layer(x)
        return x
