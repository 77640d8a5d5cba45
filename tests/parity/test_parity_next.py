"""Parity with the LLaVA-NeXT code (lmms-lab's releases) for its own checkpoint layout:
`llava_qwen` with its SigLIP tower named by hub id, anyres_max_9 over the 36 pinpoints in their
string form, spatial_unpad, as LLaVA-OneVision's originals (lmms-lab/llava-onevision-qwen2-*).

The checkpoint is written by that code's own classes (tests/reference/run_next.py, in
.venv-next) and run by its `load_pretrained_model`; ours loads the same directory, the tower's
config from the same Hugging Face cache. Same token ids, same crops, logits of the whole merged
sequence within 1e-4 of max|logit|, 16 greedy tokens equal.
"""

import os
import subprocess

import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image

from llava_mlx import LlavaError, generate, load
from llava_mlx.model import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from llava_mlx.video import load_video

from conftest import ROOT
from reference.original import assert_logits_close, check_case

NEXT_PYTHON = os.environ.get("LLAVA_NEXT_PYTHON", str(ROOT / ".venv-next" / "bin" / "python"))
RUNNER = str(ROOT / "tests" / "reference" / "run_next.py")
QWEN_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
# One image each: wide, tall, small, a 2048x311 strip, either side of anyres_max_9's downscale
# threshold, far above it, one tile; then two images in one prompt.
CASES = {
    "wide": ["wide"],
    "tall": ["tall"],
    "tiny": ["tiny"],
    "strip": ["strip"],
    "under": ["under"],
    "over": ["over"],
    "big": ["big"],
    "square": ["square"],
    "two": ["wide", "tall"],
}
TURNS = [["What is in the image?", "A red car."], ["And behind it?", None]]
FRAMES = 8
# Videos: each newline position and each pooling mode (tests/reference/run_next.py's variants),
# and a picture and a clip in one prompt. The code marks a video with <image> (its modality
# says video); ours with <video>.
VIDEO_CASES = {
    "video-grid-bilinear": ("next-qwen", False),
    "video-frame-average": ("next-qwen-frame-average", False),
    "video-onetoken-max": ("next-qwen-onetoken-max", False),
    "video-notoken-bilinear": ("next-qwen-notoken-bilinear", False),
    "picture-and-clip": ("next-qwen", True),
}


def next_env(fixtures) -> dict:
    return {**os.environ, "HF_HOME": str(fixtures / "hf-home"), "HF_HUB_OFFLINE": "1"}


def run_next(*args, env, timeout=1800):
    result = subprocess.run([NEXT_PYTHON, RUNNER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def next_fixtures(family, tmp_path_factory):
    """The checkpoint written by the LLaVA-NeXT code, its tower in a Hugging Face cache."""
    root = tmp_path_factory.mktemp("next")
    run_next("build", str(root), str(family["hub-onevision"]), env=next_env(root))
    return root


@pytest.fixture(scope="session")
def next_images(family, tmp_path_factory):
    images = {name: family[f"image-{name}"] for name in ("wide", "tall", "tiny", "under", "over", "big", "square")}
    strip = tmp_path_factory.mktemp("next-images") / "strip_2048x311.png"
    x = np.linspace(0, 255, 2048, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, 311, dtype=np.float32)[:, None, None]
    Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], -1).astype(np.uint8)).save(strip)
    frames = tmp_path_factory.mktemp("next-frames") / "frames.npy"
    np.save(frames, load_video(str(family["clip.mp4"]), FRAMES))
    return {**images, "strip": strip, "frames": frames}


@pytest.fixture(scope="session")
def next_reference(next_fixtures, next_images, tmp_path_factory):
    """Every case run once by the LLaVA-NeXT code: name -> npz."""
    import json

    out = tmp_path_factory.mktemp("next-reference")
    checkpoint = str(next_fixtures / "next-qwen")
    jobs = [
        {
            "name": name,
            "checkpoint": checkpoint,
            "images": [str(next_images[i]) for i in images],
            "prompt": QWEN_PROMPT.format("<image>\n" * len(images) + "What is in the image?")
            + "<|im_start|>assistant\n",
        }
        for name, images in CASES.items()
    ]
    for name, (checkpoint_name, picture) in VIDEO_CASES.items():
        media = "<image>\n" * (2 if picture else 1)
        jobs.append(
            {
                "name": name,
                "checkpoint": str(next_fixtures / checkpoint_name),
                "images": [str(next_images["wide"])] if picture else [],
                "video_frames": str(next_images["frames"]),
                "prompt": QWEN_PROMPT.format(media + "What happens?") + "<|im_start|>assistant\n",
            }
        )
    jobs.append(
        {"name": "template", "checkpoint": checkpoint, "images": [str(next_images["wide"])], "turns": TURNS}
        | {"conv_mode": "qwen_1_5"}
    )
    (out / "jobs.json").write_text(json.dumps(jobs))
    run_next("run", str(out / "jobs.json"), str(out), env=next_env(next_fixtures))
    return {job["name"]: dict(np.load(out / f"{job['name']}.npz")) for job in jobs}


@pytest.fixture(scope="session")
def next_loaded(next_fixtures):
    """Ours, the tower's config read from the fixture's Hugging Face cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(next_fixtures / "hf-home" / "hub"))
        return load(str(next_fixtures / "next-qwen"))


def test_the_layout_reads_as_the_code_builds_it(next_loaded):
    config = next_loaded[0].config
    assert config.vision_model_type == "siglip" and config.image_processor == "siglip"
    assert config.vision.num_hidden_layers == 2  # the tower's 3, its last deleted by the code
    assert config.image_aspect_ratio == "anyres_max_9" and len(config.image_grid_pinpoints) == 36
    assert config.image_grid_pinpoints[:2] == [[384, 384], [384, 768]]  # "(1x1),(1x2),...": (width, height)
    assert next_loaded[1].vocabulary == len(next_loaded[1].tokenizer._tokenizer)  # cut to len(tokenizer)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_the_next_code(name, next_loaded, next_reference, next_images):
    model, processor = next_loaded
    ref = next_reference[name]
    check_case(model, processor, ref, [str(next_images[i]) for i in CASES[name]], str(ref["prompt"]))


@pytest.fixture(scope="session")
def next_variants(next_fixtures):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(next_fixtures / "hf-home" / "hub"))
        return {name: load(str(next_fixtures / name)) for name in {c for c, _ in VIDEO_CASES.values()} - {"next-qwen"}}


@pytest.mark.parametrize("name", list(VIDEO_CASES))
def test_video_parity_with_the_next_code(name, next_loaded, next_variants, next_reference, next_images):
    checkpoint, picture = VIDEO_CASES[name]
    model, processor = next_loaded if checkpoint == "next-qwen" else next_variants[checkpoint]
    ref = next_reference[name]
    frames = np.load(next_images["frames"])
    images = [str(next_images["wide"])] if picture else []
    prompt = str(ref["prompt"]).replace("<image>\n", "<video>\n", 2 if picture else 1)
    if picture:  # the picture's <image> stays first
        prompt = prompt.replace("<video>\n", "<image>\n", 1)
    inputs = processor(prompt, images, videos=[frames], num_frames=FRAMES)
    ids = [IMAGE_PLACEHOLDER if t == VIDEO_PLACEHOLDER else t for t in np.asarray(inputs["input_ids"])[0].tolist()]
    assert ids == ref["input_ids"].tolist()
    video = processor.preprocess_video(frames).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(video, ref[f"pixel_values_{len(images)}"], atol=1e-5)
    assert model.config.video_token_count(len(frames)) == ref["image_token_counts"][-1]
    logits = model(**inputs)
    assert logits.shape[1] == ref["logits"].shape[0]
    assert_logits_close(logits[0], ref["logits"])
    result = generate(
        model, processor, prompt, images, videos=[frames], num_frames=FRAMES, max_tokens=16, template=False,
        ignore_eos=True,
    )  # fmt: skip
    assert result.tokens == ref["greedy"].tolist()


def test_the_qwen_template_is_the_codes(next_loaded, next_reference, next_images):
    model, processor = next_loaded
    ref = next_reference["template"]
    (q1, a1), (q2, _) = TURNS
    prompt = processor.apply_template(q2, [1, 0], None, [(q1, a1)])
    assert prompt == str(ref["prompt"])
    inputs = processor(prompt, [str(next_images["wide"])])
    assert_logits_close(model(**inputs)[0], ref["logits"])


def test_a_tower_not_in_the_cache_is_guessed_from_the_released_one(next_fixtures, capsys):
    """Offline, with nothing cached: the released SigLIP's geometry is guessed with one warning,
    and the tiny fixture's weights then do not fit it (their shapes are checked)."""
    with pytest.raises(LlavaError, match="shape"):
        load(str(next_fixtures / "next-qwen"))
    assert "google/siglip-so400m-patch14-384" in capsys.readouterr().err


def test_converted_and_quantized_the_layout_keeps_its_answers(next_fixtures, next_reference, next_images, tmp_path):
    """convert() writes our MLX layout (the tower's config inside: no hub cache needed after),
    which answers as the LLaVA-NeXT code does; 8-bit quantized, it loads and answers."""
    from llava_mlx import convert, generate

    ref, image = next_reference["wide"], [str(next_images["wide"])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(next_fixtures / "hf-home" / "hub"))
        convert(str(next_fixtures / "next-qwen"), str(tmp_path / "mlx"), progress=False)
        convert(str(next_fixtures / "next-qwen"), str(tmp_path / "q8"), quantize=True, q_bits=8, progress=False)
    model, processor = load(str(tmp_path / "mlx"))
    assert model.config.image_processor == "siglip" and processor.family == "qwen_1_5"
    check_case(model, processor, ref, image, str(ref["prompt"]))
    quantized, quantized_processor = load(str(tmp_path / "q8"))
    answer = generate(quantized, quantized_processor, "What is in the image?", image, max_tokens=4)
    assert answer.prompt_tokens == ref["logits"].shape[0]


def test_generate_py_answers_as_the_api(next_fixtures, next_loaded, next_images):
    from llava_mlx import generate

    from helpers import run_cli

    result = run_cli(
        "--model", str(next_fixtures / "next-qwen"), "--image", str(next_images["tall"]), "--max-tokens", "8",
        env={"HF_HOME": str(next_fixtures / "hf-home")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    api = generate(*next_loaded, "Describe this image.", [str(next_images["tall"])], max_tokens=8)
    assert result.stdout.strip() == api.text.strip()
