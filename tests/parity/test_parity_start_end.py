"""Checkpoints trained with the image start/end tokens (`mm_use_im_start_end`: LLaVA v0, Lightning,
Med v0) against the original builder and its run_llava.py / cli.py prompts, float32: the templated
question (`<im_start><image><im_end>\\n` before it), a raw prompt with the tokens typed, a two-turn
chat; the tokens the builder adds to a tokenizer without them; a LLaVA v0 config (model_type
'llama') read as the original's auto_upgrade makes it, said once; the server's messages."""

import sys

import pytest

from llava_mlx import load
from llava_mlx.generation import generate

from conftest import ROOT
from fixtures.build_start_end import build_start_end
from helpers import environment, run_bounded
from reference.original import QUESTION, check_case, run_original

ANSWER, FOLLOW_UP = "A dog on a hill.", "And the sky?"
# case -> (checkpoint, what the reference is given, conversation template, picture)
CASES = {
    "v0-question": ("v0-vicuna", {"question": QUESTION}, "llava_v0", "wide"),
    "v0-two-turns": ("v0-vicuna", {"turns": [[QUESTION, ANSWER], [FOLLOW_UP, None]]}, "llava_v0", "tall"),
    "v0-raw": ("v0-vicuna", {"prompt": "Human: <im_start><image><im_end>\nDescribe it.###Assistant:"}, None, "odd1"),
    "startend-question": ("startend-v1.5-vicuna", {"question": QUESTION}, "llava_v1", "wide"),
    "startend-two-turns": (
        "startend-v1.5-vicuna",
        {"turns": [[QUESTION, ANSWER], [FOLLOW_UP, None]]},
        "llava_v1",
        "tall",
    ),
}
# the original builder cannot load a v0 config: it loads the copy auto_upgrade makes
UPGRADED = {"v0-vicuna": "v0up-vicuna"}


@pytest.fixture(scope="session")
def start_end(checkpoints, tmp_path_factory):
    return build_start_end(tmp_path_factory.mktemp("start-end"), checkpoints)


@pytest.fixture(scope="session")
def start_end_original(start_end, images, tmp_path_factory):
    jobs = [
        {
            "name": case,
            "checkpoint": str(start_end[UPGRADED.get(name, name)]),
            "images": [str(images[picture])],
            **given,
            **({"conv_mode": mode} if mode else {}),
            "new_tokens": 16,
        }
        for case, (name, given, mode, picture) in CASES.items()
    ]
    return run_original(jobs, tmp_path_factory.mktemp("start-end-original"))


@pytest.fixture(scope="session")
def start_end_loaded(start_end):
    return {name: load(str(start_end[name])) for name in ("v0-vicuna", "startend-v1.5-vicuna")}


@pytest.mark.parametrize("case", CASES)
def test_start_end_matches_the_original(case, start_end_loaded, start_end_original, images):
    name, given, _, picture = CASES[case]
    model, processor = start_end_loaded[name]
    if "prompt" in given:
        prompt = given["prompt"]
    else:
        turns = given.get("turns") or [[given["question"], None]]
        prompt = processor.apply_template(turns[-1][0], 1, history=[tuple(t) for t in turns[:-1]])
    assert "<im_start><image><im_end>\n" in prompt
    check_case(model, processor, start_end_original[case], [images[picture]], prompt)


def test_the_vocabulary_follows_the_builder(start_end_loaded):
    """The tokens the builder adds are the tokenizer's (special, each one id), rows 1000-1002."""
    for name in start_end_loaded:
        processor = start_end_loaded[name][1]
        assert processor.vocabulary == 1003
        assert [processor.tokenize(t)[-1] for t in ("<im_patch>", "<im_start>", "<im_end>")] == [1000, 1001, 1002]


def test_a_v0_config_says_it_is_upgraded_once(start_end, capsys):
    load(str(start_end["v0-vicuna"]))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "LLaVA v0 checkpoint" in warnings[0] and "auto_upgrade" in warnings[0]


def test_the_server_builds_the_same_conversation(start_end, start_end_loaded, start_end_original, images, tmp_path):
    from serving import ask, start_server, user

    model, processor = start_end_loaded["startend-v1.5-vicuna"]
    picture = images["tall"]
    expected = generate(model, processor, FOLLOW_UP, [picture], history=[(QUESTION, ANSWER)], max_tokens=8)
    messages = [user(QUESTION, picture), {"role": "assistant", "content": ANSWER}, user(FOLLOW_UP)]
    server = start_server(start_end["startend-v1.5-vicuna"], tmp_path / "server.log", env=environment())
    try:
        reply = ask(server, messages, max_tokens=8, temperature=0)
    finally:
        assert server.stop() == 0, (tmp_path / "server.log").read_text()[-2000:]
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == start_end_original["startend-two-turns"]["logits"].shape[0]


def test_generate_cli_prompts_as_run_llava(start_end, start_end_loaded, images):
    """generate.py on the v0 checkpoint: the templated question's answer, the upgrade said once."""
    model, processor = start_end_loaded["v0-vicuna"]
    expected = generate(model, processor, QUESTION, [images["wide"]], max_tokens=8)
    argv = ["--model", start_end["v0-vicuna"], "--image", images["wide"], "--prompt", QUESTION, "--max-tokens", "8"]
    result = run_bounded([sys.executable, ROOT / "generate.py", *argv], timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.text.strip() and expected.text.strip()
    assert result.stderr.count("warning:") == 1 and "LLaVA v0 checkpoint" in result.stderr
