"""The server over two ranks on loopback (`mlx.launch -n 2 --backend ring -- python server.py`):
rank 0 serves HTTP, rank 1 follows its engine in lockstep. The official `openai` client gets
exactly generate()'s single-process greedy answers (plain, streamed, two requests at once,
a follow-up from the prompt cache, after cancellations and a sampled request), tensor and
pipeline parallel, and a SIGTERM to the launch's process group ends every process; a
follower whose rank 0 is killed exits 1 with one line. Bounded in time; the whole group is
killed if anything hangs."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, SERVER_ARGS, SERVER_MODEL
from serving import start_server
from test_distributed import LAUNCH, environment, free_port_pair
from test_server import ask, disconnect_twice, reference, user

STOP_TIMEOUT = 60


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies waiting to be reaped do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it just ended
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def two_ranks(request, checkpoints, tmp_path_factory):
    launcher = (LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_port_pair()), "--")
    log = tmp_path_factory.mktemp("distributed-server") / "server.log"
    mode = ["--pipeline"] if request.param == "pipeline" else []
    server = start_server(checkpoints[SERVER_MODEL], log, *SERVER_ARGS, *mode, launcher=launcher, env=environment())
    yield server
    if group_alive(server.proc.pid):
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def test_rank_0_serves_and_rank_1_follows(two_ranks):
    deadline = time.monotonic() + 60
    while "following rank 0" not in two_ranks.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = two_ranks.log.read_text()
    assert log.count("llava-mlx: serving ") == 1, log  # one rank listens
    assert log.count("llava-mlx: [rank 1/2] following rank 0") == 1, log


def test_plain_and_streamed_answers_equal_one_process(two_ranks, loaded, images):
    text, tokens, finish, length = reference(loaded, "What is in the image?", [images["wide"]])
    r = ask(two_ranks, [user("What is in the image?", images["wide"])])
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == length
    assert r.usage.completion_tokens == len(tokens) - (finish == "stop")

    text, _, finish, _ = reference(loaded, "Describe it.", [images["tall"]])
    chunks = list(ask(two_ranks, [user("Describe it.", images["tall"])], stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish


def test_two_requests_at_once_answer_correctly(two_ranks, loaded, images):
    asked = [("Question A: what is this?", "square"), ("Question B, a longer one: what do you see here?", "odd1")]
    expected = [reference(loaded, q, [images[name]], max_tokens=24)[0] for q, name in asked]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda a: ask(two_ranks, [user(a[0], images[a[1]])], max_tokens=24), asked))
    assert [r.choices[0].message.content for r in answers] == expected
    assert two_ranks.health()["finished"] >= 4


def test_a_follow_up_reuses_the_cached_prefix_on_every_rank(two_ranks, loaded, images):
    q1, q2 = "Name one shape, follow-up test.", "And its colour?"
    a1 = reference(loaded, q1, [images["odd2"]])[0]
    assert ask(two_ranks, [user(q1, images["odd2"])]).choices[0].message.content == a1
    a2 = reference(loaded, q2, [images["odd2"]], history=[(q1, a1)])[0]
    r = ask(two_ranks, [user(q1, images["odd2"]), {"role": "assistant", "content": a1}, user(q2)])
    assert r.choices[0].message.content == a2
    assert r.usage.prompt_tokens_details.cached_tokens > 1000  # the image came from the cache


def test_cancelled_and_sampled_requests_keep_the_ranks_in_step(two_ranks, loaded, images):
    before, health = disconnect_twice(two_ranks, images["square"])
    assert health["cancelled"] - before["cancelled"] == 2 and health["running"] == 0
    # Sampled without a seed: rank 0 picks one for every rank.
    sampled = ask(two_ranks, [user("Say anything.", images["wide"])], temperature=0.9)
    assert sampled.usage.completion_tokens > 0
    text = reference(loaded, "What is in the image?", [images["wide"]])[0]
    assert ask(two_ranks, [user("What is in the image?", images["wide"])]).choices[0].message.content == text


def test_sigterm_to_the_group_stops_every_rank(two_ranks):
    os.killpg(two_ranks.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while group_alive(two_ranks.proc.pid) and time.monotonic() < deadline:
        two_ranks.proc.poll()  # reap the launcher
        time.sleep(0.2)
    assert not group_alive(two_ranks.proc.pid), two_ranks.log.read_text()[-3000:]
    assert "Traceback" not in two_ranks.log.read_text()


def test_a_follower_whose_rank_0_dies_exits_with_one_line(checkpoints, tmp_path):
    """Both ranks started by hand (as mlx.launch starts them): rank 0 is killed, rank 1 says
    so in one line and exits 1 instead of waiting forever."""
    base = free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    model, log = str(checkpoints[SERVER_MODEL]), tmp_path / "rank1.log"
    with open(log, "w") as out:
        follower = subprocess.Popen(
            [sys.executable, "server.py", "--model", model, "--port", "0"], stdout=subprocess.DEVNULL, stderr=out,
            cwd=ROOT, env=environment(MLX_RANK="1", MLX_HOSTFILE=str(hostfile)), start_new_session=True,
        )
    try:
        main = start_server(model, tmp_path / "rank0.log", env=environment(MLX_RANK="0", MLX_HOSTFILE=str(hostfile)))
        deadline = time.monotonic() + 60
        while "following rank 0" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(main.proc.pid, signal.SIGKILL)
        main.proc.wait()
        assert follower.wait(timeout=STOP_TIMEOUT) == 1
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait()
    lines = [line for line in log.read_text().splitlines() if not line.startswith("[ring]")]
    assert lines[-1] == "error: [rank 1/2] lost rank 0 ([ring] connection to a peer was lost)", lines
