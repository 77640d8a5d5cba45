"""The LLaVA-NeXT code's config.json read by hand-worked cases (layouts.py): its pinpoint string,
its SigLIP tower, its video settings, its merges, and what it refuses."""

import mlx.core as mx
import pytest

from llava_mlx import LlavaError
from llava_mlx.checkpoint.layouts import grid_range, read_config, sanitize

SIGLIP = "google/siglip-so400m-patch14-384"
CLIP = "openai/clip-vit-large-patch14-336"
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def config(**fields):
    return read_config({**TEXT, **fields}, None)[1]


def test_the_pinpoint_string_is_every_grid_in_its_range():
    # (i, j) from the first pair to the last, times the tile, as (width, height)
    assert grid_range("(1x1),(1x2),(2x3)", 384) == [
        [384, 384], [384, 768], [384, 1152], [768, 384], [768, 768], [768, 1152]
    ]  # fmt: skip
    assert len(grid_range("(1x1),...,(6x6)", 384)) == 36
    with pytest.raises(LlavaError, match="image_grid_pinpoints"):
        grid_range("1x1 to 6x6", 384)


def test_a_qwen_checkpoint_with_a_siglip_name_reads_as_onevisions_originals():
    c = config(
        model_type="llava_qwen", mm_vision_tower=SIGLIP, image_aspect_ratio="anyres_max_9",
        image_grid_pinpoints="(1x1),...,(6x6)", mm_patch_merge_type="spatial_unpad",
    )  # fmt: skip
    assert c.text_config["model_type"] == "qwen2" and c.llava_type == "llava_qwen"
    assert c.vision_model_type == "siglip" and c.image_processor == "siglip"
    assert c.vision.num_hidden_layers == 26 and c.vision.patches_per_side == 27  # released 27 layers, last dropped
    assert c.video_pool == "bilinear" and c.video_newline == "one_token" and c.video_pool_after_projector
    assert c.several_images_flat and c.image_grid_pinpoints[-1] == [2304, 2304]


def test_a_llama_checkpoint_takes_videos_only_when_it_says_how_to_pool_them():
    base = dict(model_type="llava_llama", mm_vision_tower=CLIP, image_aspect_ratio="anyres")
    plain = config(**base, mm_patch_merge_type="spatial_unpad")
    assert plain.video_pool is None and not plain.several_images_flat and plain.llava_type == "llava_llama"
    video = config(**base, mm_patch_merge_type="spatial_unpad", mm_spatial_pool_mode="average")
    assert (video.video_pool, video.video_pool_stride, video.video_newline) == ("average", 2, "one_token")
    # the stride the code's get_2dPool is called with is its default 2, whatever the config says
    assert config(**base, mm_patch_merge_type="spatial_unpad", mm_spatial_pool_mode="max",
                  mm_spatial_pool_stride=4).video_pool_stride == 2  # fmt: skip
    # without an 'unpad' merge there is no image_newline: one_token adds nothing
    flat = config(**base, mm_patch_merge_type="spatial", mm_spatial_pool_mode="average")
    assert flat.video_newline == "no_token"


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"mm_newline_position": "grid", "mm_patch_merge_type": "spatial"}, "needs image_newline"),
        ({"mm_newline_position": "frame", "mm_patch_merge_type": "flat"}, "needs image_newline"),
        ({"mm_newline_position": "everywhere"}, "is unknown"),
        ({"mm_spatial_pool_mode": "median"}, "is unknown"),
        ({"add_faster_video": True}, "add_faster_video"),
    ],
)
def test_video_settings_the_code_cannot_run_are_refused(fields, message):
    raw = dict(model_type="llava_llama", mm_vision_tower=CLIP, mm_spatial_pool_mode="average")
    with pytest.raises(LlavaError, match=message):
        config(**{**raw, "mm_patch_merge_type": "spatial_unpad", **fields})


def test_an_unused_image_newline_is_left_out_as_the_code_leaves_it():
    c = config(model_type="llava_llama", mm_vision_tower=CLIP, mm_patch_merge_type="flat")
    weights = {"model.image_newline": mx.zeros((64,)), "lm_head.weight": mx.zeros((10, 64))}
    assert list(sanitize(weights, c)) == ["language_model.lm_head.weight"]
    unpad = config(model_type="llava_llama", mm_vision_tower=CLIP, mm_patch_merge_type="spatial_unpad")
    assert "image_newline" in sanitize(weights, unpad)
