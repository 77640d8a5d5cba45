"""A newcomer's picture does not freeze the answers under way: admission work (a few crops
through the tower, a prefill chunk) and decode steps alternate, and every answer is still
generate()'s."""

import json

import pytest

from llava_mlx.server.admission import FIRST_CHUNK, MIN_CHUNK, Admission, Pace

from conftest import SERVER_MODEL
from serving import user, video_message


def test_pace_sizes_units_to_the_budget():
    pace = Pace(budget=0.2, max_positions=2048)
    assert pace.crops(5, alone=True) == 5 and pace.positions(3000, alone=True) == 2048  # nobody waits
    assert pace.crops(5, alone=False) == 1  # not yet timed: one crop
    assert pace.positions(3000, alone=False) == FIRST_CHUNK
    pace.crop_seconds = 0.07
    assert pace.crops(5, alone=False) == 2  # 0.2 / 0.07 = 2.9 crops
    assert pace.crops(1, alone=False) == 1
    pace.last_chunk, pace.last_seconds, pace.position_seconds = 256, 0.256, 0.001  # over budget: linear
    assert pace.positions(3000, alone=False) == 200 and pace.positions(150, alone=False) == 150
    pace.last_chunk, pace.last_seconds, pace.position_seconds = 256, 0.0256, 0.0001  # under: quadratic
    assert pace.positions(3000, alone=False) == 715  # 256 * sqrt(0.2 / 0.0256), not 0.2 / 0.0001 = 2000

    pace.last_chunk, pace.last_seconds, pace.position_seconds = 64, 3.2, 0.05  # slow: never below MIN_CHUNK
    assert pace.positions(3000, alone=False) == MIN_CHUNK and pace.positions(5, alone=False) == 5
    pace.last_chunk, pace.last_seconds, pace.position_seconds = 1500, 0.0015, 1e-6  # never above --prefill-step-size
    assert pace.positions(30000, alone=False) == 2048
    pace.follow(decode_seconds=0.04, floor=0.1)
    assert pace.budget == pytest.approx(0.32)  # 8 decode steps
    pace.follow(decode_seconds=0.005, floor=0.1)
    assert pace.budget == 0.1


@pytest.mark.parametrize("media", ["picture", "video"])
def test_a_newcomer_is_admitted_between_decode_steps(media, loaded, images, family, family_loaded):
    """Answer A runs while B (a five-crop LLaVA-1.6 picture, or a six-frame OneVision clip) is
    admitted: B's crops or frames go through the tower in several units and its prompt in
    several chunks, a decode step of A between each two; both answers equal generate()'s."""
    from llava_mlx import generate
    from llava_mlx.server.engine import Engine, EngineOptions, Job
    from llava_mlx.server.prompt import build_prompt
    from llava_mlx.server.request import Limits, parse_chat

    model, processor = loaded(SERVER_MODEL) if media == "picture" else family_loaded("hub-onevision")
    limits = Limits(num_frames=6)
    options = EngineOptions(max_batch=8, prompt_cache_bytes=0, feature_cache_bytes=0, admission_budget=1e-4)
    engine = Engine(lambda: (model, processor), options)
    timeline = []  # ("admit", job name, what) and ("decode", running count)
    scheduler = engine.scheduler
    step, encode, decode = Admission.step, Admission._encode, scheduler._decode_step

    def admit_step(self, pace, alone):
        timeline.append(("admit", self.job.chat.turns[-1][0], "encode" if self.todo else "prefill", alone))
        return step(self, pace, alone)

    def decode_step():
        timeline.append(("decode", len(scheduler.running)))
        decode()

    Admission.step, scheduler._decode_step = admit_step, decode_step

    def job(content, tokens):
        body = json.dumps({"messages": [content], "max_tokens": tokens}).encode()
        chat = parse_chat(body, limits)
        return Job(build_prompt(chat, processor, limits, lambda key: True), chat)

    question = "What is in the image?"
    if media == "picture":
        b = job(user(question, images["wide"]), 16)
        media_args = dict(images=[str(images["wide"])])
    else:
        b = job(video_message(question, family["clip.mp4"]), 16)
        media_args = dict(videos=[str(family["clip.mp4"])], num_frames=6)
    a = job(user("Tell me a long story."), 150)
    # generate()'s answers, first: this also evaluates the lazily loaded weights in this thread
    expected_texts = [
        generate(model, processor, "Tell me a long story.", max_tokens=150).text,
        generate(model, processor, question, max_tokens=16, **media_args).text,
    ]
    engine.start()
    try:
        engine.submit(a)
        first = a.events.get(timeout=120)
        assert first[0] == "text"  # A is answering
        engine.submit(b)
        assert b.finished.wait(120) and a.finished.wait(120)
    finally:
        engine.stop()
        Admission.step, Admission._encode = step, encode
    for j, expected, seen in zip((a, b), expected_texts, ([first], [])):
        assert "".join(e[2] for e in seen + list(j.events.queue) if e[0] == "text") == expected
    units = [i for i, t in enumerate(timeline) if t[:2] == ("admit", "What is in the image?")]
    kinds = [timeline[i][2] for i in units]
    assert kinds.count("encode") >= 2 and kinds.count("prefill") >= 2, kinds  # the picture and prompt in parts
    assert not any(timeline[i][3] for i in units)  # A was running all along: every unit budgeted
    for i, j in zip(units, units[1:]):
        assert ("decode", 1) in timeline[i + 1 : j]  # A decoded between two units
