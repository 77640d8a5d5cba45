"""Parity with transformers 5 for LLaVA-OneVision and LLaVA-NeXT-Video, float32, end to end.

transformers is the reference for these two model types (they were released through it).
Our side runs everything itself: our processor (tokenisation, image crops, video frames)
and our model. The reference runs transformers' tokenizer, its image processor and its
model. Videos: transformers' video processors need torchvision, which cannot be installed
here, so the reference preprocesses the frames with PIL as video_preprocessor_config.json
says, passes `pixel_values_videos` to the model, and expands each `<video>` with its
processor's `replace_video_token` (OneVision: frames × pooled² + 1; NeXT-Video:
frames × (side / stride)²); see reference/run_family.py.

Each case: the same expanded sequence (every image / video position in place), logits of
the whole merged sequence within 1e-4 of max|logit|, and 16 identical greedy tokens. Each
reference runs once per session (it is slow on 2 cores) and is shared by the tests.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from llava_mlx.model import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from llava_mlx.video import load_video

from reference.run_family import family_reference

RTOL = 1e-4
ONEVISION_PROMPT = "<|im_start|>user {media}\nWhat is in it?<|im_end|>\n<|im_start|>assistant\n"
NEXT_VIDEO_PROMPT = "USER: {media}\nWhat is in it? ASSISTANT:"
# Videos: (frames, height, width) of seeded random arrays, or the fixture's MP4 with a frame count.
ARRAY_VIDEOS = {"short": (3, 50, 70), "long": (7, 90, 64), "one": (1, 120, 160)}

# (case id, checkpoint, images, videos)
CASES = [
    ("ov-wide", "hub-onevision", ["wide"], []),
    ("ov-tall", "tf5-onevision", ["tall"], []),
    ("ov-tiny", "hub-onevision", ["tiny"], []),
    ("ov-under-downscale", "hub-onevision", ["under"], []),
    ("ov-over-downscale", "tf5-onevision", ["over"], []),
    ("ov-big", "hub-onevision", ["big"], []),
    ("ov-two-images", "tf5-onevision", ["wide", "tall"], []),
    ("ov-video-mp4", "tf5-onevision", [], [("mp4", 6)]),
    ("ov-video-short", "hub-onevision", [], ["short"]),
    ("ov-video-long", "tf5-onevision", [], ["long"]),
    ("nv-wide", "hub-next-video", ["wide"], []),
    ("nv-tall", "tf5-next-video", ["tall"], []),
    ("nv-tiny", "hub-next-video", ["tiny"], []),
    ("nv-two-images", "tf5-next-video", ["square", "wide"], []),
    ("nv-video-mp4", "hub-next-video", [], [("mp4", 5)]),
    ("nv-video-short", "tf5-next-video", [], ["short"]),
    ("nv-video-max-long", "tf5-next-video-max", [], ["long"]),
    ("nv-video-max-one", "hub-next-video-max", [], ["one"]),
]


def video_frames(family, spec) -> np.ndarray:
    """uint8 (T, H, W, 3) frames: the MP4 decoded by our loader, or a seeded random array."""
    if isinstance(spec, tuple):
        return load_video(family["clip.mp4"], spec[1])
    t, h, w = ARRAY_VIDEOS[spec]
    return np.random.default_rng([7, t, h, w]).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def case_inputs(family, checkpoint, images, videos):
    template = ONEVISION_PROMPT if "onevision" in checkpoint else NEXT_VIDEO_PROMPT
    prompt = template.format(media="<image>" * len(images) + "<video>" * len(videos))
    return prompt, [str(family[f"image-{n}"]) for n in images], [video_frames(family, v) for v in videos]


@pytest.fixture(scope="session")
def family_references(family):
    """The transformers reference of each case, computed once per session on first use."""
    results = {}

    def get(case_id):
        if case_id not in results:
            _, checkpoint, images, videos = next(c for c in CASES if c[0] == case_id)
            prompt, paths, frames = case_inputs(family, checkpoint, images, videos)
            results[case_id] = family_reference(str(family[checkpoint]), prompt, paths, frames)
        return results[case_id]

    return get


def expanded(ids, features, image_token, video_token):
    """Our input ids with each placeholder widened to its feature rows (the reference's form)."""
    out, media = [], iter(features)
    for token in ids:
        if token in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
            rows = next(media).shape[0]
            out.extend([image_token if token == IMAGE_PLACEHOLDER else video_token] * rows)
        else:
            out.append(int(token))
    return out


def ours(model, processor, prompt, images, frames):
    """(input ids, per-placeholder features, logits, 16 greedy tokens) from our own pipeline."""
    inputs = processor(prompt, images, videos=frames, num_frames=10**6)
    ids = np.asarray(inputs["input_ids"][0]).tolist()
    several = sum(t == IMAGE_PLACEHOLDER for t in ids) > 1
    images = iter(model.image_features(inputs["pixel_values"], inputs["image_sizes"], several) if images else [])
    videos = iter(model.video_features(v) for v in inputs.get("pixel_values_videos") or [])
    features = [next(images) if t == IMAGE_PLACEHOLDER else next(videos) for t in ids if t < 0]
    embeddings = model.embed(ids, image_features=features)
    logits = np.asarray(model.language_model(None, input_embeddings=embeddings)[0])
    steps = generate_step(
        mx.zeros((embeddings.shape[1],), mx.int32), model.language_model, max_tokens=16, input_embeddings=embeddings[0]
    )
    return ids, features, logits, [int(t) for t, _ in steps]


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_same_sequence_logits_and_tokens(case_id, family, family_loaded, family_references):
    _, checkpoint, images, videos = next(c for c in CASES if c[0] == case_id)
    model, processor = family_loaded(checkpoint)
    prompt, paths, frames = case_inputs(family, checkpoint, images, videos)
    reference = family_references(case_id)
    ids, features, logits, greedy = ours(model, processor, prompt, paths, frames)

    vocab = processor.tokenizer._tokenizer.get_vocab()
    sequence = expanded(ids, features, vocab["<image>"], vocab["<video>"])
    assert len(sequence) == len(reference["input_ids"])
    assert sequence == reference["input_ids"].tolist()
    counts = [f.shape[0] for f, t in zip(features, [t for t in ids if t < 0]) if t == IMAGE_PLACEHOLDER]
    assert counts == reference["image_token_counts"].tolist()
    assert logits.shape == reference["logits"].shape
    err = np.abs(logits - reference["logits"]).max() / np.abs(reference["logits"]).max()
    print(f"{case_id}: max|Δlogit| / max|logit| = {err:.2e}")
    assert err <= RTOL, err
    assert greedy == reference["greedy"].tolist()


def test_counts_follow_the_config(family_loaded, family):
    """The config's own position counts (used before encoding) agree with the merged features."""
    from PIL import Image

    for checkpoint in ("hub-onevision", "hub-next-video"):
        model, processor = family_loaded(checkpoint)
        for name in ("wide", "tall", "tiny", "under", "over", "big"):
            image = Image.open(family[f"image-{name}"]).convert("RGB")
            pixels, sizes = processor.preprocess([image])
            (feats,) = model.image_features(mx.array(pixels), sizes)
            assert feats.shape[0] == model.config.image_token_count(image.size), (checkpoint, name)
        frames = mx.array(processor.preprocess_video(video_frames(family, "long")))
        assert model.video_features(frames).shape[0] == model.config.video_token_count(7)


def test_downscale_triggers_only_above_threshold(family_loaded, family):
    """'over' is shrunk by anyres_max_9, 'under' is not (unpadded maps 81x100 and 81x98 of a 4x3
    grid of 27x27 tiles: the threshold is 1.1² · 9 · 27² = 7938.9 positions)."""
    model, _ = family_loaded("hub-onevision")
    side = model.config.vision.patches_per_side
    assert side == 27  # 384 // 14, as SigLIP so400m's unpadded convolution
    under = model.config.image_token_count((1400, 1150))
    over = model.config.image_token_count((1406, 1150))
    assert under == 729 + 81 * 99
    ratio = (81 * 100 / (9 * 729)) ** 0.5  # 1.111
    assert over == 729 + int(81 // ratio) * (int(100 // ratio) + 1) == 729 + 72 * 90


def test_tied_embeddings_said_at_the_top_only(family, family_loaded, tmp_path):
    """A config whose text_config leaves tie_word_embeddings to the top level (Qwen2's default
    is untied) still ties: the hub file has no lm_head."""
    import json
    import shutil

    from llava_mlx import load

    copy = tmp_path / "onevision"
    shutil.copytree(family["hub-onevision"], copy)
    config = json.loads((copy / "config.json").read_text())
    del config["text_config"]["tie_word_embeddings"]
    (copy / "config.json").write_text(json.dumps(config))
    model, processor = load(str(copy))
    reference, _ = family_loaded("hub-onevision")
    ids = processor.tokenize("<|im_start|>user hello<|im_end|>")
    assert np.array_equal(np.asarray(model(ids)), np.asarray(reference(ids)))
