"""transformers-5 reference for the hf-* / tf5-* fixtures (imported in-process by the tests).

    from tests.reference.run_transformers import hf_end_to_end, hf_logits_from_inputs

hf_end_to_end(ckpt_dir, prompt, image_paths, new_tokens=16) -> dict
    AutoProcessor + AutoModelForImageTextToText (float32, CPU, offline). `prompt` holds one "<image>" per
    image (the processor expands each into its image tokens). Returns numpy arrays:
      input_ids            int64 (T,)  expanded: each image is a run of image_token_index
      pixel_values         float32, (N, 3, 336, 336) for llava, (N, P, 3, 336, 336) for llava_next
      image_sizes          int64 (N, 2) as (height, width) (llava_next only; None for llava)
      logits               float32 (T, vocab)  (vocab is the padded V+64)
      image_token_counts   int64 (N,)  image positions per image
      greedy               int64 (new_tokens,) greedy argmax continuation, KV cache, no EOS stop
      prompt               the prompt as given
hf_logits_from_inputs(ckpt_dir, input_ids, pixel_values, image_sizes=None) -> np.ndarray (T, vocab)
    One forward pass on given tensors (processor-style: llava_next pixel_values (N, P, 3, 336, 336) and
    image_sizes (N, 2) as (height, width); llava pixel_values (N, 3, 336, 336)). input_ids may be the
    expanded form, or contain original-style -200 placeholders (one per image), which are expanded here
    to the number of image tokens transformers computes for that image.
Models and processors are cached per path.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from llava_mlx.model import IMAGE_PLACEHOLDER

ORIG_IMAGE_TOKEN_INDEX = -200
_CACHE: dict[str, tuple] = {}


def load(ckpt_dir):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    key = str(pathlib.Path(ckpt_dir).resolve())
    if key not in _CACHE:
        processor = AutoProcessor.from_pretrained(key)
        model = AutoModelForImageTextToText.from_pretrained(key, dtype=torch.float32).eval()
        _CACHE[key] = (processor, model)
    return _CACHE[key]


def _image_token_id(model):
    cfg = model.config
    return getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index")


def _is_next(model):
    return model.config.model_type == "llava_next"


def _count_tokens(processor, model, image_sizes_hw):
    """Image positions transformers gives each image ((h, w) sizes of the original images)."""
    if _is_next(model):
        return [
            int(n)
            for n in processor._get_num_multimodal_tokens(
                image_sizes=[list(s) for s in image_sizes_hw]
            ).num_image_tokens
        ]
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    if (
        model.config.vision_feature_select_strategy == "full"
        and model.config.vision_config.model_type != "siglip_vision_model"
    ):
        n += 1  # CLIP's class token (SigLIP has none)
    return [n] * len(image_sizes_hw)


def _greedy(model, out, new_tokens):
    import torch

    pkv = out.past_key_values
    nxt = int(out.logits[0, -1].argmax())
    greedy = []
    for step in range(new_tokens):
        greedy.append(nxt)
        if step == new_tokens - 1:
            break
        o = model(input_ids=torch.tensor([[nxt]]), past_key_values=pkv, use_cache=True)
        pkv = o.past_key_values
        nxt = int(o.logits[0, -1].argmax())
    return np.array(greedy, dtype=np.int64)


def hf_end_to_end(ckpt_dir, prompt_with_image_tokens: str, image_paths, new_tokens: int = 16) -> dict:
    import torch
    from PIL import Image

    processor, model = load(ckpt_dir)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    kwargs = {"text": prompt_with_image_tokens, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    inputs = processor(**kwargs)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        greedy = _greedy(model, out, new_tokens)
    ids = inputs["input_ids"][0].numpy().astype(np.int64)
    image_sizes = inputs.get("image_sizes")
    sizes_hw = (
        [tuple(int(v) for v in s) for s in image_sizes]
        if image_sizes is not None
        else [(im.height, im.width) for im in images]
    )
    counts = _count_tokens(processor, model, sizes_hw) if images else []
    assert sum(counts) == int((ids == _image_token_id(model)).sum()), (
        counts,
        int((ids == _image_token_id(model)).sum()),
    )
    return {
        "prompt": prompt_with_image_tokens,
        "input_ids": ids,
        "pixel_values": inputs["pixel_values"].float().numpy() if images else None,
        "image_sizes": image_sizes.numpy().astype(np.int64) if image_sizes is not None else None,
        "logits": out.logits[0].float().numpy(),
        "image_token_counts": np.array(counts, dtype=np.int64),
        "greedy": greedy,
    }


def hf_logits_from_inputs(ckpt_dir, input_ids, pixel_values, image_sizes=None) -> np.ndarray:
    import torch

    processor, model = load(ckpt_dir)
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    pv = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32))
    if _is_next(model):
        if pv.ndim == 4:  # one image's crops (P, 3, H, W)
            pv = pv.unsqueeze(0)
        sizes = torch.as_tensor(np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2))
    else:
        if pv.ndim == 3:
            pv = pv.unsqueeze(0)
        sizes = None
    if (ids == ORIG_IMAGE_TOKEN_INDEX).any():
        n_img = int((ids == ORIG_IMAGE_TOKEN_INDEX).sum())
        hw = sizes.tolist() if sizes is not None else [(336, 336)] * n_img
        counts = _count_tokens(processor, model, hw)
        assert len(counts) == n_img, (counts, n_img)
        parts, k = [], 0
        for t in ids:
            if t == ORIG_IMAGE_TOKEN_INDEX:
                parts.extend([_image_token_id(model)] * counts[k])
                k += 1
            else:
                parts.append(int(t))
        ids = np.array(parts, dtype=np.int64)
    kwargs = {"input_ids": torch.as_tensor(ids)[None], "pixel_values": pv}
    if sizes is not None:
        kwargs["image_sizes"] = sizes
    with torch.no_grad():
        return model(**kwargs).logits[0].float().numpy()


def ours_from_transformers(reference, image_token):
    """transformers' inputs in our form: one placeholder per image run, NHWC crops, (w, h)."""
    ids, collapsed = reference["input_ids"].tolist(), []
    for i, token in enumerate(ids):
        if token != image_token:
            collapsed.append(token)
        elif i == 0 or ids[i - 1] != image_token:
            collapsed.append(IMAGE_PLACEHOLDER)
    pixels = reference["pixel_values"]
    sizes = reference.get("image_sizes")
    if pixels.ndim == 5:  # llava_next pads every image to the same number of crops
        pixels = pixels[0]
    return collapsed, pixels.transpose(0, 2, 3, 1), sizes
