"""llhttp (httptools, strict) is the judge of HTTP/1.1 grammar: this file is the inventory.

- `test_llhttp_refuses`: each hazard the hand-written grammar used to check, fed to httptools
  alone, is refused by llhttp; garrison has no code of its own for it (and refuses it, with the
  status a client sees, in test_http1_hostile.py).
- `test_llhttp_lets_through`: each check garrison keeps (marked `# check <name>` in
  garrison/parsers/http1.py, listed in its docstring), with bytes llhttp accepts and garrison
  refuses. The day llhttp refuses one of them, the first assertion fails and the check can go.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import httptools
import pytest

from garrison.parsers import http1
from garrison.parsers.http1 import HTTP1Limits, HTTP1RequestParser, HTTP1ResponseParser
from tests.unit.parsers.test_http1_support import feed_error

H = b"Host: deathstar\r\n"
POST = b"POST /v1/request-landing HTTP/1.1\r\n" + H
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

# (hazard, request bytes): what llhttp refuses on its own.
REFUSED = [
    ("nul_byte", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n"),
    ("control_byte", b"GET / HTTP/1.1\r\n" + H + b"X: a\x0bb\r\n\r\n"),
    ("del_byte", b"GET / HTTP/1.1\r\n" + H + b"X: a\x7f\r\n\r\n"),
    ("bare_cr", b"GET / HTTP/1.1\r\n" + H + b"X: a\rY: b\r\n\r\n"),
    ("bare_lf", b"GET / HTTP/1.1\r\n" + H + b"X: a\nY: b\r\n\r\n"),
    ("bare_lf_head", b"GET / HTTP/1.1\nHost: deathstar\n\n"),
    ("obs_fold", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n"),
    ("space_before_colon", b"GET / HTTP/1.1\r\nHost : deathstar\r\n\r\n"),
    ("field_name_not_token", b"GET / HTTP/1.1\r\n" + H + b"X(y): a\r\n\r\n"),
    ("field_name_empty", b"GET / HTTP/1.1\r\n" + H + b": a\r\n\r\n"),
    ("field_line_without_colon", b"GET / HTTP/1.1\r\n" + H + b"Nocolon\r\n\r\n"),
    ("method_not_token", b"GE(T / HTTP/1.1\r\n" + H + b"\r\n"),
    ("method_unknown", b"FOO / HTTP/1.1\r\n" + H + b"\r\n"),
    ("tab_in_request_line", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n"),
    ("space_after_version", b"GET / HTTP/1.1 \r\n" + H + b"\r\n"),
    ("version_1_2", b"GET / HTTP/1.2\r\n" + H + b"\r\n"),
    ("target_nul", b"GET /\x00 HTTP/1.1\r\n" + H + b"\r\n"),
    ("content_length_with_te", POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("content_length_twice_equal", POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n"),
    ("content_length_list", POST + b"Content-Length: 5, 5\r\n\r\n"),
    ("content_length_sign", POST + b"Content-Length: +5\r\n\r\n"),
    ("content_length_empty", POST + b"Content-Length:\r\n\r\n"),
    ("chunked_not_last", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n"),
    ("chunked_twice", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("final_coding_not_chunked", POST + b"Transfer-Encoding: identity\r\n\r\n"),
    ("chunk_size_space", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n"),
    ("chunk_size_not_hex", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("chunk_size_bare_lf", CHUNKED + b"5\nhello\r\n0\r\n\r\n"),
    ("chunk_size_overflow", CHUNKED + b"10000000000000000\r\n"),
    ("chunk_ext_empty", CHUNKED + b"5;\r\nhello\r\n0\r\n\r\n"),
    ("chunk_ext_open_quote", CHUNKED + b'5;a="b\r\nhello\r\n0\r\n\r\n'),
    ("chunk_data_without_crlf", CHUNKED + b"5\r\nhello0\r\n\r\n"),
    ("trailer_obs_fold", CHUNKED + b"0\r\nX: a\r\n b\r\n\r\n"),
    ("trailer_nul", CHUNKED + b"0\r\nX: a\x00\r\n\r\n"),
    ("connect", b"CONNECT deathstar:443 HTTP/1.1\r\n" + H + b"\r\n"),
    (
        "connection_upgrade",
        b"GET / HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: ws\r\n\r\n",
    ),
]


@pytest.mark.parametrize("data", [r[1] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_llhttp_refuses(data: bytes) -> None:
    with pytest.raises((httptools.HttpParserError, httptools.HttpParserUpgrade)):
        httptools.HttpRequestParser(object()).feed_data(data)
    assert feed_error(HTTP1RequestParser(), [data]).status in (400, 501, 505)


SMALL = HTTP1Limits(max_request_line=64, max_header_block=256, max_headers=4, max_body=10)

# (check, bytes, status garrison answers with, limits, response to which method or None)
LET_THROUGH: list[tuple[str, bytes, int, HTTP1Limits | None, str | None]] = [
    ("request_line_exact", b"GET  /  HTTP/1.1\r\n" + H + b"\r\n", 400, None, None),
    ("request_line_exact", b"\nGET / HTTP/1.1\r\n" + H + b"\r\n", 400, None, None),
    ("request_line_exact", b"GET /\r\n" + H + b"\r\n", 400, None, None),
    ("version_1x", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, None, None),
    ("version_1x", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505, None, None),
    ("version_1x", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", 502, None, "GET"),
    ("host_exactly_one", b"GET / HTTP/1.1\r\n\r\n", 400, None, None),
    ("host_exactly_one", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400, None, None),
    ("host_exactly_one", b"GET / HTTP/1.1\r\nHost: u@deathstar\r\n\r\n", 400, None, None),
    ("absolute_form_authority", b"GET http://tie/ HTTP/1.1\r\n" + H + b"\r\n", 400, None, None),
    ("upgrade_field", b"GET / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\n\r\n", 501, None, None),
    (
        "transfer_coding_chunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
        501,
        None,
        None,
    ),
    ("transfer_coding_chunked", POST + b"Transfer-Encoding: ,chunked\r\n\r\n", 400, None, None),
    (
        "transfer_coding_chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        502,
        None,
        "GET",
    ),
    (
        "transfer_encoding_http10",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        None,
        None,
    ),
    (
        "content_length_digits",
        POST + b"Content-Length: 9999999999999999999\r\n\r\n",
        400,
        None,
        None,
    ),
    ("chunk_size_digits", CHUNKED + b"00000000000000005\r\nhello\r\n0\r\n\r\n", 400, None, None),
    ("chunk_size_digits", CHUNKED + b"ffffffffffffffff\r\nhello\r\n", 400, None, None),
    ("chunk_ext_value", CHUNKED + b"5;a=\r\nhello\r\n0\r\n\r\n", 400, None, None),
    ("chunk_ext_value", CHUNKED + b"5;a=;b\r\nhello\r\n0\r\n\r\n", 400, None, None),
    ("status_100_plus", b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", 502, None, "GET"),
    ("response_expected", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 502, None, None),
    ("h2_preface", b"PRI * HTTP/2.0\r\n\r\n", 505, None, None),
    ("limit_request_line", b"GET /" + b"a" * 70 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, SMALL, None),
    ("limit_head", b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 250 + b"\r\n\r\n", 431, SMALL, None),
    (
        "limit_fields",
        b"GET / HTTP/1.1\r\n" + H + b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
        431,
        SMALL,
        None,
    ),
    ("limit_body", POST + b"Content-Length: 11\r\n\r\nhello world", 413, SMALL, None),
    (
        "limit_chunk_line",
        CHUNKED + b"5;a=" + b"b" * 2000 + b"\r\nhello\r\n0\r\n\r\n",
        400,
        None,
        None,
    ),
    ("end_of_stream", POST + b"Content-Length: 10\r\n\r\nhello", 400, None, None),
]


@pytest.mark.parametrize(
    ("data", "status", "limits", "method"),
    [c[1:] for c in LET_THROUGH],
    ids=[c[0] for c in LET_THROUGH],
)
def test_llhttp_lets_through(
    data: bytes, status: int, limits: HTTP1Limits | None, method: str | None
) -> None:
    parser: HTTP1RequestParser | HTTP1ResponseParser
    if data.startswith(b"HTTP/"):
        httptools.HttpResponseParser(object()).feed_data(data)
        parser = HTTP1ResponseParser(limits)
        if method is not None:
            parser.expect_response(method)
    else:
        httptools.HttpRequestParser(object()).feed_data(data)
        parser = HTTP1RequestParser(limits)
    assert feed_error(parser, [data]).status == status


def test_llhttp_keeps_alive_what_says_close() -> None:
    """check connection_close: llhttp keeps an HTTP/1.0 `keep-alive, close` connection open."""
    data = b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"

    class Probe:
        keep_alive: bool | None = None

        def on_headers_complete(self) -> None:
            self.keep_alive = llhttp.should_keep_alive()

    probe = Probe()
    llhttp = httptools.HttpRequestParser(probe)
    llhttp.feed_data(data)
    assert probe.keep_alive is True
    parser = HTTP1RequestParser()
    parser.receive_data(data)
    request = parser.next_event()
    assert isinstance(request, http1.RequestReceived) and request.keep_alive is False


def test_every_named_check_has_a_case_and_a_line_in_the_docstring() -> None:
    source = (Path(http1.__file__).parent / "http1.py").read_text()
    checks = set(re.findall(r"# check (\w+)", source))
    assert len(checks) >= 14
    assert checks == {c[0] for c in LET_THROUGH if not c[0].startswith(("limit_", "end_"))} | {
        "connection_close"
    }
    docstring = ast.get_docstring(ast.parse(source)) or ""  # mypyc drops a module's __doc__
    for name in checks:
        assert f"`{name}`" in docstring, name
