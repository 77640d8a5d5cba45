"""convert.py on LLaVA-OneVision and LLaVA-NeXT-Video: float conversion is exact, 8-bit stays close."""

import numpy as np
import pytest

from llava_mlx import convert, load
from llava_mlx.video import load_video

PROMPTS = {
    "onevision": "<|im_start|>user <image><video>\nWhat is in it?<|im_end|>\n<|im_start|>assistant\n",
    "next-video": "USER: <image>\n<video>\nWhat is in it? ASSISTANT:",
}


def logits(model, processor, prompt, image, frames):
    inputs = processor(prompt, [image], videos=[frames], num_frames=4)
    return np.asarray(model(**inputs)[0])


@pytest.mark.parametrize("kind", ["onevision", "next-video"])
def test_convert_family(kind, family, family_loaded, tmp_path):
    source = f"tf5-{kind}" if kind == "onevision" else f"hub-{kind}"
    model, processor = family_loaded(source)
    image, frames = str(family["image-tall"]), load_video(str(family["clip.mp4"]), 4)
    expected = logits(model, processor, PROMPTS[kind], image, frames)

    out = convert(str(family[source]), str(tmp_path / "float"), progress=False)
    assert (out / "video_preprocessor_config.json").exists()
    converted, converted_processor = load(str(out))
    assert converted.config.llava_type == model.config.llava_type
    assert converted.config.video_pool == model.config.video_pool
    got = logits(converted, converted_processor, PROMPTS[kind], image, frames)
    assert np.array_equal(got, expected)

    out = convert(str(family[source]), str(tmp_path / "q8"), quantize=True, q_bits=8, progress=False)
    quantized, quantized_processor = load(str(out))
    assert quantized.config.quantization["bits"] == 8
    got = logits(quantized, quantized_processor, PROMPTS[kind], image, frames)
    cosine = float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected))
    assert cosine > 0.999, cosine
    assert got.argmax(-1)[-8:].tolist() == expected.argmax(-1)[-8:].tolist()
