"""Session fixtures: tiny checkpoints in every layout and test images, built once."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded by the tests

from fixtures.build import build_all  # noqa: E402
from fixtures.build_family import build_family  # noqa: E402
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
def adapters(checkpoints, tmp_path_factory):
    """LoRA, projector-only and delta checkpoints and their base (fixtures/build_adapters.py)."""
    from fixtures.build_adapters import build_adapters

    return build_adapters(tmp_path_factory.mktemp("adapters"), checkpoints)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


def loader(paths):
    """get(name) -> (model, processor), each checkpoint loaded once."""
    from llava_mlx import load

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load(str(paths[name]))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def loaded(checkpoints):
    """Load each checkpoint once: loaded(name) -> (model, processor)."""
    return loader(checkpoints)


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """LLaVA-OneVision and LLaVA-NeXT-Video checkpoints (hub, tf5), test images, an MP4."""
    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def family_loaded(family):
    """Load each family checkpoint once: family_loaded(name) -> (model, processor)."""
    return loader(family)


# The live server the server and chat-page tests share: LLaVA-1.6 (images of different
# sizes give prompts of different lengths), limits small enough to reach in a test.
SERVER_MODEL = "hf-v1.6-vicuna"
SERVER_ARGS = [
    "--max-tokens",
    "600",
    "--max-batch",
    "8",
    "--max-images",
    "3",
    "--max-image-pixels",
    "4000000",
    "--max-body-mb",
    "4",
    "--image-url-timeout",
    "2",
    "--prompt-cache-bytes",
    str(24 << 20),
    "--allow-private-image-urls",  # the tests' image hosts are on loopback
]


@pytest.fixture(scope="session")
def live_server(checkpoints, tmp_path_factory):
    from serving import start_server

    server = start_server(checkpoints[SERVER_MODEL], tmp_path_factory.mktemp("server") / "server.log", *SERVER_ARGS)
    yield server
    assert server.stop() == 0, server.log.read_text()[-2000:]


@pytest.fixture(scope="session")
def tokenizer_variants(checkpoints, tmp_path_factory):
    """LLaVA-1.6 (llava-hf) with other tokenizer.json decoders (fixtures/build_tokenizers.py)."""
    from fixtures.build_tokenizers import build_tokenizer_variants

    return build_tokenizer_variants(tmp_path_factory.mktemp("tokenizers"), checkpoints["hf-v1.6-vicuna"])


@pytest.fixture(scope="session")
def training(checkpoints, images, tmp_path_factory):
    """A plain Vicuna-like language model, the CLIP tower, a pretraining stage's mm_projector.bin
    and data in LLaVA's format (fixtures/build_training.py)."""
    from fixtures.build_training import build_training

    return build_training(tmp_path_factory.mktemp("training"), checkpoints, images)


@pytest.fixture(scope="session")
def next_fixtures(family, checkpoints, training, tmp_path_factory):
    """The LLaVA-NeXT code's checkpoints, written by its own classes (reference/next.py)."""
    from reference.next import build_next_fixtures

    return build_next_fixtures(tmp_path_factory.mktemp("next"), family, checkpoints, training)
