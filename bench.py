#!/usr/bin/env python
"""Benchmark llava-mlx against mlx-vlm and transformers/PyTorch on synthetic checkpoints.

Nothing is downloaded: random-weight checkpoints in the llava-hf layout (transformers 4.x
names, torch conv layout, config.json with text_config / vision_config) are written to a
temporary directory, with a small llama-style BPE tokenizer trained there too.

    python bench.py                                   # --shape small, float32, all peers
    python bench.py --shape 7b --dtype float16        # real LLaVA-1.5-7B / 1.6-Mistral-7B shapes (Apple silicon)
    python bench.py --peers mlx-vlm --tokens 32 --out docs/

Each (implementation, case) runs in its own subprocess so that load time, peak memory
and caches are not shared. Set up the peers with scripts/setup_bench.sh.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # until llava-mlx is pip-installed in the bench venv
    sys.path.insert(0, str(HERE))

# ----------------------------------------------------------------------------- defaults
DEFAULT_SHAPE = "small"
DEFAULT_DTYPE = "float32"
DEFAULT_TOKENS = 128
DEFAULT_PEERS = "mlx-vlm,transformers"
DEFAULT_OUT = "docs"
DEFAULT_REPEATS = 2  # measured runs per (implementation, case), after one warm-up; best of
SEED = 0
PREFILL_STEP_SIZE = 2048
INIT_STD = 0.02
SHARD_BYTES = 2 << 30
IMPLS = ("llava-mlx", "mlx-vlm", "transformers")
VOCAB_BASE = 32000  # tokenizer pieces; <image> = 32000, <pad> = 32001, embeddings padded to 32064
IMAGE_TOKEN_ID = 32000
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QUESTION = "Describe this image in detail."

CLIP_L_336 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, image_size=336, patch_size=14, projection_dim=768)
CLIP_SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=512, image_size=336, patch_size=14, projection_dim=128)
VICUNA_7B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=11008, rope_theta=10000.0)
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, rope_theta=1000000.0)
LLAMA_SMALL = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, intermediate_size=352, rope_theta=10000.0)
MISTRAL_SMALL = dict(model_type="mistral", hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=448, rope_theta=1000000.0)

SHAPES = {
    "7b": {"llava-1.5": (VICUNA_7B, CLIP_L_336), "llava-1.6": (MISTRAL_7B, CLIP_L_336)},
    "small": {"llava-1.5": (LLAMA_SMALL, CLIP_SMALL), "llava-1.6": (MISTRAL_SMALL, CLIP_SMALL)},
}


@dataclass
class Case:
    name: str
    family: str  # llava-1.5 | llava-1.6
    image_size: tuple  # (W, H)
    prompt: str
    reference_positions: int  # image positions in the original LLaVA code


CASES = [
    Case("LLaVA-1.5, one 640x480 image", "llava-1.5", (640, 480),
         f"USER: <image>\n{QUESTION} ASSISTANT:", 576),
    Case("LLaVA-1.6, one 1000x600 image (5 crops)", "llava-1.6", (1000, 600),
         f"[INST] <image>\n{QUESTION} [/INST]", 1948),
]


# ----------------------------------------------------------------------------- checkpoint builder
def text_config(shape_text: dict) -> dict:
    cfg = dict(shape_text)
    cfg.update(vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096 if cfg["model_type"] == "llama" else 32768,
               hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if cfg["model_type"] == "mistral":
        cfg["sliding_window"] = None
    return cfg


def vision_config(shape_vision: dict) -> dict:
    cfg = dict(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5,
               num_channels=3, attention_dropout=0.0)
    cfg.update(shape_vision)
    return cfg


def model_config(family: str, shape: str, dtype: str) -> dict:
    t, v = SHAPES[shape][family]
    cfg = {
        "architectures": ["LlavaForConditionalGeneration" if family == "llava-1.5" else "LlavaNextForConditionalGeneration"],
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
    specs += [("language_model.model.norm.weight", (d,), "ones"),
              ("language_model.lm_head.weight", (V, d), "lm_head")]
    vd, vi, ps = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    npos = (v["image_size"] // ps) ** 2 + 1
    vp = "vision_tower.vision_model."
    specs += [(vp + "embeddings.class_embedding", (vd,), "normal"),
              (vp + "embeddings.patch_embedding.weight", (vd, 3, ps, ps), "normal"),
              (vp + "embeddings.position_embedding.weight", (npos, vd), "normal"),
              (vp + "pre_layrnorm.weight", (vd,), "ones"), (vp + "pre_layrnorm.bias", (vd,), "zeros")]
    for i in range(v["num_hidden_layers"]):
        p = f"{vp}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(p + f"self_attn.{n}.weight", (vd, vd), "normal"), (p + f"self_attn.{n}.bias", (vd,), "zeros")]
        specs += [(p + "layer_norm1.weight", (vd,), "ones"), (p + "layer_norm1.bias", (vd,), "zeros"),
                  (p + "mlp.fc1.weight", (vi, vd), "normal"), (p + "mlp.fc1.bias", (vi,), "zeros"),
                  (p + "mlp.fc2.weight", (vd, vi), "normal"), (p + "mlp.fc2.bias", (vd,), "zeros"),
                  (p + "layer_norm2.weight", (vd,), "ones"), (p + "layer_norm2.bias", (vd,), "zeros")]
    specs += [(vp + "post_layernorm.weight", (vd,), "ones"), (vp + "post_layernorm.bias", (vd,), "zeros"),
              ("multi_modal_projector.linear_1.weight", (d, vd), "normal"),
              ("multi_modal_projector.linear_1.bias", (d,), "zeros"),
              ("multi_modal_projector.linear_2.weight", (d, d), "normal"),
              ("multi_modal_projector.linear_2.bias", (d,), "zeros")]
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
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
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

    fixture = HERE / "tests" / "fixtures" / "tokenizer" / "tokenizer.json"
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    if fixture.exists():
        tok = Tokenizer.from_file(str(fixture))
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=VOCAB_BASE, special_tokens=specials, show_progress=False,
                                      min_frequency=1, limit_alphabet=200)
        tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
        n = tok.get_vocab_size(with_added_tokens=True)
        if n < VOCAB_BASE:
            tok.add_special_tokens([AddedToken(f"<unused{i}>", special=True) for i in range(VOCAB_BASE - n)])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_BASE, tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN_ID
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
        "padding_side": "left", "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {"image_token": "<image>"},
        "chat_template": chat_template,
    }, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "image_token": "<image>"}, indent=1))
    (out / "chat_template.jinja").write_text(chat_template)


CHAT_15 = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: "
           "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
           " {% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
CHAT_16 = ("{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
           "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
           " [/INST]{% else %} {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}")


def write_processor_files(cfg: dict, out: Path):
    v = cfg["vision_config"]
    size = v["image_size"]
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3, "rescale_factor": 1 / 255,
              "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
              "do_center_crop": True}
    if cfg["model_type"] == "llava":
        pre = {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", **common}
        proc = {"processor_class": "LlavaProcessor"}
    else:
        pre = {"image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
               "image_grid_pinpoints": PINPOINTS, "do_pad": True, **common}
        proc = {"processor_class": "LlavaNextProcessor"}
    proc.update(patch_size=v["patch_size"], vision_feature_select_strategy="default", image_token="<image>",
                num_additional_image_tokens=1)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    (out / "processor_config.json").write_text(json.dumps(proc, indent=1))


def build_checkpoint(family: str, shape: str, dtype: str, out: Path, tokenizer_src: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(family, shape, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001, "do_sample": False}, indent=1))
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
        d.ellipse([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    im.save(path)
    return path


# ----------------------------------------------------------------------------- workers (subprocesses)
def _rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _maxrss_bytes() -> int:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _timeline_stats(ttft, t_tokens, t0):
    n = len(t_tokens)
    decode_tps = (n - 1) / (t_tokens[-1] - t_tokens[0]) if n > 1 else float("nan")
    return dict(ttft=ttft, decode_tps=decode_tps, generated=n, total_time=t_tokens[-1] - t0)


def _best(runs: list) -> dict:
    """Combine repeated measured runs: fastest times, highest rates, highest peak memory."""
    out = dict(runs[-1])
    for k, pick in (("ttft", min), ("encode_time", min), ("total_time", min), ("decode_tps", max),
                    ("own_decode_tps", max), ("own_prompt_tps", max), ("peak_memory", max)):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = pick(vals)
    out["runs"] = len(runs)
    out["all_runs"] = {k: [r.get(k) for r in runs] for k in ("ttft", "encode_time", "decode_tps", "peak_memory")}
    return out


def worker_llava_mlx(a) -> dict:
    import mlx.core as mx
    from llava_mlx import load, stream_generate

    t0 = time.perf_counter()
    model, processor = load(a.ckpt)
    mx.eval(model.parameters())
    load_time = time.perf_counter() - t0
    kw = dict(max_tokens=a.tokens, temperature=0.0, template=False, ignore_eos=True,
              prefill_step_size=PREFILL_STEP_SIZE)
    # warm-up on a different image of the same size (no feature/prefix cache hit on the measured run)
    for _ in stream_generate(model, processor, a.prompt, images=[a.warm_image], **{**kw, "max_tokens": 2}):
        pass
    def measure():
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        times, last, first = [], None, None
        for r in stream_generate(model, processor, a.prompt, images=[a.image], **kw):
            now = time.perf_counter()
            if r.token is None:
                continue
            if first is None:
                first = r
            if r.generation_tokens > len(times):  # the closing response repeats the last token
                times.append(now)
            last = r
        peak = mx.get_peak_memory()
        res = _timeline_stats(times[0] - t0, times, t0)
        get = lambda name, default=None: getattr(last, name, getattr(first, name, default))
        res.update(
            peak_memory=peak, encode_time=get("encode_time"), image_positions=get("image_positions"),
            prompt_positions=get("prompt_tokens"), own_prompt_tps=get("prompt_tps"),
            own_decode_tps=get("generation_tps"), own_ttft=get("ttft"), own_peak_memory_gb=get("peak_memory"),
            missing_fields=[f for f in ("encode_time", "image_positions", "ttft", "prompt_tokens", "peak_memory")
                            if getattr(last, f, None) is None],
        )
        return res

    res = _best([measure() for _ in range(a.repeats)])
    res.update(load_time=load_time, memory_kind="mx.get_peak_memory")
    return res


def _mlx_vlm_compat(processor):
    """mlx-vlm 0.7.10's LLaVA processors forward the tokenizer's `padding` / `padding_side` kwargs to the
    image processor, which transformers >= 5.2x rejects (strict ImagesKwargs). Drop them there; nothing
    else about mlx-vlm is changed."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return
    call = ip.__call__

    class _Strip:
        def __init__(self, inner):
            self._inner = inner

        def __call__(self, *args, **kw):
            for k in ("padding", "padding_side", "add_special_tokens"):
                kw.pop(k, None)
            return self._inner(*args, **kw)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    processor.image_processor = _Strip(ip)


def worker_mlx_vlm(a) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_vlm import load, stream_generate

    t0 = time.perf_counter()
    model, processor = load(a.ckpt)
    mx.eval(model.parameters())
    load_time = time.perf_counter() - t0
    _mlx_vlm_compat(processor)
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    # EOS ignored: stream_generate stops only when tokenizer.stopping_criteria(token) is true
    tokenizer.stopping_criteria = lambda *args, **kwargs: False
    image_id = model.config.image_token_index
    probe = {}
    orig = model.get_input_embeddings

    def timed_embeddings(input_ids=None, pixel_values=None, **kw):
        t = time.perf_counter()
        out = orig(input_ids, pixel_values, **kw)
        mx.eval(out.inputs_embeds)
        probe["encode_time"] = time.perf_counter() - t
        ids = np.array(input_ids)
        probe["input_ids_len"] = int(ids.shape[-1])
        probe["image_tokens_in_ids"] = int((ids == image_id).sum())
        probe["prompt_positions"] = int(out.inputs_embeds.shape[1])
        probe["image_positions"] = int(out.inputs_embeds.shape[1] - (ids != image_id).sum())
        return out

    model.get_input_embeddings = timed_embeddings
    kw = dict(max_tokens=a.tokens, temperature=0.0, prefill_step_size=PREFILL_STEP_SIZE)
    for _ in stream_generate(model, processor, a.prompt, image=[a.warm_image], **{**kw, "max_tokens": 2}):
        pass
    def measure():
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        times, last = [], None
        for r in stream_generate(model, processor, a.prompt, image=[a.image], **kw):
            now = time.perf_counter()
            if r.token is None:
                continue
            if not times or r.generation_tokens > len(times):
                times.append(now)
            last = r
        peak = mx.get_peak_memory()
        res = _timeline_stats(times[0] - t0, times, t0)
        res.update(peak_memory=peak, own_prompt_tps=last.prompt_tps, own_decode_tps=last.generation_tps,
                   own_prompt_tokens=last.prompt_tokens, **probe)
        return res

    res = _best([measure() for _ in range(a.repeats)])
    res.update(load_time=load_time, memory_kind="mx.get_peak_memory")
    return res


def worker_transformers(a) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.generation.streamers import BaseStreamer
    from PIL import Image

    torch.set_num_threads(os.cpu_count() or 1)
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(a.ckpt, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(a.ckpt)
    load_time = time.perf_counter() - t0
    inner = getattr(model, "model", model)
    enc = {"t": 0.0, "start": None}
    inner.vision_tower.register_forward_pre_hook(lambda m, i: enc.__setitem__("start", time.perf_counter()))

    def proj_done(m, i, o):
        enc["t"] += time.perf_counter() - enc["start"]
    inner.multi_modal_projector.register_forward_hook(proj_done)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(image_path, n):
        img = Image.open(image_path).convert("RGB")
        t = time.perf_counter()
        inputs = processor(images=img, text=a.prompt, return_tensors="pt")
        clock = Clock()
        enc["t"] = 0.0
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                           pad_token_id=32001)
        return t, inputs, clock.times[1:]  # first put() is the prompt

    run(a.warm_image, 2)
    image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", IMAGE_TOKEN_ID)

    def measure():
        t0, inputs, times = run(a.image, a.tokens)
        ids = inputs["input_ids"][0]
        res = _timeline_stats(times[0] - t0, times, t0)
        res.update(encode_time=enc["t"], image_positions=int((ids == image_id).sum()),
                   prompt_positions=int(ids.shape[-1]))
        return res

    res = _best([measure() for _ in range(a.repeats)])
    res.update(load_time=load_time, peak_memory=_maxrss_bytes() - rss0,
               memory_kind="peak RSS - RSS before load", torch_threads=torch.get_num_threads())
    return res


def worker_roofline(a) -> dict:
    """Bandwidth of one plain matrix-vector product over `a.bytes` of weights, same backend and dtype."""
    import mlx.core as mx
    dt = getattr(mx, a.dtype)
    K = a.hidden
    rows = max(1, a.bytes // (K * DTYPE_BYTES[a.dtype]))
    W = (mx.random.normal((rows, K), key=mx.random.key(SEED)) * INIT_STD).astype(dt)
    x = mx.random.normal((1, K), key=mx.random.key(SEED + 1)).astype(dt)
    mx.eval(W, x)
    nbytes = rows * K * DTYPE_BYTES[a.dtype]
    best = {}
    forms = (("x @ W.T (nn.Linear)", lambda: x @ W.T), ("W @ x", lambda: W @ x[0]))
    for _round in range(3):  # interleaved rounds; keep each form's best round median
        for label, fn in forms:
            for _ in range(3):
                mx.eval(fn())
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                mx.eval(fn())
                ts.append(time.perf_counter() - t)
            ts.sort()
            best[label] = max(best.get(label, 0.0), nbytes / ts[len(ts) // 2])
    label = max(best, key=best.get)
    return dict(bandwidth=best[label], form=label, all=best, bytes=nbytes, rows=rows, cols=K)


WORKERS = {"llava-mlx": worker_llava_mlx, "mlx-vlm": worker_mlx_vlm, "transformers": worker_transformers,
           "roofline": worker_roofline}


def worker_main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("impl")
    p.add_argument("--ckpt")
    p.add_argument("--image")
    p.add_argument("--warm-image")
    p.add_argument("--prompt")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    p.add_argument("--dtype", default=DEFAULT_DTYPE)
    p.add_argument("--bytes", type=int, default=0)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    if a.repeats is None:
        a.repeats = 30 if a.impl == "roofline" else DEFAULT_REPEATS
    res = WORKERS[a.impl](a)
    print("RESULT " + json.dumps(res), flush=True)


def run_worker(args: list, timeout: float = 3600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": " | ".join(tail)[-600:] or f"exit code {proc.returncode}", "wall": wall}


# ----------------------------------------------------------------------------- report
def machine_info() -> dict:
    import mlx.core as mx
    cpu = platform.processor() or platform.machine()
    if sys.platform == "darwin":
        cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip() or cpu
    elif Path("/proc/cpuinfo").exists():
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    metal = mx.metal.is_available()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    vers = {}
    import importlib.metadata as md
    for pkg in ("mlx", "mlx-lm", "mlx-vlm", "torch", "transformers", "llava-mlx"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    return dict(cpu=cpu, cores=os.cpu_count(), os=platform.platform(), python=platform.python_version(),
                mlx=mx.__version__, backend="metal" if metal else "cpu", device=str(mx.default_device()),
                memory=mem, versions=vers)


def fmt(x, spec=".2f", unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:{spec}}{unit}"


def mb(x):
    return "–" if x is None else f"{x / 2**20:,.0f} MB"


def write_report(out: Path, info: dict, settings: dict, results: dict, roof: dict, cases_meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    L = []
    L.append("# Benchmarks\n")
    L.append(f"Generated by `{settings['command']}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    L.append("| | |\n|---|---|")
    L.append(f"| Machine | {info['cpu']}, {info['cores']} cores"
             + (f", {info['memory'] / 2**30:.0f} GiB RAM" if info.get("memory") else "") + " |")
    L.append(f"| OS | {info['os']} (Python {info['python']}) |")
    L.append(f"| MLX | {info['mlx']}, backend **{info['backend']}** (`{info['device']}`) |")
    L.append("| Versions | " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v) + " |")
    L.append(f"| Checkpoints | synthetic, random weights (seed {SEED}), llava-hf layout, shape **{settings['shape']}**, "
             f"dtype **{settings['dtype']}** (transformers runs float32) |")
    L.append(f"| Generation | greedy, {settings['tokens']} new tokens, EOS ignored, prefill step {PREFILL_STEP_SIZE}; "
             f"one warm-up run on a different image of the same size, then best of {settings['repeats']} measured runs; "
             "each implementation in its own process |")
    L.append("")
    if info["backend"] == "cpu":
        L.append("> **Note.** This run used MLX's **CPU backend** (Linux). It is far slower than MLX on a Mac's GPU "
                 "(Metal), and half precision has no fast path there, so the `small` shape in float32 is what runs "
                 "here. The `small` shape keeps the real token counts (336-pixel crops, 576 features a crop, the "
                 "LLaVA-1.6 grid pinpoints, CLIP image size 336 / patch 14) with narrow, shallow layers; "
                 "absolute numbers say little about a real 7B model on Apple silicon — rerun "
                 "`python bench.py --shape 7b --dtype float16` there.\n")
    if "mlx-vlm" in settings["impls"]:
        L.append("> **How mlx-vlm is run.** Through its Python API (`mlx_vlm.load`, `mlx_vlm.stream_generate`), "
                 "with three harness-side changes and nothing else: EOS is ignored by replacing "
                 "`tokenizer.stopping_criteria` with a function that never stops; `model.get_input_embeddings` is "
                 "wrapped to time it (with an `mx.eval` of its output) and to count the positions the language model "
                 "receives; and the `padding` / `padding_side` keyword arguments its LLaVA processors forward to the "
                 "image processor are dropped, because transformers 5.2x rejects them (mlx-vlm 0.7.10 cannot "
                 "preprocess a LLaVA image with transformers 5.23 otherwise).\n")
    if settings["shape"] == "small":
        L.append("> **Decode at the small shape** reads only a few tens of MB of weights per token, so it is bound by "
                 "fixed per-token costs (graph construction, sampling over 32064 logits, Python) rather than by "
                 "memory bandwidth; every implementation sits far below the roofline here. The roofline target is "
                 "meaningful at `--shape 7b`.\n")
    for case in CASES:
        meta = cases_meta[case.family]
        L.append(f"## {case.name}\n")
        t, v = meta["cfg"]["text_config"], meta["cfg"]["vision_config"]
        L.append(f"Language model: {t['model_type']}, hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, "
                 f"{t['num_attention_heads']} heads / {t['num_key_value_heads']} KV heads, intermediate "
                 f"{t['intermediate_size']}, vocab {t['vocab_size']}. Vision: CLIP hidden {v['hidden_size']}, "
                 f"{v['num_hidden_layers']} layers, image {v['image_size']}, patch {v['patch_size']}. "
                 f"Weights {mb(meta['weight_bytes'])}; decoder bytes read per token {mb(meta['decode_bytes'])}. "
                 f"Prompt: `{case.prompt!r}`. The original LLaVA code gives **{case.reference_positions}** image "
                 "positions for this image.\n")
        L.append("| implementation | load s | encode s | TTFT s | prompt tok/s | decode tok/s | % roofline | peak memory | image positions | LM prompt length |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rf = roof.get(case.family, {})
        bw = rf.get("bandwidth")
        notes = []
        for impl in settings["impls"]:
            r = results.get((case.family, impl))
            if r is None:
                continue
            if "error" in r:
                L.append(f"| {impl} | cannot run this case: {r['error'][:300].replace('|', '/')} ||||||||| ")
                continue
            pp = r.get("prompt_positions")
            enc = r.get("encode_time")
            ptps = (pp / (r["ttft"] - enc)) if (pp and enc is not None and r["ttft"] > enc) else None
            r["prompt_tps"] = ptps
            roofp = (100 * r["decode_tps"] * meta["decode_bytes"] / bw) if bw else None
            if impl == "transformers":
                roofp_s = fmt(roofp, ".0f", "%") + "†"
            else:
                roofp_s = fmt(roofp, ".0f", "%")
            r["roofline_pct"] = roofp
            ip = r.get("image_positions")
            ip_s = str(ip) if ip is not None else "–"
            if ip is not None and ip != case.reference_positions:
                ip_s += f" (≠ {case.reference_positions})"
                notes.append(f"{impl} gives {ip} image positions where the original LLaVA gives {case.reference_positions}.")
            mem_s = mb(r.get("peak_memory")) + (" (RSS)" if r.get("memory_kind", "").startswith("peak RSS") else "")
            L.append(f"| {impl} | {fmt(r.get('load_time'))} | {fmt(enc, '.3f')} | {fmt(r['ttft'], '.3f')} | "
                     f"{fmt(ptps, ',.0f')} | {fmt(r['decode_tps'], '.1f')} | {roofp_s} | {mem_s} | {ip_s} | {pp if pp is not None else '–'} |")
        L.append("")
        if bw:
            L.append(f"Roofline: MLX {info['backend']} reaches {bw / 1e9:.1f} GB/s on a plain matrix-vector product "
                     f"({rf['form']}, {rf['rows']}×{rf['cols']} {settings['dtype']}, {mb(rf['bytes'])}); "
                     f"decode at 100% of roofline would be {bw / meta['decode_bytes']:.1f} tok/s. "
                     "† transformers runs PyTorch float32, not MLX: its % is against the same MLX figure.\n")
        ours = results.get((case.family, "llava-mlx"))
        ratio_rows = []
        if ours and "error" not in ours:
            for peer in settings["impls"]:
                if peer == "llava-mlx":
                    continue
                r = results.get((case.family, peer))
                if not r or "error" in r:
                    ratio_rows.append(f"| llava-mlx vs {peer} | peer cannot run this case ||||")
                    continue
                sp = ours["decode_tps"] / r["decode_tps"] if r.get("decode_tps") else None
                tt = r["ttft"] / ours["ttft"] if ours.get("ttft") else None
                en = (r["encode_time"] / ours["encode_time"]) if (r.get("encode_time") and ours.get("encode_time")) else None
                me = (ours["peak_memory"] / r["peak_memory"]) if (r.get("peak_memory") and ours.get("peak_memory")) else None
                ratio_rows.append(f"| llava-mlx vs {peer} | {fmt(sp, '.2f', '×')} | {fmt(tt, '.2f', '×')} | "
                                  f"{fmt(en, '.2f', '×')} | {fmt(me, '.2f', '×')} |")
        if ratio_rows:
            L.append("| ratio | decode speed-up | TTFT speed-up | encode speed-up | peak memory (ours / theirs) |")
            L.append("|---|---:|---:|---:|---:|")
            L += ratio_rows
            L.append("")
        if notes:
            L.append("Image positions: " + " ".join(notes) + " (transformers rounds the unpadded size and reads "
                     "pinpoints as (height, width); mlx-vlm's LLaVA-NeXT model does not unpad at all: it appends a "
                     "newline block per crop. The language model therefore sees a different sequence, which changes "
                     "its prompt cost.)\n")
    # targets
    L.append("## Targets\n")
    L.append("| target | measured | pass | margin |")
    L.append("|---|---:|:---:|---:|")
    for line in settings["targets"]:
        L.append(line)
    L.append("")
    L.append("Definitions: *TTFT* is wall time from the generate call (image preprocessing included) to the first token. "
             "*encode* is the vision tower + projector (mlx-vlm: its `get_input_embeddings`, which also merges the "
             "embeddings; ours: its own `encode_time`). *prompt tok/s* = LM prompt positions ÷ (TTFT − encode). "
             "*decode tok/s* = (N − 1) ÷ (time of token N − time of token 1). *peak memory*: MLX's "
             "`mx.get_peak_memory()` after `mx.reset_peak_memory()` (weights are resident, so they count); for "
             "transformers, peak RSS minus RSS before loading. *% roofline* = decode tok/s × decoder bytes per "
             "token ÷ matrix-vector bandwidth.\n")
    L.append("![benchmark chart](benchmark.png)\n")
    (out / "benchmarks.md").write_text("\n".join(L))
    (out / "benchmarks.json").write_text(json.dumps({
        "machine": info, "settings": {k: v for k, v in settings.items() if k != "targets"},
        "roofline": roof, "results": {f"{c}|{i}": r for (c, i), r in results.items()}}, indent=1, default=str))


def write_chart(out: Path, info: dict, settings: dict, results: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = settings["impls"]
    colors = {"llava-mlx": "#1f77b4", "mlx-vlm": "#ff7f0e", "transformers": "#2ca02c"}
    metrics = [("decode_tps", "decode tok/s (higher is better)", 1),
               ("ttft", "time to first token, s (lower is better)", 1),
               ("peak_memory", "peak memory, MB (lower is better)", 1 / 2**20)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / max(1, len(impls))
    for ax, (key, title, scale) in zip(axes, metrics):
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(CASES):
                r = results.get((case.family, impl))
                if r and "error" not in r and r.get(key) is not None:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r[key] * scale)
            bars = ax.bar(xs, ys, width, label=impl, color=colors.get(impl))
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.3g}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(CASES)))
        ax.set_xticklabels([c.family + ("\n1000×600" if c.family == "llava-1.6" else "\n1 image") for c in CASES])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"llava-mlx benchmark — shape {settings['shape']}, {settings['dtype']}, MLX {info['mlx']} "
                 f"({info['backend']}) — {info['cpu']}, {info['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "benchmark.png", dpi=110)
    plt.close(fig)


def evaluate_targets(settings, results, roof, cases_meta):
    lines = []
    pr = []

    def add(name, measured, ok, margin):
        mark = "✅" if ok else ("❌" if ok is not None else "n/a")
        lines.append(f"| {name} | {measured} | {mark} | {margin} |")
        pr.append(f"[{'PASS' if ok else ('FAIL' if ok is not None else 'N/A ')}] {name}: {measured} ({margin})")

    for case in [c for c in CASES if c.family in cases_meta]:  # the cases this run measured
        ours = results.get((case.family, "llava-mlx"))
        vlm = results.get((case.family, "mlx-vlm"))
        ok_ours = ours is not None and "error" not in ours
        ok_vlm = vlm is not None and "error" not in vlm
        meta = cases_meta[case.family]
        if ok_ours and ok_vlm:
            s = ours["decode_tps"] / vlm["decode_tps"]
            add(f"{case.family}: decode ≥ 1.25× mlx-vlm", f"{s:.2f}×", s >= 1.25, f"{100 * (s / 1.25 - 1):+.0f}% vs 1.25×")
        else:
            add(f"{case.family}: decode ≥ 1.25× mlx-vlm", "–", None, "ours or mlx-vlm did not run")
        bw = roof.get(case.family, {}).get("bandwidth")
        if ok_ours and bw:
            p = ours["decode_tps"] * meta["decode_bytes"] / bw
            add(f"{case.family}: decode ≥ 90% of roofline", f"{100 * p:.0f}%", p >= 0.9, f"{100 * (p - 0.9):+.0f} points")
        if case.family == "llava-1.6":
            if ok_ours and ok_vlm:
                s = vlm["ttft"] / ours["ttft"]
                add(f"{case.family} 1000×600: TTFT ≥ 2× faster than mlx-vlm", f"{s:.2f}×", s >= 2.0,
                    f"{100 * (s / 2 - 1):+.0f}% vs 2×")
            else:
                add(f"{case.family} 1000×600: TTFT ≥ 2× faster than mlx-vlm", "–", None, "ours or mlx-vlm did not run")
        if ok_ours and ours.get("peak_memory"):
            L = (ours.get("prompt_positions") or 0) + settings["tokens"]
            base = meta["weight_bytes"] + kv_cache_bytes(meta["cfg"], settings["dtype"], L)
            budget = base + max(0.10 * base, 64 * 2**20)
            add(f"{case.family}: peak memory ≤ weights + KV + max(10%, 64 MB)",
                f"{mb(ours['peak_memory'])} ≤ {mb(budget)}", ours["peak_memory"] <= budget,
                f"{(budget - ours['peak_memory']) / 2**20:+,.0f} MB headroom "
                f"(weights {mb(meta['weight_bytes'])}, KV {mb(base - meta['weight_bytes'])} for {L} positions)")
    return lines, pr


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=DEFAULT_DTYPE)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="new tokens per run (EOS ignored)")
    p.add_argument("--peers", default=DEFAULT_PEERS, help="comma-separated: mlx-vlm,transformers (or 'none')")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for benchmarks.md / benchmark.png")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="measured runs per case (best of)")
    p.add_argument("--cases", default="llava-1.5,llava-1.6")
    p.add_argument("--no-ours", action="store_true", help="skip llava-mlx (peers only)")
    p.add_argument("--keep", default=None, help="build checkpoints here and keep them (default: temp dir)")
    p.add_argument("--build-only", action="store_true", help="only build the checkpoints (use with --keep)")
    p.add_argument("--dry-run", action="store_true", help="print shapes and sizes, write nothing")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker_main(argv[1:])
    a = parse_args(argv)
    peers = [] if a.peers in ("", "none") else [p.strip() for p in a.peers.split(",") if p.strip()]
    impls = ([] if a.no_ours else ["llava-mlx"]) + [p for p in IMPLS[1:] if p in peers]
    families = [f.strip() for f in a.cases.split(",")]
    cases = [c for c in CASES if c.family in families]
    cases_meta = {}
    for c in cases:
        cfg = model_config(c.family, a.shape, a.dtype)
        cases_meta[c.family] = dict(cfg=cfg, weight_bytes=weight_bytes(cfg, a.dtype),
                                    decode_bytes=decode_bytes_per_token(cfg, a.dtype))
        print(f"{c.family}: {len(tensor_specs(cfg))} tensors, weights {mb(cases_meta[c.family]['weight_bytes'])}, "
              f"decoder bytes/token {mb(cases_meta[c.family]['decode_bytes'])}", flush=True)
    if a.dry_run:
        return
    if a.shape == "7b" and a.dtype == "float32":
        print("warning: 7b in float32 needs ~28 GB per checkpoint", flush=True)

    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="llava-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        tok_dir = None
        ckpts = {}
        for c in cases:
            d = tmp / f"{c.family}-{a.shape}-{a.dtype}"
            if not (d / "config.json").exists() or not any(d.glob("*.safetensors")):
                build_checkpoint(c.family, a.shape, a.dtype, d, tokenizer_src=tok_dir)
            tok_dir = tok_dir or d
            ckpts[c.family] = d
        print(f"checkpoints built in {time.perf_counter() - t:.1f}s under {tmp}", flush=True)
        if a.build_only:
            return
        images = {}
        for i, c in enumerate(cases):
            images[c.family] = (str(make_image(c.image_size, 100 + i, tmp / f"{c.family}.png")),
                                str(make_image(c.image_size, 200 + i, tmp / f"{c.family}-warm.png")))
        roof = {}
        for c in cases:
            meta = cases_meta[c.family]
            r = run_worker(["roofline", "--dtype", a.dtype, "--bytes", str(meta["decode_bytes"]),
                            "--hidden", str(meta["cfg"]["text_config"]["hidden_size"])])
            roof[c.family] = r
            print(f"roofline {c.family}: {r.get('bandwidth', 0) / 1e9:.2f} GB/s ({r.get('form', r.get('error'))})", flush=True)
        results = {}
        for c in cases:
            for impl in impls:
                print(f"running {impl} on {c.name} ...", flush=True)
                r = run_worker([impl, "--ckpt", str(ckpts[c.family]), "--image", images[c.family][0],
                                "--warm-image", images[c.family][1], "--prompt", c.prompt,
                                "--tokens", str(a.tokens), "--dtype", a.dtype, "--repeats", str(a.repeats)])
                results[(c.family, impl)] = r
                if "error" in r:
                    print(f"  {impl}: ERROR {r['error']}", flush=True)
                else:
                    print(f"  {impl}: load {r['load_time']:.2f}s encode {fmt(r.get('encode_time'), '.3f')}s "
                          f"ttft {r['ttft']:.3f}s decode {r['decode_tps']:.1f} tok/s peak {mb(r.get('peak_memory'))} "
                          f"image positions {r.get('image_positions')} (wall {r['wall']:.0f}s)", flush=True)
        info = machine_info()
        settings = dict(shape=a.shape, dtype=a.dtype, tokens=a.tokens, impls=impls, repeats=a.repeats,
                        command="python bench.py " + " ".join(argv))
        targets, printable = evaluate_targets(settings, results, roof, cases_meta)
        settings["targets"] = targets
        out = Path(a.out)
        _cases_backup = CASES[:]
        CASES[:] = cases
        try:
            write_report(out, info, settings, results, roof, cases_meta)
            write_chart(out, info, settings, results)
        finally:
            CASES[:] = _cases_backup
        print("\n".join(printable))
        print(f"wrote {out / 'benchmarks.md'} and {out / 'benchmark.png'}")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
