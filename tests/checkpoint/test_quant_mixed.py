"""Mixed-precision (per-module) quantization: mlx-vlm's `--quant-predicate` conversions load
and match, and `convert.py --quant-predicate` writes the same thing, its bits recorded per
module as mlx-lm and mlx-vlm record them, close to float32."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llava_mlx import convert, generate, load
from llava_mlx.checkpoint.files import load_weights, read_json
from llava_mlx.checkpoint.quantize import RECIPES, estimate_bytes
from llava_mlx.cli.convert import main
from llava_mlx.errors import LlavaError
from llava_mlx.model import LlavaConfig, LlavaModel

from fixtures.preconverted import build_preconverted
from helpers import cosine, logits

NAME = "hf-v1.6-mistral"  # 2 decoder layers: layer 1 is "last eighth", so it gets the high bits
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
IMAGE = "tie_wide"
# The layers each recipe raises to its high bits on the 2-layer fixture.
HIGH = {
    "language_model.lm_head",
    "language_model.model.embed_tokens",
    "language_model.model.layers.1.self_attn.v_proj",
    "language_model.model.layers.1.mlp.down_proj",
}
# Logit cosine to float32 over the whole merged sequence (measured 0.9509, 0.9813, 0.9862,
# 0.99658, 0.99684 for our conversions; mlx-vlm's are the same tensors).
MIN_COSINE = {"mixed_2_6": 0.94, "mixed_3_4": 0.975, "mixed_3_6": 0.98, "mixed_4_6": 0.995, "mixed_4_8": 0.995}
# The input of test_convert's 8-bit greedy test (gaps of ≥ 0.82 between the two best logits
# along the float32 greedy path): the 6-/8-bit-heavy recipes keep all 8 tokens (measured).
GREEDY = ("[INST] <image>\nWhat is in the picture? [/INST]", "square")


def module_bits(model) -> dict:
    return {
        p: (m.bits, m.group_size)
        for p, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


@pytest.fixture(scope="module")
def reference(loaded, images):
    model, processor = loaded(NAME)
    inputs = processor(PROMPT, [images[IMAGE]])
    return inputs, logits(model, inputs)


@pytest.fixture(scope="module")
def mixed(checkpoints, tmp_path_factory):
    """mixed(recipe) -> our float32 `--quant-predicate` conversion, made once."""
    cache = {}

    def get(recipe):
        if recipe not in cache:
            out = tmp_path_factory.mktemp("mixed") / recipe
            cache[recipe] = convert(
                str(checkpoints[NAME]), str(out), quant_predicate=recipe, dtype="float32", progress=False
            )
        return cache[recipe]

    return get


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_quant_predicate_records_per_module_bits(recipe, mixed, reference):
    low, high = RECIPES[recipe]
    out = mixed(recipe)
    block = read_json(out / "config.json")["quantization"]
    assert (block["bits"], block["group_size"], block["recipe"], block["skipped"]) == (low, 64, recipe, [])
    entries = {k: v for k, v in block.items() if isinstance(v, dict)}
    assert sorted(entries) == block["modules"] and all(m.startswith("language_model.") for m in entries)
    assert len(entries) == 2 * 7 + 2
    want = {m: {"group_size": 64, "bits": high if m in HIGH else low, "mode": "affine"} for m in entries}
    assert entries == want
    weights = load_weights(out)
    for module, entry in entries.items():  # the packed widths are those of the recorded bits
        rows, packed = weights[f"{module}.weight"].shape
        width = 128 if module.endswith("down_proj") else 64  # the input widths of the fixture
        assert packed * 32 == width * entry["bits"] and weights[f"{module}.scales"].shape == (rows, width // 64)

    # Read the way mlx-lm's and mlx-vlm's loaders read it: only the entries decide.
    config = LlavaConfig.from_dict({k: v for k, v in read_json(out / "config.json").items() if k != "model_type"})
    bare = LlavaModel(config)
    nn.quantize(bare, class_predicate=lambda p, m: block.get(p, False))
    bare.load_weights(list(weights.items()), strict=True)

    model, _ = load(str(out))
    assert module_bits(model) == {m: (e["bits"], 64) for m, e in entries.items()}
    inputs, expected = reference
    got = logits(model, inputs)
    np.testing.assert_array_equal(logits(bare, inputs), got)
    assert cosine(got, expected) >= MIN_COSINE[recipe]


@pytest.mark.parametrize("recipe", ["mixed_4_6", "mixed_4_8"])
def test_high_bit_recipes_keep_the_greedy_tokens(recipe, mixed, loaded, images):
    prompt, image = GREEDY
    options = dict(max_tokens=8, template=False, ignore_eos=True)
    want = generate(*loaded(NAME), prompt, [images[image]], **options).tokens
    model, processor = load(str(mixed(recipe)))
    assert generate(model, processor, prompt, [images[image]], **options).tokens == want


@pytest.mark.parametrize("recipe", ["mixed_4_6", "mixed_2_6"])
def test_mlx_vlm_mixed_conversion_loads_and_matches(recipe, checkpoints, mixed, reference, images, tmp_path):
    """mlx-vlm's `convert -q --quant-predicate` output (the fixture writes its exact tensors and
    config.json) loads with each module's bits, and equals our conversion with the same recipe."""
    pre = build_preconverted(checkpoints[NAME], tmp_path / "pre", group_size=64, dtype="float32", recipe=recipe)
    block = read_json(pre / "config.json")["quantization"]
    assert block["bits"] == 4 and block["mode"] == "affine"  # mlx-vlm's --q-bits default, whatever the recipe
    model, processor = load(str(pre))
    low, high = RECIPES[recipe]
    assert module_bits(model) == {m: (high if m in HIGH else low, 64) for m in module_bits(model)}
    assert len(module_bits(model)) == 2 * 7 + 2  # the vision side stays float
    ours, _ = load(str(mixed(recipe)))
    theirs = dict(tree_flatten(model.parameters()))
    for key, value in tree_flatten(ours.parameters()):
        assert mx.array_equal(value, theirs[key]), key
    inputs, expected = reference
    got = logits(model, inputs)
    assert cosine(got, expected) >= MIN_COSINE[recipe]
    result = generate(model, processor, PROMPT, [images[IMAGE]], max_tokens=3, template=False, ignore_eos=True)
    assert len(result.tokens) == 3

    # Converting it keeps every module's bits, recorded per module in our layout.
    out = convert(str(pre), str(tmp_path / "out"), progress=False)
    converted, _ = load(str(out))
    assert module_bits(converted) == module_bits(model)
    np.testing.assert_array_equal(logits(converted, inputs), got)
    entries = {k: v["bits"] for k, v in read_json(out / "config.json")["quantization"].items() if isinstance(v, dict)}
    assert entries == {m: b for m, (b, _) in module_bits(model).items()}


def test_entries_under_mlx_lm_names(checkpoints, tmp_path):
    """mlx-vlm also reads entries without the `language_model.` prefix (mlx-lm's names)."""
    pre = build_preconverted(checkpoints[NAME], tmp_path / "pre", group_size=64, dtype="float32", recipe="mixed_4_6")
    config = read_json(pre / "config.json")
    block = config["quantization"]
    config["quantization"] = {k.removeprefix("language_model."): v for k, v in block.items()}
    (pre / "config.json").write_text(json.dumps(config))
    model, _ = load(str(pre))
    assert module_bits(model)["language_model.lm_head"] == (6, 64)
    assert module_bits(model)["language_model.model.layers.1.mlp.down_proj"] == (6, 64)
    assert module_bits(model)["language_model.model.layers.0.mlp.down_proj"] == (4, 64)

    # An entry that disagrees with the stored tensor is one clear error.
    block["language_model.model.layers.0.mlp.down_proj"]["bits"] = 8
    config["quantization"] = block
    (pre / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlavaError, match="weight 'language_model.model.layers.0.mlp.down_proj.weight' has shape"):
        load(str(pre))


@pytest.mark.parametrize("recipe", ["mixed_4_6", "mixed_3_4"])
def test_estimate_bytes_with_a_recipe(recipe, checkpoints, loaded, tmp_path):
    out = convert(
        str(checkpoints[NAME]), str(tmp_path / "out"), quant_predicate=recipe, dtype="float16", progress=False
    )
    written = sum(v.nbytes for v in load_weights(out).values())
    config = loaded(NAME)[0].config
    assert estimate_bytes(config, quant_predicate=recipe) == written
    low, high = RECIPES[recipe]
    assert estimate_bytes(config, bits=low) < written < estimate_bytes(config, bits=high)


def test_estimate_bytes_of_the_7b_recipes():
    """docs/convert.md's 7B sizes: over plain 4-bit, mixed_4_6 adds 2 bits a weight to lm_head, the
    embedding table, and v_proj and down_proj of 16 of the 32 layers (0-3, 6, 9, ..., 27, 28-31)."""
    text = dict(
        model_type="mistral",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32064,
    )
    config = LlavaConfig(
        text_config=text,
        image_aspect_ratio="anyres",
        patch_merge_type="spatial_unpad",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )
    raised = 16 * (1024 * 4096 + 4096 * 14336) + 2 * 32064 * 4096
    plain = estimate_bytes(config, bits=4)
    assert estimate_bytes(config, quant_predicate="mixed_4_6") == plain + raised * 2 // 8
    assert estimate_bytes(config, quant_predicate="mixed_4_8") == plain + raised * 4 // 8


def test_bad_recipe_options(checkpoints, tmp_path, capsys):
    source, out = str(checkpoints[NAME]), str(tmp_path / "out")
    bad = [
        (dict(quant_predicate="mixed_5_9"), "--quant-predicate mixed_5_9 is not a recipe"),
        (dict(quant_predicate="mixed_4_6", q_bits=8), "--q-bits does not apply with --quant-predicate"),
        (dict(quant_predicate="mixed_4_6", quantize_vision=True), "--quantize-vision does not apply"),
    ]
    for options, message in bad:
        with pytest.raises(LlavaError, match=message):
            convert(source, out, progress=False, **options)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["--model", source, "--out", out, "--quant-predicate", "mixed_5_9"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["--model", source, "--out", out, "--quant-predicate", "mixed_3_6", "--dtype", "float32"]) == 0
    assert "3/6-bit (12 at 3, 4 at 6 bits), group size 64: 16 layers quantized" in capsys.readouterr().out
    shutil.rmtree(out)
