"""Session fixtures: tiny checkpoints in every layout and test images, built once."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded by the tests

from fixtures.build import build_all  # noqa: E402
from fixtures.images import make_images  # noqa: E402


# Every layout the fixtures build: liuhaotian's, llava-hf's, transformers 5's.
LAYOUTS = [
    "orig-v1.5-vicuna",
    "orig-v1.6-vicuna",
    "orig-v1.6-mistral",
    "hf-v1.5-vicuna",
    "hf-v1.6-vicuna",
    "hf-v1.6-mistral",
    "tf5-v1.5-vicuna",
    "tf5-v1.6-mistral",
]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def variants(checkpoints, tmp_path_factory):
    """Original-layout checkpoints with one config option changed (fixtures/build_variants.py)."""
    from fixtures.build_variants import build_variants

    return build_variants(tmp_path_factory.mktemp("variants"), checkpoints)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def loaded(checkpoints):
    """Load each checkpoint once: loaded(name) -> (model, processor)."""
    from llava_mlx import load

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load(str(checkpoints[name]))
        return cache[name]

    return get
