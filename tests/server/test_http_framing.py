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
