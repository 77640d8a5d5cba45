"""The towers' patch embedding on the released geometries, where the image size need not divide by the
patch size (SigLIP so400m: 384 / 14 → 27 × 27 patches, 6 pixels of each side unused)."""

import mlx.core as mx
import numpy as np
import pytest

from llava_mlx.errors import LlavaError
from llava_mlx.siglip import SiglipConfig
from llava_mlx.vision import VisionConfig, patch_embed


def test_patch_embed_hand_worked_leftover():
    """5x5 pixels, 2x2 patches, one channel, weight of ones: each output is the sum of a 2x2 block;
    the fifth row and column are never read."""
    pixels = mx.array(np.arange(25.0, dtype=np.float32).reshape(1, 5, 5, 1))
    out = patch_embed(pixels, mx.ones((1, 2, 2, 1)), 2)
    # blocks (rows 0-1, cols 0-1) = 0+1+5+6, (0-1, 2-3) = 2+3+7+8, (2-3, 0-1) = 10+11+15+16, (2-3, 2-3) = 12+13+17+18
    assert np.asarray(out).ravel().tolist() == [12.0, 20.0, 52.0, 60.0]


@pytest.mark.parametrize("size, patch", [(384, 14), (336, 14), (30, 14)])
def test_patch_embed_is_the_unpadded_convolution(size, patch):
    rng = np.random.default_rng([size, patch])
    pixels = mx.array(rng.standard_normal((2, size, size, 3)).astype(np.float32))
    weight = mx.array(rng.standard_normal((8, patch, patch, 3)).astype(np.float32))
    conv = mx.conv2d(pixels, weight, stride=patch)  # MLX's own convolution, no padding
    side = size // patch
    assert conv.shape == (2, side, side, 8)
    ours = patch_embed(pixels, weight, patch)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(conv).reshape(2, side * side, 8), rtol=1e-4, atol=1e-4)


def test_released_tower_geometry():
    assert SiglipConfig().patches_per_side == 27  # so400m-patch14-384: 729 positions
    assert VisionConfig().patches_per_side == 24  # ViT-L/14-336: 576 (+1 class token)


def test_validation_checks_what_the_code_needs():
    from llava_mlx.checkpoint.validate import model_config
    from llava_mlx.model import LlavaConfig

    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "model_type": "qwen2",
    }
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 384,
        "patch_size": 14,
    }
    model_config(LlavaConfig(text, vision, vision_model_type="siglip"), "so400m")  # 384 / 14: accepted
    with pytest.raises(LlavaError, match="patch_size 400 is larger than image_size 384"):
        model_config(LlavaConfig(text, {**vision, "patch_size": 400}, vision_model_type="siglip"), "bad")
