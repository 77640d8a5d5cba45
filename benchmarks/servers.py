"""Start, watch and stop the servers under test, each on a free loopback port.

    with Server("llava-mlx", command("llava-mlx", ckpt, port), log) as s:
        s.base_url, s.model_id, s.peak_rss()

Every server is a child process of the benchmark, in its own process group, stopped (SIGTERM,
then SIGKILL after a grace period) when the `with` block ends, whatever happened inside.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .checkpoints import PREFILL_STEP_SIZE
from .worker import child_env

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVERS = ("llava-mlx", "mlx-vlm")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def source(server_script: Path | None) -> str:
    """Which code of this project's server runs: its git commit when it is in a checkout."""
    path = Path(server_script or ROOT / "server.py").resolve()

    def git(*args):
        return subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return str(path)
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{path} at commit {commit}{dirty}"


def command(name: str, ckpt: Path, port: int, server_script: Path | None = None) -> list:
    """The command line a user would type to serve `ckpt` with `name`, on loopback."""
    common = ["--model", str(ckpt), "--host", HOST, "--port", str(port), "--prefill-step-size", str(PREFILL_STEP_SIZE)]
    if name == "llava-mlx":
        return [sys.executable, str(server_script or ROOT / "server.py"), *common]
    if name == "mlx-vlm":
        return [sys.executable, "-m", "mlx_vlm.server", *common, "--log-level", "WARNING"]
    raise ValueError(f"unknown server {name!r}; known: {', '.join(SERVERS)}")


class Server:
    """A server process: started on entry, ready when GET /v1/models answers, stopped on exit."""

    def __init__(self, name: str, cmd: list, log_path: Path, ready_timeout: float = 180.0, blas: str | None = None):
        self.name, self.cmd, self.log_path, self.ready_timeout, self.blas = name, cmd, log_path, ready_timeout, blas
        self.port = int(cmd[cmd.index("--port") + 1])
        self.base_url = f"http://{HOST}:{self.port}/v1"
        self.proc = None
        self.model_id = None
        self.startup_time = None
        self._peak = 0
        self._sampling = False
        self._sampler = None

    def __enter__(self):
        self._log = open(self.log_path, "w")
        env = child_env(self.blas, PYTHONUNBUFFERED="1")
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        try:
            self.model_id = self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_time = time.perf_counter() - t
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc):
        self._sampling = False
        if self._sampler is not None:
            self._sampler.join(timeout=2)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's group: the server and anything it forked
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._log.close()
        return False

    def log_tail(self, n: int = 12) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as r:
                    ids = [m["id"] for m in json.loads(r.read()).get("data") or []]
                model = self.cmd[self.cmd.index("--model") + 1]
                # the served checkpoint: listed under its path, or the one model listed; else ask by path
                return model if model in ids or len(ids) != 1 else ids[0]
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(0.5)
        raise TimeoutError(f"{self.name} server not ready after {self.ready_timeout:.0f}s: {self.log_tail()}")

    def _sample_rss(self):
        import psutil

        proc = psutil.Process(self.proc.pid)
        while self._sampling:
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                return
            self._peak = max(self._peak, rss)
            time.sleep(0.2)

    def peak_rss(self, reset: bool = False) -> int:
        """Highest resident memory of the server's processes since the last reset (sampled every 0.2 s)."""
        peak = self._peak
        if reset:
            self._peak = 0
        return peak
