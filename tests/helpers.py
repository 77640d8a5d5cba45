"""What many test files share: the expectation of one clear error line, directory snapshots,
the generate command as a subprocess, free loopback ports, logits and their cosine."""

import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

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
