"""The server over two ranks on loopback (`mlx.launch -n 2 --backend ring -- python server.py`):
rank 0 serves HTTP, rank 1 follows its engine in lockstep. The official `openai` client gets
exactly generate()'s single-process greedy answers (plain, streamed, two requests at once,
a follow-up from the prompt cache, after cancellations and a sampled request), tensor and
pipeline parallel, and a SIGTERM to the launch's process group ends every process; a
follower whose rank 0 is killed exits 1 with one line, and a rank killed mid-answer fails the
answer with an error event and ends the launch. Bounded in time; the whole group is
killed if anything hangs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from conftest import ROOT, SERVER_ARGS, SERVER_MODEL
from helpers import LAUNCH, environment, free_port_pair
from schemas import SCHEMAS, as_format
from serving import ask, client, disconnect_twice, reference, start_server, user

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


def test_the_ranks_exchange_once_per_batch_of_steps(two_ranks):
    """While answers only decode, rank 0 shares its changes once per batch of decode steps
    (and the head count of the ranks comes once per batch), not once per token."""
    before = two_ranks.health()
    r = ask(two_ranks, [user("Tell me a long story.")], max_tokens=120)
    after = two_ranks.health()
    steps = after["decode_steps"] - before["decode_steps"]
    exchanges = after["exchanges"] - before["exchanges"]
    assert steps == r.usage.completion_tokens + (r.choices[0].finish_reason == "stop")
    assert exchanges < steps / 2, (exchanges, steps)
    print(f"{steps} decode steps, {exchanges} exchanges")


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


def test_choices_schemas_and_logprobs_answer_as_one_process(two_ranks, live_server, images):
    """n seeded choices, a schema's mask and logprobs on two ranks: the one-process server's answers."""
    messages = [user("As JSON.", images["odd1"])]
    for options in (
        dict(n=2, temperature=1.0, seed=3, max_tokens=12),
        dict(response_format=as_format(SCHEMAS["enum"]), max_tokens=40, logprobs=True, top_logprobs=2),
    ):
        two, one = ask(two_ranks, messages, **options), ask(live_server, messages, **options)
        assert [c.message.content for c in two.choices] == [c.message.content for c in one.choices]
        assert two.usage.completion_tokens == one.usage.completion_tokens
    assert [e.token for e in two.choices[0].logprobs.content] == [e.token for e in one.choices[0].logprobs.content]


def test_sigterm_to_the_group_stops_every_rank(two_ranks):
    os.killpg(two_ranks.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while group_alive(two_ranks.proc.pid) and time.monotonic() < deadline:
        two_ranks.proc.poll()  # reap the launcher
        time.sleep(0.2)
    assert not group_alive(two_ranks.proc.pid), two_ranks.log.read_text()[-3000:]
    assert "Traceback" not in two_ranks.log.read_text()


@contextmanager
def ranks_by_hand(checkpoints, tmp_path):
    """Both ranks started by hand (as mlx.launch starts them, each in its own process group,
    so that one can be killed alone): (rank 0 as a LiveServer, rank 1's Popen, its log)."""
    base = free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    model, log = str(checkpoints[SERVER_MODEL]), tmp_path / "rank1.log"
    with open(log, "w") as out:
        follower = subprocess.Popen(
            [sys.executable, "server.py", "--model", model, "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=out,
            cwd=ROOT,
            env=environment(MLX_RANK="1", MLX_HOSTFILE=str(hostfile)),
            start_new_session=True,
        )
    main = None
    try:
        main = start_server(model, tmp_path / "rank0.log", env=environment(MLX_RANK="0", MLX_HOSTFILE=str(hostfile)))
        deadline = time.monotonic() + 60
        while "following rank 0" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        yield main, follower, log
    finally:
        for proc in (follower, main and main.proc):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def last_line(log: Path) -> str:
    return [line for line in log.read_text().splitlines() if not line.startswith("[ring]")][-1]


# MLX raises when it sees a socket close; when it fails the pending transfer without raising,
# the frame check (share_object) or the head count after each step (check_ranks) finds it.
LOST = r"lost a rank: \[ring\] connection to (a peer|rank 0) was lost.*; restart the whole launch"


def test_a_follower_whose_rank_0_dies_exits_with_one_line(checkpoints, tmp_path):
    """Rank 0 is killed: rank 1 says so in one line and exits 1 instead of waiting forever."""
    with ranks_by_hand(checkpoints, tmp_path) as (main, follower, log):
        os.killpg(main.proc.pid, signal.SIGKILL)
        main.proc.wait()
        assert follower.wait(timeout=STOP_TIMEOUT) == 1
    assert re.fullmatch(r"error: \[rank 1/2\] " + LOST, last_line(log)), log.read_text()


def rank_pid(pgid: int, rank: int) -> int:
    """The pid of the launch's process for `rank` (mlx.launch sets MLX_RANK in its environment)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            stat = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()
            found = int(stat[2]) == pgid and f"MLX_RANK={rank}".encode() in environ.read_bytes().split(b"\0")
        except OSError:  # it just ended, or is not ours to read
            continue
        if found:
            return int(environ.parent.name)
    raise LookupError(f"no process of rank {rank} in group {pgid}")


def test_a_rank_killed_mid_answer_fails_the_answer_and_ends_the_launch(checkpoints, tmp_path):
    """Rank 1 is killed while rank 0 streams an answer: the stream ends with an OpenAI-shaped
    error event (never tokens computed from half the decoder, never a hang) and the whole
    launch ends. Rank 0 finds the loss itself (then exits 1 with one line), or,
    where MLX's ring leaves it waiting in a collective, mlx.launch stops it when it sees
    rank 1 gone, and the answer gets the shutdown's 503."""
    launcher = (LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_port_pair()), "--")
    server = start_server(checkpoints[SERVER_MODEL], tmp_path / "server.log", launcher=launcher, env=environment())
    try:
        stream = client(server).chat.completions.create(
            model="llava", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=512, stream=True
        )
        chunks = iter(stream)
        while not next(chunks).choices[0].delta.content:  # the answer has begun
            pass
        os.kill(rank_pid(server.proc.pid, 1), signal.SIGKILL)
        with pytest.raises(openai.APIError) as failed:
            for chunk in chunks:  # 512 tokens take far longer than noticing the loss
                assert chunk.choices[0].finish_reason is None
        lost = re.fullmatch(
            r"the generation engine stopped \(lost a rank: .*\); restart the server", failed.value.message
        )
        assert lost or failed.value.message == "the server is shutting down", failed.value.message
        server.proc.wait(timeout=STOP_TIMEOUT)  # mlx.launch itself exits 0 whatever its ranks did
        assert not group_alive(server.proc.pid)
    finally:
        if group_alive(server.proc.pid):
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    if lost:
        lines = [line for line in server.log.read_text().splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and re.fullmatch(r"error: \[rank 0/2\] " + LOST, lines[0]), server.log.read_text()
        assert "Node with rank 0 exited with code 1" in server.log.read_text()
