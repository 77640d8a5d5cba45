"""Config normalisation and weight names across layouts (no weights needed)."""

import pytest

from llava_mlx.checkpoint.layouts import detect_layout, read_config, rename
from llava_mlx.errors import LlavaError
from llava_mlx.processor import family_prompt


def test_llava_hf_config_with_text_defaults():
    # llava-hf/llava-1.5-7b-hf style: text_config holds only a few keys.
    raw = {
        "model_type": "llava",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "model_type": "llama", "vocab_size": 32064},
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
        },
    }
    layout, config = read_config(raw, None)
    text = config.text_config
    assert layout == "llava-hf"
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (4096, 32, 32)
    assert (text["intermediate_size"], text["rope_theta"], text["vocab_size"]) == (11008, 10000.0, 32064)
    assert text["num_key_value_heads"] == 32 and text["tie_word_embeddings"] is False
    assert (config.image_aspect_ratio, config.patch_merge_type) == ("pad", "flat")
    assert config.vision.num_hidden_layers == 24


def test_llava_next_mistral_and_yi_fields_are_read():
    raw = {
        "model_type": "llava_next",
        "text_config": {"model_type": "mistral", "rope_theta": 1e6, "sliding_window": None, "vocab_size": 32064},
        "vision_feature_select_strategy": "default",
    }
    _, config = read_config(raw, None)
    assert config.text_config["rope_theta"] == 1e6 and config.text_config["num_key_value_heads"] == 8
    assert config.context_length == 4096 * 32  # no sliding window
    assert config.image_aspect_ratio == "anyres" and config.image_grid_pinpoints[0] == [336, 672]
    assert config.vision.hidden_size == 1024  # no vision_config: CLIP ViT-L/14-336
    yi = {
        "model_type": "llava_next",
        "text_config": {
            "model_type": "llama",
            "vocab_size": 64064,
            "rope_parameters": {"rope_theta": 5e6, "rope_type": "default"},
            "hidden_size": 7168,
        },
    }
    assert read_config(yi, None)[1].text_config["rope_theta"] == 5e6


def test_original_config_layout_detection():
    v15 = {
        "model_type": "llava",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "hidden_size": 4096,
        "image_aspect_ratio": "pad",
        "mm_projector_type": "mlp2x_gelu",
        "tokenizer_model_max_length": 2048,
    }
    assert detect_layout(v15) == "original"
    layout, config = read_config(v15, None)
    assert config.max_length == 2048 and config.context_length == 2048
    v16 = {
        "model_type": "llava_mistral",
        "image_grid_pinpoints": "[[336, 672], [672, 336]]",
        "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad",
    }
    _, config = read_config(v16, None)
    assert config.text_config["model_type"] == "mistral"
    assert config.image_grid_pinpoints == [[336, 672], [672, 336]]
    with pytest.raises(LlavaError, match="unknown model type 'bert'"):
        detect_layout({"model_type": "bert"})


@pytest.mark.parametrize(
    "key,ours",
    [
        (
            "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_tower.encoder.layers.0.mlp.fc1.weight",
        ),
        ("vision_tower.vision_model.embeddings.class_embedding", "vision_tower.embeddings.class_embedding"),
        ("vision_tower.embeddings.class_embedding", "vision_tower.embeddings.class_embedding"),
        ("vision_model.pre_layrnorm.weight", "vision_tower.pre_layrnorm.weight"),
        ("model.mm_projector.0.weight", "multi_modal_projector.linear_1.weight"),
        ("model.mm_projector.2.bias", "multi_modal_projector.linear_2.bias"),
        ("model.mm_projector.weight", "multi_modal_projector.linear_1.weight"),
        ("model.image_newline", "image_newline"),
        ("model.layers.3.self_attn.q_proj.weight", "language_model.model.layers.3.self_attn.q_proj.weight"),
        ("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
        ("lm_head.weight", "language_model.lm_head.weight"),
        ("language_model.model.norm.weight", "language_model.model.norm.weight"),
        ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight"),
        ("model.multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.weight"),
    ],
)
def test_weight_names(key, ours):
    assert rename(key) == ours


def test_original_templates():
    turns = [("<image>\nQ1", "A1"), ("Q2", None)]
    assert family_prompt("llava_v1", turns, "SYS") == "SYS USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert family_prompt("mistral_instruct", turns) == "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]"
    assert family_prompt("chatml_direct", turns[1:]) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    )
