"""Peers and helpers for the HTTP/2 engine tests (no tests here).

`Pipe` puts an `H2Engine` between two real HTTP/2 endpoints: an `H2ClientConnection` as the
client and an `H2ServerConnection` as the upstream (which serves doors.DoorManager from
examples/grpc/doors.py, or holds its answers when told to). `pump()` moves bytes along the
commands the engine returns until nothing moves, recording every command, record and event.
The upstream peer only starts talking once the engine has sent it something, as a real
upstream only exists once the proxy connected to it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import hpack
from hyperframe.frame import Frame

from garrison.flows.record import FlowRecord
from garrison.parsers.http2 import (
    DataReceived,
    H2Event,
    H2Limits,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection
from garrison.policies.l7rules import GRPCRule, HTTPRule, L7Protocol, L7RuleSet
from garrison.policies.labels import Labels
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.proxy.commands import (
    Close,
    Command,
    ConnectionContext,
    Forward,
    Inject,
    Log,
    PeerInfo,
    Side,
    TrafficDirection,
)
from garrison.proxy.config import ProxyConfig
from garrison.proxy.engine_h2 import H2Engine

REPO = Path(__file__).resolve().parents[3]
HTTP2_DATA = REPO / "tests" / "data" / "http2"
INDEX: dict[str, Any] = json.loads((HTTP2_DATA / "index.json").read_text())
NOW = 1_700_000_000.0

REF = RuleRef(PolicyKind.CNP, "default", "door-manager", "ingress", rule_index=0)
CLIENT = PeerInfo(300, Labels.parse("app=guard"), "127.0.0.2", 40000, namespace="default")
SERVER = PeerInfo(256, Labels.parse("app=door-manager"), "127.0.0.1", 50051, namespace="default")
SERVICE = "doors.DoorManager"


def load_doors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doors", REPO / "examples/grpc/doors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


doors = load_doors()


def fixture(name: str, side: Literal["client", "server"]) -> bytes:
    return (HTTP2_DATA / f"{name}.{side}.bin").read_bytes()


def grpc_rules(*methods: str | None, audit_ref: RuleRef = REF) -> L7RuleSet:
    """Rules allowing these methods of doors.DoorManager (None: the whole service)."""
    rules = tuple((GRPCRule(SERVICE, m), audit_ref) for m in methods)
    return L7RuleSet(L7Protocol.GRPC, rules)


def http_rules(*rules: HTTPRule) -> L7RuleSet:
    return L7RuleSet(L7Protocol.HTTP, tuple((r, REF) for r in rules))


def context(
    ruleset: L7RuleSet, *, audit: bool = False, protocol: L7Protocol | None = None
) -> ConnectionContext:
    return ConnectionContext(
        source=CLIENT,
        destination=SERVER,
        direction=TrafficDirection.INGRESS,
        protocol=protocol or ruleset.protocol,
        ruleset=ruleset,
        audit=audit,
        host_hint="door-manager",
    )


def engine(
    ruleset: L7RuleSet,
    *,
    rules: Literal["grpc", "http"] = "grpc",
    audit: bool = False,
    config: ProxyConfig | None = None,
) -> H2Engine:
    return H2Engine(context(ruleset, audit=audit), config or ProxyConfig(), rules)


def grpc_request(method: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", doors.path(method).encode()),
        (b":authority", b"door-manager:50051"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *extra,
    ]


GRPC_OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
GRPC_OK_TRAILERS = [(b"grpc-status", b"0")]

# (method, request messages) -> response messages; None: hold the call unanswered.
Handler = Callable[[str, list[bytes]], list[bytes] | None]


def door_handler(method: str, requests: list[bytes]) -> list[bytes] | None:
    """doors.DoorManager as examples/grpc/doors.py serves it."""
    if method == "GetStatus":
        return list(doors.get_status(requests[0], None))
    if method == "RequestMaintenance":
        return [doors.request_maintenance(iter(requests), None)]
    function = {
        "GetName": doors.get_name,
        "GetLocation": doors.get_location,
        "SetAccessCode": doors.set_access_code,
    }[method]
    return [function(requests[0], None)]


def _peer_limits(limits: H2Limits | None) -> H2Limits:
    """The test peers queue whatever a test makes them send (their caps are not under test)."""
    big = 1 << 28
    return replace(
        limits or H2Limits(), max_buffered_per_stream=big, max_buffered_per_connection=big
    )


@dataclass
class Pipe:
    """client peer ⇄ H2Engine ⇄ upstream peer."""

    ruleset: L7RuleSet
    rules: Literal["grpc", "http"] = "grpc"
    audit: bool = False
    config: ProxyConfig = field(default_factory=ProxyConfig)
    client_limits: H2Limits | None = None
    upstream_limits: H2Limits | None = None
    handler: Handler | None = door_handler
    client_acks: bool = True  # the client peer reads (acknowledges) what it receives
    upstream_acks: bool = True

    def __post_init__(self) -> None:
        self.engine = H2Engine(context(self.ruleset, audit=self.audit), self.config, self.rules)
        self.client = H2ClientConnection(_peer_limits(self.client_limits))
        self.upstream = H2ServerConnection(_peer_limits(self.upstream_limits))
        self.upstream_connected = False
        self.commands: list[Command] = []
        self.records: list[FlowRecord] = []
        self.client_events: list[H2Event] = []
        self.upstream_events: list[H2Event] = []
        self.closed: Close | None = None
        self.upstream_requests: dict[int, RequestReceived] = {}
        self.upstream_bodies: dict[int, bytes] = {}
        self.max_upstream_open = 0

    # -- driving --------------------------------------------------------------------------------

    def pump(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            moved = False
            out = self.client.data_to_send()
            if out and self.closed is None:
                moved = True
                self.run(self.engine.client_data(out, NOW))
            if self.upstream_connected and self.closed is None:
                out = self.upstream.data_to_send()
                if out:
                    moved = True
                    self.run(self.engine.upstream_data(out, NOW))
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def run(self, commands: Sequence[Command]) -> None:
        for cmd in commands:
            self.commands.append(cmd)
            if isinstance(cmd, Log):
                self.records.append(cmd.record)
            elif isinstance(cmd, Close):
                self.closed = cmd
            elif isinstance(cmd, Forward | Inject):
                assert cmd.data, "empty write"
                if cmd.side is Side.CLIENT:
                    self.on_client(self.client.receive_data(cmd.data, NOW))
                else:
                    assert cmd.side is Side.UPSTREAM
                    self.upstream_connected = True
                    self.on_upstream(self.upstream.receive_data(cmd.data, NOW))

    def on_client(self, events: list[H2Event]) -> None:
        self.client_events += events
        if self.client_acks:
            for ev in events:
                if isinstance(ev, DataReceived):
                    self.client.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)

    def on_upstream(self, events: list[H2Event]) -> None:
        self.upstream_events += events
        for ev in events:
            if isinstance(ev, RequestReceived):
                self.upstream_requests[ev.stream_id] = ev
                self.upstream_bodies[ev.stream_id] = b""
                self.max_upstream_open = max(
                    self.max_upstream_open, len(self.upstream.open_streams)
                )
            elif isinstance(ev, DataReceived):
                self.upstream_bodies[ev.stream_id] += ev.data
                if self.upstream_acks:
                    self.upstream.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, StreamEnded):
                self.answer(ev.stream_id)

    def answer(self, sid: int) -> None:
        if self.handler is None:
            return
        request = self.upstream_requests[sid]
        assert request.grpc is not None
        replies = self.handler(request.grpc.method, doors.unframe(self.upstream_bodies[sid]))
        if replies is None:
            return
        self.upstream.send_headers(sid, GRPC_OK_HEADERS)
        for reply in replies:
            self.upstream.send_data(sid, doors.frame(reply))
        self.upstream.send_trailers(sid, GRPC_OK_TRAILERS)

    # -- client side ----------------------------------------------------------------------------

    def call(
        self,
        method: str,
        *messages: bytes,
        extra: Iterable[tuple[bytes, bytes]] = (),
        end: bool = True,
    ) -> int:
        """Open a gRPC call from the client peer (not pumped yet)."""
        sid = self.client.send_request(grpc_request(method, *extra))
        body = b"".join(doors.frame(m) for m in messages)
        if body or end:
            self.client.send_data(sid, body, end_stream=end)
        return sid

    def client_stream(self, sid: int) -> list[H2Event]:
        return [e for e in self.client_events if getattr(e, "stream_id", None) == sid]

    def replies(self, sid: int) -> list[bytes]:
        body = b"".join(
            e.data for e in self.client_events if isinstance(e, DataReceived) and e.stream_id == sid
        )
        replies: list[bytes] = doors.unframe(body)
        return replies

    def status(self, sid: int) -> tuple[int | None, str | None]:
        """grpc-status and grpc-message the client peer got on `sid` (trailers or
        trailers-only)."""
        for ev in self.client_stream(sid):
            if isinstance(ev, TrailersReceived | ResponseReceived) and ev.grpc_status is not None:
                message = dict(ev.headers).get(b"grpc-message")
                return ev.grpc_status, message.decode() if message is not None else None
        return None, None

    def client_resets(self, sid: int) -> list[int]:
        return [e.error_code for e in self.client_stream(sid) if isinstance(e, StreamReset)]

    def upstream_paths(self) -> list[str | None]:
        return [r.path for r in self.upstream_requests.values()]

    def writes(self, side: Side) -> list[Forward | Inject]:
        return [c for c in self.commands if isinstance(c, Forward | Inject) and c.side is side]


# ---- raw frames ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawFrame:
    type: str  # hyperframe's class name without "Frame": Headers, Data, RstStream, GoAway, ...
    stream_id: int
    flags: frozenset[str]
    payload: Frame


def frames(data: bytes) -> list[RawFrame]:
    """Split bytes into frames (a client preface, if first, is skipped)."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    if data.startswith(preface):
        data = data[len(preface) :]
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        name = type(frame).__name__.removesuffix("Frame")
        out.append(RawFrame(name, frame.stream_id, frozenset(frame.flags), frame))
        data = data[9 + length :]
    return out


class HeaderDecoder:
    """Decodes the header blocks of one direction of a connection, in order (HPACK state)."""

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()

    def decode(self, frame: RawFrame) -> list[tuple[bytes, bytes]]:
        block = frame.payload.data  # type: ignore[attr-defined]
        return [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]
