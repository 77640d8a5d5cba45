"""Sparse LLaVA-OneVision / LLaVA-NeXT-Video configs read with transformers 5's defaults."""

import pytest

from llava_mlx import LlavaError
from llava_mlx.checkpoint.layouts import read_config


def test_sparse_onevision_config():
    _, config = read_config(
        {"model_type": "llava_onevision", "text_config": {"hidden_size": 896}, "vision_config": {}}, None
    )
    assert config.vision_model_type == "siglip" and config.conventions == "transformers"
    assert config.vision_feature_layer == -1 and config.vision_feature_select == "cls_patch"
    assert config.image_aspect_ratio == "anyres_max_9" and len(config.image_grid_pinpoints) == 36
    assert config.image_grid_pinpoints[1] == [384, 768]  # (height, width), read by transformers' convention
    assert config.pinpoints[1] == [768, 384]  # as (width, height) for the shared anyres maths
    assert config.text_config["model_type"] == "qwen2" and config.text_config["vocab_size"] == 151936
    assert config.text_config["sliding_window"] is None  # Qwen2 windows nothing unless use_sliding_window
    assert (config.video_pool, config.video_pool_after_projector, config.video_newline) == (
        "bilinear",
        True,
        "one_token",
    )
    assert config.vision.layer_norm_eps == 1e-6 and config.vision.hidden_act == "gelu_pytorch_tanh"


def test_sparse_next_video_config():
    raw = {"model_type": "llava_next_video", "text_config": {}, "vision_config": {}, "spatial_pool_mode": "max"}
    _, config = read_config(raw, None)
    assert config.vision_model_type == "clip" and config.vision_feature_layer == -2
    assert config.image_aspect_ratio == "anyres" and config.patch_merge_type == "spatial_unpad"
    assert (config.video_pool, config.video_pool_stride, config.video_newline) == ("max", 2, "no_token")
    assert config.text_config["model_type"] == "llama"
    with pytest.raises(LlavaError, match="spatial_pool_mode 'conv'"):
        read_config({**raw, "spatial_pool_mode": "conv"}, None)


def test_only_the_family_has_video():
    _, config = read_config({"model_type": "llava_next", "text_config": {}, "vision_config": {}}, None)
    assert config.video_pool is None and config.conventions == "original"
