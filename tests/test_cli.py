"""generate.py end to end on every layout, and bad input: one line on stderr, exit 1."""

import json
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import LAYOUTS, ROOT
from llava_mlx import processor as processor_module
from llava_mlx.generate import main



def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


@pytest.mark.parametrize("name", LAYOUTS)
def test_generate_cli_each_layout(name, checkpoints, images):
    result = run_cli(
        "--model", str(checkpoints[name]), "--image", str(images["wide"]),
        "--prompt", "What is in the image?", "--max-tokens", "8",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Peak memory" in result.stderr and "image positions" in result.stderr


def expect_error(capsys, argv, fragment):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and fragment in err, err


def huge_png(path, width=10000, height=10000):
    """A valid PNG header claiming width x height, so no memory is spent making it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    return path


def test_bad_images(checkpoints, images, tmp_path, capsys):
    model = ["--model", str(checkpoints["hf-v1.6-vicuna"]), "--max-tokens", "2", "--image"]
    expect_error(capsys, model + [str(tmp_path / "nope.jpg")], "image not found")
    (tmp_path / "text.png").write_text("not an image at all")
    expect_error(capsys, model + [str(tmp_path / "text.png")], "not an image or corrupt")
    data = images["square"].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    expect_error(capsys, model + [str(tmp_path / "cut.png")], "corrupt")
    expect_error(capsys, model + [str(huge_png(tmp_path / "huge.png"))], "pixels")


def test_placeholder_count_and_context(checkpoints, images, capsys):
    model = ["--model", str(checkpoints["hf-v1.6-vicuna"]), "--max-tokens", "2"]
    expect_error(
        capsys,
        model + ["--image", str(images["wide"]), "--no-template", "--prompt", "<image> and <image>?"],
        "2 <image> placeholder(s) but 1 image(s)",
    )
    expect_error(capsys, model + ["--prompt", "word " * 5000], "context")


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
    expect_error(capsys, args + [str(unknown)], "unknown model type 'bert'")
    src = checkpoints["orig-v1.6-vicuna"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    missing = broken_copy(src, tmp_path / "shard", drop_file=shard)
    expect_error(capsys, args + [str(missing)], f"missing weight shard {shard}")
    wrong = broken_copy(
        checkpoints["hf-v1.6-mistral"], tmp_path / "shape",
        lambda c: c["text_config"].update(intermediate_size=c["text_config"]["intermediate_size"] * 2),
    )
    expect_error(capsys, args + [str(wrong)], "the checkpoint and its config.json disagree")
    expect_error(capsys, args + [str(tmp_path / "absent")], "is not a directory")


def test_missing_weight(checkpoints, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    dst = broken_copy(checkpoints["tf5-v1.5-vicuna"], tmp_path / "lost")
    tensors = load_file(dst / "model.safetensors")
    del tensors["multi_modal_projector.linear_2.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    expect_error(capsys, ["--model", str(dst), "--prompt", "hi"], "missing weight 'multi_modal_projector.linear_2.weight'")


def test_hub_offline_is_a_clear_error(capsys):
    expect_error(capsys, ["--model", "nobody/no-such-llava", "--prompt", "hi"], "HF_HUB_OFFLINE")


def test_default_model_offline_names_model_flag():
    result = run_cli("--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "--model" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "LA", "CMYK", "1"])
def test_image_modes_convert_to_rgb(mode, images, loaded):
    _, processor = loaded("hf-v1.6-vicuna")
    rgb = Image.open(images["square"]).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257))
        expected = rgb.convert("L").convert("RGB")
    else:
        image = rgb.convert(mode)
        expected = image.convert("RGB")
    pixels, sizes = processor.preprocess([image])
    reference, _ = processor.preprocess([expected])
    np.testing.assert_allclose(pixels, reference, atol=1e-6)
    assert tuple(sizes[0]) == rgb.size


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
