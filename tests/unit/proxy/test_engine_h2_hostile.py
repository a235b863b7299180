"""The HTTP/2 engine against hostile or broken peers, and every way a connection ends.

A peer that breaks HTTP/2 gets its GOAWAY (an Inject towards it), the other side a graceful
GOAWAY, both are closed, and one ERROR record says which side failed. Nothing is forwarded
after the error, and the engine never raises.
"""

from __future__ import annotations

import random

import hpack
import pytest

from garrison.flows.record import DropReasonDesc, FlowRecord, Verdict
from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.http2 import (
    H2_PREFACE,
    ConnectionTerminated,
    H2Limits,
    RequestReceived,
    StreamReset,
)
from garrison.proxy.commands import Close, Command, Forward, Inject, Log, Side
from tests.unit.proxy.test_engine_h2_harness import (
    NOW,
    Pipe,
    doors,
    engine,
    fixture,
    frames,
    grpc_rules,
)

ALL = grpc_rules(None)


def records(commands: list[Command]) -> list[FlowRecord]:
    return [c.record for c in commands if isinstance(c, Log)]


def goaway_code(data: bytes) -> int:
    (goaway,) = [f for f in frames(data) if f.type == "GoAway"]
    return int(goaway.payload.error_code)  # type: ignore[attr-defined]


def test_client_speaking_http1_gets_goaway_and_an_error_record() -> None:
    e = engine(ALL)
    commands = list(e.client_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", NOW))
    inject, close = commands[-2:]
    assert isinstance(inject, Inject) and inject.side is Side.CLIENT
    assert goaway_code(inject.data) == 1  # PROTOCOL_ERROR
    assert isinstance(close, Close) and close.side is Side.BOTH and close.error
    (record,) = records(commands)
    assert record.verdict is Verdict.ERROR
    assert record.drop_reason_desc is DropReasonDesc.PARSE_ERROR
    assert record.l7 is not None and record.l7.grpc is not None
    assert not [c for c in commands if isinstance(c, Forward) and c.side is Side.UPSTREAM]
    assert e.client_data(b"more", NOW) == ()  # closed: everything after is ignored


def test_client_protocol_error_mid_connection_ends_both_sides() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    sid = p.call("GetStatus", doors.message((1, "a")))
    p.pump()
    assert p.upstream_requests
    # DATA on stream 0 is a connection error.
    p.run(p.engine.client_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", NOW))
    assert p.closed is not None and p.closed.error
    client_writes = p.writes(Side.CLIENT)
    assert isinstance(client_writes[-1], Inject)
    upstream_goaway = [e for e in p.upstream_events if isinstance(e, ConnectionTerminated)]
    assert [g.error_code for g in upstream_goaway] == [0]  # graceful towards the upstream
    (error,) = [r for r in p.records if r.verdict is Verdict.ERROR]
    assert error.drop_reason_desc is DropReasonDesc.PARSE_ERROR
    assert "client" in error.error
    assert p.client_resets(sid) == []  # the stream ends with the connection, not a reset


def test_upstream_protocol_error_closes_the_client_with_goaway() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    p.call("GetName", doors.message((1, "a")))
    p.pump()
    commands = list(p.engine.upstream_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", NOW))
    p.run(commands)
    injects = [c for c in commands if isinstance(c, Inject)]
    assert [c.side for c in injects] == [Side.UPSTREAM]
    assert goaway_code(injects[0].data) == 1
    terminated = [e for e in p.client_events if isinstance(e, ConnectionTerminated)]
    assert [t.error_code for t in terminated] == [0]
    (error,) = [r for r in p.records if r.verdict is Verdict.ERROR]
    assert error.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
    assert p.closed is not None and p.closed.side is Side.BOTH and p.closed.error


def test_rapid_reset_flood_is_enhance_your_calm() -> None:
    p = Pipe(ALL, handler=lambda m, r: None, client_limits=H2Limits(max_resets_per_second=1e6))
    for _ in range(150):
        sid = p.call("GetName", doors.message((1, "a")), end=False)
        p.client.reset_stream(sid, 8)
    p.pump()
    assert p.closed is not None and p.closed.error
    terminated = [e for e in p.client_events if isinstance(e, ConnectionTerminated)]
    assert [t.error_code for t in terminated] == [11]  # ENHANCE_YOUR_CALM


def test_more_streams_than_advertised_are_refused() -> None:
    """A client that ignores our MAX_CONCURRENT_STREAMS (100), with raw frames: the first 100
    calls are forwarded, the 101st is refused (RST_STREAM REFUSED_STREAM, RFC 9113 §5.1.2)
    and never reaches the upstream."""
    e = engine(ALL)
    encoder = hpack.Encoder()
    commands = list(e.client_data(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", NOW))
    for i in range(101):
        sid = 1 + 2 * i
        block = encoder.encode(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/doors.DoorManager/GetName"),
                (b":authority", b"d"),
                (b"content-type", b"application/grpc"),
            ]
        )
        head = len(block).to_bytes(3, "big") + b"\x01\x04" + sid.to_bytes(4, "big")
        commands += e.client_data(head + block, NOW)
    assert e.open_calls == 100
    forwarded = [c for c in commands if isinstance(c, Forward) and c.side is Side.UPSTREAM]
    upstream_heads = [f for c in forwarded for f in frames(c.data) if f.type == "Headers"]
    assert len(upstream_heads) == 100
    to_client = [c for c in commands if isinstance(c, Forward | Inject) and c.side is Side.CLIENT]
    refused = [f for c in to_client for f in frames(c.data) if f.type == "RstStream"]
    assert [(f.stream_id, f.payload.error_code) for f in refused] == [(201, 7)]
    assert not any(isinstance(c, Close) for c in commands)


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    e = engine(ALL)
    good = fixture("grpc_streaming", "client")
    cut = rng.randrange(len(good))
    noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    data = good[:cut] + noise + good[cut:]
    commands: list[Command] = []
    for start in range(0, len(data), 37):
        commands += e.client_data(data[start : start + 37], NOW)
    commands += e.upstream_data(bytes(rng.randrange(256) for _ in range(64)), NOW)
    commands += e.client_eof(NOW)
    for c in commands:
        assert isinstance(c, Forward | Inject | Close | Log)
    errors = [r for r in records(commands) if r.verdict is Verdict.ERROR]
    closes = [c for c in commands if isinstance(c, Close)]
    assert len(closes) == 1
    # One record for the connection's failure; a stream the noise made malformed before
    # that has one of its own.
    assert len([r for r in errors if " stream " not in r.error]) <= 1


def test_random_upstream_bytes_never_raise() -> None:
    rng = random.Random(7)
    for _ in range(30):
        e = engine(ALL)
        e.client_data(fixture("grpc_unary", "client"), NOW)
        server = bytearray(fixture("grpc_unary", "server"))
        for _ in range(rng.randrange(1, 5)):
            server[rng.randrange(len(server))] = rng.randrange(256)
        commands = list(e.upstream_data(bytes(server), NOW))
        commands += e.upstream_eof(NOW)
        assert sum(isinstance(c, Close) for c in commands) == 1


# ---- endings ------------------------------------------------------------------------------------


def test_client_eof_closes_both_and_cancels_upstream_calls() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    p.call("GetStatus", doors.message((1, "a")))
    p.pump()
    commands = list(p.engine.client_eof(NOW))
    p.run(commands)
    assert isinstance(commands[-1], Close) and commands[-1].side is Side.BOTH
    assert not commands[-1].error
    assert [e.error_code for e in p.upstream_events if isinstance(e, ConnectionTerminated)] == [0]
    assert not [r for r in p.records if r.verdict is Verdict.ERROR]


def test_client_eof_before_anything_allowed_never_touches_the_upstream() -> None:
    e = engine(ALL)
    e.client_data(H2_PREFACE, NOW)
    commands = list(e.client_eof(NOW))
    assert commands == [Close(Side.BOTH, "client closed the connection")]


def test_upstream_eof_with_calls_in_flight_is_an_error() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    p.call("GetStatus", doors.message((1, "a")))
    p.pump()
    commands = list(p.engine.upstream_eof(NOW))
    p.run(commands)
    assert isinstance(commands[-1], Close) and commands[-1].error
    assert [e.error_code for e in p.client_events if isinstance(e, ConnectionTerminated)] == [0]
    (error,) = [r for r in p.records if r.verdict is Verdict.ERROR]
    assert error.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
    assert "1 call(s) in flight" in error.error


def test_idle_upstream_eof_is_not_an_error() -> None:
    p = Pipe(ALL)
    p.call("GetName", doors.message((1, "a")))
    p.pump()
    commands = list(p.engine.upstream_eof(NOW))
    assert isinstance(commands[-1], Close) and not commands[-1].error
    assert not records(commands)


def test_upstream_graceful_goaway_lets_calls_finish_and_sends_new_ones_elsewhere() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    sid = p.call("GetName", doors.message((1, "a")))
    p.pump()
    (usid,) = p.upstream_requests
    p.upstream.close()  # graceful GOAWAY, last stream = usid
    late = p.call("GetName", doors.message((1, "b")))  # crosses the GOAWAY on the wire
    p.pump()
    assert [e.error_code for e in p.client_events if isinstance(e, ConnectionTerminated)] == [0]
    assert p.closed is None
    p.upstream.send_headers(usid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    p.upstream.send_data(usid, doors.frame(doors.message((1, "ok"))))
    p.upstream.send_trailers(usid, [(b"grpc-status", b"0")])
    p.pump()
    assert p.status(sid) == (0, None)
    assert p.client_resets(late) == [7]  # REFUSED_STREAM: retry elsewhere
    assert len(p.upstream_requests) == 1


def test_upstream_error_goaway_closes_everything() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    p.call("GetName", doors.message((1, "a")))
    p.pump()
    p.upstream.close(error_code=2)
    p.pump()
    assert p.closed is not None and p.closed.error
    (error,) = [r for r in p.records if r.verdict is Verdict.ERROR]
    assert error.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR


def test_abort_sends_goaway_both_ways_and_logs_an_error() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    p.call("GetName", doors.message((1, "a")))
    p.pump()
    commands = list(p.engine.abort("idle timeout", NOW))
    (record,) = records(commands)
    assert record.verdict is Verdict.ERROR and record.error == "idle timeout"
    assert record.drop_reason_desc is DropReasonDesc.PROXY_ERROR
    injects = [c for c in commands if isinstance(c, Inject)]
    assert {c.side for c in injects} == {Side.CLIENT, Side.UPSTREAM}
    assert all(goaway_code(c.data) == 2 for c in injects)
    assert commands[-1] == Close(Side.BOTH, "idle timeout", error=True)
    assert p.engine.abort("again", NOW) == ()


def test_abort_before_the_upstream_exists_only_answers_the_client() -> None:
    e = engine(ALL)
    e.client_data(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", NOW)
    commands = list(e.abort("header timeout", NOW))
    assert [c.side for c in commands if isinstance(c, Inject)] == [Side.CLIENT]


def test_a_frame_the_other_side_refuses_to_send_fails_only_that_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the connection object refuses to send what is relayed (`LocalProtocolError`; h2
    validates the same way in and out, so the refusal is forced here), that call is reset
    both ways with INTERNAL_ERROR and named in an ERROR record; its siblings go on."""
    p = Pipe(ALL, handler=lambda m, r: None)
    bad = p.call("GetName", doors.message((1, "a")))
    good = p.call("GetName", doors.message((1, "b")))
    p.pump()
    usid_bad, usid_good = sorted(p.upstream_requests)
    client_side = p.engine._client  # white box: the engine's client connection
    real_send_headers = client_side.send_headers

    def refuse_for_bad(stream_id: int, *args: object, **kwargs: object) -> None:
        if stream_id == bad:
            raise LocalProtocolError("refused by h2")
        real_send_headers(stream_id, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client_side, "send_headers", refuse_for_bad)
    p.upstream.send_headers(usid_bad, [(b":status", b"200")])
    p.upstream.send_headers(
        usid_good, [(b":status", b"200"), (b"content-type", b"application/grpc")]
    )
    p.upstream.send_trailers(usid_good, [(b"grpc-status", b"0")])
    p.pump()
    assert p.client_resets(bad) == [2]
    resets = [(e.stream_id, e.error_code) for e in p.upstream_events if isinstance(e, StreamReset)]
    assert resets == [(usid_bad, 2)]
    assert p.status(good) == (0, None)
    (error,) = [r for r in p.records if r.verdict is Verdict.ERROR]
    assert error.drop_reason_desc is DropReasonDesc.PROXY_ERROR
    assert f"stream {bad}" in error.error
    assert p.closed is None
    assert p.engine.open_calls == 0


def test_an_internal_error_aborts_the_connection() -> None:
    """A bug in the engine must not leave the connection half-enforced: abort, ERROR record."""
    p = Pipe(ALL)

    def broken(*_args: object) -> None:
        raise RuntimeError("boom")

    p.engine._client_handlers[RequestReceived] = broken  # the dispatch table, not a method
    p.call("GetName", doors.message((1, "a")))
    p.pump()
    assert p.closed is not None and p.closed.error
    (error,) = [r for r in p.records if r.verdict is Verdict.ERROR]
    assert "RuntimeError: boom" in error.error
    assert not p.upstream_connected


# ---- the server's timers and policy reloads ------------------------------------------------


def test_waiting_states_for_the_servers_timers() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    assert p.engine.waiting == "head"
    hello = p.client.data_to_send()
    p.run(p.engine.client_data(hello[: len(H2_PREFACE) + 5], NOW))
    assert p.engine.waiting == "head"  # the preface alone is not a frame yet
    p.run(p.engine.client_data(hello[len(H2_PREFACE) + 5 :], NOW))
    p.pump()
    assert p.engine.waiting == "idle"
    sid = p.call("GetName", doors.message((1, "a")))
    p.pump()
    assert p.engine.waiting == "upstream"
    (usid,) = p.upstream_requests
    p.upstream.send_headers(usid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    p.upstream.send_trailers(usid, [(b"grpc-status", b"0")])
    p.pump()
    assert p.status(sid) == (0, None)
    assert p.engine.waiting == "idle"


def test_idle_timeout_closes_gracefully_without_a_record() -> None:
    p = Pipe(ALL)
    p.call("GetName", doors.message((1, "a")))
    p.pump()
    commands = list(p.engine.timeout("idle", NOW + 60))
    p.run(commands)
    assert commands[-1] == Close(Side.BOTH, "idle timeout")
    assert not records(commands)
    assert [e.error_code for e in p.client_events if isinstance(e, ConnectionTerminated)] == [0]
    assert [e.error_code for e in p.upstream_events if isinstance(e, ConnectionTerminated)] == [0]


def test_timeout_with_calls_open_is_an_error() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    p.call("GetName", doors.message((1, "a")))
    p.pump()
    commands = list(p.engine.timeout("upstream", NOW + 60))
    (record,) = records(commands)
    assert record.verdict is Verdict.ERROR and record.error == "timeout (upstream)"
    assert isinstance(commands[-1], Close) and commands[-1].error


def test_upstream_unavailable_refuses_every_stream() -> None:
    e = engine(ALL)
    commands = list(e.upstream_unavailable("connection refused", NOW))
    (record,) = records(commands)
    assert record.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
    assert "connection refused" in record.error
    (write,) = [c for c in commands if isinstance(c, Forward)]
    (goaway,) = [f for f in frames(write.data) if f.type == "GoAway"]
    assert goaway.payload.last_stream_id == 0  # type: ignore[attr-defined]
    assert commands[-1] == Close(Side.BOTH, "upstream unavailable: connection refused", error=True)


def test_policy_reload_applies_to_the_next_calls() -> None:
    p = Pipe(grpc_rules("GetName"))
    first = p.call("SetAccessCode", doors.message((1, "a")))
    p.pump()
    assert p.status(first) == (7, "Access denied")
    p.engine.update_ruleset(grpc_rules("GetName", "SetAccessCode"))
    second = p.call("SetAccessCode", doors.message((1, "a")))
    p.pump()
    assert p.status(second) == (0, None)
    p.engine.update_ruleset(grpc_rules())
    third = p.call("GetName", doors.message((1, "a")))
    p.pump()
    assert p.status(third) == (7, "Access denied")
