"""Synthetic checkpoints and test pictures shared by every benchmark.

Random-weight checkpoints in the llava-hf layout (transformers 4.x names, torch conv layout,
config.json with text_config / vision_config), a small llama-style BPE tokenizer trained on the
Python standard library, and deterministic structured pictures. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SEED = 0
PREFILL_STEP_SIZE = 2048  # every implementation, offline and served
INIT_STD = 0.02
SHARD_BYTES = 2 << 30
VOCAB_BASE = 32000  # tokenizer pieces; <image> = 32000, <pad> = 32001, embeddings padded to 32064
IMAGE_TOKEN_ID = 32000
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QUESTION = "Describe this image in detail."


CLIP_L_336 = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
CLIP_SMALL = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=512,
    image_size=336,
    patch_size=14,
    projection_dim=128,
)
VICUNA_7B = dict(
    model_type="llama",
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    rope_theta=10000.0,
)
MISTRAL_7B = dict(
    model_type="mistral",
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    rope_theta=1000000.0,
)
LLAMA_SMALL = dict(
    model_type="llama",
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=352,
    rope_theta=10000.0,
)
MISTRAL_SMALL = dict(
    model_type="mistral",
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=448,
    rope_theta=1000000.0,
)

SHAPES = {
    "7b": {"llava-1.5": (VICUNA_7B, CLIP_L_336), "llava-1.6": (MISTRAL_7B, CLIP_L_336)},
    "small": {"llava-1.5": (LLAMA_SMALL, CLIP_SMALL), "llava-1.6": (MISTRAL_SMALL, CLIP_SMALL)},
}


def text_config(shape_text: dict) -> dict:
    cfg = dict(shape_text)
    cfg.update(
        vocab_size=32064,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096 if cfg["model_type"] == "llama" else 32768,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if cfg["model_type"] == "mistral":
        cfg["sliding_window"] = None
    return cfg


def vision_config(shape_vision: dict) -> dict:
    cfg = dict(
        model_type="clip_vision_model",
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        num_channels=3,
        attention_dropout=0.0,
    )
    cfg.update(shape_vision)
    return cfg


def model_config(family: str, shape: str, dtype: str) -> dict:
    t, v = SHAPES[shape][family]
    cfg = {
        "architectures": [
            "LlavaForConditionalGeneration" if family == "llava-1.5" else "LlavaNextForConditionalGeneration"
        ],
        "model_type": "llava" if family == "llava-1.5" else "llava_next",
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN_ID,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": text_config(t),
        "vision_config": vision_config(v),
        "vocab_size": 32064,
        "pad_token_id": 32001,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    if family == "llava-1.6":
        cfg["image_grid_pinpoints"] = PINPOINTS
        cfg["use_image_newline_parameter"] = True
    return cfg


def tensor_specs(cfg: dict):
    """(name, shape, init) for every tensor of a llava-hf (transformers 4.x) checkpoint, in file order."""
    t, v = cfg["text_config"], cfg["vision_config"]
    d, V, inter = t["hidden_size"], t["vocab_size"], t["intermediate_size"]
    hd = d // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * hd
    specs = [("language_model.model.embed_tokens.weight", (V, d), "normal")]
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (d,), "ones"),
            (p + "self_attn.q_proj.weight", (d, d), "normal"),
            (p + "self_attn.k_proj.weight", (kv, d), "normal"),
            (p + "self_attn.v_proj.weight", (kv, d), "normal"),
            (p + "self_attn.o_proj.weight", (d, d), "normal"),
            (p + "post_attention_layernorm.weight", (d,), "ones"),
            (p + "mlp.gate_proj.weight", (inter, d), "normal"),
            (p + "mlp.up_proj.weight", (inter, d), "normal"),
            (p + "mlp.down_proj.weight", (d, inter), "normal"),
        ]
    specs += [("language_model.model.norm.weight", (d,), "ones"), ("language_model.lm_head.weight", (V, d), "lm_head")]
    vd, vi, ps = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    npos = (v["image_size"] // ps) ** 2 + 1
    vp = "vision_tower.vision_model."
    specs += [
        (vp + "embeddings.class_embedding", (vd,), "normal"),
        (vp + "embeddings.patch_embedding.weight", (vd, 3, ps, ps), "normal"),
        (vp + "embeddings.position_embedding.weight", (npos, vd), "normal"),
        (vp + "pre_layrnorm.weight", (vd,), "ones"),
        (vp + "pre_layrnorm.bias", (vd,), "zeros"),
    ]
    for i in range(v["num_hidden_layers"]):
        p = f"{vp}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(p + f"self_attn.{n}.weight", (vd, vd), "normal"), (p + f"self_attn.{n}.bias", (vd,), "zeros")]
        specs += [
            (p + "layer_norm1.weight", (vd,), "ones"),
            (p + "layer_norm1.bias", (vd,), "zeros"),
            (p + "mlp.fc1.weight", (vi, vd), "normal"),
            (p + "mlp.fc1.bias", (vi,), "zeros"),
            (p + "mlp.fc2.weight", (vd, vi), "normal"),
            (p + "mlp.fc2.bias", (vd,), "zeros"),
            (p + "layer_norm2.weight", (vd,), "ones"),
            (p + "layer_norm2.bias", (vd,), "zeros"),
        ]
    specs += [
        (vp + "post_layernorm.weight", (vd,), "ones"),
        (vp + "post_layernorm.bias", (vd,), "zeros"),
        ("multi_modal_projector.linear_1.weight", (d, vd), "normal"),
        ("multi_modal_projector.linear_1.bias", (d,), "zeros"),
        ("multi_modal_projector.linear_2.weight", (d, d), "normal"),
        ("multi_modal_projector.linear_2.bias", (d,), "zeros"),
    ]
    if cfg["model_type"] == "llava_next":
        specs.append(("image_newline", (d,), "normal"))
    return specs


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def weight_bytes(cfg: dict, dtype: str) -> int:
    return sum(math.prod(s) for _, s, _ in tensor_specs(cfg)) * DTYPE_BYTES[dtype]


def decode_bytes_per_token(cfg: dict, dtype: str) -> int:
    """Bytes of weights the language model reads per decoded token: every decoder layer, the final
    norm and lm_head, plus one embedding row (the embedding table itself is gathered, not read)."""
    n = 0
    for name, shape, _ in tensor_specs(cfg):
        if name.startswith("language_model.") and "embed_tokens" not in name:
            n += math.prod(shape)
    return (n + cfg["text_config"]["hidden_size"]) * DTYPE_BYTES[dtype]


def kv_cache_bytes(cfg: dict, dtype: str, length: int) -> int:
    t = cfg["text_config"]
    hd = t["hidden_size"] // t["num_attention_heads"]
    return 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * hd * length * DTYPE_BYTES[dtype]


def _make_tensor(rng, shape, init, n_vocab_used):
    import numpy as np

    if init == "ones":
        return np.ones(shape, np.float32)
    if init == "zeros":
        return np.zeros(shape, np.float32)
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= INIT_STD
    if init == "lm_head":  # never predict ids the tokenizer has no piece for (<image>, <pad>, padding rows)
        a[n_vocab_used:] = 0.0
    return a


def write_weights(cfg: dict, out: Path, dtype: str, seed: int = SEED) -> int:
    """Stream random tensors into safetensors shards: at most one shard is held in memory."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    specs = tensor_specs(cfg)
    total = sum(math.prod(s) for _, s, _ in specs) * DTYPE_BYTES[dtype]
    shards, cur, cur_bytes = [], {}, 0
    weight_map = {}
    n_shards_est = max(1, math.ceil(total / SHARD_BYTES))

    def flush():
        nonlocal cur, cur_bytes
        if not cur:
            return
        idx = len(shards) + 1
        name = "model.safetensors" if n_shards_est == 1 else f"model-{idx:05d}-of-{n_shards_est:05d}.safetensors"
        save_file(cur, str(out / name), metadata={"format": "pt"})
        for k in cur:
            weight_map[k] = name
        shards.append(name)
        cur, cur_bytes = {}, 0

    for i, (name, shape, init) in enumerate(specs):
        rng = np.random.default_rng([seed, i])
        a = _make_tensor(rng, shape, init, VOCAB_BASE)
        nbytes = a.size * DTYPE_BYTES[dtype]
        if cur and cur_bytes + nbytes > SHARD_BYTES:
            flush()
        cur[name] = torch.from_numpy(a).to(tdt).contiguous()
        cur_bytes += nbytes
        del a
    flush()
    if len(shards) > 1:
        # the estimate can be off by one at shard boundaries: rename to the real count
        final = {}
        for j, s in enumerate(shards, 1):
            new = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
            if new != s:
                os.replace(out / s, out / new)
            final[s] = new
        weight_map = {k: final[v] for k, v in weight_map.items()}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    return total


def _tokenizer_corpus(max_bytes: int = 4 << 20) -> list:
    """Deterministic English-ish training text: the Python standard library's own sources."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines, n = [], 0
    for f in sorted(stdlib.glob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for line in text.splitlines():
            line = line.strip()
            if line:
                lines.append(line)
                n += len(line)
        if n > max_bytes:
            break
    return lines


def build_tokenizer(out: Path, chat_template: str):
    """A llama-style (SentencePiece-like, byte-fallback) BPE with 32000 pieces, <image> = 32000."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    fixture = ROOT / "tests" / "fixtures" / "tokenizer" / "tokenizer.json"
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    if fixture.exists():
        tok = Tokenizer.from_file(str(fixture))
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_BASE, special_tokens=specials, show_progress=False, min_frequency=1, limit_alphabet=200
        )
        tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
        n = tok.get_vocab_size(with_added_tokens=True)
        if n < VOCAB_BASE:
            tok.add_special_tokens([AddedToken(f"<unused{i}>", special=True) for i in range(VOCAB_BASE - n)])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_BASE, tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN_ID
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 4096,
                "padding_side": "left",
                "clean_up_tokenization_spaces": False,
                "extra_special_tokens": {"image_token": "<image>"},
                "chat_template": chat_template,
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "image_token": "<image>",
            },
            indent=1,
        )
    )
    (out / "chat_template.jinja").write_text(chat_template)


QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gpt2_byte_order() -> list:
    """The 256 byte-level characters in GPT-2's (and Qwen2's) id order: printable bytes first, the
    others after, each in byte order, so that "\\n" ("Ċ") is id 198."""
    from llava_mlx.token_bytes import byte_alphabet

    alphabet = byte_alphabet()  # character -> byte
    printable = sorted((c for c, b in alphabet.items() if ord(c) == b), key=lambda c: alphabet[c])
    others = sorted((c for c, b in alphabet.items() if ord(c) != b), key=lambda c: alphabet[c])
    return printable + others


def build_qwen2_tokenizer(out: Path, lines: list, vocab_size: int, extra: tuple = ()) -> dict:
    """A byte-level BPE with Qwen2's layout and pre-tokenizer, learned from `lines` (`vocab_size`
    pieces): the 256 bytes first in GPT-2's order ("\\n" is 198, as the LLaVA-NeXT code's
    preprocess_qwen assumes), the merges after, then <|endoftext|>, <|im_start|> and <|im_end|>
    as added tokens, the last two its additional special tokens, then the `extra` special
    tokens (<image>, <video> for transformers' layout). Returns the added tokens' ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def qwen2_pipeline(tokenizer):  # Qwen2's tokenizer.json: NFC, its split (one digit apiece), bytes
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )

    out.mkdir(parents=True, exist_ok=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    learner = Tokenizer(models.BPE())
    qwen2_pipeline(learner)
    learner.train_from_iterator(lines, trainer)
    learned = json.loads(learner.to_str())["model"]
    byte_chars = gpt2_byte_order()
    rest = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in set(byte_chars)]
    vocab = {t: i for i, t in enumerate(byte_chars + rest)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    qwen2_pipeline(tok)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra]
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in specials}
    assert tok.token_to_id("Ċ") == 198
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    specials_map = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|endoftext|>"}
    specials_map["pad_token"] = "<|endoftext|>"
    (out / "special_tokens_map.json").write_text(json.dumps(specials_map, indent=1))
    return ids


CHAT_15 = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CHAT_16 = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    " [/INST]{% else %} {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)


def write_processor_files(cfg: dict, out: Path):
    v = cfg["vision_config"]
    size = v["image_size"]
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
    }
    if cfg["model_type"] == "llava":
        pre = {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", **common}
        proc = {"processor_class": "LlavaProcessor"}
    else:
        pre = {
            "image_processor_type": "LlavaNextImageProcessor",
            "processor_class": "LlavaNextProcessor",
            "image_grid_pinpoints": PINPOINTS,
            "do_pad": True,
            **common,
        }
        proc = {"processor_class": "LlavaNextProcessor"}
    proc.update(
        patch_size=v["patch_size"],
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    (out / "processor_config.json").write_text(json.dumps(proc, indent=1))


def build_checkpoint(family: str, shape: str, dtype: str, out: Path, tokenizer_src: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(family, shape, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001, "do_sample": False}, indent=1)
    )
    write_processor_files(cfg, out)
    chat = CHAT_15 if family == "llava-1.5" else CHAT_16
    if tokenizer_src is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(tokenizer_src / f, out / f)
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc["chat_template"] = chat
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
        (out / "chat_template.jinja").write_text(chat)
    else:
        build_tokenizer(out, chat)
    write_weights(cfg, out, dtype)
    return cfg


def make_image(size, seed: int, path: Path):
    """A deterministic, structured test picture (gradients, shapes, noise)."""
    import numpy as np
    from PIL import Image, ImageDraw

    W, H = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([255 * x / W, 255 * y / H, 127 + 100 * np.sin(x / 37 + y / 53)], -1)
    img += rng.normal(0, 12, img.shape)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, W - 40)), int(rng.integers(0, H - 40))
        d.ellipse(
            [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
    im.save(path)
    return path


def checkpoint_dir(root: Path, family: str, shape: str, dtype: str, tokenizer_src: Path | None = None) -> Path:
    """The checkpoint of `family` under `root`, built there unless a complete one is already present."""
    d = root / f"{family}-{shape}-{dtype}"
    if not (d / "config.json").exists() or not any(d.glob("*.safetensors")):
        build_checkpoint(family, shape, dtype, d, tokenizer_src=tokenizer_src)
    return d
