"""`model.embed(..., start, stop)` computes only positions [start, stop) of the merged sequence:
the same numbers as the whole sequence sliced, for ranges that begin or end inside an image."""

import mlx.core as mx
import numpy as np
import pytest

from llava_mlx.cache import SessionCache
from llava_mlx.processor import load_image


@pytest.mark.parametrize("name", ["hf-v1.6-vicuna", "hub-onevision"])
def test_a_range_of_the_merged_sequence(name, loaded, family_loaded, images, family):
    model, processor = loaded(name) if name == "hf-v1.6-vicuna" else family_loaded(name)
    pictures = [images["wide"], images["tall"]] if name == "hf-v1.6-vicuna" else [family["image-wide"]]
    prompt = processor.apply_template("Compare these.", len(pictures))
    inputs = processor(prompt, pictures)
    ids = np.asarray(inputs["input_ids"][0])
    _, features = SessionCache().image_features(model, processor, [load_image(str(p)) for p in pictures])
    whole = np.array(model.embed(ids, image_features=features)[0])
    first = int(np.flatnonzero(ids < 0)[0])  # the first image's first position
    length = whole.shape[0]
    for start, stop in [(0, None), (0, 3), (first - 2, first + 5), (first + 7, first + 9), (first + 3, length - 1),
                        (length - 4, None), (5, length)]:  # fmt: skip
        part = np.array(model.embed(ids, image_features=features, start=start, stop=stop)[0])
        assert np.array_equal(part, whole[start:stop]), (start, stop)
    for start, stop in ((length, None), (7, 7)):  # nothing left to prefill: an empty range, not an error
        assert model.embed(ids, image_features=features, start=start, stop=stop).shape == (1, 0, whole.shape[-1])
    assert mx.array(whole).shape[0] == len(ids) - len(pictures) + sum(f.shape[0] for f in features)
