"""Bounded downloads: an http(s) read that ends within `timeout` seconds in TOTAL and
never holds more than `max_bytes`, whatever the server does.

A socket timeout only bounds each read: a server that sends one byte a second keeps it
alive forever. Here a watchdog shuts the connection's sockets down at the deadline (the
blocked read returns at once), and the body is read a piece at a time (`read1`) against
the deadline and the size limit. Proxies are urllib's; redirects too, up to MAX_REDIRECTS
and only to http(s) URLs (never to the local disk).
"""

import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin

from .errors import LlavaError

DEFAULT_TIMEOUT = 60.0  # s, the whole download
DEFAULT_MAX_BYTES = 100 * 2**20
CHUNK = 1 << 16
MAX_REDIRECTS = 3


def _watched(base, sockets: list):
    class Connection(base):
        def connect(self):
            super().connect()
            sockets.append(self.sock)

    return Connection


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, sockets):
        super().__init__()
        self.connection = _watched(http.client.HTTPConnection, sockets)

    def http_open(self, req):
        return self.do_open(self.connection, req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, sockets):
        super().__init__()
        self.connection = _watched(http.client.HTTPSConnection, sockets)

    def https_open(self, req):
        return self.do_open(self.connection, req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):
        target = urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        if not target.lower().startswith(("http://", "https://")):
            raise LlavaError(
                f"cannot download {req.full_url}: it redirects to {target[:80]}, and only http(s) URLs are read"
            )
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def fetch(url: str, what: str = "file", timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The body of `url` (http or https); LlavaError if it is slower than `timeout` in
    total, larger than `max_bytes`, or fails in any other way."""
    if not url.startswith(("http://", "https://")):
        raise LlavaError(f"cannot download {what} {url}: only http(s) URLs are read")
    sockets, expired = [], threading.Event()

    def shut():
        expired.set()
        for sock in list(sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed: nothing left to stop
                continue

    deadline = time.monotonic() + timeout
    watchdog = threading.Timer(timeout, shut)
    watchdog.daemon = True
    watchdog.start()
    opener = urllib.request.build_opener(_HTTP(sockets), _HTTPS(sockets), _Redirects())
    request = urllib.request.Request(url, headers={"User-Agent": "llava-mlx"})
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise LlavaError(f"cannot download {what} {url}: {int(length):,} bytes, more than {max_bytes:,}")
            data = bytearray()
            while True:
                piece = response.read1(CHUNK)
                if expired.is_set() or time.monotonic() > deadline:
                    raise TimeoutError
                if not piece:
                    break
                data += piece
                if len(data) > max_bytes:
                    raise LlavaError(f"cannot download {what} {url}: more than {max_bytes:,} bytes")
            return bytes(data)
    except LlavaError:
        raise
    except (TimeoutError, socket.timeout):
        raise LlavaError(f"cannot download {what} {url}: no complete answer within {timeout:g} s") from None
    except urllib.error.HTTPError as e:
        raise LlavaError(f"cannot download {what} {url}: HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        if expired.is_set():
            raise LlavaError(f"cannot download {what} {url}: no complete answer within {timeout:g} s") from None
        reason = getattr(e, "reason", None) or e
        raise LlavaError(f"cannot download {what} {url}: {reason}") from None
    finally:
        watchdog.cancel()
