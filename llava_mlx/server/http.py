"""The server's HTTP side: routes, access rules, OpenAI-shaped responses and errors.

HTTP on the standard library (`ThreadingHTTPServer`, as mlx-lm's server): a thread per
connection checks the request and prepares its images and prompt, then waits on its
job's queue while the engine thread (engine.py) runs it; the answer goes back as
JSON or as server-sent events, shaped per API (shapes.py, responses.py). Endpoints: POST
/v1/chat/completions, /v1/completions and /v1/responses (also without /v1), GET /v1/models,
GET /health, and GET / (a chat page).
"""

import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
from collections import defaultdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..constrain import grammars
from ..errors import LlavaError
from ..token_bytes import token_table
from .engine import Engine, Job
from .prompt import build_prompt
from .request import ApiError, Limits, parse_chat, parse_completion
from .responses import ResponseShape, parse_response_request
from .shapes import ChatShape, CompletionShape

log = logging.getLogger("llava_mlx.server")
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
COMPLETION_PATHS = ("/v1/completions", "/completions")  # a raw prompt: no template, no images
RESPONSE_PATHS = ("/v1/responses", "/responses")
PARSERS = {
    **{p: parse_chat for p in CHAT_PATHS},
    **{p: parse_completion for p in COMPLETION_PATHS},
    **{p: parse_response_request for p in RESPONSE_PATHS},
}
SHAPES = {"chat": ChatShape, "completions": CompletionShape, "responses": ResponseShape}
MODEL_PATHS = ("/v1/models", "/models")
PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
CHECK_EVERY = 0.1  # s between checks that a waiting client is still connected
STREAM_EVERY = 0.02  # s: streamed tokens are sent at most this often (each send wakes a thread)
# A refused body is answered at once, then what the client still sends is read and dropped (up
# to this many bytes, this long, while it keeps coming), as nginx's lingering close does: a
# client that sends the whole body still reads the answer instead of a connection reset.
DRAIN_LIMIT = 64 << 20
DRAIN_SECONDS = 10.0
DRAIN_IDLE = 1.0  # s without a byte: the client has stopped sending


class ClientGone(Exception):
    """The client closed its connection: its request is cancelled."""


def client_gone(connection) -> bool:
    """Whether the peer has closed the connection (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llava-mlx"
    timeout = 60  # s: a client that sends nothing (or reads nothing) for this long is dropped

    def __init__(self, *args, app=None, **kwargs):
        self.app = app
        self.checked = 0.0  # when the connection was last checked for a disconnect
        self.body_read = False  # whether this request's body has been read (or it has none)
        super().__init__(*args, **kwargs)

    def unread_body(self) -> bool:
        """Whether this request declared a body that nobody read. Answering it and keeping the
        connection would parse that body as the next request (request smuggling behind a
        proxy; a desynchronised connection for any keep-alive client): such a response says
        `Connection: close` and the connection ends with it."""
        headers = getattr(self, "headers", None)  # unset when the request line itself was bad
        if headers is None or self.body_read:
            return False
        return bool(headers.get("Transfer-Encoding")) or headers.get("Content-Length", "").strip() not in ("", "0")

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)

    # -- responses -------------------------------------------------------------------
    def send_error(self, code, message=None, explain=None):
        """The standard library's own errors (malformed request line, headers) as JSON."""
        self.close_connection = True
        self._json(code, ApiError(code, message or HTTPStatus(code).phrase).body())

    def _headers(self, status: int, content_type: str, length=None):
        if self.unread_body():
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Content-Length", str(length))
        headers = getattr(self, "headers", None)  # unset when the request line itself was bad
        origin = headers.get("Origin") if headers else None
        if origin and self.app.cors(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _json(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self._headers(status, "application/json", len(data))
        self.wfile.write(data)

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # -- routes ----------------------------------------------------------------------
    def _route(self, method: str):
        self.body_read = False
        path = self.path.split("?", 1)[0]
        known = {"/": "GET", "/health": "GET", **{p: "GET" for p in MODEL_PATHS}}
        known.update({p: "POST" for p in PARSERS})
        try:
            self.app.check_origin(self.headers.get("Origin"), self.headers.get("Host"))
            if path not in known:
                raise ApiError(404, f"no route {method} {path}", code="not_found")
            if known[path] != method:
                raise ApiError(405, f"{path} takes {known[path]}, not {method}", code="method_not_allowed")
            if path == "/":
                page = PAGE.read_bytes()
                self._headers(200, "text/html; charset=utf-8", len(page))
                self.wfile.write(page)
            elif path == "/health":
                failure = self.app.engine.failure  # the engine stopped on a fault of the model
                status = {"status": "failed", "failure": failure} if failure else {"status": "ok"}
                self._json(503 if failure else 200, {**status, "model": self.app.model_id, **self.app.engine.stats()})
            else:
                self.app.check_key(self.headers.get("Authorization"))
                if path in MODEL_PATHS:
                    self._json(200, {"object": "list", "data": [self.app.model_card()]})
                else:
                    self._chat(PARSERS[path])
        except ApiError as e:
            self._json(e.status, e.body())
            if e.status == 413:
                self._linger()
        except ClientGone:
            self.close_connection = True
            log.info("%s closed its connection: request cancelled", self.address_string())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:
            log.exception("request failed")
            self.close_connection = True
            self._json(500, ApiError(500, f"internal error: {type(e).__name__}").body())

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_OPTIONS(self):  # CORS preflight
        self.body_read = False
        origin = self.headers.get("Origin")
        if not origin or not self.app.cors(origin):
            return self._json(403, ApiError(403, f"origin {origin!r} is not allowed (--allowed-origins)").body())
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", origin)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        if self.unread_body():
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()

    def do_PUT(self):
        self._route("PUT")

    do_DELETE = do_PATCH = do_PUT

    # -- chat completions ------------------------------------------------------------
    def handle_expect_100(self):
        """`Expect: 100-continue`: a body over the limit is refused before the client sends it."""
        try:
            self._too_large()
        except ApiError as e:
            self._json(e.status, e.body())
            self._linger()
            return False
        return super().handle_expect_100()

    def _too_large(self):
        """A 413 when the declared body is over --max-body-mb, answered from the headers alone."""
        length, limit = self.headers.get("Content-Length", "").strip(), self.app.limits.max_body_bytes
        if length.isdigit() and int(length) > limit:
            self.close_connection = True
            raise ApiError(
                413,
                f"the request body is {int(length):,} bytes, over the limit of {limit:,} (--max-body-mb)",
                code="request_too_large",
            )

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "send the request body with a Content-Length (no chunked uploads)")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required")
        self._too_large()
        size = int(length)
        data = self.rfile.read(size)
        self.body_read = True
        if len(data) < size:
            self.close_connection = True
            raise ApiError(400, f"the request body ended after {len(data)} of {size} bytes")
        return data

    def _linger(self):
        """After a refusal sent before the body was read: no more writes (the client reads the
        answer, then the end), and what the client still sends is dropped for a bounded time;
        then the connection closes."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(DRAIN_IDLE)
            deadline, left = time.monotonic() + DRAIN_SECONDS, DRAIN_LIMIT
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 20))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:  # the client left, or stopped sending: either way the connection is done
            return

    def _chat(self, parse):
        app = self.app
        if not app.slots.acquire(blocking=False):  # bounds the requests held in memory at once
            self.close_connection = True
            raise ApiError(
                429,
                f"the server is busy: {app.engine.options.max_batch + app.engine.options.max_queue} requests "
                "are in progress (--max-batch + --max-queue)",
            )
        try:
            self._run_chat(parse)
        finally:
            app.slots.release()

    def _run_chat(self, parse):
        app = self.app
        chat = parse(self._body(), app.limits)
        if chat.n > app.engine.options.max_batch:
            raise ApiError(400, f"'n' is {chat.n}: at most --max-batch ({app.engine.options.max_batch}) choices", "n")
        shape = SHAPES[chat.api](chat, app.model_id)
        job = Job(build_prompt(chat, app.processor, app.limits, app.engine.needs_pixels), chat)
        app.compile(chat)
        app.engine.submit(job)
        try:
            if chat.stream:
                self._stream(job, shape)
            else:
                self._complete(job, shape)
        except (ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancel()
            raise ClientGone() from None
        except ApiError:
            job.cancel()  # one choice failed: the others stop too
            raise

    def _event(self, job: Job):
        """The job's next event, cancelling it if the client goes away meanwhile (checked
        every CHECK_EVERY seconds, even while events keep coming)."""
        while True:
            now = time.monotonic()
            if now >= self.checked + CHECK_EVERY:
                self.checked = now
                if client_gone(self.connection):
                    job.cancel()
                    raise ClientGone()
            try:
                return job.events.get(timeout=CHECK_EVERY)
            except queue.Empty:
                continue

    @staticmethod
    def _queued(job: Job):
        try:
            return job.events.get_nowait()
        except queue.Empty:
            return None

    def _complete(self, job: Job, shape):
        # Wait for the end, not token by token: waking this thread for every token would
        # make the engine thread wait for the GIL as often.
        while not all(choice.finished.wait(CHECK_EVERY) for choice in job.choices):
            if client_gone(self.connection):
                job.cancel()
                raise ClientGone()
        texts, entries, finishes, usages = defaultdict(list), defaultdict(list), {}, {}
        while len(finishes) < len(job.choices):
            event = job.events.get()
            if event[0] == "error":
                raise event[1]
            if event[0] == "text":
                texts[event[1]].append(event[2])
                entries[event[1]] += event[3]
            else:
                finishes[event[1]], usages[event[1]] = event[2], event[3]
        texts = {i: "".join(parts) for i, parts in texts.items()}
        self._json(200, shape.whole(texts, entries, finishes, usages))

    def _send(self, shape, payloads):
        for payload in payloads:
            name = b"event: %s\n" % payload["type"].encode() if shape.named_events else b""
            self._chunk(name + b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _stream(self, job: Job, shape):
        first = self._event(job)  # the first event, or a failure, before the stream's 200
        if first[0] == "error":
            raise first[1]
        self._headers(200, "text/event-stream")
        self._send(shape, shape.start())
        usages, event = {}, first
        while len(usages) < len(job.choices):
            pending = {}  # index -> (texts, entries) gathered since the last send
            while event is not None and event[0] != "error":
                if event[0] == "text":
                    texts, entries = pending.setdefault(event[1], ([], []))
                    texts.append(event[2])
                    entries += event[3]
                else:
                    self._flush(shape, pending, event[1])
                    self._send(shape, shape.done(event[1], event[2]))
                    usages[event[1]] = event[3]
                event = self._queued(job)
            for index in list(pending):
                self._flush(shape, pending, index)
            if event is not None:  # an error
                self._send(shape, shape.error(event[1]))
                break
            if len(usages) < len(job.choices):
                job.finished.wait(STREAM_EVERY)  # let the next tokens gather: one wake-up, not one per token
                event = self._event(job)
        else:
            self._send(shape, shape.end(usages))
        if shape.done_marker:
            self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _flush(self, shape, pending: dict, index: int):
        texts, entries = pending.pop(index, ([], []))
        if texts or entries:
            self._send(shape, shape.text(index, "".join(texts), entries))


class App:
    """What every handler shares: the engine, the limits, the access rules."""

    def __init__(self, engine: Engine, limits: Limits, model_id: str, api_key=None, allowed_origins=()):
        self.engine, self.limits, self.model_id = engine, limits, model_id
        self.api_key, self.allowed_origins = api_key, tuple(allowed_origins)
        self.created = int(time.time())
        self.slots = threading.BoundedSemaphore(engine.options.max_batch + engine.options.max_queue)

    def drain(self, timeout: float) -> bool:
        """Wait (up to `timeout` s) for the requests in flight to send what they have: the
        handler threads are daemons, and would otherwise end with the process mid-answer."""
        deadline = time.monotonic() + timeout
        for _ in range(self.engine.options.max_batch + self.engine.options.max_queue):
            if not self.slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
        return True

    @property
    def processor(self):
        return self.engine.processor

    def check_key(self, authorization):
        if self.api_key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def cors(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins

    def check_origin(self, origin, host):
        """Browsers send Origin: a page of another site may not use this server unless allowed."""
        if origin and origin not in (f"http://{host}", f"https://{host}") and not self.cors(origin):
            raise ApiError(403, f"origin {origin!r} is not allowed (--allowed-origins)", code="origin_not_allowed")

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "llava-mlx"}

    def compile(self, chat):
        """Compile the request's schema here, in its HTTP thread (llguidance lets go of the GIL
        meanwhile), so the engine only copies it, and read the tokenizer's token bytes that
        logprobs report: a schema or a tokenizer that cannot be served is a 400 before the
        request starts."""
        try:
            if chat.logprobs:
                token_table(self.processor.tokenizer._tokenizer)
        except LlavaError as e:
            raise ApiError(400, str(e), "logprobs") from None
        if chat.schema is None:
            return
        try:
            grammars(self.processor, self.engine.model.config.text_config["vocab_size"]).matcher(chat.schema)
        except LlavaError as e:
            raise ApiError(400, str(e), "response_format") from None


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
