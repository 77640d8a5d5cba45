"""Two ranks on loopback (`mlx.launch -n 2 --backend ring`), tensor and pipeline parallel:
the single process's logits (to 1e-4 of max|logit|) and 16 greedy tokens, half the decoder
per rank, the vision tower on rank 0 only, `generate.py`'s answer printed once; clear errors
for what cannot shard and for a rank that never joins.

The launches are batched: one runs every case (tests/distributed/distributed_cases.py writes a JSON per
rank), one runs generate.py. Each is bounded in time and killed with its ranks on timeout.
"""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llava_mlx import generate, load
from llava_mlx.checkpoint import files
from llava_mlx.checkpoint.load import load_model
from llava_mlx.distributed.shard import check_shardable
from llava_mlx.errors import LlavaError

from conftest import ROOT
from fixtures.preconverted import build_preconverted
from helpers import environment, free_port_pair, launch_two, run_bounded

QUESTION = "What is in the image?"
RAW_PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
# (checkpoint, mode): LLaVA-1.5 (original layout, separate CLIP tower), LLaVA-1.6 Mistral
# (GQA: 4 heads, 2 KV heads), a 4-bit LLaVA-1.6 (packed weights split by columns), and
# LLaVA-OneVision (mlx-lm's qwen2 sharding).
CASES = [
    ("orig-v1.5-vicuna", "tensor"),
    ("orig-v1.5-vicuna", "pipeline"),
    ("hf-v1.6-mistral", "tensor"),
    ("hf-v1.6-mistral", "pipeline"),
    ("q4g32-v1.6-mistral", "tensor"),
    ("hub-onevision", "tensor"),  # qwen2 decoder (4 heads, 2 KV heads), SigLIP tower
    ("hub-onevision", "pipeline"),
]


@pytest.fixture(scope="session")
def models(checkpoints, family, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    quantized = build_preconverted(
        checkpoints["hf-v1.6-mistral"], root / "q4g32-v1.6-mistral", bits=4, group_size=32, dtype="float32"
    )
    return {**checkpoints, **family, "q4g32-v1.6-mistral": quantized}


def case_name(model, mode):
    return f"{model}-{mode}"


@pytest.fixture(scope="session")
def sharded(models, images, tmp_path_factory):
    """Every case on two ranks, in one launch: {rank: {case: result}}, and rank 0's logits."""
    out = tmp_path_factory.mktemp("sharded")
    plan = [
        dict(name=case_name(m, mode), model=str(models[m]), mode=mode, images=[str(images["wide"])],
             raw_prompt=RAW_PROMPT, question=QUESTION)
        for m, mode in CASES
    ]  # fmt: skip
    (out / "plan.json").write_text(json.dumps(plan))
    result = launch_two(ROOT / "tests" / "distributed" / "distributed_cases.py", out / "plan.json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    ranks = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    logits = {case["name"]: np.load(out / f"{case['name']}.npy") for case in plan}
    return ranks, logits


@pytest.fixture(scope="session")
def single(models, images):
    """The same cases in this one process: {model: (logits, tokens, layer bytes, vision bytes)}."""
    results = {}
    for name in sorted({m for m, _ in CASES}):
        model, processor = load(str(models[name]))
        logits = model(**processor(RAW_PROMPT, [images["wide"]]))[0].astype(mx.float32)
        tokens = generate(model, processor, QUESTION, images=[images["wide"]], max_tokens=16, ignore_eos=True).tokens
        params = tree_flatten(model.parameters())
        layers = sum(v.nbytes for k, v in params if k.startswith("language_model.model.layers."))
        vision = sum(v.nbytes for k, v in params if k.startswith(("vision_tower.", "multi_modal_projector.")))
        results[name] = (np.array(logits), tokens, layers, vision)
    return results


@pytest.mark.parametrize("name,mode", CASES)
def test_two_ranks_match_one_process(name, mode, sharded, single):
    ranks, logits = sharded
    case = case_name(name, mode)
    reference, tokens, _, _ = single[name]
    assert logits[case].shape == reference.shape
    scale = np.abs(reference).max()
    assert np.abs(logits[case] - reference).max() <= 1e-4 * scale
    assert len(tokens) == 16
    for r in (0, 1):
        assert ranks[r][case]["size"] == 2 and ranks[r][case]["mode"] == mode
        assert ranks[r][case]["tokens"] == tokens


@pytest.mark.parametrize("name,mode", CASES)
def test_each_rank_holds_half_the_decoder(name, mode, sharded, single):
    ranks, _ = sharded
    case = case_name(name, mode)
    _, _, layer_bytes, vision_bytes = single[name]
    for r in (0, 1):
        # Tensor parallel replicates only the two RMSNorm vectors of each layer.
        assert 0.5 <= ranks[r][case]["layer_bytes"] / layer_bytes <= 0.52, (r, ranks[r][case]["layer_bytes"])
    # The vision tower and projector live on rank 0 alone.
    assert ranks[0][case]["vision_bytes"] == vision_bytes > 0
    assert ranks[1][case]["vision_bytes"] == 0


def test_generate_cli_under_launch_prints_the_answer_once(models, images):
    args = [ROOT / "generate.py", "--model", models["hf-v1.6-mistral"], "--image", images["wide"],
            "--prompt", QUESTION, "--max-tokens", "12"]  # fmt: skip
    alone = run_bounded([sys.executable, *args], timeout=300)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.strip()
    both = launch_two(*args, timeout=300)
    assert both.returncode == 0, both.stderr
    assert both.stdout == alone.stdout
    for r in (0, 1):
        assert f"[rank {r}/2] Peak memory:" in both.stderr
        assert f"[rank {r}/2] Generation: 12 tokens" in both.stderr
    assert "[ring]" not in both.stderr, both.stderr


def test_a_rank_that_never_joins_is_one_line(models, tmp_path):
    base = free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    env = environment(MLX_RANK="0", MLX_HOSTFILE=str(hostfile), LLAVA_MLX_JOIN_TIMEOUT="3")
    result = run_bounded(
        [sys.executable, ROOT / "generate.py", "--model", models["hf-v1.6-mistral"], "--prompt", "hi"], 120, env
    )
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: rank 0: the other ranks did not join within 3 s")


class Ranks:
    """A stand-in group: the checks run before any communication."""

    def __init__(self, size, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def test_what_cannot_shard_is_one_clear_error(models, checkpoints, tmp_path):
    with pytest.raises(LlavaError, match=r"cannot split 4 attention heads \(4 KV heads\) over 3 ranks"):
        load_model(checkpoints["hf-v1.5-vicuna"], group=Ranks(3))
    with pytest.raises(LlavaError, match=r"cannot split 4 attention heads \(2 KV heads\) over 4 ranks"):
        load_model(checkpoints["hf-v1.6-mistral"], group=Ranks(4))
    with pytest.raises(LlavaError, match="cannot pipeline 2 decoder layers over 3 ranks"):
        load_model(checkpoints["hf-v1.6-mistral"], group=Ranks(3), pipeline=True)
    with pytest.raises(LlavaError, match="a 'gemma' decoder cannot be sharded"):
        check_shardable({"model_type": "gemma"}, 2, False)
    # 4-bit in groups of 64: o_proj's 64 inputs cannot be cut in two groups.
    q64 = build_preconverted(checkpoints["hf-v1.6-mistral"], tmp_path / "q4g64", bits=4, group_size=64)
    with pytest.raises(LlavaError, match="cannot shard this checkpoint over 2 ranks"):
        load_model(q64, group=Ranks(2))


def test_read_slice_reads_the_part_of_a_stored_tensor(tmp_path):
    rng = np.random.default_rng(0)
    stored = {
        "f32": mx.array(rng.standard_normal((6, 8)).astype(np.float32)),
        "bf16": mx.array(rng.standard_normal((4, 6)).astype(np.float32)).astype(mx.bfloat16),
        "packed": mx.array(rng.integers(0, 2**32, (8, 4), dtype=np.uint32)),
    }
    mx.save_safetensors(str(tmp_path / "w.safetensors"), stored)
    index = files.tensor_index([tmp_path / "w.safetensors"])
    loaded = mx.load(str(tmp_path / "w.safetensors"))
    for name, value in stored.items():
        assert index[name].matches(loaded[name])
        for axis in (0, 1):
            for part in (0, 1):
                expected = mx.split(value, 2, axis=axis)[part]
                got = files.read_slice(index[name], axis, part, 2)
                assert got.dtype == value.dtype and got.shape == expected.shape
                assert mx.array_equal(got, expected).item()


PUBLIC_API = """
import sys
import numpy as np
from llava_mlx import load
model, processor = load(sys.argv[1])
inputs = processor(sys.argv[2], [sys.argv[3]])
logits = np.array(model(**inputs)[0])
np.save(sys.argv[4] + ".npy" if model.sharding.group.rank() == 0 else sys.argv[4] + "-rank1.npy", logits)
"""


@pytest.mark.parametrize("name", ["hf-v1.6-mistral", "hub-onevision"])
def test_the_documented_api_works_on_every_rank(name, models, images, tmp_path):
    """load(), processor(prompt, images) and model(**inputs) on both ranks: rank 1 holds no tower,
    so rank 0 encodes the image and shares its features inside model(...); both ranks get the
    single process's logits."""
    script = tmp_path / "api.py"
    script.write_text(PUBLIC_API)
    prompt = (
        RAW_PROMPT
        if "mistral" in name
        else "<|im_start|>user <image>\\nWhat is it?<|im_end|>\\n<|im_start|>assistant\\n"
    )
    result = launch_two(script, models[name], prompt, images["wide"], tmp_path / "logits", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from llava_mlx import load

    model, processor = load(str(models[name]))
    alone = np.array(model(**processor(prompt, [str(images["wide"])]))[0])
    for rank_file in ("logits.npy", "logits-rank1.npy"):
        both = np.load(tmp_path / rank_file)
        assert both.shape == alone.shape
        assert np.abs(both - alone).max() <= 1e-4 * np.abs(alone).max(), rank_file
