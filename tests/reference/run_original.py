"""Run the ORIGINAL LLaVA code (llava-torch 1.2.2.post1 + transformers 4.37.2) on tiny fixtures.

Executed by the reference venv (scripts/setup_reference.sh), never imported by the tests:

    .venv-orig/bin/python tests/reference/run_original.py JOBS.json OUT_DIR

JOBS.json: a list of jobs (or {"jobs": [...]}), each
    {"name": "v16_wide",                     # output file OUT_DIR/<name>.npz
     "checkpoint": "/abs/orig-v1.6-vicuna",  # an orig-* fixture dir
     "images": ["/abs/wide_1000x600.png"],
     "question": "What is in the image?", "conv_mode": "llava_v1",   # llava_v1 | mistral_instruct | chatml_direct
       # or "turns": [[question, answer], ..., [question, null]] (cli.py: the images before the first)
       # or instead: "prompt": "raw text with <image> placeholders"
     "new_tokens": 16,
     "model_base": "/abs/base-vicuna",       # optional: the base of a LoRA or projector-only checkpoint
     "apply_delta": true}                    # optional, with model_base: `checkpoint` holds delta weights,
                                             # applied by llava/model/apply_delta.py into OUT_DIR/<name>-target
With "question", the prompt is built as llava/eval/run_llava.py does: "<image>\n" + question (one
"<image>\n" per image when there are several; "<im_start><image><im_end>\n" when the model's config
says mm_use_im_start_end), conv.append_message(USER, qs), conv.append_message(ASSISTANT, None),
conv.get_prompt().

Per job, OUT_DIR/<name>.npz holds:
    prompt              str (the text given to tokenizer_image_token)
    input_ids           int64 (T,), with -200 where each image goes
    image_token_counts  int64 (n_images,), feature rows each image contributes
    num_crops           int64 (n_images,), pixel crops per image (1 for 'pad'; 1 + tiles for anyres)
    image_sizes         int64 (n_images, 2), (width, height) as given to the model
    pixel_values_<i>    float32 (num_crops, 3, 336, 336), the process_images output of image i
    inputs_embeds       float32 (L, hidden), the merged sequence from prepare_inputs_labels_for_multimodal
    logits              float32 (L, vocab), the forward pass over the merged sequence
    greedy              int64 (new_tokens,), greedy argmax continuation (no EOS stop, KV cache)
    greedy_gaps         float32 (new_tokens,), top1 - top2 logit at each greedy step (near-tie check)
Loading: llava.model.builder.load_pretrained_model itself, run with float32 in place of its
hard-coded float16 (a thin proxy for the builder's `torch` module), device 'cpu', and a model_name
'llava-<dirname>' so that the builder's name checks ('llava' / 'mistral' in the name) pick the
LLaVA classes as they do for liuhaotian/llava-v1.6-mistral-7b etc. Each checkpoint is loaded once.
"""

import json
import os
import pathlib
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings

import llava.model.builder as builder
import numpy as np
import torch
from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from PIL import Image

torch.set_grad_enabled(False)
# llava's delayed CLIP load inside from_pretrained(low_cpu_mem_usage) prints one of these per tensor;
# the shipped tower weights then load over it (as with the real 1.6 checkpoints).
warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")


class _Float32Torch(types.ModuleType):
    """`torch` as seen by llava/model/builder.py, with float16 meaning float32."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        if name == "float16":
            return torch.float32
        return getattr(torch, name)


_MODELS = {}


def _float32(module, fn, *args, **kwargs):
    """fn(*args, **kwargs) with `module.torch` seeing float16 as float32."""
    saved = module.torch
    module.torch = _Float32Torch()
    try:
        return fn(*args, **kwargs)
    finally:
        module.torch = saved


def load(checkpoint, model_base=None):
    """The builder's model; with model_base its LoRA ('lora' in the name) or projector-only path."""
    checkpoint = str(pathlib.Path(checkpoint).resolve())
    key = (checkpoint, model_base)
    if key not in _MODELS:
        name = "llava-" + os.path.basename(checkpoint.rstrip("/"))
        tokenizer, model, image_processor, _ = _float32(
            builder, builder.load_pretrained_model, checkpoint, model_base, name, device_map="cpu", device="cpu"
        )
        model.eval()
        for p in model.parameters():
            assert p.dtype == torch.float32, p.dtype
        _MODELS[key] = (tokenizer, model, image_processor)
    return _MODELS[key]


def build_prompt(turns, conv_mode, n_images, start_end):
    """run_llava.py's prompt (cli.py's for several turns: the images before the first question),
    `<im_start><image><im_end>` with mm_use_im_start_end as both write it."""
    image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if start_end else DEFAULT_IMAGE_TOKEN
    conv = conv_templates[conv_mode].copy()
    for i, (question, answer) in enumerate(turns):
        qs = (image + "\n") * max(n_images, 1) + question if i == 0 else question
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def _as_list(images_tensor, n):
    if isinstance(images_tensor, list):
        return [x.float() for x in images_tensor]
    t = images_tensor.float()
    return [t[i] for i in range(n)]


def run_job(job, out_dir):
    checkpoint, model_base = job["checkpoint"], job.get("model_base")
    if job.get("apply_delta"):
        import llava.model.apply_delta as apply_delta

        target = str(out_dir / f"{job['name']}-target")
        _float32(apply_delta, apply_delta.apply_delta, model_base, target, checkpoint)
        checkpoint, model_base = target, None
    tokenizer, model, image_processor = load(checkpoint, model_base)
    images = [Image.open(p).convert("RGB") for p in job["images"]]
    image_sizes = [im.size for im in images]
    if "prompt" in job:
        prompt = job["prompt"]
    else:
        turns = job.get("turns") or [[job["question"], None]]
        start_end = getattr(model.config, "mm_use_im_start_end", False)
        prompt = build_prompt(turns, job.get("conv_mode", "llava_v1"), len(images), start_end)
    new_tokens = int(job.get("new_tokens", 16))

    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    images_tensor = None
    per_image = []
    if images:
        images_tensor = process_images(images, image_processor, model.config)
        per_image = _as_list(images_tensor, len(images))
        if isinstance(images_tensor, list):
            images_tensor = [x.to(dtype=torch.float32) for x in images_tensor]
        else:
            images_tensor = images_tensor.to(dtype=torch.float32)

    _, position_ids, attention_mask, past, inputs_embeds, _ = model.prepare_inputs_labels_for_multimodal(
        input_ids, None, None, None, None, images_tensor, image_sizes=image_sizes
    )
    if inputs_embeds is None:  # no image: plain text
        inputs_embeds = model.get_model().embed_tokens(input_ids)

    out = model(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        return_dict=True,
    )
    logits = out.logits[0].float().numpy()
    pkv = out.past_key_values
    greedy, gaps = [], []

    def pick(row):
        top = torch.topk(row.float(), 2).values
        gaps.append(float(top[0] - top[1]))
        return int(row.argmax())

    nxt = pick(out.logits[0, -1])
    for step in range(new_tokens):
        greedy.append(nxt)
        if step == new_tokens - 1:
            break
        o = model(input_ids=torch.tensor([[nxt]]), past_key_values=pkv, use_cache=True, return_dict=True)
        pkv = o.past_key_values
        nxt = pick(o.logits[0, -1])

    # per-image feature counts: merge each image alone behind a BOS
    counts = []
    for i in range(len(images)):
        one = per_image[i]
        one = [one] if (isinstance(images_tensor, list) or one.ndim == 4) else one.unsqueeze(0)
        ids = torch.tensor([[tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]])
        emb = model.prepare_inputs_labels_for_multimodal(
            ids, None, None, None, None, one, image_sizes=[image_sizes[i]]
        )[4]
        counts.append(emb.shape[1] - 1)

    res = {
        "prompt": np.array(prompt),
        "input_ids": input_ids[0].numpy().astype(np.int64),
        "image_token_counts": np.array(counts, dtype=np.int64),
        "num_crops": np.array([x.shape[0] if x.ndim == 4 else 1 for x in per_image], dtype=np.int64),
        "image_sizes": np.array(image_sizes, dtype=np.int64).reshape(-1, 2),
        "inputs_embeds": inputs_embeds[0].float().numpy(),
        "logits": logits.astype(np.float32),
        "greedy": np.array(greedy, dtype=np.int64),
        "greedy_gaps": np.array(gaps, dtype=np.float32),
    }
    for i, x in enumerate(per_image):
        x = x if x.ndim == 4 else x.unsqueeze(0)
        res[f"pixel_values_{i}"] = x.numpy().astype(np.float32)
    return res


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: run_original.py JOBS.json OUT_DIR")
    jobs = json.loads(pathlib.Path(argv[1]).read_text())
    if isinstance(jobs, dict):
        jobs = jobs["jobs"]
    out_dir = pathlib.Path(argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    # group by checkpoint so each is loaded once and then dropped
    order = sorted(range(len(jobs)), key=lambda i: str(jobs[i]["checkpoint"]))
    current = None
    for i in order:
        job = jobs[i]
        ck = str(pathlib.Path(job["checkpoint"]).resolve())
        if current is not None and ck != current:
            _MODELS.clear()
        current = ck
        res = run_job(job, out_dir)
        np.savez(out_dir / f"{job['name']}.npz", **res)
        print(
            f"{job['name']}: L={res['logits'].shape[0]} image_tokens={res['image_token_counts'].tolist()} "
            f"crops={res['num_crops'].tolist()} greedy={res['greedy'].tolist()}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv)
