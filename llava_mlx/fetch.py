"""Bounded downloads: an http(s) read that ends within `timeout` seconds in TOTAL and
never holds more than `max_bytes`, whatever the server does.

A socket timeout only bounds each read: a server that sends one byte a second keeps it
alive forever. Here a watchdog shuts the connection's sockets down at the deadline (the
blocked read returns at once), and the body is read a piece at a time (`read1`) against
the deadline and the size limit. Proxies are urllib's; redirects too, up to MAX_REDIRECTS
and only to http(s) URLs (never to the local disk).

`public_only` (the server's default): every connection, the first and each redirect's, goes
only to a public address. The host is resolved once, each of its addresses checked, and the
socket connected to a checked one, so a second DNS answer cannot swap in a private address.
Refused: loopback, private, link-local, shared, reserved, multicast and unspecified
addresses (IPv4-mapped IPv6 included) — the Mac's own services, the LAN, the router and a
cloud machine's metadata address. Behind a proxy the check applies to the proxy's address.
"""

import http.client
import ipaddress
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


class NonPublicAddress(LlavaError):
    """A connection `public_only` refused (raised inside urllib, said with the URL by `fetch`)."""


def non_public(address: str) -> bool:
    """Whether an IP address is anything but a public unicast one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone index is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def public_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """`socket.create_connection` to a public address only (see the module's docstring)."""
    host, port = address
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host}: {e.strerror}") from None
    public = [info for info in found if not non_public(info[4][0])]
    if not public:
        shown = ", ".join(sorted({info[4][0] for info in found}))
        raise NonPublicAddress(
            f"{host} is a non-public address ({shown}: loopback, private, link-local or reserved), "
            "which the server does not fetch from (start it with --allow-private-image-urls to allow it)"
        )
    error = None
    for family, kind, proto, _, target in public:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(target)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


def _watched(base, sockets: list, public_only: bool):
    class Connection(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if public_only:
                self._create_connection = public_connection

        def connect(self):
            super().connect()
            sockets.append(self.sock)

    return Connection


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, sockets, public_only):
        super().__init__()
        self.connection = _watched(http.client.HTTPConnection, sockets, public_only)

    def http_open(self, req):
        return self.do_open(self.connection, req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, sockets, public_only):
        super().__init__()
        self.connection = _watched(http.client.HTTPSConnection, sockets, public_only)

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


def fetch(
    url: str,
    what: str = "file",
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    public_only: bool = False,
) -> bytes:
    """The body of `url` (http or https); LlavaError if it is slower than `timeout` in
    total, larger than `max_bytes`, (with `public_only`) on a non-public address, or fails in
    any other way."""
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
    opener = urllib.request.build_opener(_HTTP(sockets, public_only), _HTTPS(sockets, public_only), _Redirects())
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
    except NonPublicAddress as e:
        raise LlavaError(f"cannot download {what} {url}: {e}") from None
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
