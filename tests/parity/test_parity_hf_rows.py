"""Parity with transformers 5 for the llava-hf rows beyond LLaVA 1.5/1.6 (fixtures/build_hf_rows.py):
LLaVA-Interleave (llava + SigLIP + Qwen2), llava_next with Qwen2 and with Llama-3, BakLLaVA
(llava + Mistral), float32.

Every row: given transformers' own inputs, our model gives its logits of the whole merged sequence
(within 1e-4 of max|logit|) and its 16 greedy tokens. Where our preprocessing follows the same
conventions as transformers' (Interleave: SigLIP's squash, released through transformers; the
llava_next rows on sizes where the original's anyres geometry and transformers' agree), our own
pipeline end to end (processor, tokens, crops, model) gives them too. BakLLaVA's own pipeline pads
to square as the original LLaVA-1.5 code does, which transformers' processor does not.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from llava_mlx import load

from conftest import loader
from fixtures.build_hf_rows import build_hf_rows
from reference.run_transformers import hf_end_to_end, ours_from_transformers

RTOL = 1e-4
PROMPTS = {
    "interleave": "<|im_start|>user <image>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n",
    "next-qwen": "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n",
    "next-llama3": "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the image?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "bakllava": "USER: <image>\nWhat is in the image? ASSISTANT:",
}
SAME_INPUTS = [(row, image) for row in PROMPTS for image in ("wide", "tall")]
OWN_PIPELINE = [("interleave", "wide"), ("interleave", "tall"), ("next-qwen", "wide"), ("next-llama3", "tall")]


@pytest.fixture(scope="session")
def rows(tmp_path_factory):
    return build_hf_rows(tmp_path_factory.mktemp("hf-rows"))


@pytest.fixture(scope="session")
def rows_loaded(rows):
    return loader(rows)


@pytest.fixture(scope="session")
def references(rows, images):
    cache = {}

    def get(row, image):
        if (row, image) not in cache:
            cache[(row, image)] = hf_end_to_end(str(rows[row]), PROMPTS[row], [str(images[image])])
        return cache[(row, image)]

    return get


def assert_close(logits, reference):
    assert logits.shape == reference["logits"].shape
    err = np.abs(logits - reference["logits"]).max() / np.abs(reference["logits"]).max()
    print(f"max|Δlogit| / max|logit| = {err:.2e}", end=" ")
    assert err <= RTOL, err


def greedy(model, embeddings) -> list:
    steps = generate_step(
        mx.zeros((embeddings.shape[1],), mx.int32), model.language_model, max_tokens=16, input_embeddings=embeddings[0]
    )
    return [int(t) for t, _ in steps]


@pytest.mark.parametrize("row,image", SAME_INPUTS)
def test_same_inputs_same_logits_and_tokens(row, image, rows_loaded, references, images):
    from PIL import Image

    model, processor = rows_loaded(row)
    reference = references(row, image)
    ids, pixels, sizes = ours_from_transformers(
        reference, processor.tokenizer._tokenizer.convert_tokens_to_ids("<image>")
    )
    width, height = Image.open(images[image]).size
    if sizes is not None:
        assert tuple(sizes[0]) == (height, width)
        pixels = pixels[: model.config.crops((width, height))]
    embeddings = model.embed([ids], mx.array(pixels), [(width, height)])
    assert_close(np.asarray(model.language_model(None, input_embeddings=embeddings)[0]), reference)
    assert greedy(model, embeddings) == reference["greedy"].tolist()


@pytest.mark.parametrize("row,image", OWN_PIPELINE)
def test_own_pipeline_end_to_end(row, image, rows_loaded, references, images):
    """Our processor and model alone: the same expanded sequence, logits and tokens."""
    model, processor = rows_loaded(row)
    reference = references(row, image)
    inputs = processor(PROMPTS[row], [str(images[image])])
    ids = np.asarray(inputs["input_ids"][0])
    (count,) = reference["image_token_counts"].tolist()
    assert model.config.image_token_count(tuple(np.asarray(inputs["image_sizes"][0]).tolist())) == count
    image_token = processor.tokenizer._tokenizer.convert_tokens_to_ids("<image>")
    expanded = [t for i in ids.tolist() for t in ([image_token] * count if i < 0 else [i])]
    assert expanded == reference["input_ids"].tolist()
    assert_close(np.asarray(model(**inputs)[0]), reference)
    assert greedy(model, model.embed(**inputs)) == reference["greedy"].tolist()


def test_configs_read_as_released(rows_loaded):
    interleave, _ = rows_loaded("interleave")
    assert interleave.config.vision_model_type == "siglip" and interleave.config.vision.patches_per_side == 27
    assert interleave.config.image_token_count((1000, 600)) == 729  # squashed to one 384 crop, no class token
    assert interleave.config.text_config["model_type"] == "qwen2"
    assert rows_loaded("next-qwen")[0].config.text_config["model_type"] == "qwen2"
    assert rows_loaded("bakllava")[0].config.text_config["model_type"] == "mistral"
    llama3, processor = rows_loaded("next-llama3")
    assert llama3.config.text_config["rope_theta"] == 500000.0
    assert processor.sentencepiece is None  # a byte-level BPE: transformers' tokenisation is the only one


def test_a_byte_level_tokenizer_without_tokenizer_model_is_no_guess(rows, capfd):
    """Llama-3's tokenizer never had a tokenizer.model: loading says nothing (a SentencePiece
    llama without one still gets its warning, tests/checkpoint/test_fallbacks.py)."""
    load(str(rows["next-llama3"]))
    assert "warning" not in capfd.readouterr().err
