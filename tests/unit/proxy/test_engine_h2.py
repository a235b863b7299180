"""The HTTP/2 + gRPC engine driven with real bytes: captured grpcio and curl traffic
(tests/data/http2) and live HTTP/2 peers on both sides (test_engine_h2_harness).

Asserted: what reaches the upstream (requests unchanged, nothing denied), the exact frames of
deny answers and which command carries them, what the client gets back, and every record.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from garrison.flows.record import (
    DropReasonDesc,
    FlowRecord,
    L7FlowType,
    Policy,
    TrafficDirection,
    Verdict,
)
from garrison.parsers.http2 import (
    DataReceived,
    H2Limits,
    NeverIndexed,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection
from garrison.policies.l7rules import HeaderMatch, HTTPRule, L7Protocol, L7RuleSet, MismatchAction
from garrison.proxy.commands import Command, Forward, Inject, Log, Side
from garrison.proxy.config import ProxyConfig
from garrison.proxy.engine import make_engine
from garrison.proxy.engine_h2 import H2Engine
from tests.unit.proxy.test_engine_h2_harness import (
    CLIENT,
    INDEX,
    NOW,
    REF,
    SERVER,
    SERVICE,
    HeaderDecoder,
    Pipe,
    context,
    doors,
    engine,
    fixture,
    frames,
    grpc_rules,
    http_rules,
)

ALL_DOORS = grpc_rules(None)


def scenario(name: str) -> dict[str, object]:
    return next(s for s in INDEX["scenarios"] if s["name"] == name)


def requests_in(data: bytes) -> list[tuple[RequestReceived, bytes]]:
    """The requests (and their bodies) an HTTP/2 server reads from `data`."""
    observer = H2ServerConnection()
    found: dict[int, tuple[RequestReceived, bytes]] = {}
    for ev in observer.receive_data(data, NOW):
        if isinstance(ev, RequestReceived):
            found[ev.stream_id] = (ev, b"")
        elif isinstance(ev, DataReceived):
            req, body = found[ev.stream_id]
            found[ev.stream_id] = (req, body + ev.data)
    return list(found.values())


def upstream_bytes(commands: Sequence[Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, Forward) and c.side is Side.UPSTREAM)


def client_bytes(commands: Sequence[Command]) -> bytes:
    return b"".join(
        c.data for c in commands if isinstance(c, Forward | Inject) and c.side is Side.CLIENT
    )


def l7(records: list[FlowRecord]) -> list[tuple[str, str, str, int | None]]:
    """(type, verdict, method, status) per record, for compact assertions."""
    out = []
    for r in records:
        assert r.l7 is not None
        grpc = r.l7.grpc
        method = (
            grpc.method
            if grpc is not None and grpc.method
            else (r.l7.http.method if r.l7.http else "")
        )
        out.append((r.l7.type.value, r.verdict.value, method, grpc.status if grpc else None))
    return out


# ---- captured grpcio traffic -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grpc_unary", "grpc_concurrent", "grpc_streaming"])
def test_captured_calls_reach_upstream_unchanged_at_every_split(name: str) -> None:
    client = fixture(name, "client")
    expected = requests_in(client)
    for cut in range(1, len(client)):
        e = engine(ALL_DOORS)
        commands = [*e.client_data(client[:cut], NOW), *e.client_data(client[cut:], NOW)]
        got = requests_in(upstream_bytes(commands))
        assert [(r.headers, body) for r, body in got] == [
            (r.headers, body) for r, body in expected
        ], f"split at {cut}"
        assert not [c for c in commands if isinstance(c, Inject)]


@pytest.mark.parametrize("name", ["grpc_unary", "grpc_concurrent", "grpc_streaming"])
def test_captured_answers_reach_the_client(name: str) -> None:
    """The upstream side replays what grpcio's server sent; the client gets every reply."""
    e = engine(ALL_DOORS)
    e.client_data(fixture(name, "client"), NOW)
    server = fixture(name, "server")
    commands: list[Command] = []
    for cut in range(0, len(server), 7):  # arbitrary chunking of the server's bytes
        commands += e.upstream_data(server[cut : cut + 7], NOW + 0.001)
    decoder = HeaderDecoder()
    blocks: dict[int, list[list[tuple[bytes, bytes]]]] = {}
    bodies: dict[int, bytes] = {}
    for f in frames(client_bytes(commands)):
        if f.type == "Headers":
            blocks.setdefault(f.stream_id, []).append(decoder.decode(f))
        elif f.type == "Data":
            bodies[f.stream_id] = bodies.get(f.stream_id, b"") + f.payload.data  # type: ignore[attr-defined]
    calls = scenario(name)["calls"]
    assert isinstance(calls, list)
    # grpc_concurrent starts with a warm-up call the index does not list.
    for sid, call in zip(sorted(blocks)[-len(calls) :], calls, strict=True):
        head, trailers = blocks[sid]
        assert head[0] == (b":status", b"200")
        assert (b"grpc-status", b"0") in trailers
        replies = [doors.unframe(bodies[sid])]
        if "replies" in call:
            assert [r.hex() for r in replies[0]] == call["replies"]
        else:
            assert [r.hex() for r in replies[0]] == [call["reply"]]
    responses = [r for r in e_records(commands) if r.l7 and r.l7.type is L7FlowType.RESPONSE]
    assert [r.l7.grpc.status for r in responses if r.l7 and r.l7.grpc] == [0] * len(blocks)
    assert all((r.l7.latency_ns or 0) > 0 for r in responses if r.l7)
    assert e.open_calls == 0
    assert e.buffered_bytes == 0


def e_records(commands: Sequence[Command]) -> list[FlowRecord]:
    return [c.record for c in commands if isinstance(c, Log)]


def test_captured_unary_call_denied_exact_frames() -> None:
    """GetLocation is denied: its answer is one HEADERS frame with END_STREAM, carried by an
    Inject command; grpcio had already ended the request (no reset needed)."""
    e = engine(grpc_rules("GetName", "SetAccessCode"))
    client = fixture("grpc_unary", "client")
    commands = list(e.client_data(client, NOW))
    injects = [c for c in commands if isinstance(c, Inject)]
    assert len(injects) == 1 and injects[0].side is Side.CLIENT
    (deny,) = frames(injects[0].data)
    assert deny.type == "Headers"
    assert deny.flags == {"END_STREAM", "END_HEADERS"}
    assert deny.stream_id == 3  # grpcio's second call: GetLocation
    # The deny's header block is decodable in sequence with everything else sent to the client.
    decoder = HeaderDecoder()
    blocks = [decoder.decode(f) for f in frames(client_bytes(commands)) if f.type == "Headers"]
    assert blocks == [
        [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"7"),
            (b"grpc-message", b"Access denied"),
        ]
    ]
    paths = [r.path for r, _ in requests_in(upstream_bytes(commands))]
    assert paths == ["/doors.DoorManager/GetName", "/doors.DoorManager/SetAccessCode"]


def test_fixture_curl_grpc_call_and_curl_get() -> None:
    """curl's gRPC call is allowed on a gRPC port; curl's plain GET there gets 403."""
    e = engine(grpc_rules("GetName"))
    commands = list(e.client_data(fixture("curl_grpc", "client"), NOW))
    assert [r.path for r, _ in requests_in(upstream_bytes(commands))] == [
        "/doors.DoorManager/GetName"
    ]
    e = engine(grpc_rules("GetName"))
    commands = list(e.client_data(fixture("curl_get", "client"), NOW))
    assert upstream_bytes(commands) == b""
    decoder = HeaderDecoder()
    out = frames(client_bytes(commands))
    heads = [decoder.decode(f) for f in out if f.type == "Headers"]
    assert heads == [
        [(b":status", b"403"), (b"content-type", b"text/plain"), (b"content-length", b"15")]
    ]
    assert b"".join(f.payload.data for f in out if f.type == "Data") == b"Access denied\r\n"  # type: ignore[attr-defined]
    request, response = e_records(commands)
    assert request.verdict is Verdict.DROPPED and response.verdict is Verdict.DROPPED
    assert request.l7 is not None and request.l7.http is not None
    assert request.l7.http.method == "GET"
    assert request.l7.http.url == "http://127.0.0.1:38881/v1/doors/front?verbose=1" or (
        request.l7.http.url.endswith("/v1/doors/front?verbose=1")
    )
    assert response.l7 is not None and response.l7.http is not None
    assert response.l7.http.code == 403


# ---- live peers: allow, deny, siblings ----------------------------------------------------------


def test_allowed_unary_call_round_trip_and_records() -> None:
    p = Pipe(grpc_rules("GetName"))
    sid = p.call("GetName", doors.message((1, "front")), extra=[(b"authorization", b"secret")])
    p.pump()
    assert p.replies(sid) == [doors.message((1, "door front"))]
    assert p.status(sid) == (0, None)
    (upstream_request,) = p.upstream_requests.values()
    assert list(upstream_request.headers)[:6] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/doors.DoorManager/GetName"),
        (b":authority", b"door-manager:50051"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    assert (b"authorization", b"secret") in upstream_request.headers
    request, response = p.records
    for record in (request, response):
        assert record.verdict is Verdict.FORWARDED
        assert record.traffic_direction is TrafficDirection.INGRESS
        assert record.ingress_allowed_by == (Policy.from_ref(REF),)
        assert record.ingress_denied_by == ()
        assert record.drop_reason_desc is None
    assert (request.source.identity, request.destination.identity) == (300, 256)
    assert (response.source.identity, response.destination.identity) == (256, 300)
    assert request.source.labels == (
        "k8s:app=guard",
        "k8s:io.kubernetes.pod.namespace=default",
    ) or ("app=guard" in " ".join(request.source.labels))
    assert (request.source.ip, request.source.port) == (CLIENT.ip, CLIENT.port)
    assert (request.destination.ip, request.destination.port) == (SERVER.ip, SERVER.port)
    assert request.l7 is not None and request.l7.grpc is not None and request.l7.http is not None
    assert request.l7.type is L7FlowType.REQUEST and not request.is_reply
    assert (request.l7.grpc.service, request.l7.grpc.method) == (SERVICE, "GetName")
    assert request.l7.http.url == "http://door-manager:50051/doors.DoorManager/GetName"
    assert request.l7.http.protocol == "HTTP/2"
    headers = {h.key: h.value for h in request.l7.http.headers}
    assert headers["authorization"] == "[REDACTED]"
    assert headers["te"] == "trailers"
    assert response.l7 is not None and response.l7.grpc is not None and response.l7.http is not None
    assert response.l7.type is L7FlowType.RESPONSE and response.is_reply
    assert response.l7.grpc.status == 0
    assert response.l7.http.code == 200
    assert response.summary == "gRPC 0 OK 0ms (doors.DoorManager/GetName)"
    assert request.time == int(NOW * 1e9)
    assert p.engine.open_calls == 0


def test_never_indexed_fields_stay_never_indexed_through_the_engine() -> None:
    """A field the client sent never-indexed reaches the upstream never-indexed, on the first
    call and on repeats, so the proxy's HPACK encoder towards the upstream never learns it;
    credentials go never-indexed even when sent plain."""
    p = Pipe(grpc_rules("GetName"))
    p.client = H2ClientConnection(prevalidated_headers=True)  # sends the marks it is given
    api_key = NeverIndexed((b"x-api-key", b"k3y-s3cret"))
    auth = (b"authorization", b"Bearer s3cret")
    sids = []
    for _ in range(3):
        sids.append(p.call("GetName", doors.message((1, "front")), extra=[api_key, auth]))
        p.pump()
    assert [p.status(sid) for sid in sids] == [(0, None)] * 3
    assert len(p.upstream_requests) == 3
    for request in p.upstream_requests.values():
        fields = {h[0]: h for h in request.headers}
        assert fields[b"x-api-key"] == tuple(api_key)
        # what the upstream decoded: never-indexed literals (RFC 7541 §6.2.3)
        assert type(fields[b"x-api-key"]) is NeverIndexed
        assert type(fields[b"authorization"]) is NeverIndexed
        assert type(fields[b"te"]) is not NeverIndexed  # the hop does index what it may


def test_denied_call_among_concurrent_allowed_calls() -> None:
    """Twenty calls open at once on one connection, every other one denied: the denied ones
    get PERMISSION_DENIED and a reset of their request body, the others their answers."""
    p = Pipe(grpc_rules("GetName", "GetLocation"))
    allowed, denied = [], []
    for i in range(20):
        if i % 2:
            denied.append(
                p.call("SetAccessCode", doors.message((1, f"d{i}"), (2, "0000")), end=False)
            )
        else:
            allowed.append(p.call("GetName", doors.message((1, f"d{i}"))))
    p.pump()
    for i, sid in enumerate(allowed):
        assert p.replies(sid) == [doors.message((1, f"door d{2 * i}"))]
        assert p.status(sid) == (0, None)
        assert p.client_resets(sid) == []
    for sid in denied:
        assert p.status(sid) == (7, "Access denied")
        assert p.replies(sid) == []
        assert p.client_resets(sid) == [0]  # RST_STREAM(NO_ERROR): stop sending the body
        first = p.client_stream(sid)[0]
        assert isinstance(first, ResponseReceived) and first.end_stream
    assert set(p.upstream_paths()) == {"/doors.DoorManager/GetName"}
    assert len(p.upstream_requests) == 10
    # Each deny answer is its own Inject: one HEADERS frame with END_STREAM. The bodies still
    # open are cut at the end of the batch, in one more Inject of RST_STREAM(NO_ERROR) frames.
    injects = [c for c in p.commands if isinstance(c, Inject)]
    assert len(injects) == 11
    for inject, sid in zip(injects, denied, strict=False):
        assert inject.side is Side.CLIENT
        (head,) = frames(inject.data)
        assert (head.type, head.stream_id, head.flags) == (
            "Headers",
            sid,
            frozenset({"END_STREAM", "END_HEADERS"}),
        )
    resets = frames(injects[-1].data)
    assert [(f.type, f.stream_id, f.payload.error_code) for f in resets] == [  # type: ignore[attr-defined]
        ("RstStream", sid, 0) for sid in denied
    ]
    verdicts = l7(p.records)
    assert verdicts.count(("REQUEST", "DROPPED", "SetAccessCode", None)) == 10
    assert verdicts.count(("RESPONSE", "DROPPED", "SetAccessCode", 7)) == 10
    assert verdicts.count(("REQUEST", "FORWARDED", "GetName", None)) == 10
    assert verdicts.count(("RESPONSE", "FORWARDED", "GetName", 0)) == 10
    dropped = [r for r in p.records if r.verdict is Verdict.DROPPED]
    assert all(r.drop_reason_desc is DropReasonDesc.POLICY_DENIED for r in dropped)
    assert all(r.ingress_allowed_by == () for r in dropped)
    # The policy whose L7 rules the call failed to match is named, as for HTTP/1.1.
    assert all(r.ingress_denied_by == (Policy.from_ref(REF),) for r in dropped)
    assert p.engine.open_calls == 0 and p.engine.buffered_bytes == 0
    # The client can go on using the connection afterwards.
    sid = p.call("GetLocation", doors.message((1, "x")))
    p.pump()
    assert p.status(sid) == (0, None)


def test_denied_call_whose_body_ends_in_the_same_read_is_not_reset() -> None:
    """grpcio sends a unary call's HEADERS and DATA(END_STREAM) together: the request is
    complete, so the deny answer needs no RST_STREAM after it."""
    p = Pipe(grpc_rules("GetName"))
    sids = [p.call("SetAccessCode", doors.message((1, "a"), (2, "1"))) for _ in range(3)]
    p.pump()
    for sid in sids:
        assert p.status(sid) == (7, "Access denied")
        assert p.client_resets(sid) == []
    writes = b"".join(c.data for c in p.writes(Side.CLIENT))
    assert not [f for f in frames(writes) if f.type == "RstStream"]


def test_denied_call_with_ended_request_is_not_reset() -> None:
    p = Pipe(grpc_rules("GetName"))
    sid = p.client.send_request(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/doors.DoorManager/SetAccessCode"),
            (b":authority", b"door-manager"),
            (b"content-type", b"application/grpc"),
        ],
        end_stream=True,
    )
    p.pump()
    assert p.status(sid) == (7, "Access denied")
    assert p.client_resets(sid) == []
    assert not p.upstream_connected  # nothing allowed yet: no upstream connection needed


def test_all_denied_client_never_opens_an_upstream_connection() -> None:
    p = Pipe(grpc_rules("GetName"))
    sids = [p.call("SetAccessCode", doors.message((1, "x"))) for _ in range(5)]
    p.pump()
    assert [p.status(s) for s in sids] == [(7, "Access denied")] * 5
    assert not p.upstream_connected
    assert p.writes(Side.UPSTREAM) == []


def test_request_body_after_deny_is_discarded_and_credited() -> None:
    """A client that keeps streaming after its deny (the reset crossed its DATA on the wire):
    the late frames go nowhere and the connection goes on."""
    p = Pipe(grpc_rules("GetName"))
    sid = p.call("RequestMaintenance", doors.message((1, "x")), end=False)
    p.pump()
    assert p.status(sid) == (7, "Access denied")
    # Late DATA, as if sent before the client saw the reset (raw frame on the wire).
    late = b"\x00\x00\x05\x00\x00" + sid.to_bytes(4, "big") + b"abcde"
    commands = p.engine.client_data(late * 3, NOW)
    assert not [c for c in commands if isinstance(c, Forward) and c.side is Side.UPSTREAM]
    p.run(commands)
    sid2 = p.call("GetName", doors.message((1, "y")))
    p.pump()
    assert p.status(sid2) == (0, None)
    assert p.engine.open_calls == 0


def test_non_grpc_request_on_grpc_port_gets_403() -> None:
    p = Pipe(grpc_rules(None))
    sid = p.client.send_request(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"d")],
        end_stream=True,
    )
    p.pump()
    head, data, _ended = p.client_stream(sid)
    assert isinstance(head, ResponseReceived) and head.status == 403
    assert isinstance(data, DataReceived) and data.data == b"Access denied\r\n" and data.end_stream
    assert not p.upstream_connected
    request, response = p.records
    assert request.l7 is not None and request.l7.http is not None and request.l7.grpc is None
    assert (request.verdict, request.l7.http.method, request.l7.http.url) == (
        Verdict.DROPPED,
        "GET",
        "http://d/",
    )
    assert response.l7 is not None and response.l7.http is not None
    assert response.l7.http.code == 403


@pytest.mark.parametrize(
    "path",
    [
        b"/doors.DoorManager/GetName/../SetAccessCode",
        b"/doors.DoorManager/GetName?x=1",
        b"/doors.DoorManager%2FGetName",
        b"/doors.DoorManager",
    ],
)
def test_malformed_grpc_call_is_denied_even_when_the_service_is_allowed(path: bytes) -> None:
    p = Pipe(grpc_rules(None))
    sid = p.client.send_request(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", b"d"),
            (b"content-type", b"application/grpc"),
        ],
        end_stream=True,
    )
    p.pump()
    assert p.status(sid) == (7, "Access denied")
    assert not p.upstream_connected
    assert [r.verdict for r in p.records] == [Verdict.DROPPED, Verdict.DROPPED]


def test_audit_mode_forwards_what_would_be_denied_and_logs_audit() -> None:
    p = Pipe(grpc_rules("GetName"), audit=True)
    ok = p.call("GetName", doors.message((1, "a")))
    audited = p.call("SetAccessCode", doors.message((1, "a"), (2, "1")))
    p.pump()
    assert p.status(ok) == (0, None)
    assert p.status(audited) == (0, None)
    assert p.replies(audited) == [doors.message((1, True))]
    assert not [c for c in p.commands if isinstance(c, Inject)]
    assert l7(p.records) == [
        ("REQUEST", "FORWARDED", "GetName", None),
        ("REQUEST", "AUDIT", "SetAccessCode", None),
        ("RESPONSE", "FORWARDED", "GetName", 0),
        ("RESPONSE", "AUDIT", "SetAccessCode", 0),
    ]
    audit = [r for r in p.records if r.verdict is Verdict.AUDIT]
    assert all(r.ingress_allowed_by == () for r in audit)
    assert all(r.ingress_denied_by == (Policy.from_ref(REF),) for r in audit)
    assert all(r.drop_reason_desc is DropReasonDesc.POLICY_DENIED for r in audit)
    forwarded = [r for r in p.records if r.verdict is Verdict.FORWARDED]
    assert all(r.drop_reason_desc is None and r.ingress_denied_by == () for r in forwarded)


# ---- streaming -----------------------------------------------------------------------------------


def test_server_streaming_call() -> None:
    p = Pipe(grpc_rules("GetStatus"))
    sid = p.call("GetStatus", doors.message((1, "front")))
    p.pump()
    assert p.replies(sid) == list(doors.get_status(doors.message((1, "front")), None))
    assert p.status(sid) == (0, None)
    kinds = [type(e).__name__ for e in p.client_stream(sid)]
    assert kinds[0] == "ResponseReceived" and kinds[-2:] == ["TrailersReceived", "StreamEnded"]


def test_client_streaming_call_sent_in_pieces() -> None:
    """Messages arrive one pump at a time; the upstream gets them in order and answers once
    the client half-closes."""
    p = Pipe(grpc_rules("RequestMaintenance"))
    sid = p.call("RequestMaintenance", end=False)
    p.pump()
    for i in range(5):
        p.client.send_data(sid, doors.frame(doors.message((1, "front"), (2, f"hinge {i}"))))
        p.pump()
        assert p.status(sid) == (None, None)
    p.client.send_data(sid, b"", end_stream=True)
    p.pump()
    assert p.replies(sid) == [doors.message((1, "T-1"), (2, 5))]
    assert p.status(sid) == (0, None)
    (usid,) = p.upstream_bodies
    assert len(doors.unframe(p.upstream_bodies[usid])) == 5


def test_request_trailers_are_relayed() -> None:
    p = Pipe(http_rules(HTTPRule()), rules="http", handler=None)
    sid = p.client.send_request(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/up"), (b":authority", b"d")]
    )
    p.client.send_data(sid, b"body")
    p.client.send_trailers(sid, [(b"x-checksum", b"abc")])
    p.pump()
    trailers = [e for e in p.upstream_events if isinstance(e, TrailersReceived)]
    assert [t.headers for t in trailers] == [((b"x-checksum", b"abc"),)]
    assert list(p.upstream_bodies.values()) == [b"body"]


# ---- upstream stream slots -----------------------------------------------------------------------


def test_calls_wait_for_the_upstreams_max_concurrent_streams() -> None:
    held: list[int] = []

    def slow(method: str, requests: list[bytes]) -> list[bytes] | None:
        return None  # answered by the test, one at a time

    p = Pipe(grpc_rules(None), upstream_limits=H2Limits(max_concurrent_streams=2))
    # A first call, so that the upstream's SETTINGS (its limit) have arrived: before them a
    # client may assume no limit, and a real server refuses the excess (next test).
    first = p.call("GetName", doors.message((1, "warm-up")))
    p.pump()
    assert p.status(first) == (0, None)
    held.append(*p.upstream_requests)
    p.handler = slow
    sids = [p.call("GetName", doors.message((1, f"d{i}"))) for i in range(6)]
    p.pump()
    assert len(p.upstream_requests) == 3
    assert p.engine.open_calls == 6
    while len(held) < 7:
        pending = [s for s in p.upstream_requests if s not in held]
        assert pending, "a waiting call was never opened upstream"
        usid = pending[0]
        held.append(usid)
        p.upstream.send_headers(
            usid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
        )
        p.upstream.send_data(usid, doors.frame(doors.message((1, "ok"))))
        p.upstream.send_trailers(usid, [(b"grpc-status", b"0")])
        p.pump()
        assert p.max_upstream_open <= 2
    assert [p.status(s) for s in sids] == [(0, None)] * 6
    assert p.engine.open_calls == 0


# ---- HTTP rules over h2c -------------------------------------------------------------------------


def test_make_engine_builds_the_grpc_engine() -> None:
    e = make_engine(context(grpc_rules("GetName")), ProxyConfig())
    assert isinstance(e, H2Engine)


def test_http_rules_allow_deny_and_normalize() -> None:
    rules = http_rules(
        HTTPRule(method="GET", path="/v1/doors/[a-z]+"),
        HTTPRule(method="POST", path="/doors.DoorManager/GetName"),
    )
    p = Pipe(rules, rules="http", handler=None)

    def get(path: bytes) -> int:
        return p.client.send_request(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path), (b":authority", b"d")],
            end_stream=True,
        )

    allowed = get(b"/v1//doors/./front")
    denied = get(b"/v1/doors/front/open")
    unsafe = get(b"/v1/%2e%2e/%2e%2e/etc")
    grpc_allowed = p.call("GetName", doors.message((1, "a")))
    grpc_denied = p.call("SetAccessCode", doors.message((1, "a")))
    p.pump()
    assert [r.path for r in p.upstream_requests.values()] == [
        "/v1/doors/front",
        "/doors.DoorManager/GetName",
    ]
    (head, body, _) = p.client_stream(denied)
    assert isinstance(head, ResponseReceived) and head.status == 403
    assert isinstance(body, DataReceived) and body.data == b"Access denied\r\n"
    (head, body, _) = p.client_stream(unsafe)
    assert isinstance(head, ResponseReceived) and head.status == 400
    assert isinstance(body, DataReceived) and body.data == b"Bad Request\r\n"
    assert p.status(grpc_denied) == (7, "Access denied")  # a gRPC client's own words
    assert p.client_stream(allowed) == [] and p.client_stream(grpc_allowed) == []  # held
    # Answer the allowed ones.
    for usid, req in p.upstream_requests.items():
        p.upstream.send_headers(usid, [(b":status", b"200")], end_stream=req.grpc is None)
        if req.grpc is not None:
            p.upstream.send_trailers(usid, [(b"grpc-status", b"0")])
    p.pump()
    head = p.client_stream(allowed)[0]
    assert isinstance(head, ResponseReceived) and head.status == 200
    assert p.status(grpc_allowed) == (0, None)
    by_path = {
        (
            r.l7.type.value,
            r.verdict.value,
            r.l7.http.url if r.l7.http else "",
            r.l7.http.code if r.l7.http else 0,
        )
        for r in p.records
        if r.l7 is not None
    }
    assert ("REQUEST", "FORWARDED", "http://d/v1/doors/front", 0) in by_path
    assert ("RESPONSE", "FORWARDED", "http://d/v1/doors/front", 200) in by_path
    assert ("REQUEST", "DROPPED", "http://d/v1/doors/front/open", 0) in by_path
    assert ("RESPONSE", "DROPPED", "http://d/v1/doors/front/open", 403) in by_path
    assert ("RESPONSE", "DROPPED", "http://d/v1/%2e%2e/%2e%2e/etc", 400) in by_path
    bad = [r for r in p.records if r.l7 and r.l7.http and r.l7.http.code == 400]
    assert bad[0].drop_reason_desc is DropReasonDesc.PARSE_ERROR
    # both records of the refused request say why, as HTTP/1.1's parse error record does
    refused = [r for r in p.records if r.l7 and r.l7.http and "%2e%2e" in r.l7.http.url]
    assert len(refused) == 2
    for record in refused:
        assert record.error.startswith("HTTP/2 request refused: "), record.error
        assert "dot-segment" in record.error or ".." in record.error, record.error
    grpc_records = [r for r in p.records if r.l7 and r.l7.grpc]
    assert {
        (r.verdict.value, r.l7.grpc.method, r.l7.grpc.status)
        for r in grpc_records
        if r.l7 and r.l7.grpc
    } == {
        ("FORWARDED", "GetName", None),
        ("FORWARDED", "GetName", 0),
        ("DROPPED", "SetAccessCode", None),
        ("DROPPED", "SetAccessCode", 7),
    }


def test_http_rules_header_edits_apply_to_forwarded_headers() -> None:
    rules = http_rules(
        HTTPRule(
            path="/v1/.*",
            header_matches=(
                HeaderMatch("X-Team", "doors", MismatchAction.REPLACE),
                HeaderMatch("X-Debug", "", MismatchAction.DELETE),
                HeaderMatch("X-Added", "yes", MismatchAction.ADD),
            ),
        )
    )
    p = Pipe(rules, rules="http", handler=None)
    p.client.send_request(
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/v1/x"),
            (b":authority", b"d"),
            (b"x-team", b"other"),
            (b"x-debug", b"1"),
        ],
        end_stream=True,
    )
    p.pump()
    (req,) = p.upstream_requests.values()
    fields = [h for h in req.headers if not h[0].startswith(b":")]
    assert fields == [(b"x-team", b"doors"), (b"x-added", b"yes")]


def test_curl_h2c_get_under_http_rules() -> None:
    """curl's captured prior-knowledge GET, on an HTTP port whose engine handed it over. The
    path a rule matches includes the query string."""
    e = engine(http_rules(HTTPRule(method="GET", path=r"/v1/doors/front\?verbose=1")), rules="http")
    commands = list(e.client_data(fixture("curl_get", "client"), NOW))
    ((request, _),) = requests_in(upstream_bytes(commands))
    assert request.path == "/v1/doors/front?verbose=1"
    assert (b"x-door", b"front") in request.headers
    (record,) = e_records(commands)
    assert record.verdict is Verdict.FORWARDED
    assert record.l7 is not None and record.l7.http is not None
    assert record.l7.http.url.endswith("/v1/doors/front?verbose=1")

    e = engine(http_rules(HTTPRule(method="GET", path="/v1/doors/front")), rules="http")
    commands = list(e.client_data(fixture("curl_get", "client"), NOW))
    assert upstream_bytes(commands) == b""
    assert [r.verdict for r in e_records(commands)] == [Verdict.DROPPED, Verdict.DROPPED]


def test_stream_ids_and_records_for_allow_all_ruleset() -> None:
    ruleset = L7RuleSet(L7Protocol.GRPC, (), allow_all=True, allow_all_ref=REF)
    p = Pipe(ruleset)
    sids = [p.call(m, doors.message((1, "a"))) for m in ("GetName", "GetLocation", "SetAccessCode")]
    p.pump()
    assert [p.status(s) for s in sids] == [(0, None)] * 3
    assert all(r.ingress_allowed_by == (Policy.from_ref(REF),) for r in p.records)


def test_informational_response_is_relayed_before_the_final_one() -> None:
    p = Pipe(http_rules(HTTPRule()), rules="http", handler=None)
    sid = p.client.send_request(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"d")],
        end_stream=True,
    )
    p.pump()
    (usid,) = p.upstream_requests
    p.upstream.send_headers(usid, [(b":status", b"103"), (b"link", b"</a.css>")])
    p.upstream.send_headers(usid, [(b":status", b"204")], end_stream=True)
    p.pump()
    statuses = [e.status for e in p.client_stream(sid) if isinstance(e, ResponseReceived)]
    assert statuses == [103, 204]
    assert isinstance(p.client_stream(sid)[-1], StreamEnded)
    codes = [r.l7.http.code for r in p.records if r.l7 and r.l7.http and r.is_reply]
    assert codes == [204]


def test_upstream_refusing_a_stream_refuses_it_to_the_client() -> None:
    """REFUSED_STREAM (not processed, safe to retry: gRPC clients retry it transparently)."""
    p = Pipe(grpc_rules(None), handler=lambda m, r: None)
    sid = p.call("GetName", doors.message((1, "a")))
    p.pump()
    (usid,) = p.upstream_requests
    p.upstream.reset_stream(usid, 7)
    p.pump()
    assert p.client_resets(sid) == [7]
    assert p.engine.open_calls == 0


def test_denied_head_is_answered_with_headers_only() -> None:
    """A HEAD answer has no body: a DATA frame after it made curl and httpx report a protocol
    error. The 403's fields stay (content-length 15, as for GET) and the stream ends with them;
    the connection goes on."""
    p = Pipe(http_rules(HTTPRule(method="GET", path="/v1/.*")), rules="http", handler=None)

    def ask(method: bytes, path: bytes) -> int:
        return p.client.send_request(
            [(b":method", method), (b":scheme", b"http"), (b":path", path),
             (b":authority", b"d")],
            end_stream=True,
        )

    head = ask(b"HEAD", b"/v1/doors")
    p.pump()
    response, ended = p.client_stream(head)
    assert isinstance(response, ResponseReceived) and response.status == 403
    assert (b"content-length", b"15") in response.headers
    assert isinstance(ended, StreamEnded)
    data = [f for f in frames(b"".join(c.data for c in p.writes(Side.CLIENT)))
            if f.type == "Data"]
    assert data == []
    get = ask(b"GET", b"/v1/doors")
    p.pump()
    [usid] = p.upstream_requests
    p.upstream.send_headers(usid, [(b":status", b"200")], end_stream=True)
    p.pump()
    response = p.client_stream(get)[0]
    assert isinstance(response, ResponseReceived) and response.status == 200
    assert [(r.l7.http.method, r.l7.http.code) for r in p.records
            if r.l7 and r.l7.http and r.l7.type.value == "RESPONSE"] == [
        ("HEAD", 403), ("GET", 200)]


def _denied_put(p: Pipe, size: int) -> int:
    sid = p.client.send_request(
        [(b":method", b"PUT"), (b":scheme", b"http"), (b":path", b"/v1/upload"),
         (b":authority", b"d")],
        end_stream=False,
    )
    p.pump()  # the 403 comes while the body is still open
    sent = 0
    while sent < size:  # the client's window only reopens as the engine acknowledges
        piece = min(size - sent, 16384)
        p.client.send_data(sid, b"u" * piece, end_stream=sent + piece == size)
        sent += piece
        p.pump()
    return sid


def test_denied_upload_is_drained_not_reset() -> None:
    """403 + DATA + RST_STREAM(NO_ERROR) made curl 7.88 and httpx fail the upload. The body
    is drained instead: acknowledged (windows reopen) and thrown away until END_STREAM."""
    p = Pipe(http_rules(HTTPRule(method="GET")), rules="http", handler=None)
    sid = _denied_put(p, 1_000_000)  # far beyond the initial 64 KiB window
    response, body, ended = p.client_stream(sid)
    assert isinstance(response, ResponseReceived) and response.status == 403
    assert isinstance(body, DataReceived) and body.data == b"Access denied\r\n"
    assert isinstance(ended, StreamEnded)
    assert p.client_resets(sid) == []
    writes = b"".join(c.data for c in p.writes(Side.CLIENT))
    assert not [f for f in frames(writes) if f.type == "RstStream"]
    assert p.writes(Side.UPSTREAM) == [] and p.closed is None
    assert p.engine.buffered_bytes == 0 and not p.engine._draining


def test_a_denied_upload_past_the_limit_is_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("garrison.proxy.engine_h2.DENIED_BODY_LIMIT", 100_000)
    p = Pipe(http_rules(HTTPRule(method="GET")), rules="http", handler=None)
    sid = p.client.send_request(
        [(b":method", b"PUT"), (b":scheme", b"http"), (b":path", b"/v1/upload"),
         (b":authority", b"d")],
        end_stream=False,
    )
    p.pump()
    for _ in range(10):
        p.client.send_data(sid, b"u" * 16384)
        p.pump()
    assert p.client_resets(sid) == [0]  # NO_ERROR, after the complete answer
    assert p.closed is None


def test_a_denied_body_gets_its_windows_at_once() -> None:
    """The client may send the whole declared body without waiting for a WINDOW_UPDATE
    (nginx does the same for a body it discards): httpx's uploads stall when several wait."""
    p = Pipe(http_rules(HTTPRule(method="GET")), rules="http", handler=None)
    sids = [
        p.client.send_request(
            [(b":method", b"PUT"), (b":scheme", b"http"), (b":path", b"/v1/upload"),
             (b":authority", b"d"), (b"content-length", b"300000")],
            end_stream=False,
        )
        for _ in range(5)
    ]
    p.pump()
    # 1.5 MB: more than the 256 KiB stream windows and the 1 MiB connection window advertised.
    for sid in sids:
        assert p.client.send_data(sid, b"u" * 300_000, end_stream=True) == 300_000
    p.pump()
    for sid in sids:
        assert isinstance(p.client_stream(sid)[0], ResponseReceived)
        assert p.client_resets(sid) == []
    assert not p.engine._draining and p.closed is None


def test_http_rules_refuse_a_host_field_that_names_another_authority() -> None:
    """Host rules match `:authority`; an upstream that routes by the `host` field would serve
    another site than the one the policy allowed (RFC 9113 §8.3.1: malformed). 400, never
    forwarded, as HTTP/1.1 refuses an absolute-form target whose authority is not the Host."""
    p = Pipe(http_rules(HTTPRule(method="GET", path="/v1/.*", host="good\\.example")),
             rules="http", handler=None)

    def get(*fields: tuple[bytes, bytes]) -> int:
        return p.client.send_request(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/v1/x"), *fields],
            end_stream=True,
        )

    smuggled = get((b":authority", b"good.example"), (b"host", b"evil.example"))
    same = get((b":authority", b"good.example"), (b"host", b"GOOD.example"))
    host_only = get((b"host", b"good.example"))
    p.pump()
    assert [list(r.headers) for r in p.upstream_requests.values()] == [
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/v1/x"),
         (b":authority", b"good.example"), (b"host", b"GOOD.example")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/v1/x"),
         (b"host", b"good.example")],
    ]
    (head, body, _) = p.client_stream(smuggled)
    assert isinstance(head, ResponseReceived) and head.status == 400
    assert isinstance(body, DataReceived) and body.data == b"Bad Request\r\n"
    assert p.client_stream(same) == [] and p.client_stream(host_only) == []  # held upstream
    refused = [r for r in p.records if r.l7 and r.l7.http and r.l7.http.code == 400]
    assert len(refused) == 1
    assert refused[0].verdict is Verdict.DROPPED
    assert refused[0].drop_reason_desc is DropReasonDesc.PARSE_ERROR


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([(b":path", b"/v1/a"), (b":path", b"/v1/b")], "Invalid HTTP header field"),
        ([(b":path", b"/v1/a"), (b":protocol", b"x")], "Invalid HTTP header field"),
        ([], "HTTP messaging rule"),  # no :path
    ],
)
def test_a_malformed_request_is_reset_and_logged(
    fields: list[tuple[bytes, bytes]], reason: str
) -> None:
    """nghttp2 resets a malformed request (PROTOCOL_ERROR, RFC 9113 §8.1.1); the operator
    sees it in the access log as an ERROR record that says why, like an HTTP/1.1 parse error.
    The connection and its other streams go on."""
    p = Pipe(http_rules(HTTPRule(path="/v1/.*")), rules="http", handler=None)
    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"d")]
    bad = p.client.send_request([*base, *fields], end_stream=True)
    good = p.client.send_request([*base, (b":path", b"/v1/ok")], end_stream=True)
    p.pump()
    assert p.client_resets(bad) == [1]  # PROTOCOL_ERROR
    assert [r.path for r in p.upstream_requests.values()] == ["/v1/ok"]
    assert good not in p.client_resets(good)
    errors = [r for r in p.records if r.verdict is Verdict.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].drop_reason_desc is DropReasonDesc.PARSE_ERROR
    assert f"stream {bad}" in errors[0].error and reason in errors[0].error


@pytest.mark.parametrize(
    "authority", [b"evil.example@good.example", b"good.example%2e", b"good.example:+80"]
)
def test_http_rules_refuse_an_authority_http1_would_refuse(authority: bytes) -> None:
    """`:authority` (or `host`) with userinfo, a percent-escape or a bad port: servers split
    such a value differently (`evil.example@good.example` is good.example to one, matched as
    evil.example.* by a host pattern), so it is 400, as the Host field is over HTTP/1.1."""
    p = Pipe(http_rules(HTTPRule(path="/v1/.*", host="evil\\.example.*")),
             rules="http", handler=None)
    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/v1/x")]
    with_authority = p.client.send_request([*base, (b":authority", authority)], end_stream=True)
    with_host = p.client.send_request([*base, (b"host", authority)], end_stream=True)
    p.pump()
    assert p.upstream_requests == {}
    for sid in (with_authority, with_host):
        head = p.client_stream(sid)[0]
        assert isinstance(head, ResponseReceived) and head.status == 400, sid
    refused = [r for r in p.records if r.l7 and r.l7.http and r.l7.http.code == 400]
    assert [r.drop_reason_desc for r in refused] == [DropReasonDesc.PARSE_ERROR] * 2


def test_audit_mode_still_refuses_what_cannot_be_read_safely() -> None:
    """Audit forwards what the policy would deny; a path that cannot be normalized, or two
    authorities, are not policy but ambiguity, refused 400 in audit mode too (as HTTP/1.1
    refuses them whatever the mode) and recorded DROPPED, not AUDIT."""
    p = Pipe(http_rules(HTTPRule(path="/v1/.*")), rules="http", audit=True, handler=None)
    base = [(b":method", b"GET"), (b":scheme", b"http")]
    unsafe = p.client.send_request(
        [*base, (b":authority", b"d"), (b":path", b"/v1/%2e%2e/%2e%2e/etc")], end_stream=True
    )
    two = p.client.send_request(
        [*base, (b":authority", b"d"), (b":path", b"/v1/x"), (b"host", b"e")], end_stream=True
    )
    audited = p.client.send_request(
        [*base, (b":authority", b"d"), (b":path", b"/v2/x")], end_stream=True
    )
    p.pump()
    assert [r.path for r in p.upstream_requests.values()] == ["/v2/x"]  # audit forwards it
    for sid in (unsafe, two):
        head = p.client_stream(sid)[0]
        assert isinstance(head, ResponseReceived) and head.status == 400
    assert p.client_stream(audited) == []  # held upstream
    refused = [r for r in p.records if r.l7 and r.l7.http and r.l7.http.code == 400]
    assert [(r.verdict, r.drop_reason_desc) for r in refused] == [
        (Verdict.DROPPED, DropReasonDesc.PARSE_ERROR)
    ] * 2


def test_a_malformed_upstream_response_is_logged() -> None:
    """nghttp2 resets an upstream stream whose response breaks RFC 9113 (here: no :status);
    the client's stream is cancelled and the operator reads why in an ERROR record, as an
    HTTP/1.1 upstream's botched response is one."""
    p = Pipe(http_rules(HTTPRule(path="/v1/.*")), rules="http", handler=None)
    sid = p.client.send_request(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"d"), (b":path", b"/v1/x")],
        end_stream=True,
    )
    p.pump()
    (usid,) = p.upstream_requests
    p.upstream.send_headers(usid, [(b"x-no-status", b"1")], end_stream=True)
    p.pump()
    assert p.client_resets(sid) == [8]  # CANCEL
    (error,) = [r for r in p.records if r.verdict is Verdict.ERROR]
    assert error.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
    assert error.error.startswith(f"upstream stream {usid} reset with PROTOCOL_ERROR")
    assert p.engine.open_calls == 0
