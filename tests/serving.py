"""A live `server.py` for the tests: a subprocess on 127.0.0.1, a free port, its log in a file."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 180


class LiveServer:
    def __init__(self, proc, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        """SIGTERM: the server shuts down cleanly, exit code 0."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def start_server(model: Path, log: Path, *args, launcher=(), env=None) -> LiveServer:
    """`[LAUNCHER] python server.py --model MODEL --port 0 ARGS`, once it says where it listens
    (in a process group of its own: `launcher` may start several processes)."""
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*launcher, sys.executable, str(ROOT / "server.py"), "--model", str(model), "--port", "0", *args],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return LiveServer(proc, int(found.group(1)), log)
        if proc.poll() is not None:
            raise RuntimeError(f"server.py exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"server.py did not start in {STARTUP_TIMEOUT} s:\n{log.read_text()}")
