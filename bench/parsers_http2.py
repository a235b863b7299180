"""HTTP/2 + gRPC parsing cost per unary call, on a connection in steady state.

Run: .venv/bin/python bench/parsers_http2.py [--requests N] [--rounds R]

The call is grpcio's `GetLocation` from tests/data/http2/grpc_unary.client.bin: its header
block and its request message. A client connection re-encodes it N times on one connection
(new stream ids, HPACK dynamic table warm, as grpcio's own second and later calls are); the
server side acknowledges each request body and ends each stream with a trailers-only answer,
so the connection stays within its stream and window limits. Only what a proxy must do per
call on the client-facing side is timed:

- `parse`: `H2ServerConnection.receive_data` of one call's bytes (HEADERS, DATA, the
  client's WINDOW_UPDATEs) into events, gRPC method recognised;
- `parse+match`: the same plus `GRPCMatcher.match` against a four-rule policy;
- `parse+match+deny`: the same plus the trailers-only PERMISSION_DENIED answer encoded.

`results()` is what the aggregate bench file imports; the best of R rounds is reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from garrison.parsers.http2 import DataReceived, H2Event, RequestReceived
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection
from garrison.policies.l7rules import GRPCRule, L7Protocol, L7RuleSet
from garrison.policies.match_grpc import GRPCMatcher
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.proxy.deny import grpc_permission_denied_headers

FIXTURE = Path(__file__).resolve().parent.parent / "tests/data/http2/grpc_unary.client.bin"
METHOD = b"/doors.DoorManager/GetLocation"


def captured_call() -> tuple[tuple[tuple[bytes, bytes], ...], bytes]:
    """The GetLocation header block and request body exactly as grpcio sent them."""
    conn = H2ServerConnection()
    headers: tuple[tuple[bytes, bytes], ...] | None = None
    body = b""
    stream = 0
    for ev in conn.receive_data(FIXTURE.read_bytes(), 0.0):
        if isinstance(ev, RequestReceived) and dict(ev.headers)[b":path"] == METHOD:
            headers, stream = ev.headers, ev.stream_id
        elif isinstance(ev, DataReceived) and ev.stream_id == stream:
            body += ev.data
    assert headers is not None, f"{METHOD!r} not in {FIXTURE}"
    return headers, body


def answer(server: H2ServerConnection, events: list[H2Event]) -> None:
    for ev in events:
        if isinstance(ev, DataReceived):
            server.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
            if ev.end_stream:
                server.send_trailers_only(ev.stream_id, grpc_permission_denied_headers())


def record(requests: int) -> tuple[bytes, list[bytes]]:
    """(connection start, one byte string per call) from a live client/server pair."""
    headers, body = captured_call()
    client, server = H2ClientConnection(), H2ServerConnection()
    preface = client.data_to_send()
    server.receive_data(preface, 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    settings_ack = client.data_to_send()
    server.receive_data(settings_ack, 0.0)
    server.data_to_send()
    calls = []
    for _ in range(requests):
        sid = client.send_request(headers)
        client.send_data(sid, body, end_stream=True)
        chunk = client.data_to_send()
        calls.append(chunk)
        answer(server, server.receive_data(chunk, 0.0))
        down = server.data_to_send()
        if down:
            client.receive_data(down, 0.0)
    return preface + settings_ack, calls


def policy(*, allow_get_location: bool) -> GRPCMatcher:
    ref = RuleRef(PolicyKind.CNP, "default", "doors", "ingress")
    rules = [
        (GRPCRule("doors.DoorManager", "GetName"), ref),
        (GRPCRule("doors.DoorManager", "RequestMaintenance"), ref),
        (GRPCRule("doors.Admin"), ref),
    ]
    if allow_get_location:
        rules.append((GRPCRule("doors.DoorManager", "GetLocation"), ref))
    return GRPCMatcher(L7RuleSet(protocol=L7Protocol.GRPC, rules=tuple(rules)))


def run(start: bytes, calls: list[bytes], mode: str) -> float:
    """Seconds spent in the timed part for all calls."""
    server = H2ServerConnection()
    server.receive_data(start, 0.0)
    server.data_to_send()
    deny_mode = mode == "parse+match+deny"
    matcher = policy(allow_get_location=not deny_mode)
    deny = grpc_permission_denied_headers()
    spent = 0.0
    clock = time.perf_counter
    for chunk in calls:
        t0 = clock()
        events = server.receive_data(chunk, 0.0)
        if mode != "parse":
            for ev in events:
                if isinstance(ev, RequestReceived) and ev.grpc is not None:
                    verdict = matcher.match(ev.grpc.service, ev.grpc.method)
                    if not verdict.allowed:
                        server.send_trailers_only(ev.stream_id, deny)
        spent += clock() - t0
        if deny_mode:  # already answered: only the request body to acknowledge
            for ev in events:
                if isinstance(ev, DataReceived):
                    server.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
        else:
            answer(server, events)
        server.data_to_send()
    return spent


def results(requests: int = 20_000, rounds: int = 3) -> list[dict[str, object]]:
    start, calls = record(requests)
    rows: list[dict[str, object]] = []
    for mode in ("parse", "parse+match", "parse+match+deny"):
        best = min(run(start, calls, mode) for _ in range(rounds))
        rows.append(
            {
                "name": f"http2 grpc unary: {mode}",
                "requests_per_s": round(requests / best),
                "us_per_request": round(best / requests * 1e6, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for row in results(args.requests, args.rounds):
        print(
            f"{row['name']:<40} {row['requests_per_s']:>9} req/s "
            f"{row['us_per_request']:>8} us/request"
        )


if __name__ == "__main__":
    main()
