"""Build tiny checkpoints with the LLaVA-NeXT code's own classes, and run that code on them.

Executed by its virtual environment (.venv-next, scripts/setup_reference.sh), never imported by
the tests:

    .venv-next/bin/python tests/reference/run_next.py build OUT_DIR QWEN_TOK LLAMA3_TOK SP_TOK
    .venv-next/bin/python tests/reference/run_next.py run JOBS.json OUT_DIR

`build` writes the released towers' geometry with tiny widths into a Hugging Face cache,
OUT_DIR/hf-home, under the ids the releases name: SigLIP so400m (384 / 14, the code's
SigLipVisionModel; the code takes a SigLIP tower only by a name that is not a local path: any
existing path is built as CLIP) and CLIP ViT-L/14-336 (336 / 14, with its image processor).
Then the MODELS, each saved by the code's own class (save_pretrained; the tower named by
mm_vision_tower, its weights inside), with the tokenizer directory given for it, and the
VARIANTS: the same weights with other settings. Run the code, and load ours, with
HF_HOME=OUT_DIR/hf-home and HF_HUB_OFFLINE=1.

`run` takes jobs {"name", "checkpoint", "images": [paths], "prompt": "raw text with <image>",
"new_tokens", optionally "model_name": the builder's argument} (or, instead of "prompt",
"turns": [[question, answer or null], ...] and "conv_mode": the prompt conversation.py builds,
one "<image>\n" per image before the first question, as the code's demos do) and writes
OUT_DIR/<name>.npz: prompt, input_ids (-200 at each image), image_sizes, pixel_values_<i> (the
process_images output of image i), image_token_counts (positions each image takes, merged
alone), logits (L, len(tokenizer)) of the whole merged sequence, greedy (argmax continuation
with the KV cache, no EOS stop).

Loading is the code's own `load_pretrained_model`, with two things worked around here, never
in the code: float32 is not one of its dtypes (it stops at a pdb.set_trace(), made a no-op
here; the checkpoint's own float32 then loads), and a device_map other than "auto" moves the
tower to CUDA ("auto" on a machine without one is the CPU).
"""

import json
import os
import pathlib
import shutil
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_grad_enabled(False)

OV_PINPOINTS = ",".join(f"({i}x{j})" for i in range(1, 7) for j in range(1, 7))
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llama3-llava-next-8b's
SIGLIP = "google/siglip-so400m-patch14-384"
CLIP = "openai/clip-vit-large-patch14-336"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
MM_FIELDS = dict(
    mm_projector_type="mlp2x_gelu",
    mm_hidden_size=64,
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    mm_use_im_start_end=False,
    mm_use_im_patch_token=False,
    tie_word_embeddings=False,
)
# Each checkpoint: (its class in the code, its tokenizer's argument to `build`, fields), as
# released: OneVision's originals (Qwen2 + SigLIP, anyres_max_9 over the pinpoint string),
# lmms-lab/llama3-llava-next-8b (Llama-3 + CLIP ViT-L/14-336, anyres over the 1.6 pinpoints), and
# the code's Mistral and Mixtral classes in the same CLIP anyres setting.
CLIP_ANYRES = dict(
    mm_vision_tower=CLIP, image_aspect_ratio="anyres", image_grid_pinpoints=NEXT_PINPOINTS,
    mm_patch_merge_type="spatial_unpad",
)  # fmt: skip
MODELS = {
    "next-qwen": ("llava_qwen.LlavaQwenForCausalLM", "qwen", dict(
        architectures=["LlavaQwenForCausalLM"], max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, mm_vision_tower=SIGLIP, image_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=OV_PINPOINTS, mm_patch_merge_type="spatial_unpad", mm_newline_position="grid",
        mm_spatial_pool_mode="bilinear", mm_spatial_pool_stride=2, tokenizer_model_max_length=32768,
        bos_token_id=None, eos_token="<|im_end|>", pad_rows=8,  # as Qwen2's 151936 > len(tokenizer)
    )),
    # OneVision as its fine-tuning starts: the tokenizer with Qwen2's id layout ("\n" is 198, which
    # the code's preprocess_qwen assumes), its additional special tokens <|im_start|> and <|im_end|>
    "next-qwen-ov": ("llava_qwen.LlavaQwenForCausalLM", "qwen2", dict(
        architectures=["LlavaQwenForCausalLM"], max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, mm_vision_tower=SIGLIP, image_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=OV_PINPOINTS, mm_patch_merge_type="spatial_unpad", mm_newline_position="grid",
        mm_spatial_pool_mode="bilinear", mm_spatial_pool_stride=2, tokenizer_model_max_length=32768,
        bos_token_id=None, eos_token="<|im_end|>", pad_rows=8,
    )),
    "next-llama": ("llava_llama.LlavaLlamaForCausalLM", "llama3", dict(
        architectures=["LlavaLlamaForCausalLM"], max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tokenizer_model_max_length=8192, bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", **CLIP_ANYRES,
    )),
    "next-mistral": ("llava_mistral.LlavaMistralForCausalLM", "sentencepiece", dict(
        architectures=["LlavaMistralForCausalLM"], max_position_embeddings=32768, rope_theta=1000000.0,
        sliding_window=None, tokenizer_model_max_length=4096, bos_token_id=1, eos_token_id=2, **CLIP_ANYRES,
    )),
    "next-mixtral": ("llava_mixtral.LlavaMixtralForCausalLM", "sentencepiece", dict(
        architectures=["LlavaMixtralForCausalLM"], max_position_embeddings=32768, rope_theta=1000000.0,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tokenizer_model_max_length=4096,
        bos_token_id=1, eos_token_id=2, **CLIP_ANYRES,
    )),
}  # fmt: skip
# The same weights with other settings: each newline position and each pooling mode once
# (LLaVA-Video-7B-Qwen2: grid + bilinear; the OneVision originals: one_token + bilinear), the
# code's other merges, its 'pad' with another tower layer and the class token, and videos on
# the CLIP checkpoint.
VARIANTS = {
    "next-qwen-frame-average": ("next-qwen", {"mm_newline_position": "frame", "mm_spatial_pool_mode": "average"}),
    "next-qwen-onetoken-max": ("next-qwen", {"mm_newline_position": "one_token", "mm_spatial_pool_mode": "max"}),
    "next-qwen-notoken-bilinear": (
        "next-qwen", {"mm_newline_position": "no_token", "mm_spatial_pool_mode": "bilinear"}
    ),
    "next-llama-maxpool": ("next-llama", {"mm_patch_merge_type": "spatial_maxpool2x2"}),
    "next-llama-nobase": ("next-llama", {"mm_patch_merge_type": "spatial_unpad_nobase"}),
    "next-llama-pad": ("next-llama", {
        "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "mm_vision_select_layer": -1,
        "mm_vision_select_feature": "cls_patch",
    }),
    "next-llama-video": ("next-llama", {"mm_spatial_pool_mode": "average", "mm_newline_position": "frame"}),
}  # fmt: skip
SNAPSHOT = "0" * 40
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
)  # fmt: skip


def hub_snapshot(hf_home: pathlib.Path, repo: str) -> pathlib.Path:
    """The snapshot directory of `repo` in a Hugging Face cache (its refs/main pointing at it)."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    snapshot = root / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def build_towers(hf_home: pathlib.Path):
    """The released towers' geometry with tiny widths, in the cache under their hub ids: SigLIP
    so400m (384 / 14) as the code's SigLipVisionModel saves it, CLIP ViT-L/14-336 as the whole
    CLIPModel the hub holds (its text half unused) with its image processor."""
    from llava.model.multimodal_encoder.siglip_encoder import SigLipVisionConfig, SigLipVisionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3)
    siglip = SigLipVisionConfig(**tiny, image_size=384, patch_size=14)
    SigLipVisionModel(siglip).save_pretrained(str(hub_snapshot(hf_home, SIGLIP)))
    clip = CLIPConfig(
        text_config=dict(tiny, vocab_size=100, max_position_embeddings=16),
        vision_config=dict(tiny, image_size=336, patch_size=14),
        projection_dim=32,
    )
    snapshot = hub_snapshot(hf_home, CLIP)
    CLIPModel(clip).save_pretrained(str(snapshot), safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD, resample=3,
    ).save_pretrained(str(snapshot))  # fmt: skip


def build_model(out: pathlib.Path, name: str, tokenizer_dir: pathlib.Path):
    """One checkpoint of MODELS, saved by its class (the tower loaded from the cache inside it)."""
    import importlib

    from transformers import AutoTokenizer

    path, _, fields = MODELS[name]
    module, cls = path.rsplit(".", 1)
    model_class = getattr(importlib.import_module(f"llava.model.language_model.{module}"), cls)
    checkpoint = out / name
    checkpoint.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).exists():
            shutil.copyfile(tokenizer_dir / file, checkpoint / file)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    fields = dict(fields)
    ids = {f"{k}_id": tokenizer.convert_tokens_to_ids(fields.pop(k)) for k in ("bos_token", "eos_token") if k in fields}
    config = model_class.config_class(
        vocab_size=len(tokenizer) + fields.pop("pad_rows", 0), **TINY_TEXT, **MM_FIELDS, **fields, **ids
    )
    torch.manual_seed(1)
    model = model_class(config)
    for param_name, p in model.named_parameters():  # spread the logits: default inits give near-ties
        if "vision_tower" in param_name:
            continue
        if p.ndim >= 2:
            p.normal_(0.0, 0.15)
        elif param_name.endswith("image_newline"):
            p.normal_(0.0, 1.0)
    model.save_pretrained(str(checkpoint), safe_serialization=True)


def build(out: pathlib.Path, tokenizers: dict):
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HOME"] = str(out / "hf-home")
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_CACHE = str(out / "hf-home" / "hub")  # read at import: set for this process too
    build_towers(out / "hf-home")
    for name in MODELS:
        if MODELS[name][1] in tokenizers:
            build_model(out, name, tokenizers[MODELS[name][1]])
    for name, (base, fields) in VARIANTS.items():  # the same weights, other settings
        variant = out / name
        variant.mkdir(exist_ok=True)
        for item in (out / base).iterdir():
            if item.name != "config.json":
                os.link(item, variant / item.name)
        config_json = json.loads((out / base / "config.json").read_text())
        (variant / "config.json").write_text(json.dumps({**config_json, **fields}, indent=2))
    print(out)


def load(checkpoint: str, model_name: str = None):
    import pdb

    import llava.model.builder as builder

    pdb.set_trace = lambda *a, **k: None  # the builder's answer to torch_dtype="float32"
    # the builder picks the class by name: the job's model_name (as a release's directory name
    # would give it), else the checkpoint's model_type
    model_type = json.loads((pathlib.Path(checkpoint) / "config.json").read_text())["model_type"]
    tokenizer, model, image_processor, _ = builder.load_pretrained_model(
        checkpoint, None, model_name or model_type, device_map="auto", torch_dtype="float32",
        attn_implementation="eager",
    )  # fmt: skip
    model.eval()
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype
    return tokenizer, model, image_processor


def conversation(job: dict, images: int, tokenizer) -> str:
    from llava.conversation import conv_templates

    conv = conv_templates[job["conv_mode"]].copy()
    if job["conv_mode"] == "llava_llama_3":  # it renders with Meta-Llama-3-8B-Instruct's tokenizer, from the
        conv.tokenizer = tokenizer  # hub: the checkpoint's copy of it, whose chat template is that one
    for i, (question, answer) in enumerate(job["turns"]):
        conv.append_message(conv.roles[0], ("<image>\n" * images if i == 0 else "") + question)
        conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def answer(tokenizer, model, prompt: str, pixels: list, modalities: list, sizes: list, new_tokens: int) -> dict:
    """The code's merged sequence for `prompt` and its media: token ids, the logits of the whole
    sequence, the greedy continuation, and the positions each medium takes (merged alone)."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]

    def merged(ids, media, kinds, media_sizes):
        embeds = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, media, kinds, media_sizes)[4]
        return model.get_model().embed_tokens(ids) if embeds is None else embeds

    result = model(inputs_embeds=merged(input_ids, pixels or None, modalities, sizes), use_cache=True)
    logits, cache = result.logits[0], result.past_key_values
    greedy, token = [], int(logits[-1].argmax())
    for _ in range(new_tokens):
        greedy.append(token)
        step = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, token = step.past_key_values, int(step.logits[0, -1].argmax())
    after = torch.tensor([[IMAGE_TOKEN_INDEX, int(input_ids[0, -1])]])  # a medium alone, then one token
    counts = [merged(after, [p], [kind], [size]).shape[1] - 1 for p, kind, size in zip(pixels, modalities, sizes)]
    return {
        "prompt": np.array(prompt),
        "input_ids": input_ids[0].numpy().astype(np.int64),
        "image_sizes": np.array(sizes, dtype=np.int64).reshape(-1, 2),
        "image_token_counts": np.array(counts, dtype=np.int64),
        "logits": logits.float().numpy(),
        "greedy": np.array(greedy, dtype=np.int64),
        "vocabulary": np.array(len(tokenizer)),
        **{f"pixel_values_{i}": p.reshape(-1, *p.shape[-3:]).float().numpy() for i, p in enumerate(pixels)},
    }


def run(jobs_file: pathlib.Path, out: pathlib.Path):
    from llava.mm_utils import process_images
    from PIL import Image

    jobs = json.loads(jobs_file.read_text())
    models = {}
    for job in jobs:
        if job["checkpoint"] not in models:
            models[job["checkpoint"]] = load(job["checkpoint"], job.get("model_name"))
        tokenizer, model, image_processor = models[job["checkpoint"]]
        new_tokens = int(job.get("new_tokens", 16))
        images = [Image.open(p).convert("RGB") for p in job.get("images", [])]
        media = len(images) + (1 if job.get("video_frames") else 0)
        prompt = job["prompt"] if "prompt" in job else conversation(job, media, tokenizer)
        config = model.config
        if job.get("image_aspect_ratio"):  # several images padded to one crop each, as the OneVision tutorial
            config = types.SimpleNamespace(**{**config.to_dict(), "image_aspect_ratio": job["image_aspect_ratio"]})
        pixels = process_images(images, image_processor, config) if images else []
        pixels, kinds, sizes = (
            [pixels[i] for i in range(len(images))],
            ["image"] * len(images),
            [im.size for im in images],
        )
        if job.get("video_frames"):  # uint8 (T, H, W, 3), sampled by the test; as the code's demos do,
            frames = np.load(job["video_frames"])  # after the images, through the image processor
            pixels.append(image_processor.preprocess(list(frames), return_tensors="pt")["pixel_values"])
            kinds.append("video")
            sizes.append((frames.shape[2], frames.shape[1]))
        record = answer(tokenizer, model, prompt, pixels, kinds, sizes, new_tokens)
        np.savez(out / f"{job['name']}.npz", **record)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "build":  # OUT_DIR QWEN_TOKENIZER LLAMA3_TOKENIZER SENTENCEPIECE_TOKENIZER [QWEN2_TOKENIZER]
        kinds = ("qwen", "llama3", "sentencepiece", "qwen2")
        build(pathlib.Path(args[0]), dict(zip(kinds, map(pathlib.Path, args[1:]))))
    elif command == "run":
        run(pathlib.Path(args[0]), pathlib.Path(args[1]))
    else:
        sys.exit(f"unknown command {command!r}: build or run")
