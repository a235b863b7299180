"""Property tests: arbitrary and mutated input never raises anything but HTTP1Error, never makes
the parser hold more than its limits, and the outcome does not depend on how bytes arrive."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from garrison.parsers.http1 import (
    BodyReceived,
    HTTP1Error,
    HTTP1Event,
    HTTP1Limits,
    HTTP1RequestParser,
    HTTP1ResponseParser,
)
from tests.unit.parsers.test_http1_support import Parser

DATA = Path(__file__).resolve().parents[2] / "data" / "http1"
LIMITS = HTTP1Limits(max_request_line=200, max_header_block=400, max_headers=8, max_chunk_line=40)
SEEDS = [
    *(p.read_bytes() for p in sorted(DATA.glob("*.bin")) if not p.name.endswith(".response.bin")),
    b"GET /v1/../x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n",
]
RESPONSE_SEEDS = [
    *(p.read_bytes() for p in sorted(DATA.glob("*.response.bin"))),
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
]
TOKENS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b"\x00",
    b"\x0b",
    b":",
    b",",
    b";",
    b"%",
    b"%2e",
    b"%2f",
    b"/..",
    b"//",
    b"\\",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 4\r\n",
    b"Connection: close\r\n",
    b"Host: b\r\n",
    b"0\r\n\r\n",
    b"ffffffff",
    b"\xff",
    # what llhttp lets through and garrison refuses (the `# check` names in parsers/http1.py)
    b"=;",
    b"  ",
    b"HTTP/2.0",
    b"Upgrade: x\r\n",
    b"gzip, ",
    b"00000000000000000",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.integers(0, 3))
        if kind == 0:
            data[at] = draw(st.integers(0, 255))
        elif kind == 1:
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif kind == 2:
            del data[at : at + draw(st.integers(1, 8))]
        else:
            end = min(len(data), at + draw(st.integers(1, 40)))
            data[at:at] = data[at:end]
    return bytes(data)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    offsets = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(offsets) if b > a]


def outcome(parser: Parser, pieces: list[bytes]) -> tuple[list[HTTP1Event], int | None]:
    """(events with bodies merged, status of the error or None); checks memory on the way."""
    events: list[HTTP1Event] = []
    try:
        for piece in [*pieces, b""]:
            parser.receive_data(piece)
            assert parser.buffered <= max(LIMITS.max_header_block, LIMITS.max_chunk_line)
            for event in parser.events():
                if (
                    isinstance(event, BodyReceived)
                    and events
                    and isinstance(events[-1], BodyReceived)
                ):
                    events[-1] = BodyReceived(events[-1].data + event.data)
                else:
                    events.append(event)
    except HTTP1Error as exc:
        assert exc.status is not None
        return events, exc.status
    return events, None


# GARRISON_FUZZ_EXAMPLES=20000 for a deeper local run; the suite keeps it short.
EXAMPLES = int(os.environ.get("GARRISON_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_arbitrary_bytes_request(data: bytes, cuts: list[int]) -> None:
    outcome(HTTP1RequestParser(LIMITS), split(data, cuts))


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_arbitrary_bytes_response(data: bytes, cuts: list[int]) -> None:
    parser = HTTP1ResponseParser(LIMITS)
    parser.expect_response("GET")
    parser.expect_response("HEAD")
    outcome(parser, split(data, cuts))


@FUZZ
@given(mutated(SEEDS), st.lists(st.integers(0, 2000), max_size=8))
def test_mutated_requests_same_outcome_however_split(data: bytes, cuts: list[int]) -> None:
    whole = outcome(HTTP1RequestParser(LIMITS), [data])
    assert outcome(HTTP1RequestParser(LIMITS), split(data, cuts)) == whole


@FUZZ
@given(mutated(RESPONSE_SEEDS), st.lists(st.integers(0, 2000), max_size=8))
def test_mutated_responses_same_outcome_however_split(data: bytes, cuts: list[int]) -> None:
    def parser() -> HTTP1ResponseParser:
        p = HTTP1ResponseParser(LIMITS)
        for method in ("GET", "HEAD", "GET", "POST"):
            p.expect_response(method)
        return p

    assert outcome(parser(), split(data, cuts)) == outcome(parser(), [data])


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 50), st.integers(0, 255))
def test_endless_head_is_cut_at_the_limit(size: int, byte: int) -> None:
    parser = HTTP1RequestParser(LIMITS)
    piece = b"GET /" + bytes([byte]) * size
    try:
        for _ in range(100):
            parser.receive_data(piece)
            list(parser.events())
            assert parser.buffered <= LIMITS.max_header_block
    except HTTP1Error as exc:
        assert exc.status in (400, 414, 431)
        return
    raise AssertionError("an endless head was accepted")
