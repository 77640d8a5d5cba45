"""convert.py: every layout round-trips exactly, 8-/4-bit are accurate and really smaller,
the pre-converted MLX layout (mlx-community) loads and generates, and bad input fails with
one line on stderr, nothing left behind and a previous --out untouched."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llava_mlx import generate, load
from llava_mlx.checkpoint.convert import INDEX, convert
from llava_mlx.checkpoint.files import load_weights, read_json
from llava_mlx.checkpoint.layouts import rename
from llava_mlx.checkpoint.quantize import estimate_bytes
from llava_mlx.cli.convert import main
from llava_mlx.errors import LlavaError
from llava_mlx.model import LlavaConfig, LlavaModel
from llava_mlx.vision import layers_to_run

from conftest import LAYOUTS, ROOT
from fixtures.preconverted import build_preconverted
from helpers import cosine, logits, snapshot

# One checkpoint per variant: the other layouts of a variant hold the same weights.
VARIANTS = ["hf-v1.5-vicuna", "hf-v1.6-vicuna", "hf-v1.6-mistral"]
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
IMAGE = "tie_wide"  # 300x200: one crop for 1.5, three for 1.6 (short sequences, fast)
# float16 conversion: max |Δlogit| / max |logit| against float32 (measured ≤ 2.3e-3).
FLOAT16_RTOL = 1e-2
# Inputs whose greedy path is robust to 8-bit: along the float32 greedy path (8 tokens) the gap
# between the two best logits stays ≥ 1.24 / 0.74 / 0.82, while 8-bit moves no logit by more
# than 0.25 (measured; many other inputs of these random models have near-ties).
GREEDY = {
    "hf-v1.5-vicuna": ("[INST] <image>\nWhat is in the picture? [/INST]", "square"),
    "hf-v1.6-vicuna": ("USER: <image>\nWhat color is the bus? ASSISTANT:", "tall"),
    "hf-v1.6-mistral": ("[INST] <image>\nWhat is in the picture? [/INST]", "square"),
}
VISION_PARTS = ("vision_tower.", "multi_modal_projector.")


def quantized_paths(model) -> list:
    return sorted(p for p, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))


def leftovers(out: Path) -> list:
    """Temporary directories of a conversion into `out` still beside it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def reference(loaded, images):
    """reference(name) -> (inputs, float32 logits of the source checkpoint), computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            model, processor = loaded(name)
            inputs = processor(PROMPT, [images[IMAGE]])
            cache[name] = inputs, logits(model, inputs)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def quantized(checkpoints, tmp_path_factory):
    """quantized(name, bits, dtype) -> a `bits`-bit conversion (group 64), made once.

    Accuracy is measured with float32 scales: MLX's CPU backend runs quantized float16
    matmuls ten times slower, and the error is the quantization's either way.
    """
    cache = {}

    def get(name, bits, dtype="float32"):
        if (name, bits, dtype) not in cache:
            out = tmp_path_factory.mktemp("quantized") / f"{name}-{bits}bit-{dtype}"
            cache[name, bits, dtype] = convert(
                str(checkpoints[name]), str(out), quantize=True, q_bits=bits, dtype=dtype, progress=False
            )
        return cache[name, bits, dtype]

    return get


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", LAYOUTS)
def test_round_trip_is_exact(name, checkpoints, loaded, reference, images, tmp_path):
    out = convert(str(checkpoints[name]), str(tmp_path / "out"), dtype="float32", progress=False)
    model, processor = load(str(out))
    source_model, source_processor = loaded(name)
    inputs, expected = reference(name)

    assert model.config.to_dict() == source_model.config.to_dict()
    weights, source = dict(tree_flatten(model.parameters())), dict(tree_flatten(source_model.parameters()))
    assert weights.keys() == source.keys()
    for key, value in source.items():
        assert weights[key].dtype == value.dtype and mx.array_equal(weights[key], value), key
    # The same processing: tokens, pixels, chat template.
    converted = processor(PROMPT, [images[IMAGE]])
    for key, value in inputs.items():
        np.testing.assert_array_equal(np.array(converted[key]), np.array(value), err_msg=key)
    assert processor.image_config == source_processor.image_config
    assert processor.apply_template("Describe it.", 1) == source_processor.apply_template("Describe it.", 1)
    np.testing.assert_array_equal(logits(model, inputs), expected)

    params = read_json(out / "config.json")
    assert params["model_type"] == "llava_mlx" and "quantization" not in params
    assert params["vision_config"]["hidden_size"] == 64 and "mm_vision_tower" not in json.dumps(params)
    assert (out / "preprocessor_config.json").exists() and (out / INDEX).exists()
    assert leftovers(out) == []


def test_original_v15_no_longer_needs_its_tower(checkpoints, reference, loaded, tmp_path):
    """LLaVA-1.5 reads its CLIP tower from mm_vision_tower; converted, it carries it along."""
    source, tower = tmp_path / "orig", tmp_path / "tower"
    shutil.copytree(checkpoints["orig-v1.5-vicuna"], source)
    shutil.copytree(checkpoints["clip-tower-v1.5-vicuna"], tower)
    config = read_json(source / "config.json")
    (source / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tower)}))
    out = convert(str(source), str(tmp_path / "out"), dtype="float32", progress=False)
    shutil.rmtree(tower)
    shutil.rmtree(source)

    model, processor = load(str(out))
    inputs, expected = reference("orig-v1.5-vicuna")
    np.testing.assert_array_equal(logits(model, inputs), expected)
    assert processor.image_config == loaded("orig-v1.5-vicuna")[1].image_config  # the tower's settings


def test_vision_tower_option(checkpoints, reference, tmp_path):
    """--vision-tower stands in for an mm_vision_tower that is not at hand."""
    source = tmp_path / "orig"
    shutil.copytree(checkpoints["orig-v1.5-vicuna"], source)
    config = read_json(source / "config.json")
    (source / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "/nonexistent/clip-tower"}))
    with pytest.raises(LlavaError, match="vision tower '/nonexistent/clip-tower' is not a directory"):
        convert(source, tmp_path / "out", progress=False)
    out = convert(source, tmp_path / "out", vision_tower=checkpoints["clip-tower-v1.5-vicuna"], progress=False)
    model, _ = load(str(out))
    inputs, expected = reference("orig-v1.5-vicuna")
    np.testing.assert_array_equal(logits(model, inputs), expected)


def test_pytorch_bin_weights(checkpoints, reference, tmp_path):
    """Original checkpoints (llava-v1.5-7b, its CLIP tower) ship PyTorch .bin files only."""
    import torch  # the test extra installs it
    from safetensors.torch import load_file

    source, tower = tmp_path / "orig", tmp_path / "tower"
    shutil.copytree(checkpoints["orig-v1.5-vicuna"], source)
    shutil.copytree(checkpoints["clip-tower-v1.5-vicuna"], tower)
    for directory in (source, tower):
        weight_map = {}
        for file in sorted(directory.glob("*.safetensors")):
            name = file.name.replace("model", "pytorch_model").replace(".safetensors", ".bin")
            state = load_file(str(file))
            torch.save(state, directory / name)
            weight_map.update(dict.fromkeys(state, name))
            file.unlink()
        (directory / INDEX).unlink(missing_ok=True)
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = read_json(source / "config.json")
    (source / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tower)}))

    with pytest.raises(LlavaError, match="convert.py"):
        load(str(source))
    out = convert(str(source), str(tmp_path / "out"), dtype="float32", progress=False)
    model, _ = load(str(out))
    inputs, expected = reference("orig-v1.5-vicuna")
    np.testing.assert_array_equal(logits(model, inputs), expected)
    assert leftovers(out) == []  # the safetensors scratch copy is gone


@pytest.mark.parametrize("name", VARIANTS)
def test_float16_is_close(name, checkpoints, reference, tmp_path):
    out = convert(str(checkpoints[name]), str(tmp_path / "out"), dtype="float16", progress=False)
    dtypes = {v.dtype for v in load_weights(out).values()}
    assert dtypes == {mx.float16}
    model, _ = load(str(out))
    inputs, expected = reference(name)
    error = np.abs(logits(model, inputs) - expected).max() / np.abs(expected).max()
    assert error <= FLOAT16_RTOL


def test_shards_and_index(checkpoints, loaded, tmp_path):
    source = str(checkpoints["hf-v1.6-mistral"])
    out = convert(source, str(tmp_path / "out"), dtype="float32", progress=False, shard_gb=0)
    index = read_json(out / INDEX)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(index["weight_map"]) > 1  # a zero limit: one tensor per shard
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in load_weights(out).values())
    model, _ = load(str(out))
    source = dict(tree_flatten(loaded("hf-v1.6-mistral")[0].parameters()))
    assert all(mx.array_equal(v, source[k]) for k, v in tree_flatten(model.parameters()))


# -- quantization ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_8bit_is_close_with_the_same_greedy_tokens(name, quantized, loaded, reference, images):
    model, processor = load(str(quantized(name, 8)))
    inputs, expected = reference(name)
    assert cosine(logits(model, inputs), expected) >= 0.999  # measured ≥ 0.99996
    prompt, image = GREEDY[name]
    source_model, source_processor = loaded(name)
    options = dict(max_tokens=8, template=False, ignore_eos=True)
    want = generate(source_model, source_processor, prompt, [images[image]], **options).tokens
    assert generate(model, processor, prompt, [images[image]], **options).tokens == want


@pytest.mark.parametrize("name", VARIANTS)
def test_4bit_is_close(name, quantized, reference):
    model, _ = load(str(quantized(name, 4)))
    inputs, expected = reference(name)
    assert cosine(logits(model, inputs), expected) >= 0.99


@pytest.mark.parametrize("bits,limit", [(4, 0.30), (8, 0.55)])
def test_quantized_decoder_is_smaller(bits, limit, quantized):
    out = quantized("hf-v1.6-mistral", bits, "float16")  # float16 scales and biases, as in practice
    block = read_json(out / "config.json")["quantization"]
    assert (block["bits"], block["group_size"], block["skipped"]) == (bits, 64, [])
    decoder = [m for m in block["modules"] if m.startswith("language_model.")]
    assert decoder == block["modules"]  # nothing of the vision side without --quantize-vision
    assert len(decoder) == 2 * 7 + 2  # every linear of the 2 layers, lm_head, embed_tokens
    weights = load_weights(out)
    stored = sum(weights[f"{m}.{part}"].nbytes for m in decoder for part in ("weight", "scales", "biases"))
    rows_cols = [(weights[f"{m}.weight"].shape[0], weights[f"{m}.weight"].shape[1] * 32 // bits) for m in decoder]
    float16 = sum(2 * rows * cols for rows, cols in rows_cols)
    assert stored <= limit * float16
    model, _ = load(str(out))
    assert quantized_paths(model) == block["modules"]  # the loader rebuilds exactly that set


def test_layers_that_do_not_divide_stay_float(checkpoints, images, tmp_path):
    """Group 128: only down_proj (input width 128) divides; the 64-wide layers are listed."""
    out = convert(
        str(checkpoints["hf-v1.6-vicuna"]), str(tmp_path / "out"), quantize=True, q_group_size=128, progress=False
    )
    block = read_json(out / "config.json")["quantization"]
    assert block["modules"] == [f"language_model.model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert "language_model.lm_head" in block["skipped"] and "language_model.model.embed_tokens" in block["skipped"]
    assert len(block["skipped"]) == 2 * 6 + 2
    model, processor = load(str(out))
    assert quantized_paths(model) == block["modules"]
    assert len(generate(model, processor, PROMPT, [images[IMAGE]], max_tokens=3, ignore_eos=True).tokens) == 3


def test_quantize_vision(checkpoints, images, tmp_path):
    out = convert(
        str(checkpoints["hf-v1.6-vicuna"]), str(tmp_path / "out"), quantize=True, quantize_vision=True, progress=False
    )
    block = read_json(out / "config.json")["quantization"]
    vision = [m for m in block["modules"] if m.startswith(VISION_PARTS)]
    assert "multi_modal_projector.linear_1" in vision and "multi_modal_projector.linear_2" in vision
    assert len([m for m in vision if m.startswith("vision_tower.encoder.layers.")]) == 2 * 6  # 2 layers run
    assert not any(m.startswith("vision_tower.embeddings.") for m in block["modules"])  # read as arrays
    model, processor = load(str(out))
    assert quantized_paths(model) == block["modules"]
    assert len(generate(model, processor, PROMPT, [images[IMAGE]], max_tokens=3, ignore_eos=True).tokens) == 3


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(quantize=True, q_bits=8),
        dict(quantize=True, q_bits=4),
        dict(quantize=True, q_bits=4, q_group_size=32, quantize_vision=True),
        dict(quantize=True, q_bits=4, q_group_size=128),
    ],
)
def test_estimate_bytes_matches_what_is_written(options, checkpoints, loaded, tmp_path):
    name = "hf-v1.6-mistral"
    out = convert(str(checkpoints[name]), str(tmp_path / "out"), dtype="float16", progress=False, **options)
    written = sum(v.nbytes for v in load_weights(out).values())
    config = loaded(name)[0].config
    estimate = estimate_bytes(
        config,
        bits=options.get("q_bits"),
        group_size=options.get("q_group_size", 64),
        quantize_vision=options.get("quantize_vision", False),
    )
    assert estimate == written
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert written <= on_disk <= written + 64 * 1024  # plus the safetensors header


def test_estimate_bytes_of_llava_16_mistral_7b():
    """docs/convert.md's size table, from shapes alone, checked against a count by hand."""
    config = LlavaConfig(
        text_config=dict(
            model_type="mistral",
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=32064,
            rope_theta=1e6,
        ),
        image_aspect_ratio="anyres",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        patch_merge_type="spatial_unpad",
    )
    h, kv, inter, vocab, layers = 4096, 1024, 14336, 32064, 32
    d, di, run = 1024, 4096, 23  # CLIP ViT-L/14-336, 23 of 24 layers run
    decoder_linear = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # (out, in)
    decoder = layers * (sum(o * i for o, i in decoder_linear) + 2 * h) + 2 * vocab * h + h
    vision = d + d * 14 * 14 * 3 + 577 * d + 2 * d + run * (4 * (d * d + d) + 4 * d + d * di + di + di * d + d)
    projector = d * h + h + h * h + h + h  # two linears and image_newline
    assert estimate_bytes(config) == 2 * (decoder + vision + projector)

    def quantized(bits, group=64):  # packed weights, float16 scale and bias per group
        return lambda o, i: o * i * bits // 8 + 2 * 2 * o * i // group

    for bits in (8, 4):
        q = quantized(bits)
        decoder_q = layers * (sum(q(o, i) for o, i in decoder_linear) + 2 * 2 * h) + 2 * q(vocab, h) + 2 * h
        assert estimate_bytes(config, bits) == decoder_q + 2 * (vision + projector)


# -- pre-converted MLX layout ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name,bits,dtype,min_cosine",
    [
        ("hf-v1.5-vicuna", 8, "float16", 0.999),  # float16, as in the real repos (measured 0.9999)
        ("hf-v1.6-mistral", 4, "float32", 0.95),  # 4-bit tower too (measured 0.972); float32: faster on CPU
    ],
)
def test_preconverted_mlx_layout_loads_and_generates(
    name, bits, dtype, min_cosine, checkpoints, reference, images, tmp_path
):
    pre = build_preconverted(checkpoints[name], tmp_path / "pre", bits=bits, group_size=64, dtype=dtype)
    model, processor = load(str(pre))
    # Quantized as the files say, except what we never run (the last tower layer) and the
    # position embedding, which vision.py reads as a plain array (dequantized on load).
    keep = layers_to_run(model.config.vision.num_hidden_layers, model.config.vision_feature_layer)
    expected = sorted(
        rename(k[: -len(".scales")])
        for k in load_weights(pre)
        if k.endswith(".scales") and "position_embedding" not in k and f"encoder.layers.{keep}." not in k
    )
    assert quantized_paths(model) == expected and any(p.startswith("vision_tower.") for p in expected)
    inputs, source = reference(name)
    assert cosine(logits(model, inputs), source) >= min_cosine  # the same model, quantized
    result = generate(model, processor, PROMPT, [images[IMAGE]], max_tokens=4, template=False, ignore_eos=True)
    assert len(result.tokens) == 4

    # Converting it keeps it as it is, in our layout.
    out = convert(str(pre), str(tmp_path / "out"), progress=False)
    converted, _ = load(str(out))
    weights = dict(tree_flatten(model.parameters()))
    for key, value in tree_flatten(converted.parameters()):
        assert value.dtype == weights[key].dtype and mx.array_equal(value, weights[key]), key
    block = read_json(out / "config.json")["quantization"]
    assert (block["bits"], block["group_size"]) == (bits, 64) and block["modules"] == quantized_paths(converted)
    with pytest.raises(LlavaError, match="already quantized"):
        convert(str(pre), str(tmp_path / "again"), quantize=True, progress=False)


# -- bad input ------------------------------------------------------------------------------
def odd_width_checkpoint(directory: Path, tokenizer_from: Path) -> Path:
    """Our own layout with widths 40 and 80: no group size (32, 64, 128) divides them."""
    config = LlavaConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=1064,
            hidden_size=40,
            intermediate_size=80,
            num_hidden_layers=1,
            num_attention_heads=4,
        ),
        vision_config=dict(
            hidden_size=40,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        ),
    )
    model = LlavaModel(config)
    directory.mkdir()
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (directory / "config.json").write_text(json.dumps({"model_type": "llava_mlx", **config.to_dict()}))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_from / name, directory / name)
    return directory


def test_bad_input_via_the_cli(checkpoints, tmp_path):
    """Each case: exit code 1, one line `error: ...` on stderr, the previous --out untouched."""
    previous = convert(str(checkpoints["hf-v1.5-vicuna"]), str(tmp_path / "previous"), progress=False)
    before = snapshot(previous)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert"}))
    missing = tmp_path / "missing"
    shutil.copytree(checkpoints["hf-v1.6-vicuna"], missing)
    (missing / "model-00002-of-00002.safetensors").unlink()
    odd = odd_width_checkpoint(tmp_path / "odd", checkpoints["hf-v1.5-vicuna"])
    # Killed half-way: the third shard (one tensor each) cannot be written.
    halfway = (
        "import importlib, sys, mlx.core as mx\n"
        "c = importlib.import_module('llava_mlx.checkpoint.convert')\n"
        "shards, save, calls = c.make_shards, mx.save_safetensors, []\n"
        "c.make_shards = lambda weights, gb: shards(weights, 0)\n"
        "def failing(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3: raise OSError(28, 'No space left on device')\n"
        "    return save(*args, **kwargs)\n"
        "mx.save_safetensors = failing\n"
        "sys.exit(importlib.import_module('llava_mlx.cli.convert').main(sys.argv[1:]))\n"
    )
    out, small = ["--out", str(previous)], str(checkpoints["hf-v1.5-vicuna"])
    cases = {
        "unknown model type 'bert'": ["convert.py", "--model", str(unknown), *out, "--force"],
        "missing weight shard model-00002-of-00002": ["convert.py", "--model", str(missing), *out, "--force"],
        "group size 32 divides the input width of no layer": [
            "convert.py",
            "--model",
            str(odd),
            *out,
            "--force",
            "-q",
            "--q-group-size",
            "32",
        ],
        "already exists and is not empty; pass --force": ["convert.py", "--model", small, *out],
        "No space left on device": ["-c", halfway, "--model", small, *out, "--force"],
    }
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    running = {
        expected: subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for expected, args in cases.items()
    }
    for expected, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, (expected, stderr[-2000:])
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (expected, stderr[-2000:])
        assert stdout == ""
    assert snapshot(previous) == before
    assert leftovers(previous) == []


def test_existing_out_is_replaced_only_with_force(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--model", str(checkpoints["hf-v1.5-vicuna"]), "--out", str(out), "--dtype", "float16"]
    assert main(args) == 1
    assert capsys.readouterr().err.startswith("error: --out") and snapshot(out) == {"notes.txt": b"mine"}
    assert main([*args, "--force"]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert not (out / "notes.txt").exists() and read_json(out / "config.json")["model_type"] == "llava_mlx"
    assert {v.dtype for v in load_weights(out).values()} == {mx.float16}
    assert leftovers(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(str(checkpoints["hf-v1.5-vicuna"]), str(empty), progress=False)  # an empty directory is fine
    assert (empty / "config.json").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_previous_out_untouched(error, checkpoints, tmp_path, monkeypatch):
    previous = convert(str(checkpoints["hf-v1.5-vicuna"]), str(tmp_path / "out"), progress=False)
    before = snapshot(previous)
    save, calls = mx.save_safetensors, []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 5:
            raise error
        return save(*args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    expected = LlavaError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        convert(str(checkpoints["hf-v1.6-mistral"]), str(previous), force=True, progress=False, shard_gb=0)
    assert len(calls) == 5 and all(Path(c).parent != previous for c in calls)  # into a temporary directory
    assert snapshot(previous) == before
    assert leftovers(previous) == []


def test_bad_options_and_paths(checkpoints, tmp_path):
    source = str(checkpoints["hf-v1.5-vicuna"])
    out = str(tmp_path / "out")
    bad = [
        (dict(q_bits=8), "apply only with -q"),
        (dict(quantize_vision=True), "apply only with -q"),
        (dict(quantize=True, q_bits=3), "--q-bits 3 is not supported"),
        (dict(quantize=True, q_group_size=48), "--q-group-size 48 is not supported"),
        (dict(dtype="int8"), "--dtype int8 is not supported"),
    ]
    for options, message in bad:
        with pytest.raises(LlavaError, match=message):
            convert(source, out, progress=False, **options)
    with pytest.raises(LlavaError, match="not a directory nor a Hugging Face repo id"):
        convert(str(tmp_path / "nowhere"), out, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(checkpoints["hf-v1.5-vicuna"], copy)
    before = snapshot(copy)
    with pytest.raises(LlavaError, match="holds the checkpoint being converted"):
        convert(str(copy), str(copy), force=True, progress=False)
    assert snapshot(copy) == before
    assert not Path(out).exists() and leftovers(Path(out)) == []


def test_cli_convert_then_generate(checkpoints, images, tmp_path):
    """`convert.py -q` then `generate.py` on its output, and on a pre-converted MLX repo."""
    root = ROOT
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = tmp_path / "q4"
    done = subprocess.run(
        [
            sys.executable,
            str(root / "convert.py"),
            "--model",
            str(checkpoints["orig-v1.5-vicuna"]),
            "--out",
            str(out),
            "-q",
            "--q-group-size",
            "64",
        ],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "4-bit" in done.stdout
    pre = build_preconverted(checkpoints["hf-v1.6-mistral"], tmp_path / "pre", bits=4, group_size=64, dtype="float16")
    for model in (out, pre):
        result = subprocess.run(
            [
                sys.executable,
                str(root / "generate.py"),
                "--model",
                str(model),
                "--image",
                str(images["wide"]),
                "--prompt",
                "What is it?",
                "--max-tokens",
                "4",
            ],
            capture_output=True,
            text=True,
            cwd=root,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() and "Peak memory" in result.stderr
