"""Image URLs: with `public_only` (the server's default) no connection goes to a non-public
address, the first one or a redirect's; the check is on the resolved address, not the name."""

import http.server
import threading

import pytest

from llava_mlx import fetch as fetch_module
from llava_mlx.errors import LlavaError
from llava_mlx.fetch import fetch, non_public


@pytest.mark.parametrize(
    "address, refused",
    [
        ("8.8.8.8", False),
        ("1.1.1.1", False),
        ("2606:4700:4700::1111", False),
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # a cloud machine's metadata address
        ("100.64.0.1", True),  # shared (carrier-grade NAT)
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("fe80::1%eth0", True),
        ("fd00::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", False),
    ],
)
def test_non_public_addresses(address, refused):
    assert non_public(address) is refused


class Pictures(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", "http://" + self.path[len("/to/") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"picture bytes"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def host():
    """Two loopback hosts: 127.0.0.1 and 127.0.0.2 (Linux and macOS route all of 127/8)."""
    servers = [http.server.ThreadingHTTPServer((ip, 0), Pictures) for ip in ("127.0.0.1", "127.0.0.2")]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"{ip}:{s.server_address[1]}" for ip, s in zip(("127.0.0.1", "127.0.0.2"), servers)]
    for server in servers:
        server.shutdown()


def test_loopback_is_fetched_only_when_allowed(host):
    assert fetch(f"http://{host[0]}/a.png", "the image URL") == b"picture bytes"  # the API's default
    for url in (f"http://{host[0]}/a.png", f"http://localhost:{host[0].split(':')[1]}/a.png"):
        with pytest.raises(LlavaError, match="is a non-public address .*--allow-private-image-urls"):
            fetch(url, "the image URL", public_only=True)


def test_every_redirect_is_checked(host, monkeypatch):
    """A redirect from an allowed host to a refused one is refused at the redirect (here 127.0.0.1
    stands for a public host and 127.0.0.2 for a private one)."""
    monkeypatch.setattr(fetch_module, "non_public", lambda address: address == "127.0.0.2")
    assert fetch(f"http://{host[0]}/a.png", public_only=True) == b"picture bytes"
    with pytest.raises(LlavaError, match=r"127\.0\.0\.2 is a non-public address"):
        fetch(f"http://{host[0]}/to/{host[1]}/a.png", public_only=True)
    monkeypatch.setattr(fetch_module, "non_public", lambda address: False)
    assert fetch(f"http://{host[0]}/to/{host[1]}/a.png", public_only=True) == b"picture bytes"
