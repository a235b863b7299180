"""Hostile HTTP/1.1 input: every refusal with its error class and status, request smuggling
classics, and path-normalization tricks, each fed whole and byte by byte."""

from __future__ import annotations

import pytest

from garrison.parsers.http1 import (
    HTTP1Error,
    HTTP1FramingError,
    HTTP1HeadError,
    HTTP1LimitError,
    HTTP1Limits,
    HTTP1RequestParser,
    HTTP1ResponseParser,
    HTTP1TargetError,
    HTTP1UpgradeRefusedError,
    RequestReceived,
)
from tests.unit.parsers.test_http1_support import feed, feed_error, requests_of

H = b"Host: deathstar\r\n"
POST = b"POST /v1/request-landing HTTP/1.1\r\n" + H

# (id, request bytes, error class, status)
REQUESTS: list[tuple[str, bytes, type[HTTP1Error], int]] = [
    # --- bytes that have no place in a head
    ("nul in value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", HTTP1HeadError, 400),
    ("nul in target", b"GET /\x00 HTTP/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("nul in name", b"GET / HTTP/1.1\r\n" + H + b"X\x00: a\r\n\r\n", HTTP1HeadError, 400),
    ("vertical tab", b"GET / HTTP/1.1\r\n" + H + b"X: a\x0bb\r\n\r\n", HTTP1HeadError, 400),
    ("DEL in value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x7f\r\n\r\n", HTTP1HeadError, 400),
    ("bare CR", b"GET / HTTP/1.1\r\n" + H + b"X: a\rY: b\r\n\r\n", HTTP1HeadError, 400),
    ("bare LF head", b"GET / HTTP/1.1\nHost: deathstar\n\n", HTTP1HeadError, 400),
    ("bare LF line", b"GET / HTTP/1.1\r\n" + H + b"X: a\nY: b\r\n\r\n", HTTP1HeadError, 400),
    # --- field lines
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", HTTP1HeadError, 400),
    ("obs-fold tab", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n\tb\r\n\r\n", HTTP1HeadError, 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : deathstar\r\n\r\n", HTTP1HeadError, 400),
    ("tab before colon", b"GET / HTTP/1.1\r\n" + H + b"X\t: a\r\n\r\n", HTTP1HeadError, 400),
    ("space in name", b"GET / HTTP/1.1\r\n" + H + b"Bad Name: a\r\n\r\n", HTTP1HeadError, 400),
    ("empty name", b"GET / HTTP/1.1\r\n" + H + b": a\r\n\r\n", HTTP1HeadError, 400),
    ("no colon", b"GET / HTTP/1.1\r\n" + H + b"Nocolon\r\n\r\n", HTTP1HeadError, 400),
    ("name not a token", b"GET / HTTP/1.1\r\n" + H + b"X(y): a\r\n\r\n", HTTP1HeadError, 400),
    # --- request line
    ("two spaces", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("trailing space", b"GET / HTTP/1.1 \r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("no version", b"GET /\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("tab separator", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("method not token", b"GE(T / HTTP/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("unknown method", b"FOO / HTTP/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 501),
    ("lower-case method", b"get / HTTP/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 501),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\n" + H + b"\r\n", HTTP1HeadError, 505),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", HTTP1HeadError, 505),
    ("HTTP/0.9", b"GET / HTTP/0.9\r\n" + H + b"\r\n", HTTP1HeadError, 505),
    ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HTTP1HeadError, 505),
    ("version garbage", b"GET / HTTP/1\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    # --- what llhttp lets through (garrison/parsers/http1.py, `# check <name>`)
    ("LF before the method", b"\nGET / HTTP/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("two spaces after target", b"GET /  HTTP/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("RTSP version", b"GET / RTSP/1.0\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    ("lower-case version", b"GET / http/1.1\r\n" + H + b"\r\n", HTTP1HeadError, 400),
    # --- Host
    ("no Host", b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", HTTP1HeadError, 400),
    ("two Host", b"GET / HTTP/1.1\r\n" + H + b"Host: tiefighter\r\n\r\n", HTTP1HeadError, 400),
    ("two equal Host", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", HTTP1HeadError, 400),
    ("Host with userinfo", b"GET / HTTP/1.1\r\nHost: u@deathstar\r\n\r\n", HTTP1HeadError, 400),
    ("Host with space", b"GET / HTTP/1.1\r\nHost: death star\r\n\r\n", HTTP1HeadError, 400),
    ("empty Host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", HTTP1HeadError, 400),
    (
        "absolute-form vs Host",
        b"GET http://tiefighter/v1/ HTTP/1.1\r\n" + H + b"\r\n",
        HTTP1TargetError,
        400,
    ),
    # --- tunnels and upgrades
    ("CONNECT", b"CONNECT deathstar:443 HTTP/1.1\r\n" + H + b"\r\n", HTTP1UpgradeRefusedError, 501),
    (
        "websocket",
        b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        HTTP1UpgradeRefusedError,
        501,
    ),
    (
        "h2c upgrade",
        b"GET / HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        HTTP1UpgradeRefusedError,
        501,
    ),
    (
        "Upgrade alone",
        b"GET / HTTP/1.1\r\n" + H + b"Upgrade: x\r\n\r\n",
        HTTP1UpgradeRefusedError,
        501,
    ),
    # --- request smuggling: message length ambiguities
    (
        "CL.TE",
        POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        HTTP1FramingError,
        400,
    ),
    (
        "TE.CL",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "TE.TE xchunked",
        POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        HTTP1FramingError,
        501,
    ),
    (
        "TE.TE space-prefixed line",
        POST + b"Content-Length: 4\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        HTTP1HeadError,
        400,
    ),
    (
        "TE.TE vertical tab",
        POST + b"Transfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n",
        HTTP1HeadError,
        400,
    ),
    (
        "TE.TE space before colon",
        POST + b"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        HTTP1HeadError,
        400,
    ),
    (
        "TE.TE duplicate chunked",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "TE.TE chunked then other",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "TE chunked, gzip",
        POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "TE gzip, chunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
        HTTP1FramingError,
        501,
    ),
    ("TE identity", POST + b"Transfer-Encoding: identity\r\n\r\n", HTTP1FramingError, 501),
    ("TE empty element", POST + b"Transfer-Encoding: ,chunked\r\n\r\n", HTTP1FramingError, 400),
    ("TE empty", POST + b"Transfer-Encoding:\r\n\r\n", HTTP1FramingError, 400),
    ("TE quoted", POST + b'Transfer-Encoding: "chunked"\r\n\r\n', HTTP1FramingError, 400),
    (
        "TE in HTTP/1.0",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    ("CL +5", POST + b"Content-Length: +5\r\n\r\nhello", HTTP1FramingError, 400),
    ("CL 5, 6", POST + b"Content-Length: 5, 6\r\n\r\nhello", HTTP1FramingError, 400),
    ("CL 5, 5", POST + b"Content-Length: 5, 5\r\n\r\nhello", HTTP1FramingError, 400),
    ("CL -1", POST + b"Content-Length: -1\r\n\r\n", HTTP1FramingError, 400),
    ("CL hex", POST + b"Content-Length: 0x5\r\n\r\nhello", HTTP1FramingError, 400),
    ("CL inner space", POST + b"Content-Length: 1 2\r\n\r\n", HTTP1FramingError, 400),
    ("CL empty", POST + b"Content-Length:\r\n\r\n", HTTP1FramingError, 400),
    ("CL huge", POST + b"Content-Length: 9999999999999999999\r\n\r\n", HTTP1FramingError, 400),
    (
        "CL 2^64-1",
        POST + b"Content-Length: 18446744073709551615\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "CL duplicate differing",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        HTTP1FramingError,
        400,
    ),
    (
        "CL duplicate equal",
        POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        HTTP1FramingError,
        400,
    ),
    # --- chunked framing
    (
        "chunk size space after",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk size space before",
        POST + b"Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk size 0x",
        POST + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk size negative",
        POST + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk size empty",
        POST + b"Transfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk size 17 digits",
        POST + b"Transfer-Encoding: chunked\r\n\r\n00000000000000005\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk size overflow",
        POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nhello\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk size bare LF",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk ext empty",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5;\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk size 2^63",
        POST + b"Transfer-Encoding: chunked\r\n\r\n8000000000000000\r\nhello\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk ext empty value before another",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5;a=;b\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk ext no value",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5;a=\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk ext spaces",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5 ; a=b\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk ext open quote",
        POST + b'Transfer-Encoding: chunked\r\n\r\n5;a="b\r\nhello\r\n0\r\n\r\n',
        HTTP1FramingError,
        400,
    ),
    (
        "chunk ext too long",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5;a=" + b"b" * 2000 + b"\r\nhello\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk data too long",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "chunk data no CRLF",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n",
        HTTP1FramingError,
        400,
    ),
    (
        "trailer obs-fold",
        POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: a\r\n b\r\n\r\n",
        HTTP1HeadError,
        400,
    ),
    (
        "trailer bad name",
        POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nBad Name: a\r\n\r\n",
        HTTP1HeadError,
        400,
    ),
    (
        "trailer NUL",
        POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: a\x00\r\n\r\n",
        HTTP1HeadError,
        400,
    ),
    # --- the end of the stream inside a message
    ("eof in head", b"GET / HTTP/1.1\r\nHost: death", HTTP1FramingError, 400),
    ("eof in body", POST + b"Content-Length: 10\r\n\r\nhello", HTTP1FramingError, 400),
    ("eof in chunk", POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel", HTTP1FramingError, 400),
    (
        "eof before trailers end",
        POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n",
        HTTP1FramingError,
        400,
    ),
]

SMALL = HTTP1Limits(max_request_line=64, max_header_block=256, max_headers=4, max_body=10)

# (id, request bytes, error class, status) with the SMALL limits
LIMITS: list[tuple[str, bytes, type[HTTP1Error], int]] = [
    ("request line", b"GET /" + b"a" * 70 + b" HTTP/1.1\r\n" + H + b"\r\n", HTTP1LimitError, 414),
    ("request line never ends", b"GET /" + b"a" * 300, HTTP1LimitError, 414),
    ("head", b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 250 + b"\r\n\r\n", HTTP1LimitError, 431),
    ("head never ends", b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 300, HTTP1LimitError, 431),
    (
        "headers",
        b"GET / HTTP/1.1\r\n" + H + b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
        HTTP1LimitError,
        431,
    ),
    ("body by length", POST + b"Content-Length: 11\r\n\r\nhello world", HTTP1LimitError, 413),
    (
        "body by chunks",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        HTTP1LimitError,
        413,
    ),
    (
        "trailers",
        POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: " + b"a" * 300 + b"\r\n\r\n",
        HTTP1LimitError,
        431,
    ),
    (
        "trailer count",
        POST
        + b"Transfer-Encoding: chunked\r\n\r\n0\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n",
        HTTP1LimitError,
        431,
    ),
]


def _check(data: bytes, error: type[HTTP1Error], status: int, limits: HTTP1Limits | None) -> None:
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        caught = feed_error(HTTP1RequestParser(limits), pieces)
        assert type(caught) is error, caught
        assert caught.status == status, caught


@pytest.mark.parametrize(
    ("data", "error", "status"), [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS]
)
def test_hostile_request_refused(data: bytes, error: type[HTTP1Error], status: int) -> None:
    _check(data, error, status, None)


@pytest.mark.parametrize(
    ("data", "error", "status"), [r[1:] for r in LIMITS], ids=[r[0] for r in LIMITS]
)
def test_limit_refused(data: bytes, error: type[HTTP1Error], status: int) -> None:
    _check(data, error, status, SMALL)


def test_limits_are_inclusive() -> None:
    line = b"GET /" + b"a" * (64 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 64
    head = line + b"\r\n" + H + b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n"
    assert requests_of(feed(HTTP1RequestParser(SMALL), [head]))
    body = POST + b"Content-Length: 10\r\n\r\n0123456789"
    assert requests_of(feed(HTTP1RequestParser(SMALL), [body]))


# Requests that look odd but are unambiguous: accepted, with the framing every parser agrees on.
ACCEPTED = [
    ("TE value OWS", POST + b"Transfer-Encoding:  \tchunked \r\n\r\n0\r\n\r\n", None, True),
    ("TE upper-case", POST + b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n", None, True),
    ("CL leading zeros", POST + b"Content-Length: 005\r\n\r\nhello", 5, False),
    ("CL OWS", POST + b"Content-Length: \t5 \r\n\r\nhello", 5, False),
    (
        "chunk extensions",
        POST + b'Transfer-Encoding: chunked\r\n\r\n5;a=b;c;d="x y"\r\nhello\r\n0;z\r\n\r\n',
        None,
        True,
    ),
    (
        "chunk size upper hex",
        POST + b"Transfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
        None,
        True,
    ),
    ("trailers", POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-Sum: 1\r\n\r\n", None, True),
]


@pytest.mark.parametrize(
    ("data", "length", "chunked"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED]
)
def test_odd_but_unambiguous_accepted(data: bytes, length: int | None, chunked: bool) -> None:
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        (request,) = requests_of(feed(HTTP1RequestParser(), pieces))
        assert (request.content_length, request.chunked) == (length, chunked)


# (target as sent, normalized path or None for a 400)
TRICKS = [
    (b"/v1/../admin", "/admin"),
    (b"/v1/%2e%2e/admin", "/admin"),
    (b"//admin", "/admin"),
    (b"/v1/%2Fadmin", None),
    (b"/v1/%2fadmin", None),
    (b"/v1/%5Cadmin", None),
    (b"/v1\\admin", None),
    (b"/%2e/", "/"),
    (b"/v1/./x", "/v1/x"),
    (b"/v1/x/..", "/v1/"),
    (b"/../admin", None),
    (b"/v1/..;/admin", None),
    (b"/v1/%00", None),
    (b"/v1/%zz", None),
    (b"/v1/\xff", None),
    (b"/v1/#frag", None),
    (b"/%7Ev1/%41?q=%2f", "/~v1/A?q=%2F"),
    (b"*", None),  # only for OPTIONS
    (b"http://deathstar/v1/../x", "/x"),
    (b"deathstar:80", None),
]


@pytest.mark.parametrize(("target", "path"), TRICKS)
def test_normalization_tricks(target: bytes, path: str | None) -> None:
    data = b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n"
    if path is None:
        caught = feed_error(HTTP1RequestParser(), [data])
        assert caught.status == 400
        assert isinstance(caught, HTTP1TargetError | HTTP1HeadError)
        return
    (request,) = requests_of(feed(HTTP1RequestParser(), [data]))
    assert request.path == path
    assert request.forward_head().startswith(b"GET " + path.encode() + b" HTTP/1.1\r\n")


def test_options_asterisk() -> None:
    data = b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n"
    (request,) = requests_of(feed(HTTP1RequestParser(), [data]))
    assert request.path == "*"


def test_pipelined_smuggling_attempt_never_yields_the_hidden_request() -> None:
    """CL.TE with a valid request first: the first is served, the smuggled one is not."""
    valid = b"GET /v1/ HTTP/1.1\r\n" + H + b"\r\n"
    smuggle = POST + b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    hidden = b"GET /admin HTTP/1.1\r\n" + H + b"\r\n"
    parser = HTTP1RequestParser()
    parser.receive_data(valid + smuggle + hidden)
    seen = []
    with pytest.raises(HTTP1FramingError):
        for event in parser.events():
            seen.append(event)
    assert [e.path for e in seen if isinstance(e, RequestReceived)] == ["/v1/"]


# (id, response bytes, request method)
RESPONSES = [
    ("101", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "GET"),
    ("CL.TE", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "GET"),
    ("two CL", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "GET"),
    ("TE gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "GET"),
    ("status 4 digits", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "GET"),
    ("status 099", b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", "GET"),
    ("HTTP/2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", "GET"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n", "GET"),
    ("NUL", b"HTTP/1.1 200 OK\r\nX: \x00\r\nContent-Length: 0\r\n\r\n", "GET"),
    ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "GET"),
    ("eof in body", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", "GET"),
    ("unsolicited", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", None),
]


@pytest.mark.parametrize(
    ("data", "method"), [r[1:] for r in RESPONSES], ids=[r[0] for r in RESPONSES]
)
def test_hostile_response_is_a_502(data: bytes, method: str | None) -> None:
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        parser = HTTP1ResponseParser()
        if method is not None:
            parser.expect_response(method)
        assert feed_error(parser, pieces).status == 502
