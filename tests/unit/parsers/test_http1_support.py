"""Helpers shared by the HTTP/1.1 parser tests; this module holds no tests itself."""

from __future__ import annotations

from collections.abc import Iterable

from garrison.parsers.http1 import (
    BodyReceived,
    HTTP1Error,
    HTTP1Event,
    HTTP1RequestParser,
    HTTP1ResponseParser,
    RequestReceived,
    ResponseReceived,
)

Parser = HTTP1RequestParser | HTTP1ResponseParser


def feed(parser: Parser, pieces: Iterable[bytes], *, eof: bool = True) -> list[HTTP1Event]:
    """Feed pieces (then the end of stream) and return the events with adjacent BodyReceived
    merged into one: how a body is split across events depends on how the bytes arrived."""
    out: list[HTTP1Event] = []
    for piece in pieces:
        parser.receive_data(piece)
        _drain(parser, out)
    if eof:
        parser.receive_data(b"")
        _drain(parser, out)
    return out


def _drain(parser: Parser, out: list[HTTP1Event]) -> None:
    for event in parser.events():
        if isinstance(event, BodyReceived) and out and isinstance(out[-1], BodyReceived):
            out[-1] = BodyReceived(out[-1].data + event.data)
        else:
            out.append(event)


def requests_of(events: Iterable[HTTP1Event]) -> list[RequestReceived]:
    return [e for e in events if isinstance(e, RequestReceived)]


def responses_of(events: Iterable[HTTP1Event]) -> list[ResponseReceived]:
    return [e for e in events if isinstance(e, ResponseReceived)]


def bodies_of(events: Iterable[HTTP1Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, BodyReceived)]


def feed_error(parser: Parser, pieces: Iterable[bytes]) -> HTTP1Error:
    """Feed pieces until the parser raises; return the error (fails if it never does)."""
    try:
        feed(parser, pieces)
    except HTTP1Error as exc:
        return exc
    raise AssertionError("the parser accepted the input")


def dechunk(raw: bytes) -> bytes:
    """An independent, minimal chunked decoder (trusts its input) for checking payloads."""
    body = b""
    while True:
        line, _, raw = raw.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return body
        body += raw[:size]
        raw = raw[size + 2 :]
