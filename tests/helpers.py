"""What many test files share: the expectation of one clear error line, directory snapshots,
a checkpoint with another config.json, the generate command as a subprocess, free loopback
ports, two ranks under mlx.launch, logits and their cosine."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# A command's environment: offline, no inherited Python paths, only the system's tools.
CLI_ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


def expect_error(capsys, main, argv, fragment, code=1):
    """`main(argv)` exits with `code`, saying exactly one line, `error: ...` holding `fragment`."""
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


def snapshot(directory: Path) -> dict:
    """Every file below `directory` with its bytes: equal snapshots, nothing touched."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def with_config(source: Path, out: Path, **changes) -> Path:
    """`out`: the checkpoint at `source` with `changes` over its config.json (its other files linked)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return out


def run_cli(*args, env=None):
    """`python generate.py ARGS` in a child process, bounded in time."""
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**CLI_ENV, **(env or {})},
        timeout=300,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logits(model, inputs) -> np.ndarray:
    return np.array(model(**inputs)[0].astype(mx.float32))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


LAUNCH = Path(sys.executable).parent / "mlx.launch"
LAUNCH_TIMEOUT = 600


def free_port_pair() -> int:
    """A base port with base and base + 1 free: mlx.launch's ring listens on base + rank."""
    for _ in range(200):
        base, held = random.randint(20000, 60000), []
        try:
            for port in (base, base + 1):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run_bounded(command, timeout, env=None) -> subprocess.CompletedProcess:
    """Run in its own process group, killed whole (launcher and ranks) on timeout."""
    p = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env or environment(),
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{' '.join(map(str, command))} did not finish within {timeout} s")
    return subprocess.CompletedProcess(command, p.returncode, out, err)


def launch_two(*args, timeout=LAUNCH_TIMEOUT, env=None) -> subprocess.CompletedProcess:
    command = [LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_port_pair()), "--", sys.executable, *args]
    return run_bounded(command, timeout, env)
