"""Captured grpcio and curl traffic (scripts/capture_http2_fixtures.py) through the wrapper.

Each capture is fed whole, byte by byte and split in two at every offset: the events must be
the same (DATA merged per stream, since how a payload arrives is not a fact about it). What
the parser reports is compared with tests/data/http2/index.json, which the capture script
built with a plain frame reader and the `hpack` decoder, not with garrison.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from garrison.parsers.http2 import (
    DataReceived,
    GrpcCall,
    H2Event,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection

DATA = Path(__file__).resolve().parents[2] / "data" / "http2"
INDEX: dict[str, Any] = json.loads((DATA / "index.json").read_text())
SCENARIOS = {s["name"]: s for s in INDEX["scenarios"]}


def client_bytes(name: str) -> bytes:
    return (DATA / SCENARIOS[name]["client_file"]).read_bytes()


def server_bytes(name: str) -> bytes:
    return (DATA / SCENARIOS[name]["server_file"]).read_bytes()


def merged(events: Iterable[H2Event]) -> list[H2Event]:
    """Consecutive DataReceived of one stream become one."""
    out: list[H2Event] = []
    for ev in events:
        last = out[-1] if out else None
        if (
            isinstance(ev, DataReceived)
            and isinstance(last, DataReceived)
            and last.stream_id == ev.stream_id
            and not last.end_stream
        ):
            out[-1] = replace(
                last,
                data=last.data + ev.data,
                flow_controlled_length=last.flow_controlled_length + ev.flow_controlled_length,
                end_stream=ev.end_stream,
            )
        else:
            out.append(ev)
    return out


def parse_requests(chunks: Sequence[bytes]) -> list[H2Event]:
    conn = H2ServerConnection()
    events: list[H2Event] = []
    for chunk in chunks:
        events += conn.receive_data(chunk, now=0.0)
    return merged(events)


def replayed_client(name: str) -> H2ClientConnection:
    """An upstream-facing connection that has sent the capture's requests, in order."""
    conn = H2ClientConnection()
    for ev in parse_requests([client_bytes(name)]):
        if isinstance(ev, RequestReceived):
            assert conn.send_request(ev.headers, end_stream=ev.end_stream) == ev.stream_id
        elif isinstance(ev, DataReceived):
            conn.send_data(ev.stream_id, ev.data, end_stream=ev.end_stream)
    conn.data_to_send()
    return conn


def parse_responses(name: str, chunks: Sequence[bytes]) -> list[H2Event]:
    conn = replayed_client(name)
    events: list[H2Event] = []
    for chunk in chunks:
        events += conn.receive_data(chunk, now=0.0)
    return merged(events)


def splits(data: bytes) -> Iterable[list[bytes]]:
    yield [bytes([b]) for b in data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def payloads(name: str, side: str) -> dict[int, bytes]:
    """DATA payload per stream, read from the capture at the index's frame offsets."""
    raw = client_bytes(name) if side == "client" else server_bytes(name)
    out: dict[int, bytes] = {}
    for f in SCENARIOS[name][side]["frames"]:
        if f["type"] == "DATA":
            assert not f["flags"] & 0x8, "captures carry no padding"
            start = f["offset"] + 9
            out[f["stream"]] = out.get(f["stream"], b"") + raw[start : start + f["length"]]
    return out


def as_index(headers: Sequence[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_requests_match_the_independent_index(name: str) -> None:
    events = parse_requests([client_bytes(name)])
    requests = [e for e in events if isinstance(e, RequestReceived)]
    blocks = SCENARIOS[name]["client"]["header_blocks"]
    assert [as_index(r.headers) for r in requests] == [b["headers"] for b in blocks]
    assert [(r.stream_id, r.end_stream) for r in requests] == [
        (b["stream"], b["end_stream"]) for b in blocks
    ]
    data = {e.stream_id: e.data for e in events if isinstance(e, DataReceived)}
    assert data == payloads(name, "client")
    ended = [e.stream_id for e in events if isinstance(e, StreamEnded)]
    assert sorted(ended) == sorted(r.stream_id for r in requests)
    for r in requests:
        fields = dict(r.headers)
        assert r.method == fields[b":method"].decode()
        assert r.path == fields[b":path"].decode()
        assert r.authority == fields[b":authority"].decode()
        assert r.scheme == "http"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_grpc_calls_are_recognised(name: str) -> None:
    requests = [e for e in parse_requests([client_bytes(name)]) if isinstance(e, RequestReceived)]
    for r in requests:
        if name.startswith("grpc_") or name == "curl_grpc":
            assert r.path is not None
            service, method = r.path[1:].split("/")
            assert r.grpc == GrpcCall(service, method)
            assert service == "doors.DoorManager"
        else:
            assert r.grpc is None
            assert not r.is_grpc
        assert r.grpc_error is None


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_responses_match_the_independent_index(name: str) -> None:
    events = parse_responses(name, [server_bytes(name)])
    blocks = SCENARIOS[name]["server"]["header_blocks"]
    seen = [e for e in events if isinstance(e, ResponseReceived | TrailersReceived)]
    assert [as_index(e.headers) for e in seen] == [b["headers"] for b in blocks]
    assert {e.stream_id: e.data for e in events if isinstance(e, DataReceived)} == payloads(
        name, "server"
    )
    for e in seen:
        if isinstance(e, ResponseReceived):
            assert e.status == 200
        else:
            assert (e.grpc_status, dict(e.headers).get(b"grpc-message")) == (0, b"")
    resets = [e for e in events if isinstance(e, StreamReset)]
    if name in ("curl_get", "curl_post"):  # grpcio refuses non-gRPC requests this way
        assert [(r.stream_id, r.remote) for r in resets] == [(1, True)]
    else:
        assert resets == []


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_request_events_do_not_depend_on_how_bytes_arrive(name: str) -> None:
    data = client_bytes(name)
    whole = parse_requests([data])
    assert any(isinstance(e, RequestReceived) for e in whole)
    for chunks in splits(data):
        assert parse_requests(chunks) == whole


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_response_events_do_not_depend_on_how_bytes_arrive(name: str) -> None:
    data = server_bytes(name)
    whole = parse_responses(name, [data])
    assert whole
    for chunks in splits(data):
        assert parse_responses(name, chunks) == whole
