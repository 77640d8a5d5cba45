"""Build tiny checkpoints with the LLaVA-NeXT code's own classes, and run that code on them.

Executed by its virtual environment (.venv-next, scripts/setup_reference.sh), never imported by
the tests:

    .venv-next/bin/python tests/reference/run_next.py build OUT_DIR TOKENIZER_DIR
    .venv-next/bin/python tests/reference/run_next.py run JOBS.json OUT_DIR

`build` writes the code's SigLipVisionModel (save_pretrained; SigLIP so400m's geometry, 384 /
14, tiny widths) into a Hugging Face cache, OUT_DIR/hf-home, under the id the releases name,
google/siglip-so400m-patch14-384 (the code takes a SigLIP tower only by a name that is not a
local path: any existing path is built as CLIP), and OUT_DIR/next-qwen (LlavaQwenForCausalLM,
save_pretrained: Qwen2 decoder, anyres_max_9 over the 36 released pinpoints written in their
string form, spatial_unpad; the tower named by mm_vision_tower, its weights inside). Run the
code, and load ours, with HF_HOME=OUT_DIR/hf-home and HF_HUB_OFFLINE=1. Beside it, the
VIDEO_VARIANTS: the same weights, other video settings.

`run` takes jobs {"name", "checkpoint", "images": [paths], "prompt": "raw text with <image>",
"new_tokens"} (or, instead of "prompt", "turns": [[question, answer or null], ...] and
"conv_mode": the prompt conversation.py builds, one "<image>\n" per image before the first
question, as the code's demos do) and writes OUT_DIR/<name>.npz: prompt, input_ids (-200 at each image), image_sizes,
pixel_values_<i> (the process_images output of image i), image_token_counts (positions each
image takes, merged alone), logits (L, len(tokenizer)) of the
whole merged sequence, greedy (argmax continuation with the KV cache, no EOS stop).

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_grad_enabled(False)

OV_PINPOINTS = ",".join(f"({i}x{j})" for i in range(1, 7) for j in range(1, 7))
SIGLIP = "google/siglip-so400m-patch14-384"
# Each newline position and each pooling mode once (LLaVA-Video-7B-Qwen2: grid + bilinear; the
# OneVision originals: one_token + bilinear).
VIDEO_VARIANTS = {
    "next-qwen-frame-average": {"mm_newline_position": "frame", "mm_spatial_pool_mode": "average"},
    "next-qwen-onetoken-max": {"mm_newline_position": "one_token", "mm_spatial_pool_mode": "max"},
    "next-qwen-notoken-bilinear": {"mm_newline_position": "no_token", "mm_spatial_pool_mode": "bilinear"},
}
SNAPSHOT = "0" * 40


def hub_snapshot(hf_home: pathlib.Path, repo: str) -> pathlib.Path:
    """The snapshot directory of `repo` in a Hugging Face cache (its refs/main pointing at it)."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    snapshot = root / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def build(out: pathlib.Path, tokenizer_dir: pathlib.Path):
    from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM
    from llava.model.multimodal_encoder.siglip_encoder import SigLipVisionConfig, SigLipVisionModel
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tower = hub_snapshot(out / "hf-home", SIGLIP)
    torch.manual_seed(0)
    tower_config = SigLipVisionConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, image_size=384, patch_size=14
    )
    SigLipVisionModel(tower_config).save_pretrained(str(tower))
    checkpoint = out / "next-qwen"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (tokenizer_dir / name).exists():
            checkpoint.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tokenizer_dir / name, checkpoint / name)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    config = LlavaQwenConfig(
        vocab_size=len(tokenizer) + 8,  # padded rows, as Qwen2's 151936 > len(tokenizer)
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        architectures=["LlavaQwenForCausalLM"],
        mm_vision_tower=SIGLIP,
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=64,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=OV_PINPOINTS,
        mm_patch_merge_type="spatial_unpad",
        mm_newline_position="grid",
        mm_spatial_pool_mode="bilinear",
        mm_spatial_pool_stride=2,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        tokenizer_model_max_length=32768,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    torch.manual_seed(1)
    os.environ["HF_HOME"] = str(out / "hf-home")
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_CACHE = str(out / "hf-home" / "hub")  # read at import: set for this process too
    model = LlavaQwenForCausalLM(config)
    for name, p in model.named_parameters():  # spread the logits: default inits give near-ties
        if "vision_tower" in name:
            continue
        if p.ndim >= 2:
            p.normal_(0.0, 0.15)
        elif name.endswith("image_newline"):
            p.normal_(0.0, 1.0)
    model.save_pretrained(str(checkpoint), safe_serialization=True)
    for name, fields in VIDEO_VARIANTS.items():  # the same weights, other video settings
        variant = out / name
        variant.mkdir(exist_ok=True)
        for item in checkpoint.iterdir():
            if item.name != "config.json":
                os.link(item, variant / item.name)
        config_json = json.loads((checkpoint / "config.json").read_text())
        (variant / "config.json").write_text(json.dumps({**config_json, **fields}, indent=2))
    print(checkpoint)


def load(checkpoint: str):
    import pdb

    import llava.model.builder as builder

    pdb.set_trace = lambda *a, **k: None  # the builder's answer to torch_dtype="float32"
    tokenizer, model, image_processor, _ = builder.load_pretrained_model(
        checkpoint, None, "llava_qwen", device_map="auto", torch_dtype="float32", attn_implementation="eager"
    )
    model.eval()
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype
    return tokenizer, model, image_processor


def conversation(job: dict, images: int) -> str:
    from llava.conversation import conv_templates

    conv = conv_templates[job["conv_mode"]].copy()
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
        **{f"pixel_values_{i}": p.float().numpy() for i, p in enumerate(pixels)},
    }


def run(jobs_file: pathlib.Path, out: pathlib.Path):
    from llava.mm_utils import process_images
    from PIL import Image

    jobs = json.loads(jobs_file.read_text())
    models = {}
    for job in jobs:
        if job["checkpoint"] not in models:
            models[job["checkpoint"]] = load(job["checkpoint"])
        tokenizer, model, image_processor = models[job["checkpoint"]]
        new_tokens = int(job.get("new_tokens", 16))
        images = [Image.open(p).convert("RGB") for p in job.get("images", [])]
        prompt = job["prompt"] if "prompt" in job else conversation(job, len(images))
        pixels = process_images(images, image_processor, model.config) if images else []
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
    if command == "build":
        build(pathlib.Path(args[0]), pathlib.Path(args[1]))
    elif command == "run":
        run(pathlib.Path(args[0]), pathlib.Path(args[1]))
    else:
        sys.exit(f"unknown command {command!r}: build or run")
