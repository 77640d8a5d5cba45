"""One request, one response: every path that answers before reading the body (unknown route,
wrong method, a GET with a body, chunked or unsized uploads, too large a body, a preflight)
closes the connection, so a body that is itself a request is never answered as one."""

import pytest

from serving import SMUGGLED, request_with_body, responses_to

CASES = {
    "unknown route": request_with_body("POST", "/v1/nothing"),
    "wrong method": request_with_body("PUT", "/v1/chat/completions"),
    "GET with a body": request_with_body("GET", "/health"),
    "the page with a body": request_with_body("GET", "/"),
    "models with a body": request_with_body("GET", "/v1/models"),
    "preflight with a body": request_with_body("OPTIONS", "/v1/chat/completions"),
    "chunked upload": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    ),
    "unreadable length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4x\r\n\r\n" + SMUGGLED,
    "too large": request_with_body("POST", "/v1/chat/completions", SMUGGLED + b" " * (4 << 20)),
}
EXPECTED = {
    "unknown route": "404",
    "wrong method": "405",
    "GET with a body": "200",
    "the page with a body": "200",
    "models with a body": "200",
    "preflight with a body": "403",
    "chunked upload": "411",
    "unreadable length": "411",
    "too large": "413",
}


@pytest.mark.parametrize("case", list(CASES))
def test_exactly_one_response(case, live_server):
    statuses = responses_to(live_server.port, CASES[case])
    assert statuses == [EXPECTED[case]]  # one answer, then the connection ends


def test_a_read_body_keeps_the_connection(live_server):
    """A request whose body was read keeps its connection: the next request on it is answered."""
    import json

    body = json.dumps({"messages": "not a list"}).encode()
    statuses = responses_to(live_server.port, request_with_body("POST", "/v1/chat/completions", body) + SMUGGLED, 5)
    assert statuses == ["400", "200", None]  # both answered, the connection still open


def read_response(reader) -> tuple:
    """(status, headers, body) of one response read from a socket's file."""
    status = reader.readline().split()[1].decode()
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers.get("content-length", 0)))


@pytest.mark.parametrize("expect", [False, True])
def test_a_body_over_the_limit_is_refused_before_it_is_sent(live_server, expect):
    """The 413 comes from the headers alone (before any `100 Continue`): a client that has sent
    none of its 60 MB reads it at once, then the connection ends."""
    import json
    import socket
    import time

    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 62914560\r\n"
    head += "Expect: 100-continue\r\n" if expect else ""
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as s:
        s.sendall((head + "\r\n").encode())
        reader = s.makefile("rb")
        status, headers, body = read_response(reader)  # no body sent: a server waiting for it times this out
        assert status == "413" and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_too_large"
        tic = time.monotonic()
        assert reader.read() == b""  # the end, once the client has been quiet for a second
        assert time.monotonic() - tic < 4


def test_a_client_that_sends_the_whole_body_still_reads_the_413(live_server):
    """A client that sends all 6 MB anyway: its upload is read and dropped, it reads the 413
    (no reset), and nothing of the body is answered as a request."""
    import socket

    body = SMUGGLED * ((6 << 20) // len(SMUGGLED))
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=10) as s:
        s.sendall(request_with_body("POST", "/v1/chat/completions", body))
        reader = s.makefile("rb")
        assert read_response(reader)[0] == "413"
        assert reader.read() == b""
