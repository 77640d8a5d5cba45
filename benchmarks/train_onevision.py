"""The training benchmark's OneVision model: a small LLaVA-OneVision (Qwen2 decoder, SigLIP
so400m's geometry (384 px / 14, its last layer deleted as the LLaVA-NeXT code does),
anyres_max_9 over the (1x1)..(6x6) pinpoints, spatial_unpad) with random weights, written twice,
the same tensors: in the LLaVA-NeXT code's layout (lmms-lab's releases, which this project
fine-tunes by that code's rules; its tower named by hub id, in a Hugging Face cache of the
benchmark's own) and in transformers' llava_onevision layout (llava-hf's, which mlx-vlm trains).
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import SEED, _make_tensor, _tokenizer_corpus, build_qwen2_tokenizer

SIGLIP = "google/siglip-so400m-patch14-384"
OV_PINPOINTS = ",".join(f"({i}x{j})" for i in range(1, 7) for j in range(1, 7))
QWEN2_SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=352)  # fmt: skip
SIGLIP_SMALL = dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2,
                    image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")  # fmt: skip
VOCABULARY = 4000  # learned pieces; the embeddings padded to a multiple of 64 past the added tokens
# llava-hf's OneVision template: the pictures first in a user's message, then its text
HF_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def linear(name: str, rows: int, cols: int, bias: bool = True) -> list:
    return [(f"{name}.weight", (rows, cols), "normal")] + ([(f"{name}.bias", (rows,), "zeros")] if bias else [])


def norm(name: str, width: int, bias: bool = True) -> list:
    return [(f"{name}.weight", (width,), "ones")] + ([(f"{name}.bias", (width,), "zeros")] if bias else [])


def tensors(vocab: int) -> list:
    """(LLaVA-NeXT code's name, transformers' name, shape, init) of every tensor."""
    t, v = QWEN2_SMALL, SIGLIP_SMALL
    d, inter = t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * d // t["num_attention_heads"]
    out = [("model.embed_tokens.weight", (vocab, d), "normal")]
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += norm(p + "input_layernorm", d, False) + norm(p + "post_attention_layernorm", d, False)
        out += linear(p + "self_attn.q_proj", d, d) + linear(p + "self_attn.k_proj", kv, d)
        out += linear(p + "self_attn.v_proj", kv, d) + linear(p + "self_attn.o_proj", d, d, False)
        out += linear(p + "mlp.gate_proj", inter, d, False) + linear(p + "mlp.up_proj", inter, d, False)
        out += linear(p + "mlp.down_proj", d, inter, False)
    out += norm("model.norm", d, False) + linear("lm_head", vocab, d, False)
    vd, vi, ps = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    vp = "model.vision_tower.vision_tower.vision_model."
    out += [(vp + "embeddings.patch_embedding.weight", (vd, 3, ps, ps), "normal")]
    out += [(vp + "embeddings.patch_embedding.bias", (vd,), "zeros")]
    out += [(vp + "embeddings.position_embedding.weight", ((v["image_size"] // ps) ** 2, vd), "normal")]
    for i in range(v["num_hidden_layers"] - 1):  # the code deletes the tower's last layer
        p = f"{vp}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += linear(p + f"self_attn.{name}", vd, vd)
        out += norm(p + "layer_norm1", vd) + norm(p + "layer_norm2", vd)
        out += linear(p + "mlp.fc1", vi, vd) + linear(p + "mlp.fc2", vd, vi)
    out += norm(vp + "post_layernorm", vd)
    out += linear("model.mm_projector.0", d, vd) + linear("model.mm_projector.2", d, d)
    out += [("model.image_newline", (d,), "normal")]
    return [(name, hf_name(name), shape, init) for name, shape, init in out]


def hf_name(name: str) -> str:
    """The LLaVA-NeXT code's name → transformers 4's llava_onevision name."""
    for old, new in (("model.vision_tower.vision_tower.", "vision_tower."), ("model.image_newline", "image_newline"),
                     ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
                     ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
                     ("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):  # fmt: skip
        if name.startswith(old):
            return new + name[len(old) :]
    raise ValueError(name)


def build(root: Path) -> dict:
    """{"next": the LLaVA-NeXT code's layout, "hf": transformers', "hf_home": the towers' cache}."""
    import numpy as np
    from safetensors.numpy import save_file

    paths = {"next": root / "onevision-next-small", "hf": root / "onevision-hf-small", "hf_home": root / "hf-home"}
    if all((paths[k] / "model.safetensors").exists() for k in ("next", "hf")):
        return paths
    ids = build_qwen2_tokenizer(paths["next"], _tokenizer_corpus(), VOCABULARY, extra=("<image>", "<video>"))
    build_qwen2_tokenizer(paths["hf"], _tokenizer_corpus(), VOCABULARY, extra=("<image>", "<video>"))
    vocab = -(-(max(ids.values()) + 1) // 64) * 64
    own, theirs = {}, {}
    for i, (name, hf, shape, init) in enumerate(tensors(vocab)):
        value = _make_tensor(np.random.default_rng([SEED, i]), shape, init, vocab)
        own[name], theirs[hf] = value, value
    save_file(own, str(paths["next"] / "model.safetensors"), metadata={"format": "pt"})
    save_file(theirs, str(paths["hf"] / "model.safetensors"), metadata={"format": "pt"})
    text = dict(QWEN2_SMALL, vocab_size=vocab, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                hidden_act="silu", tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"])  # fmt: skip
    next_config = {
        **text, "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "mm_vision_tower": SIGLIP,
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": SIGLIP_SMALL["hidden_size"], "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": OV_PINPOINTS, "mm_newline_position": "one_token",
        "mm_spatial_pool_mode": "bilinear", "use_mm_proj": True, "tokenizer_model_max_length": 32768,
    }  # fmt: skip
    (paths["next"] / "config.json").write_text(json.dumps(next_config, indent=1))
    tower = hub_snapshot(paths["hf_home"], SIGLIP)
    (tower / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": SIGLIP_SMALL}))
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    vision = dict(SIGLIP_SMALL, model_type="siglip_vision_model", vision_use_head=False)
    vision["num_hidden_layers"] -= 1
    hf_config = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
        "text_config": {**text, "model_type": "qwen2"}, "vision_config": vision, "tie_word_embeddings": False,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": pinpoints, "image_token_index": ids["<image>"], "video_token_index": ids["<video>"],
        "use_image_newline_parameter": True, "projector_hidden_act": "gelu",
    }  # fmt: skip
    (paths["hf"] / "config.json").write_text(json.dumps(hf_config, indent=1))
    image = {"image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
             "image_grid_pinpoints": pinpoints, "size": {"height": 384, "width": 384}, "do_pad": True,
             "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3,
             "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip
    (paths["hf"] / "preprocessor_config.json").write_text(json.dumps(image, indent=1))
    processor = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 729, "image_token": "<image>",
                 "video_token": "<video>", "vision_feature_select_strategy": "full"}  # fmt: skip
    (paths["hf"] / "processor_config.json").write_text(json.dumps(processor, indent=1))
    config = json.loads((paths["hf"] / "tokenizer_config.json").read_text())
    config.update(chat_template=HF_TEMPLATE, extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    (paths["hf"] / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (paths["hf"] / "chat_template.jinja").write_text(HF_TEMPLATE)
    return paths


def hub_snapshot(hf_home: Path, repo: str) -> Path:
    """The snapshot directory of `repo` in a Hugging Face cache (refs/main pointing at it)."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot
