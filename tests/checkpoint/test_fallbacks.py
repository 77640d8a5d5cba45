"""Where the loader has to guess, it says so on stderr; where it cannot know, it refuses."""

import json
import shutil

import pytest

from llava_mlx import LlavaError, load
from llava_mlx.checkpoint.layouts import read_config
from llava_mlx.cli.generate import main


def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unreadable_vision_tower_is_a_stated_guess(checkpoints, tmp_path, capsys):
    """LLaVA-1.6 ships its tower weights; the named tower only gives its config. Unreadable
    (not a directory, not in the hub cache, offline), ViT-L/14-336 is guessed, out loud."""
    path = edited_copy(
        checkpoints["orig-v1.6-vicuna"], tmp_path / "lost-tower", mm_vision_tower="nobody/no-such-clip-tower"
    )
    with pytest.raises(LlavaError, match="the checkpoint and its config.json disagree"):
        load(str(path))  # the guess is ViT-L; this tiny tower is not
    err = capsys.readouterr().err
    assert err.startswith("warning: the vision tower 'nobody/no-such-clip-tower'")
    assert "guessing CLIP ViT-L/14-336" in err and "--vision-tower" in err
    assert len(err.strip().splitlines()) == 1
    # the hint works, silently
    load(str(path), vision_tower=str(checkpoints["clip-tower-v1.6-vicuna"]))
    load(str(checkpoints["orig-v1.6-vicuna"]))
    assert capsys.readouterr().err == ""


def test_cli_shows_the_guess_then_the_error(checkpoints, tmp_path, capsys):
    path = edited_copy(
        checkpoints["orig-v1.6-mistral"], tmp_path / "lost-tower", mm_vision_tower="nobody/no-such-clip-tower"
    )
    assert main(["--model", str(path), "--prompt", "hi", "--max-tokens", "2"]) == 1
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: ") and "--vision-tower" in warning
    assert error.startswith("error: ") and "disagree" in error


@pytest.mark.parametrize(
    "model_type,architecture",
    [
        ("llava_mpt", "LlavaMptForCausalLM"),
        ("llava_qwen_moe", "LlavaQwenMoeForCausalLM"),  # the LLaVA-NeXT code's, no release
        ("llava", "LlavaMptForCausalLM"),  # liuhaotian's 'llava' with another decoder
        ("llava_gemma", None),
    ],
)
def test_original_decoders_other_than_llama_are_refused(model_type, architecture):
    raw = {"model_type": model_type, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "hidden_size": 64}
    if architecture:
        raw["architectures"] = [architecture]
    with pytest.raises(LlavaError, match=f"of type '{model_type}' \\({architecture or model_type}\\) is not supported"):
        read_config(raw, None)


@pytest.mark.parametrize(
    "model_type,architecture,decoder",
    [
        ("llava", "LlavaLlamaForCausalLM", "llama"),  # liuhaotian/llava-v1.5-7b
        ("llava", "LlavaMistralForCausalLM", "mistral"),
        ("llava_llama", "LlavaLlamaForCausalLM", "llama"),
        ("llava_mistral", "LlavaMistralForCausalLM", "mistral"),
        ("llava", None, "llama"),
        ("llava_qwen", "LlavaQwenForCausalLM", "qwen2"),  # the LLaVA-NeXT code's (lmms-lab)
        ("llava", "LlavaQwenForCausalLM", "qwen2"),
        ("llava_mixtral", "LlavaMixtralForCausalLM", "mixtral"),
    ],
)
def test_original_layout_decoders(model_type, architecture, decoder):
    raw = {"model_type": model_type, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    if architecture:
        raw["architectures"] = [architecture]
    assert read_config(raw, None)[1].text_config["model_type"] == decoder


def test_cli_refuses_an_mpt_original_by_name(checkpoints, tmp_path, capsys):
    path = edited_copy(
        checkpoints["orig-v1.5-vicuna"], tmp_path / "mpt", model_type="llava_mpt", architectures=["LlavaMptForCausalLM"]
    )
    assert main(["--model", str(path), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: original LLaVA checkpoint of type 'llava_mpt' (LlavaMptForCausalLM)")
    assert len(err.splitlines()) == 1


def test_tokenising_without_tokenizer_model_is_a_stated_fallback(checkpoints, tmp_path, capsys):
    path = shutil.copytree(checkpoints["hf-v1.5-vicuna"], tmp_path / "no-spm")
    (path / "tokenizer.model").unlink()
    _, processor = load(str(path))
    err = capsys.readouterr().err
    assert err == (
        f"warning: {path} has no tokenizer.model: tokenising with transformers' rules, which can "
        "differ from the original LLaVA's after special tokens and <image>\n"
    )
    assert processor.sentencepiece is None
    load(str(checkpoints["hf-v1.5-vicuna"]))
    assert capsys.readouterr().err == ""


def test_original_without_a_named_tower_is_a_stated_guess(checkpoints, tmp_path, capsys):
    path = tmp_path / "unnamed"
    edited_copy(checkpoints["orig-v1.6-vicuna"], path)
    config = json.loads((path / "config.json").read_text())
    del config["mm_vision_tower"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlavaError, match="disagree"):
        load(str(path))
    assert capsys.readouterr().err.startswith(f"warning: {path / 'config.json'} names no vision tower: guessing CLIP")
