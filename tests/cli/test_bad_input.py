"""Every bad input of every entry point: one clear error, never a traceback, a hang or a lost
output. The CLIs answer with one `error:` line and exit 1 (130 / 143 on Ctrl-C / SIGTERM),
the Python API with a LlavaError that is also a TypeError / ValueError where that fits.
CLI cases run in-process (`main(argv)`); signals and argv bytes need real processes."""

import importlib
import io
import json
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_mlx import LlavaError, convert, generate, load, stream_generate
from llava_mlx import processor as processor_module
from llava_mlx.cli.convert import main as convert_main
from llava_mlx.cli.generate import main as generate_main
from llava_mlx.fetch import fetch

from conftest import ROOT
from helpers import expect_error, snapshot

SMALL = "hf-v1.5-vicuna"
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}


# -- generate.py flags ------------------------------------------------------------------------------
FLAG_CASES = [
    (["--seed", "-1"], "seed must be between 0 and"),
    (["--max-kv-size", "0"], "max_kv_size must be >= 1"),
    (["--max-kv-size", "-3"], "max_kv_size must be >= 1"),
    (["--prefill-step-size", "0"], "prefill_step_size must be >= 1"),
    (["--prefill-step-size", "-5"], "prefill_step_size must be >= 1"),
    (["--temp", "-1"], "temperature must be >= 0"),
    (["--temp", "nan"], "temperature must be a finite number"),
    (["--temp", "inf"], "temperature must be a finite number"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-p", "-0.5"], "top_p must be in (0, 1]"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "nan"], "top_p must be a finite number"),
    (["--max-tokens", "-2"], "max_tokens must be >= -1"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "  \n "], "the prompt is empty"),
    (["--prompt", "caf\udcc3 ?"], "the prompt is not valid UTF-8"),  # argv bytes b"caf\xc3 ?"
    (["--prompt", "lone \ud800 surrogate"], "the prompt is not valid UTF-8"),
    (["--system", "sys\udcff"], "system is not valid UTF-8"),
    (["--vision-tower", ""], "vision_tower is empty"),
]


@pytest.mark.parametrize("flags,fragment", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_generate_flags(flags, fragment, checkpoints, capsys):
    expect_error(capsys, generate_main, ["--model", str(checkpoints[SMALL]), "--max-tokens", "2", *flags], fragment)


def test_generate_inputs_refused(checkpoints, images, tmp_path, capsys):
    model = ["--model", str(checkpoints[SMALL]), "--max-tokens", "1", "--prompt", "hi"]
    expect_error(capsys, generate_main, ["--model", "", "--prompt", "hi"], "the model is empty")
    expect_error(capsys, generate_main, [*model, "--image", ""], "an image name is empty")
    expect_error(capsys, generate_main, [*model, "--image", str(tmp_path)], "(a directory)")
    expect_error(capsys, generate_main, [*model, "--image", "ftp://example.com/a.png"], "only http(s) URLs")
    expect_error(capsys, generate_main, [*model, "--image", "file:///etc/hostname"], "only http(s) URLs")
    # --vision-tower is read only by the original layout: elsewhere it would be ignored silently
    expect_error(capsys, generate_main, [*model, "--vision-tower", str(tmp_path)], "applies only to original")


LONG = "a" * 5000  # longer than any file system takes as one name


def test_names_the_file_system_cannot_take(checkpoints, family, tmp_path, capsys):
    """A 5,000-character name (or a NUL byte) is one line naming the argument, never an OSError."""
    model = ["--model", str(checkpoints[SMALL]), "--max-tokens", "1", "--prompt", "hi"]
    too_long = "(5,000 characters)': File name too long"
    expect_error(capsys, generate_main, [*model, "--image", LONG], "image 'aaaa")
    expect_error(capsys, generate_main, [*model, "--image", LONG], too_long)
    video_model = ["--model", str(family["hub-onevision"]), "--max-tokens", "1", "--prompt", "hi"]
    expect_error(capsys, generate_main, [*video_model, "--video", LONG], too_long)
    expect_error(capsys, generate_main, ["--model", LONG, "--prompt", "hi"], "the model 'aaaa")
    expect_error(capsys, generate_main, [*model, "--model-base", LONG], too_long)
    expect_error(capsys, generate_main, [*model, "--vision-tower", LONG], too_long)
    out = ["--out", str(tmp_path / LONG)]
    expect_error(capsys, convert_main, ["--model", str(checkpoints[SMALL]), *out], "characters)': File name too long")
    assert list(tmp_path.iterdir()) == []
    from llava_mlx.processor import load_image

    with pytest.raises(ValueError, match="image 'x\\\\x00y': embedded null byte"):
        load_image("x\x00y")


def test_invalid_utf8_in_argv_is_one_line(checkpoints):
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--model", str(checkpoints[SMALL]), "--prompt", b"caf\xc3 ?"],
        capture_output=True,
        env={**ENV, "LC_ALL": "C.UTF-8"},
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode().strip() == "error: the prompt is not valid UTF-8 text (bad character at position 3)"


def test_chat_stdin_not_utf8(checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe what?\n"), encoding="utf-8"))
    expect_error(
        capsys,
        generate_main,
        ["--model", str(checkpoints[SMALL]), "--chat", "--max-tokens", "1"],
        "stdin is not valid UTF-8",
    )


def test_interrupt_inside_main_is_one_line(monkeypatch, capsys):
    load_module = importlib.import_module("llava_mlx.cli.generate")  # the `load` the command calls

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(load_module, "load", interrupted)
    assert generate_main(["--model", "any/where", "--prompt", "hi"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_closed_stdout_and_hangup_are_quiet(checkpoints):
    """`generate.py | head -c0` (the reader gone): exit 1, nothing on stderr. SIGHUP while the
    chat waits for the next question: one line, exit 128 + 1."""
    args = [sys.executable, str(ROOT / "generate.py"), "--model", str(checkpoints[SMALL]), "--max-tokens", "4"]
    process = subprocess.Popen([*args, "--prompt", "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and stderr == b"", stderr
    process = subprocess.Popen(
        [*args, "--prompt", "hi", "--chat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    for line in process.stderr:  # the first answer's report: the chat now waits on stdin
        if line.startswith("Peak memory"):
            break
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 129 and stderr.strip() == "terminated (SIGHUP)", stderr


# -- checkpoints: every file of the layouts --------------------------------------------------------------
def edit(key_path, value):
    """A config edit setting config[k1][k2]... = value."""

    def apply(config):
        target = config
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = value

    return apply


# (name, source layout, a config.json edit or {file: bytes | "DIR" | None (removed) | edit}, expected fragment)
CHECKPOINT_CASES = [
    ("config-array", SMALL, {"config.json": b"[1, 2]"}, "config.json must hold a JSON object, not a list"),
    ("config-null", SMALL, {"config.json": b"null"}, "must hold a JSON object"),
    ("config-not-utf8", SMALL, {"config.json": b'{"model_type": "llava\xff"}'}, "config.json is not UTF-8 text"),
    ("config-directory", SMALL, {"config.json": "DIR"}, "config.json is a directory"),
    ("config-empty", SMALL, {"config.json": b""}, "config.json is not valid JSON"),
    ("text-config-string", SMALL, edit(["text_config"], "llama"), "'text_config' in"),
    ("vision-config-list", SMALL, edit(["vision_config"], [1]), "'vision_config' in"),
    (
        "negative-hidden",
        SMALL,
        edit(["text_config", "hidden_size"], -16),
        "text hidden_size must be a positive integer",
    ),
    ("negative-layers", SMALL, edit(["text_config", "num_hidden_layers"], -1), "text num_hidden_layers must be"),
    ("zero-heads", SMALL, edit(["text_config", "num_attention_heads"], 0), "num_attention_heads must be a positive"),
    ("string-size", SMALL, edit(["text_config", "intermediate_size"], "64"), "intermediate_size must be a positive"),
    ("float-size", SMALL, edit(["text_config", "hidden_size"], 16.5), "hidden_size must be a positive integer"),
    ("negative-vocab", SMALL, edit(["text_config", "vocab_size"], -3), "vocab_size must be a positive integer"),
    ("zero-context", SMALL, edit(["text_config", "max_position_embeddings"], 0), "max_position_embeddings"),
    ("negative-image-size", SMALL, edit(["vision_config", "image_size"], -336), "vision image_size must be"),
    ("zero-patch", SMALL, edit(["vision_config", "patch_size"], 0), "vision patch_size must be"),
    ("unknown-activation", SMALL, edit(["vision_config", "hidden_act"], "relu9"), "hidden_act 'relu9'"),
    ("feature-layer-string", SMALL, edit(["vision_feature_layer"], "x"), "vision_feature_layer in"),
    ("feature-layer-99", SMALL, edit(["vision_feature_layer"], 99), "vision feature layer must be between"),
    ("feature-layers-list", SMALL, edit(["vision_feature_layer"], [-2, -5]), "several layers"),
    ("select-strategy", SMALL, edit(["vision_feature_select_strategy"], "bogus"), "vision_feature_select_strategy"),
    ("text-model-type", SMALL, edit(["text_config", "model_type"], "gpt2"), "unsupported language model type"),
    ("quantization-string", SMALL, edit(["quantization"], "4bit"), "'quantization' in"),
    ("quantization-no-group", SMALL, edit(["quantization"], {"bits": 4}), "quantization group_size"),
    ("pinpoints-syntax", "hf-v1.6-vicuna", edit(["image_grid_pinpoints"], "((("), "image_grid_pinpoints in"),
    ("pinpoints-code", "hf-v1.6-vicuna", edit(["image_grid_pinpoints"], "__import__('os')"), "image_grid_pinpoints in"),
    ("pinpoints-flat", "hf-v1.6-vicuna", edit(["image_grid_pinpoints"], [1, 2, 3]), "image_grid_pinpoints must be"),
    ("pinpoints-empty", "hf-v1.6-vicuna", edit(["image_grid_pinpoints"], []), "image_grid_pinpoints must be"),
    ("pinpoints-negative", "hf-v1.6-vicuna", edit(["image_grid_pinpoints"], [[-336, 672]]), "pinpoints must be"),
    ("pinpoints-not-tiles", "hf-v1.6-vicuna", edit(["image_grid_pinpoints"], [[100, 100]]), "multiples of"),
    ("orig-projector", "orig-v1.6-vicuna", edit(["mm_projector_type"], "mlp9x_relu"), "unsupported projector"),
    ("orig-aspect", "orig-v1.6-vicuna", edit(["image_aspect_ratio"], "stretch"), "image_aspect_ratio 'stretch'"),
    ("orig-merge", "orig-v1.6-vicuna", edit(["mm_patch_merge_type"], "weird"), "patch merge type 'weird'"),
    ("orig-select", "orig-v1.6-vicuna", edit(["mm_vision_select_feature"], "foo"), "vision feature select 'foo'"),
    ("orig-select-layer", "orig-v1.6-vicuna", edit(["mm_vision_select_layer"], "-2"), "mm_vision_select_layer in"),
    ("orig-pinpoints", "orig-v1.6-vicuna", edit(["image_grid_pinpoints"], "[[336, 672], "), "image_grid_pinpoints"),
    ("orig-max-length", "orig-v1.6-vicuna", edit(["tokenizer_model_max_length"], -1), "tokenizer_model_max_length"),
    ("tokenizer-model", "orig-v1.6-vicuna", {"tokenizer.model": b"garbage"}, "is not a SentencePiece model"),
    ("tokenizer-json", SMALL, {"tokenizer.json": b"{nope"}, "cannot load the tokenizer"),
    ("tokenizer-config", SMALL, {"tokenizer_config.json": b"{nope"}, "tokenizer_config.json is not valid JSON"),
    ("tokenizer-config-list", SMALL, {"tokenizer_config.json": b"[]"}, "tokenizer_config.json must hold"),
    ("special-tokens", SMALL, {"special_tokens_map.json": b"{nope"}, "special_tokens_map.json is not valid"),
    ("generation-config", SMALL, {"generation_config.json": b"\xff"}, "generation_config.json is not UTF-8"),
    ("no-tokenizer", SMALL, {"tokenizer.json": None, "tokenizer.model": None}, "no tokenizer in"),
    ("preprocessor", SMALL, {"preprocessor_config.json": b"{nope"}, "preprocessor_config.json is not valid"),
    ("preprocessor-list", SMALL, {"preprocessor_config.json": b"[1]"}, "preprocessor_config.json must hold"),
    ("preprocessor-dir", SMALL, {"preprocessor_config.json": "DIR"}, "preprocessor_config.json is a directory"),
    ("preprocessor-size", SMALL, {"preprocessor_config.json": b'{"size": "big"}'}, "unreadable image sizes"),
    ("preprocessor-negative", SMALL, {"preprocessor_config.json": b'{"crop_size": -5}'}, "crop must be positive"),
    ("preprocessor-mean", SMALL, {"preprocessor_config.json": b'{"image_mean": [0.5]}'}, "image_mean must be 3"),
    ("preprocessor-std", SMALL, {"preprocessor_config.json": b'{"image_std": [0, 0, 0]}'}, "image_std must be"),
    (
        "chat-template-syntax",
        SMALL,
        {"tokenizer_config.json": edit(["chat_template"], "{% for %}")},
        "chat template fails: TemplateSyntaxError",
    ),
    (
        "chat-template-raises",
        SMALL,
        {"tokenizer_config.json": edit(["chat_template"], "{{ raise_exception('no') }}")},
        "chat template fails",
    ),
    ("chat-template-json", SMALL, {"chat_template.json": b"{nope"}, "chat_template.json is not valid JSON"),
    ("index-json", "orig-v1.6-vicuna", {"model.safetensors.index.json": b"{nope"}, "index.json is not valid JSON"),
    ("index-list", "orig-v1.6-vicuna", {"model.safetensors.index.json": b"[]"}, "index.json must hold"),
    (
        "index-escapes",
        "orig-v1.6-vicuna",
        {"model.safetensors.index.json": json.dumps({"weight_map": {"a": "../../../etc/passwd"}}).encode()},
        "not a plain file name",
    ),
    ("weights-garbage", SMALL, {"model-00001-of-00002.safetensors": b"garbage"}, "cannot read weights"),
    ("weights-directory", SMALL, {"model-00001-of-00002.safetensors": "DIR"}, "cannot read weights"),
    (
        "orig-tower-missing",
        "orig-v1.5-vicuna",
        edit(["mm_vision_tower"], "/nonexistent/tower"),
        "vision tower '/nonexistent/tower' is not a directory",
    ),
]


@pytest.fixture(scope="module")
def broken(checkpoints, tmp_path_factory):
    """broken(name) -> a copy of a fixture checkpoint with one file damaged, built once."""
    root, made = tmp_path_factory.mktemp("broken"), {}
    cases = {name: (source, change) for name, source, change, _ in CHECKPOINT_CASES}

    def get(name):
        if name not in made:
            source, change = cases[name]
            target = root / name
            shutil.copytree(checkpoints[source], target)
            if callable(change):
                config = json.loads((target / "config.json").read_text())
                change(config)
                (target / "config.json").write_text(json.dumps(config))
            else:
                for file, content in change.items():
                    if callable(content):  # an edit of that JSON file
                        data = json.loads((target / file).read_text())
                        content(data)
                        content = json.dumps(data).encode()
                    (target / file).unlink()
                    if content == "DIR":
                        (target / file).mkdir()
                    elif content is not None:
                        (target / file).write_bytes(content)
            made[name] = target
        return made[name]

    return get


@pytest.mark.parametrize(
    "name,fragment", [(c[0], c[3]) for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_broken_checkpoint(name, fragment, broken, images, capsys):
    argv = ["--model", str(broken(name)), "--prompt", "hi", "--max-tokens", "1", "--image", str(images["tiny"])]
    expect_error(capsys, generate_main, argv, fragment)
    with pytest.raises(LlavaError, match="."):
        load(str(broken(name)))


def test_truncated_weights(checkpoints, tmp_path, capsys):
    """A download cut short: the safetensors header promises more than the file holds."""
    copy = tmp_path / "cut"
    shutil.copytree(checkpoints[SMALL], copy)
    shard = copy / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    expect_error(capsys, generate_main, ["--model", str(copy), "--prompt", "hi"], "incomplete download or corrupt")


def test_broken_tower_config(checkpoints, tmp_path, capsys):
    tower = tmp_path / "tower"
    shutil.copytree(checkpoints["clip-tower-v1.5-vicuna"], tower)
    config = json.loads((tower / "config.json").read_text())
    config["vision_config"] = "clip"
    (tower / "config.json").write_text(json.dumps(config))
    argv = ["--model", str(checkpoints["orig-v1.5-vicuna"]), "--vision-tower", str(tower), "--prompt", "hi"]
    expect_error(capsys, generate_main, argv, "'vision_config' in")


# -- the Python API -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(loaded):
    return loaded(SMALL)


API_CASES = [
    (dict(prompt=None), TypeError, "the prompt must be a str, not NoneType"),
    (dict(prompt=b"hi"), TypeError, "the prompt must be a str, not bytes"),
    (dict(prompt=""), ValueError, "the prompt is empty"),
    (dict(prompt="x\udcff"), ValueError, "not valid UTF-8"),
    (dict(max_tokens="10"), TypeError, "max_tokens must be an integer, not str '10'"),
    (dict(max_tokens=2.0), TypeError, "max_tokens must be an integer"),
    (dict(max_tokens=True), TypeError, "max_tokens must be an integer"),
    (dict(temperature="0.5"), TypeError, "temperature must be a number"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number"),
    (dict(top_p=0.0), ValueError, "top_p must be in (0, 1]"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(seed=2**70), ValueError, "seed must be between"),
    (dict(prefill_step_size=0), ValueError, "prefill_step_size must be >= 1"),
    (dict(kv_bits=3), ValueError, "kv_bits must be 4 or 8"),
    (dict(max_kv_size=0), ValueError, "max_kv_size must be >= 1"),
    (dict(history="hello"), TypeError, "history must be a list of (question, answer) pairs"),
    (dict(history=["hello"]), TypeError, "history[0] must be a (question, answer) pair"),
    (dict(history=[("a", "b", "c")]), TypeError, "history[0] must be a (question, answer) pair"),
    (dict(history=[{"role": "user", "content": "a"}]), TypeError, "history[0] must be"),
    (dict(history=[("a", None)]), TypeError, "history[0] answer must be a str"),
    (dict(system=5), TypeError, "system must be a str"),
    (dict(cache={}), TypeError, "cache must be a SessionCache"),
    (dict(images=5), TypeError, "images must be an image or a list of images"),
    (dict(images={"a": 1}), TypeError, "images must be an image or a list of images"),
    (dict(images=[None]), TypeError, "images[0] is a NoneType"),
    (dict(images=[np.zeros((4, 4, 3), np.float32)]), TypeError, "an image array must be uint8"),
    (dict(images=[np.zeros((4, 4, 2), np.uint8)]), ValueError, "an image array must be (height, width"),
    (dict(images=[np.zeros((0, 4, 3), np.uint8)]), ValueError, "the image array is empty"),
    (dict(images=[b"not an image"]), LlavaError, "cannot read image (bytes)"),
]


@pytest.mark.parametrize("kwargs,error,fragment", API_CASES, ids=[str(c[0])[:40] for c in API_CASES])
def test_api_arguments(kwargs, error, fragment, small):
    model, processor = small
    kwargs = {"prompt": "hi", "max_tokens": 1, **kwargs}
    with pytest.raises(error) as raised:
        generate(model, processor, **kwargs)
    assert isinstance(raised.value, LlavaError) and fragment in str(raised.value)
    with pytest.raises(error):  # the streaming API checks the same, before any work
        next(stream_generate(model, processor, **kwargs))


def test_numpy_and_bytes_images_are_images(small, images):
    """What an app holds (a (H, W, 3) uint8 array, a file's bytes) gives the same answer as the file."""
    model, processor = small
    path = images["tie_wide"]
    pixels = np.asarray(Image.open(path).convert("RGB"))
    reference = generate(model, processor, "What is it?", [path], max_tokens=4).tokens
    assert generate(model, processor, "What is it?", [pixels], max_tokens=4).tokens == reference
    assert generate(model, processor, "What is it?", pixels, max_tokens=4).tokens == reference  # one bare array
    assert generate(model, processor, "What is it?", [path.read_bytes()], max_tokens=4).tokens == reference
    gray = np.asarray(Image.open(path).convert("L"))
    expected, _ = processor.preprocess([Image.fromarray(gray).convert("RGB")])
    np.testing.assert_array_equal(processor.preprocess([gray])[0], expected)
    np.testing.assert_array_equal(
        processor("<image>\nhi", pixels)["pixel_values"], processor("<image>\nhi", [path])["pixel_values"]
    )
    assert generate(model, processor, "hi", images=None, max_tokens=1).prompt_tokens > 0  # None: no images


def test_processor_and_load_arguments(small, checkpoints):
    _, processor = small
    with pytest.raises(TypeError, match="the prompt must be a str"):
        processor(None)
    with pytest.raises(TypeError, match="images must be an image or a list"):
        processor("<image>", 5)
    with pytest.raises(TypeError, match="the model must be a str or a path, not NoneType"):
        load(None)
    with pytest.raises(ValueError, match="the model is empty"):
        load("  ")
    with pytest.raises(TypeError, match="vision_tower must be a str or a path"):
        load(str(checkpoints[SMALL]), vision_tower=3)


# -- convert -----------------------------------------------------------------------------------------------
def test_convert_out_refused(checkpoints, tmp_path, monkeypatch, capsys):
    """--out empty, the current directory or a parent of it, the model or a parent of it:
    refused even with --force, and nothing is touched."""
    parent = tmp_path / "work"
    model = parent / "models" / "llava"
    shutil.copytree(checkpoints[SMALL], model)
    cwd = parent / "here"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    for out, fragment in [
        ("", "--out is empty"),
        ("   ", "--out is empty"),
        (".", "is the current directory or one of its parents"),
        (str(cwd), "is the current directory or one of its parents"),
        ("..", "is the current directory or one of its parents"),
        ("/", "is the current directory or one of its parents"),
        (str(model), "holds the checkpoint being converted"),
        (str(model.parent), "holds the checkpoint being converted"),
        ("../models", "holds the checkpoint being converted"),
    ]:
        expect_error(capsys, convert_main, ["--model", str(model), "--out", out, "--force"], fragment)
    link = tmp_path / "link"
    link.symlink_to(model)
    expect_error(capsys, convert_main, ["--model", str(model), "--out", str(link), "--force"], "holds the checkpoint")
    link.unlink()
    assert snapshot(tmp_path) == before


def test_convert_api_arguments(checkpoints, tmp_path):
    source, out = str(checkpoints[SMALL]), str(tmp_path / "out")
    for kwargs, error, fragment in [
        (dict(model=None, out=out), TypeError, "--model must be a str or a path"),
        (dict(model=source, out=None), TypeError, "--out must be a str or a path"),
        (dict(model=source, out=out, quantize=True, q_bits="4"), TypeError, "--q-bits must be an integer"),
        (dict(model=source, out=out, shard_gb=-1), ValueError, "shard_gb must be a number >= 0"),
    ]:
        with pytest.raises(error, match=fragment.replace("(", r"\(")):
            convert(**kwargs)
    assert not Path(out).exists()


def conversion_process(source: Path, out: Path, hook: str) -> subprocess.Popen:
    """convert.py in a child process with `hook` (Python) run first, e.g. to stop at a chosen step."""
    script = (
        "import importlib, runpy, sys\n"
        "c = importlib.import_module('llava_mlx.checkpoint.convert')\n"
        f"{hook}\n"
        f"sys.argv = ['convert.py', '--model', {str(source)!r}, '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(ROOT / 'convert.py')!r}, run_name='__main__')\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )


def wait_for(process, marker: str, timeout: float = 120):
    """Read the child's stdout until `marker` (the hook prints it at the chosen step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if marker in line:
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before '{marker}': {process.stderr.read()[-2000:]}")
    raise AssertionError(f"no '{marker}' within {timeout} s")


# A hook that announces the step, then waits (up to 60 s) to be signalled.
WAIT = (
    "def {name}(*a, **k):\n    print('{marker}', flush=True)\n    import time; time.sleep(60)\n"
    "    return {call}(*a, **k)\n"
)


@pytest.mark.parametrize(
    "signum,code,line", [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")]
)
def test_signal_mid_write_cleans_up(signum, code, line, checkpoints, tmp_path):
    """Killed while writing the weights: no hidden .out.converting-* left, no --out."""
    out = tmp_path / "out"
    hook = "save = c.save_shard\n" + WAIT.format(name="slow", marker="WRITING", call="save") + "c.save_shard = slow"
    process = conversion_process(checkpoints[SMALL], out, hook)
    wait_for(process, "WRITING")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.converting-")]  # it is there now
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert stderr.strip() == line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupt_late_does_not_put_the_output_in_place(checkpoints, tmp_path):
    """Ctrl-C during the last step (the check that the output loads): no --out, nothing left."""
    out = tmp_path / "out"
    hook = "load = c.load\n" + WAIT.format(name="slow", marker="VERIFYING", call="load") + "c.load = slow"
    process = conversion_process(checkpoints[SMALL], out, hook)
    wait_for(process, "VERIFYING")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == "interrupted", stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupt_just_before_the_move(checkpoints, tmp_path):
    """Ctrl-C that arrives as the move into place begins (signals held): nothing is moved."""
    out = tmp_path / "out"
    hook = (
        "import contextlib, os, signal\n"
        "held = c.signals_held\n"
        "@contextlib.contextmanager\n"
        "def signal_then_hold():\n"
        "    with held() as received:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        yield received\n"
        "c.signals_held = signal_then_hold"
    )
    process = conversion_process(checkpoints[SMALL], out, hook)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip() == "interrupted", stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_during_start_up():
    """Ctrl-C while the libraries are imported: exit 130, one line, no traceback, for the
    scripts and the installed console scripts alike. `-X importtime` reports each import as it
    completes: the signal is sent once mlx.core is in, inside the import of llava_mlx (mlx-lm
    and transformers are still to come)."""
    bin_dir = Path(sys.executable).parent  # the installed console scripts, beside the venv's python
    for script, args in (
        ([ROOT / "generate.py"], ["--prompt", "hi"]),
        ([ROOT / "convert.py"], ["--out", "y"]),
        (["-m", "llava_mlx", "generate"], ["--prompt", "hi"]),
        ([bin_dir / "llava-generate"], ["--prompt", "hi"]),
        ([bin_dir / "llava-convert"], ["--out", "y"]),
    ):
        process = subprocess.Popen(
            [sys.executable, "-X", "importtime", *map(str, script), "--model", "nobody/nothing", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        for line in process.stderr:
            if line.split("|")[-1].strip() == "mlx.core":
                break
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        said = [line for line in stderr.splitlines() if not line.startswith("import time:")]
        assert process.returncode == 130, (script, stderr[-2000:])
        assert said == ["interrupted"], (script, stderr[-2000:])


# -- the network: bounded in total time and size -----------------------------------------------------------
class SlowServer(socketserver.ThreadingTCPServer):
    """Loopback HTTP that answers in `mode`: 'drip-body' (one byte every 0.1 s, forever),
    'drip-headers' (the status line byte by byte), 'big' (Content-Length far too large),
    'endless' (no Content-Length, 64 KB pieces until the client hangs up)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, mode):
        self.mode = mode
        super().__init__(("127.0.0.1", 0), SlowHandler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/image.png"


class SlowHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.recv(65536)
        mode = self.server.mode
        try:
            if mode == "drip-headers":
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n" * 100:
                    self.request.sendall(bytes([byte]))
                    time.sleep(0.1)
            elif mode == "drip-body":
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                for _ in range(10000):
                    self.request.sendall(b"x")
                    time.sleep(0.1)
            elif mode == "big":
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n" + b"x" * 1000)
            elif mode == "endless":
                self.request.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                for _ in range(100000):
                    self.request.sendall(b"x" * 65536)
        except OSError:  # the client hung up: the point of the test
            return


@pytest.fixture
def serve():
    servers = []

    def start(mode):
        server = SlowServer(mode)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", ["drip-headers", "drip-body"])
def test_slow_server_is_bounded_in_total_time(mode, serve):
    url = serve(mode)
    tic = time.monotonic()
    with pytest.raises(LlavaError, match="no complete answer within 1.5 s"):
        fetch(url, "image", timeout=1.5)
    assert time.monotonic() - tic < 5


@pytest.mark.parametrize("mode", ["big", "endless"])
def test_large_answer_is_bounded_in_size(mode, serve):
    tic = time.monotonic()
    with pytest.raises(LlavaError, match="more than 1,000,000"):
        fetch(serve(mode), "image", timeout=30, max_bytes=1_000_000)
    assert time.monotonic() - tic < 10


def test_slow_image_url_from_the_cli(serve, checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(processor_module, "URL_TIMEOUT", 1.5)
    url = serve("drip-body")
    tic = time.monotonic()
    argv = ["--model", str(checkpoints[SMALL]), "--prompt", "hi", "--image", url]
    expect_error(capsys, generate_main, argv, f"cannot download image {url}: no complete answer within 1.5 s")
    assert time.monotonic() - tic < 30  # the load of the model included


def test_unreachable_url_is_one_error():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LlavaError, match="cannot download image"):
        fetch(f"http://127.0.0.1:{port}/a.png", "image", timeout=5)
    with pytest.raises(LlavaError, match="only http"):
        fetch("ftp://127.0.0.1/a.png", "image")
