"""A live `server.py` for the tests (a subprocess on 127.0.0.1, a free port, its log in a file), and the
official `openai` client's side of the conversation with it."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from llava_mlx.generation import stream_generate

from conftest import SERVER_MODEL

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
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
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


TOKENS = 16


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(question, *images):
    parts = [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}


def video_uri(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def video_part(path) -> dict:
    return {"type": "video_url", "video_url": {"url": video_uri(path)}}


def video_message(question, video, image=None):
    parts = [{"type": "image_url", "image_url": {"url": data_uri(image)}}] if image else []
    parts.append(video_part(video))
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}


def client(server, **kwargs):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)


def reference(loaded, question, images, history=(), max_tokens=TOKENS):
    """generate()'s answer: (text, tokens with the EOS if it stopped, finish, prompt length)."""
    model, processor = loaded(SERVER_MODEL)
    steps = list(stream_generate(model, processor, question, images, max_tokens=max_tokens, history=history))
    text = "".join(s.text for s in steps)
    tokens = [s.token for s in steps[:-1]] + ([steps[-1].token] if steps[-1].finish_reason == "stop" else [])
    return text, tokens, steps[-1].finish_reason, steps[-1].prompt_tokens


def ask(server, messages, max_tokens=TOKENS, **kwargs):
    return client(server).chat.completions.create(model="llava", messages=messages, max_tokens=max_tokens, **kwargs)


def disconnect_twice(server, image):
    """Ask twice about `image` for 600 tokens, leaving a streamed and a plain request
    early; the server's health (before, after both are no longer running)."""
    before = server.health()
    stream = ask(server, [user("A long story please.", image)], max_tokens=600, stream=True)
    next(iter(stream))
    stream.close()
    with pytest.raises(openai.APITimeoutError):
        # 600 tokens take over 1 s here even with the image cached: gone well before the end
        client(server).with_options(timeout=0.4).chat.completions.create(
            model="llava", messages=[user("Another long one.", image)], max_tokens=600
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = server.health()
        if health["cancelled"] - before["cancelled"] >= 2 and health["running"] == 0:
            break
        time.sleep(0.2)
    return before, health


SMUGGLED = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # a body that is itself a request


def responses_to(port: int, request: bytes, timeout: float = 10) -> list:
    """The statuses of the responses the server sends on one connection for `request` (bytes as
    sent), parsed one after another until the server closes the connection; None at the end
    when it kept the connection open instead (nothing more came within `timeout`)."""
    import socket

    statuses = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        reader = s.makefile("rb")
        while True:
            try:
                line = reader.readline()
            except TimeoutError:
                return statuses + [None]
            if not line:
                return statuses  # closed by the server
            headers = {}
            while (header := reader.readline()) not in (b"\r\n", b""):
                name, _, value = header.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                reader.read(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                while (size := int(reader.readline().split(b";")[0], 16)) > 0:
                    reader.read(size + 2)
                reader.readline()
            statuses.append(line.decode().split()[1])


def request_with_body(method: str, path: str, body: bytes = SMUGGLED, headers: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    return head.encode() + body
