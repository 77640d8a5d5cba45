"""Videos through the server (`video_url` parts, as vLLM takes them) on LLaVA-OneVision and
LLaVA-NeXT-Video with the official client: answers equal generate(videos=...)'s, a picture
and a clip in one request, a video admitted a few frames at a time while another answer
runs, the serial (--kv-bits) path, and the bad inputs."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from llava_mlx import generate

from serving import client, data_uri, start_server, video_message, video_part

FRAMES = "6"


@pytest.fixture(scope="module", params=["hub-onevision", "hub-next-video"])
def video_server(request, family, tmp_path_factory):
    log = tmp_path_factory.mktemp("video-server") / "server.log"
    server = start_server(family[request.param], log, "--num-frames", FRAMES, "--max-tokens", "200")
    server.name = request.param
    yield server
    assert server.stop() == 0, server.log.read_text()[-2000:]


def ask(server, messages, max_tokens=12, **kwargs):
    return client(server).chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, **kwargs)


def test_a_video_answers_as_generate(video_server, family, family_loaded):
    model, processor = family_loaded(video_server.name)
    clip, picture = family["clip.mp4"], family["image-wide"]
    api = generate(model, processor, "What happens?", videos=[str(clip)], num_frames=int(FRAMES), max_tokens=12)
    r = ask(video_server, [video_message("What happens?", clip)])
    assert r.choices[0].message.content == api.text
    assert r.usage.prompt_tokens == api.prompt_tokens
    both = generate(
        model, processor, "And now?", [str(picture)], videos=[str(clip)], num_frames=int(FRAMES), max_tokens=12
    )
    assert ask(video_server, [video_message("And now?", clip, picture)]).choices[0].message.content == both.text
    streamed = ask(video_server, [video_message("What happens?", clip)], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == api.text


def test_several_pictures_answer_as_generate(video_server, family, family_loaded):
    """OneVision encodes each of several pictures as one padded crop: the server's feature
    cache keys and counts them so, as generate() does (NeXT-Video keeps its anyres)."""
    model, processor = family_loaded(video_server.name)
    pictures = [family["image-square"], family["image-tiny"]]
    api = generate(model, processor, "Compare them.", [str(p) for p in pictures], max_tokens=12)
    content = [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in pictures]
    r = ask(video_server, [{"role": "user", "content": content + [{"type": "text", "text": "Compare them."}]}])
    assert r.choices[0].message.content == api.text
    assert r.usage.prompt_tokens == api.prompt_tokens


def test_a_video_is_admitted_between_decode_steps(video_server, family, family_loaded):
    """A long answer runs while a video arrives: both answers are what they are alone (the
    frames going through the tower in parts is tested in test_admission.py)."""
    model, processor = family_loaded(video_server.name)
    long = [{"role": "user", "content": "Tell me a long story."}]
    alone = [ask(video_server, long, max_tokens=150).choices[0].message.content]
    clip = family["clip.mp4"]
    api = generate(model, processor, "Why?", videos=[str(clip)], num_frames=int(FRAMES), max_tokens=12)
    before = video_server.health()
    with ThreadPoolExecutor(2) as pool:
        story = pool.submit(ask, video_server, long, max_tokens=150)
        while video_server.health()["running"] == 0:  # the story has started
            pass
        video = pool.submit(ask, video_server, [video_message("Why?", clip)])
        answers = [story.result().choices[0].message.content, video.result().choices[0].message.content]
    after = video_server.health()
    assert answers == alone + [api.text]
    assert after["admission_units"] - before["admission_units"] >= 2  # the frames, then the prompt


def test_bad_videos(video_server, family):
    clip = family["clip.mp4"]
    cases = [
        ([{"role": "user", "content": [video_part(clip), video_part(clip)]}], "2 videos: at most 1"),
        (
            [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}],
            "not a video or corrupt",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "video_url", "video_url": {"url": data_uri(family["image-wide"])}}],
                }
            ],
            "data:video/",
        ),
        ([{"role": "user", "content": "see <video>"}], "video_url parts"),
    ]
    for messages, fragment in cases:
        with pytest.raises(openai.BadRequestError, match=fragment):
            ask(video_server, messages)


def test_a_model_without_video_says_so(live_server, family):
    with pytest.raises(openai.BadRequestError, match="takes no video"):
        ask(live_server, [video_message("What happens?", family["clip.mp4"])])


def test_the_serial_path_takes_videos(family, family_loaded):
    """The one-at-a-time scheduler (--kv-bits) passes the sampled frames to stream_generate:
    in-process here, since no video fixture has a head size the KV can be quantized with."""
    import json

    from llava_mlx.server.engine import Engine, EngineOptions, Job
    from llava_mlx.server.prompt import build_prompt
    from llava_mlx.server.request import Limits, parse_chat
    from llava_mlx.server.serial import SerialScheduler

    model, processor = family_loaded("hub-next-video")
    clip, limits = family["clip.mp4"], Limits(num_frames=int(FRAMES))
    api = generate(model, processor, "What happens?", videos=[str(clip)], num_frames=int(FRAMES), max_tokens=12)
    body = json.dumps({"messages": [video_message("What happens?", clip)], "max_tokens": 12}).encode()
    chat = parse_chat(body, limits)
    job = Job(build_prompt(chat, processor, limits, lambda key: False), chat)
    engine = Engine(lambda: (model, processor), EngineOptions(), scheduler_type=SerialScheduler)
    engine.start()
    try:
        engine.submit(job)
        assert job.finished.wait(120)
    finally:
        engine.stop()
    assert "".join(e[2] for e in job.events.queue if e[0] == "text") == api.text
