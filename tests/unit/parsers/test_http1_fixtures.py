"""Requests and responses captured from real clients (scripts/capture_http1_fixtures.py).

Each fixture is fed whole, byte by byte, and split in two at every offset: the events must be
the same every time, match what the stdlib server parsed from the same bytes, and account for
every byte (heads plus body bytes = the capture).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from garrison.parsers.http1 import (
    BodyReceived,
    ConnectionClosed,
    HTTP1RequestParser,
    HTTP1ResponseParser,
    MessageCompleted,
    RequestReceived,
)
from tests.unit.parsers.test_http1_support import bodies_of, dechunk, feed, responses_of

DATA = Path(__file__).resolve().parents[2] / "data" / "http1"


@cache
def fixtures() -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = json.loads((DATA / "fixtures.json").read_text())
    return loaded


def fixture_ids() -> list[str]:
    return [f["file"].removesuffix(".bin") for f in fixtures()]


def fixture(name: str) -> tuple[dict[str, Any], bytes, bytes]:
    entry = next(f for f in fixtures() if f["file"] == f"{name}.bin")
    return entry, (DATA / f"{name}.bin").read_bytes(), (DATA / f"{name}.response.bin").read_bytes()


def split_everywhere(data: bytes) -> list[list[bytes]]:
    """Two pieces at every offset (`b""` would mean the end of the stream: left out)."""
    return [[data[:i], data[i:]] for i in range(1, len(data))]


@pytest.mark.parametrize("name", fixture_ids())
def test_request_events_match_what_the_client_sent(name: str) -> None:
    entry, raw, _ = fixture(name)
    events = feed(HTTP1RequestParser(), [raw])
    assert events[-1] == ConnectionClosed()
    rebuilt = b""
    position = 0
    for expected in entry["requests"]:
        request = events[position]
        assert isinstance(request, RequestReceived)
        assert request.method == expected["method"]
        assert request.target == expected["target"]
        assert request.path == expected["path"]
        assert request.version.decode() == expected["version"]
        assert request.host == expected["host"]
        assert request.keep_alive == expected["keep_alive"]
        assert request.chunked == expected["chunked"]
        assert request.content_length == expected["content_length"]
        assert [[k.decode(), v.decode()] for k, v in request.headers] == expected["headers"]
        position += 1
        body = b""
        if isinstance(events[position], BodyReceived):
            body = events[position].data  # type: ignore[union-attr]
            position += 1
        assert events[position] == MessageCompleted(expected["keep_alive"])
        position += 1
        payload = dechunk(body) if request.chunked else body
        assert payload == expected["body"].encode("latin-1")
        rebuilt += request.raw_head + body
    assert events[position:] == [ConnectionClosed()]
    assert rebuilt == raw, "every byte of the capture is in a head or a body event"


@pytest.mark.parametrize("name", fixture_ids())
def test_request_events_do_not_depend_on_how_bytes_arrive(name: str) -> None:
    _, raw, _ = fixture(name)
    whole = feed(HTTP1RequestParser(), [raw])
    assert feed(HTTP1RequestParser(), [raw[i : i + 1] for i in range(len(raw))]) == whole
    for pieces in split_everywhere(raw):
        assert feed(HTTP1RequestParser(), pieces) == whole, f"split at {len(pieces[0])}"


def _response_parser(entry: dict[str, Any]) -> HTTP1ResponseParser:
    parser = HTTP1ResponseParser()
    for request in entry["requests"]:
        parser.expect_response(request["method"])
    return parser


@pytest.mark.parametrize("name", fixture_ids())
def test_response_events_at_every_split(name: str) -> None:
    entry, _, raw = fixture(name)
    whole = feed(_response_parser(entry), [raw])
    responses = responses_of(whole)
    assert [r.status for r in responses] == [200] * len(entry["requests"])
    assert bodies_of(whole) == [b"ok\n"] * len(entry["requests"])
    assert b"".join(r.raw_head + b"ok\n" for r in responses) == raw
    for pieces in split_everywhere(raw):
        assert feed(_response_parser(entry), pieces) == whole


def test_normalized_target_is_forwarded_and_the_rest_is_byte_identical() -> None:
    _, raw, _ = fixture("python_urllib")
    parser = HTTP1RequestParser()
    parser.receive_data(raw)
    request = parser.next_event()
    assert isinstance(request, RequestReceived)
    forwarded = request.forward_head()
    assert forwarded.startswith(b"GET /v1/~droid/specs?q=a%2Fb HTTP/1.1\r\n")
    assert forwarded.split(b"\r\n", 1)[1] == raw.split(b"\r\n", 1)[1]


def test_unchanged_target_forwards_the_raw_head() -> None:
    _, raw, _ = fixture("curl_get")
    parser = HTTP1RequestParser()
    parser.receive_data(raw)
    request = parser.next_event()
    assert isinstance(request, RequestReceived)
    assert request.forward_head() == raw
