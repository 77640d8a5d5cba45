"""generate.py end to end on every layout, and bad input: one line on stderr, exit 1."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from llava_mlx import processor as processor_module
from llava_mlx.cli.generate import main

from conftest import LAYOUTS, ROOT
from helpers import expect_error, run_cli


@pytest.mark.parametrize("name", LAYOUTS)
def test_generate_cli_each_layout(name, checkpoints, images):
    result = run_cli(
        "--model",
        str(checkpoints[name]),
        "--image",
        str(images["wide"]),
        "--prompt",
        "What is in the image?",
        "--max-tokens",
        "8",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Peak memory" in result.stderr and "image positions" in result.stderr


def huge_png(path, width=10000, height=10000):
    """A valid PNG header claiming width x height, so no memory is spent making it."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    return path


def test_bad_images(checkpoints, images, tmp_path, capsys):
    model = ["--model", str(checkpoints["hf-v1.6-vicuna"]), "--max-tokens", "2", "--image"]
    expect_error(capsys, main, model + [str(tmp_path / "nope.jpg")], "image not found")
    (tmp_path / "text.png").write_text("not an image at all")
    expect_error(capsys, main, model + [str(tmp_path / "text.png")], "not an image or corrupt")
    data = images["square"].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    expect_error(capsys, main, model + [str(tmp_path / "cut.png")], "corrupt")
    expect_error(capsys, main, model + [str(huge_png(tmp_path / "huge.png"))], "pixels")


def test_placeholder_count_and_context(checkpoints, images, capsys):
    model = ["--model", str(checkpoints["hf-v1.6-vicuna"]), "--max-tokens", "2"]
    expect_error(
        capsys,
        main,
        model + ["--image", str(images["wide"]), "--no-template", "--prompt", "<image> and <image>?"],
        "2 <image> placeholder(s) but 1 image(s)",
    )
    expect_error(capsys, main, model + ["--prompt", "word " * 5000], "context")


def broken_copy(src, dst, edit_config=None, drop_file=None):
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if drop_file:
        (dst / drop_file).unlink()
    return dst


def test_bad_checkpoints(checkpoints, tmp_path, capsys):
    args = ["--max-tokens", "2", "--prompt", "hi", "--model"]
    unknown = broken_copy(checkpoints["hf-v1.5-vicuna"], tmp_path / "bert", lambda c: c.update(model_type="bert"))
    expect_error(capsys, main, args + [str(unknown)], "unknown model type 'bert'")
    src = checkpoints["orig-v1.6-vicuna"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    missing = broken_copy(src, tmp_path / "shard", drop_file=shard)
    expect_error(capsys, main, args + [str(missing)], f"missing weight shard {shard}")
    wrong = broken_copy(
        checkpoints["hf-v1.6-mistral"],
        tmp_path / "shape",
        lambda c: c["text_config"].update(intermediate_size=c["text_config"]["intermediate_size"] * 2),
    )
    expect_error(capsys, main, args + [str(wrong)], "the checkpoint and its config.json disagree")
    expect_error(capsys, main, args + [str(tmp_path / "absent")], "is not a directory")


def test_missing_weight(checkpoints, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    dst = broken_copy(checkpoints["tf5-v1.5-vicuna"], tmp_path / "lost")
    tensors = load_file(dst / "model.safetensors")
    del tensors["multi_modal_projector.linear_2.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    expect_error(
        capsys, main, ["--model", str(dst), "--prompt", "hi"], "missing weight 'multi_modal_projector.linear_2.weight'"
    )


def test_hub_offline_is_a_clear_error(capsys):
    expect_error(capsys, main, ["--model", "nobody/no-such-llava", "--prompt", "hi"], "HF_HUB_OFFLINE")


def test_default_model_offline_names_model_flag(tmp_path):
    """Whatever this machine's Hugging Face cache holds: an empty one here."""
    empty = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    result = run_cli("--prompt", "hi", env=empty)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "--model" in result.stderr
    assert "mlx-community/llava-v1.6-mistral-7b-4bit" in result.stderr
    assert "Traceback" not in result.stderr


# Hand-computed RGB of one pixel per mode (as PIL's convert("RGB"), which the original uses,
# except 16-bit and float images, which are scaled to 8 bits rather than clipped).
MODES = [
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha is dropped, not composited
    ("LA", (100, 7), (100, 100, 100)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("CMYK", (0, 255, 0, 0), (255, 0, 255)),
    ("CMYK", (0, 0, 0, 51), (204, 204, 204)),
    ("CMYK", (102, 0, 0, 51), (122, 204, 204)),
    ("I;16", 257 * 77, (77, 77, 77)),
    ("I;16", 1000, (4, 4, 4)),  # 1000 / 65535 * 255 = 3.9
    ("I", 65535, (255, 255, 255)),
    ("I", 77, (77, 77, 77)),  # an 8-bit range in a 32-bit image stays
    ("F", 0.5, (128, 128, 128)),  # [0, 1] floats
]


@pytest.mark.parametrize("mode,value,rgb", MODES, ids=[f"{m}-{v}" for m, v, _ in MODES])
def test_image_modes_convert_to_rgb(mode, value, rgb):
    image = Image.new(mode, (3, 2), value)
    converted = processor_module.load_image(image)
    assert converted.mode == "RGB" and converted.size == (3, 2)
    assert (np.asarray(converted) == np.array(rgb, np.uint8)).all()


def test_palette_image_converts_to_its_colours():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 0), 1)
    assert np.asarray(processor_module.load_image(image)).tolist() == [[[0, 0, 0], [200, 100, 50]]]


def test_rgba_image_preprocesses_as_its_rgb(loaded, images):
    _, processor = loaded("hf-v1.6-vicuna")
    rgb = np.asarray(Image.open(images["odd1"]).convert("RGB"))
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)]), "RGBA")
    pixels, sizes = processor.preprocess([rgba])
    reference, _ = processor.preprocess([Image.fromarray(rgb, "RGB")])
    np.testing.assert_array_equal(pixels, reference)
    assert tuple(sizes[0]) == rgba.size


def test_pixel_limit_is_checked_before_decoding(monkeypatch, images):
    monkeypatch.setattr(processor_module, "MAX_PIXELS", 1000)
    with pytest.raises(processor_module.LlavaError, match="more than 1,000 pixels"):
        processor_module.load_image(images["square"])


def test_http_image_urls(images, loaded):
    """--image takes http(s) URLs (served here on loopback); a failed download is one clear error."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images["wide"].parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        _, processor = loaded("hf-v1.6-vicuna")
        from_url, _ = processor.preprocess([base + images["wide"].name])
        from_file, _ = processor.preprocess([images["wide"]])
        np.testing.assert_array_equal(from_url, from_file)
        with pytest.raises(processor_module.LlavaError, match="cannot download image"):
            processor_module.load_image(base + "missing.png")
    finally:
        server.shutdown()


def test_one_entry_point(checkpoints):
    """`python -m llava_mlx generate` is the command `python generate.py` is; without a command, or
    with an unknown one, the usage and exit 2."""
    model = str(checkpoints["hf-v1.5-vicuna"])
    args = ["--model", model, "--prompt", "What is it?", "--max-tokens", "3"]
    answers = []
    for command in ([str(ROOT / "generate.py")], ["-m", "llava_mlx", "generate"]):
        result = subprocess.run(
            [sys.executable, *command, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        answers.append(result.stdout)
    assert answers[0] == answers[1] and answers[0].strip()
    for argv, said in (
        ([], "usage: python -m llava_mlx {generate,convert,server,train}"),
        (["bogus"], "error: unknown command 'bogus'"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "llava_mlx", *argv], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert result.returncode == 2 and said in result.stderr, result.stderr
