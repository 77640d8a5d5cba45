"""transformers-5 reference for the LLaVA-OneVision and LLaVA-NeXT-Video fixtures (in-process).

    from reference.run_family import family_reference
    family_reference(ckpt_dir, prompt, image_paths=(), videos=(), new_tokens=16) -> dict

`prompt` holds one `<image>` per image and one `<video>` per video. Images go through
transformers' own image processor (its PIL backend) and are expanded by its processor's
`replace_image_token`; several images of one prompt are given as one nested list, as its
chat-template path does (OneVision then skips anyres for them).

Videos: transformers' video processors need torchvision, which cannot be installed here.
The frames (uint8 arrays (T, H, W, 3)) are preprocessed below with PIL as the checkpoint's
`video_preprocessor_config.json` says (OneVision: resize to size × size; NeXT-Video:
shortest edge then centre crop; BICUBIC, rescale, normalise), given to the model as
`pixel_values_videos`, and each `<video>` is expanded with the processor's own
`replace_video_token` (OneVision: frames × pooled² + 1; NeXT-Video: frames × (side / 2)²).

Returns numpy arrays: input_ids (T,) expanded, logits (T, vocab), greedy (new_tokens,),
image_token_counts, video_token_counts.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from reference.run_transformers import _greedy

_CACHE: dict[str, tuple] = {}


def _processor(model_type: str, directory: pathlib.Path, image_processor, tokenizer):
    """transformers' processor object without its video processor (which needs torchvision):
    only its token-expansion methods are used."""
    from transformers import LlavaNextVideoProcessor, LlavaOnevisionProcessor

    settings = json.loads((directory / "processor_config.json").read_text())
    cls = LlavaOnevisionProcessor if model_type == "llava_onevision" else LlavaNextVideoProcessor
    proc = object.__new__(cls)
    proc.image_processor, proc.tokenizer = image_processor, tokenizer
    proc.image_token, proc.video_token = "<image>", "<video>"
    proc.vision_feature_select_strategy = settings["vision_feature_select_strategy"]
    if model_type == "llava_onevision":
        proc.num_image_tokens = settings["num_image_tokens"]
        proc.vision_aspect_ratio = settings["vision_aspect_ratio"]
    else:
        proc.patch_size = settings["patch_size"]
        proc.num_additional_image_tokens = settings["num_additional_image_tokens"]
    return proc


def load(ckpt_dir):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    key = str(pathlib.Path(ckpt_dir).resolve())
    if key not in _CACHE:
        directory = pathlib.Path(key)
        model = AutoModelForImageTextToText.from_pretrained(key, dtype=torch.float32).eval()
        image_processor = AutoImageProcessor.from_pretrained(key)
        tokenizer = AutoTokenizer.from_pretrained(key)
        proc = _processor(model.config.model_type, directory, image_processor, tokenizer)
        video = json.loads((directory / "video_preprocessor_config.json").read_text())
        _CACHE[key] = (model, proc, video)
    return _CACHE[key]


def preprocess_video(frames: np.ndarray, config: dict) -> np.ndarray:
    """(T, 3, H, W) float32 from uint8 frames, with PIL, as video_preprocessor_config.json says."""
    from PIL import Image

    size = config["size"]
    out = []
    for frame in frames:
        image = Image.fromarray(frame)
        if "shortest_edge" in size:
            short = size["shortest_edge"]
            w, h = image.size
            if w <= h:
                new = (short, int(short * h / w))
            else:
                new = (int(short * w / h), short)
            image = image.resize(new, Image.BICUBIC)
        else:
            image = image.resize((size["width"], size["height"]), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float64)
        if config.get("do_center_crop"):
            ch, cw = config["crop_size"]["height"], config["crop_size"]["width"]
            top, left = (pixels.shape[0] - ch) // 2, (pixels.shape[1] - cw) // 2
            pixels = pixels[top : top + ch, left : left + cw]
        pixels = pixels * config["rescale_factor"]
        pixels = (pixels - np.array(config["image_mean"])) / np.array(config["image_std"])
        out.append(pixels.astype(np.float32).transpose(2, 0, 1))
    return np.stack(out)


def _expand(text: str, token: str, replacements: list) -> str:
    parts = text.split(token)
    assert len(parts) == len(replacements) + 1, (token, len(parts) - 1, len(replacements))
    out = parts[0]
    for replacement, part in zip(replacements, parts[1:]):
        out += replacement + part
    return out


def family_reference(ckpt_dir, prompt: str, image_paths=(), videos=(), new_tokens: int = 16) -> dict:
    import torch
    from PIL import Image

    model, proc, video_config = load(ckpt_dir)
    kwargs, text = {}, prompt
    image_counts, video_counts = [], []
    if image_paths:
        images = [Image.open(p).convert("RGB") for p in image_paths]
        processed = proc.image_processor([images], return_tensors="pt")
        replacements = [proc.replace_image_token(processed, image_idx=i) for i in range(len(images))]
        image_counts = [len(r) // len(proc.image_token) for r in replacements]
        text = _expand(text, proc.image_token, replacements)
        kwargs.update(pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"])
        if "batch_num_images" in processed:
            kwargs["batch_num_images"] = processed["batch_num_images"]
    if len(videos):
        pixel_videos = [preprocess_video(v, video_config) for v in videos]
        replacements = [
            proc.replace_video_token({"pixel_values_videos": pixel_videos}, video_idx=i) for i in range(len(videos))
        ]
        video_counts = [len(r) // len(proc.video_token) for r in replacements]
        text = _expand(text, proc.video_token, replacements)
        kwargs["pixel_values_videos"] = torch.tensor(np.stack(pixel_videos))
    inputs = proc.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], use_cache=True, **kwargs)
        greedy = _greedy(model, out, new_tokens)
    return {
        "input_ids": inputs["input_ids"][0].numpy().astype(np.int64),
        "logits": out.logits[0].float().numpy(),
        "greedy": greedy,
        "image_token_counts": np.array(image_counts, dtype=np.int64),
        "video_token_counts": np.array(video_counts, dtype=np.int64),
    }
