"""Video input: files (PyAV), arrays and PIL lists through the API and generate.py; bad input."""

import numpy as np
import pytest
from PIL import Image

from llava_mlx import LlavaError, generate, stream_generate
from llava_mlx.cli.generate import main
from llava_mlx.video import decode_frames, load_video

from helpers import expect_error, run_cli

FAMILY = ["hub-onevision", "hub-next-video"]


@pytest.mark.parametrize("name", FAMILY)
def test_cli_image_and_video(name, family, family_loaded):
    image = run_cli("--model", str(family[name]), "--image", str(family["image-wide"]), "--max-tokens", "6")
    assert image.returncode == 0, image.stderr
    assert "Peak memory" in image.stderr
    video = run_cli(
        "--model",
        str(family[name]),
        "--video",
        str(family["clip.mp4"]),
        "--num-frames",
        "4",
        "--prompt",
        "What happens?",
        "--max-tokens",
        "6",
    )
    assert video.returncode == 0, video.stderr
    model, processor = family_loaded(name)
    expected = model.config.video_token_count(4)
    assert f"({expected} image positions)" in video.stderr
    # the CLI's answer is the API's
    api = generate(model, processor, "What happens?", videos=[str(family["clip.mp4"])], num_frames=4, max_tokens=6)
    assert video.stdout.strip() == api.text.strip()


def test_video_forms_agree(family, family_loaded):
    """A path, its decoded uint8 array and the same frames as PIL images give the same answer."""
    model, processor = family_loaded("tf5-next-video")
    path = str(family["clip.mp4"])
    frames = load_video(path, 5)
    assert frames.shape == (5, 60, 80, 3) and frames.dtype == np.uint8
    options = dict(max_tokens=8, num_frames=5)
    from_path = generate(model, processor, "What happens?", videos=[path], **options)
    from_array = generate(model, processor, "What happens?", videos=frames, **options)
    from_pil = generate(model, processor, "What happens?", videos=[[Image.fromarray(f) for f in frames]], **options)
    assert from_path.tokens == from_array.tokens == from_pil.tokens
    assert from_path.prompt_tokens == from_array.prompt_tokens
    streamed = "".join(p.text for p in stream_generate(model, processor, "What happens?", videos=[path], **options))
    assert streamed == from_path.text


def test_frames_given_are_frames_used(family, capsys):
    """Frames already decoded (an array, a list of pictures) are taken as given, every one; a
    file is sampled (8 by default); `num_frames` samples frames given too, and says so once."""
    nine = load_video(str(family["clip.mp4"]), 9)
    assert nine.shape[0] == 9 and len(load_video(str(family["clip.mp4"]))) == 8
    assert np.array_equal(load_video(nine), nine)
    pictures = [Image.fromarray(f) for f in nine]
    assert np.array_equal(load_video(pictures), nine)
    assert np.array_equal(load_video(nine, 9), nine) and np.array_equal(load_video(nine, 20), nine)
    assert capsys.readouterr().err == ""
    assert np.array_equal(load_video(nine, 8), nine[[0, 1, 2, 3, 4, 5, 6, 8]])  # linspace(0, 8, 8), truncated
    assert capsys.readouterr().err.splitlines() == [
        "warning: num_frames=8: 8 of the 9 frames given are used, sampled uniformly"
    ]


def test_video_and_image_in_one_prompt(family, family_loaded):
    model, processor = family_loaded("tf5-onevision")
    result = generate(
        model,
        processor,
        "Compare.",
        images=[str(family["image-wide"])],
        videos=[str(family["clip.mp4"])],
        num_frames=3,
        max_tokens=4,
    )
    wide = Image.open(family["image-wide"]).size  # 1200 x 480: a 4x2 grid of 384-px tiles
    positions = model.config.image_token_count(wide) + model.config.video_token_count(3)
    assert (
        positions == 729 + 44 * 109 + 3 * 196 + 1
    )  # base, unpadded 44x108 map with newlines, 3 frames of 14x14, newline
    assert result.image_positions == positions


def test_only_the_sampled_frames(family):
    """Uniform sampling keeps the first and last frames, and decoding stops after the last used."""
    all_frames = decode_frames(str(family["clip.mp4"]), 1000)
    assert len(all_frames) == 24
    two = decode_frames(str(family["clip.mp4"]), 2)
    assert np.array_equal(two[0], all_frames[0]) and np.array_equal(two[1], all_frames[23])
    six = load_video(str(family["clip.mp4"]), 6)
    assert all(np.array_equal(f, all_frames[i]) for f, i in zip(six, [0, 4, 9, 13, 18, 23]))


def test_stream_without_frame_count(tmp_path, family):
    """A raw H.264 stream has no frame count in its header: the packets are counted instead."""
    import av

    frames = load_video(str(family["clip.mp4"]), 1000)
    path = tmp_path / "clip.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 80, 60, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert len(load_video(str(path), 1000)) == 24
    assert len(load_video(str(path), 3)) == 3


def test_bad_videos(family, checkpoints, tmp_path, capsys):
    model = ["--model", str(family["hub-next-video"]), "--max-tokens", "2"]
    clip = str(family["clip.mp4"])
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    expect_error(capsys, main, model + ["--video", str(junk)], "not a video or corrupt")
    expect_error(capsys, main, model + ["--video", str(empty)], "not a video or corrupt")
    expect_error(capsys, main, model + ["--video", str(tmp_path / "missing.mp4")], "video not found")
    expect_error(capsys, main, model + ["--video", clip, "--num-frames", "0"], "at least 1")
    expect_error(
        capsys,
        main,
        model + ["--video", clip, "--no-template", "--prompt", "USER: <video><video> hi"],
        "2 <video> placeholder(s) but 1 video(s)",
    )
    expect_error(
        capsys, main, model + ["--no-template", "--prompt", "USER: <video> hi"], "1 <video> placeholder(s) but 0"
    )
    expect_error(capsys, main, ["--model", str(checkpoints["hf-v1.6-vicuna"]), "--video", clip], "takes no video")


def test_bad_video_arrays(family_loaded):
    model, processor = family_loaded("hub-onevision")
    for video, fragment in [
        (np.zeros((0, 10, 10, 3), np.uint8), "no frames"),
        (np.zeros((2, 10, 10, 3), np.float32), "must be uint8"),
        (np.zeros((2, 10, 10), np.uint8), "must be uint8"),
        ([], "no frames"),
        (42, "a video is a file path"),
    ]:
        with pytest.raises(LlavaError, match=fragment):
            generate(model, processor, "x", videos=[video], max_tokens=1)


@pytest.mark.parametrize("name", FAMILY)
def test_video_settings_fallback(name, family, tmp_path, capsys):
    """A checkpoint without video_preprocessor_config.json (hub repos made before transformers'
    video processors) preprocesses frames as its image processor config says, and says so."""
    import shutil

    from llava_mlx.checkpoint.preprocessing import video_settings

    shutil.copy(family[name] / "preprocessor_config.json", tmp_path)
    image_settings = {"size": 0, "crop": 0, "mean": (0.0,), "std": (1.0,)}
    fallback = video_settings(tmp_path, image_settings)
    said = capsys.readouterr().err.splitlines()
    assert said == [
        f"warning: {tmp_path} has no video_preprocessor_config.json: video frames are preprocessed like images"
    ]
    assert fallback == video_settings(family[name], image_settings)


def test_chat_about_a_video_reuses_it(family, family_loaded):
    """A second turn about the same video neither re-encodes it nor re-runs its positions,
    and answers as a cold run does."""
    from llava_mlx.cache import SessionCache

    model, processor = family_loaded("hub-onevision")
    path, cache = str(family["clip.mp4"]), SessionCache()
    options = dict(videos=[path], num_frames=3, max_tokens=5)
    first = generate(model, processor, "What happens?", cache=cache, **options)
    history = [("What happens?", first.text.strip())]
    pieces = list(stream_generate(model, processor, "And then?", history=history, cache=cache, **options))
    cold = generate(model, processor, "And then?", history=history, **options)
    assert pieces[-1].cached_tokens > model.config.video_token_count(3)
    assert [p.token for p in pieces if p.finish_reason is None] == cold.tokens
