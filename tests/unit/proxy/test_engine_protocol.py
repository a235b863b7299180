"""The one engine protocol (`garrison.proxy.engine`): events in, commands out, driven with a fake
monotonic clock (sans-io: no real clock, no sockets).

Every timer runs on the events' `mono`; the wall clock (`now`) only stamps records, so a step
of it — forwards or backwards — neither fires nor stalls a timeout. When a connection ends
without a FIN or the proxy stops, the Kafka engine's pending aggregated denials are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

from garrison.flows.record import Aggregate, Verdict
from garrison.proxy.commands import (
    ClientClosed,
    ClientData,
    Close,
    Command,
    Forward,
    Inject,
    Log,
    OpenUpstream,
    ReleaseUpstream,
    RequestWakeup,
    Side,
    Started,
    Stopping,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamData,
    Wakeup,
)
from garrison.proxy.config import Timeouts
from garrison.proxy.engine import ConnectionEngine, EventEngine
from tests.unit.proxy.test_engine_http1 import LAND, make, resp
from tests.unit.proxy.test_engine_kafka import engine as kafka_core
from tests.unit.proxy.test_engine_kafka import learnt_registry
from tests.unit.proxy.test_engine_kafka_noise import PRODUCE_ORDERS, flood

WALL = 1_800_000_000.0  # what time.time() says
MONO = 5_000.0  # what time.monotonic() says
TIMEOUTS = Timeouts(header_read=10.0, idle=60.0, upstream_reply=30.0)
GET = LAND
OK = resp()


def http_engine() -> EventEngine:
    return EventEngine(make(), TIMEOUTS, 1.0)


def wakeups(commands: Sequence[Command]) -> list[float]:
    return [c.at for c in commands if isinstance(c, RequestWakeup)]


def closes(commands: Sequence[Command]) -> list[Close]:
    return [c for c in commands if isinstance(c, Close)]


def to_client(commands: Sequence[Command]) -> bytes:
    return b"".join(
        c.data for c in commands if isinstance(c, Forward | Inject) and c.side is Side.CLIENT
    )


def test_the_event_engine_is_the_protocol_the_server_drives() -> None:
    engine: ConnectionEngine = http_engine()  # mypy checks the protocol; this, that it runs
    assert engine.handle(Started(WALL, MONO))[0] == OpenUpstream("http/1.1", pooled=True)


def test_a_head_timer_runs_on_the_monotonic_clock_whatever_the_wall_clock_does() -> None:
    engine = http_engine()
    engine.handle(Started(WALL, MONO))
    out = engine.handle(ClientData(b"POST /v1/request-landing HTTP/1.1\r\nHo", WALL, MONO + 1))
    assert wakeups(out) == []  # the start's wakeup (release timer, 1 s) comes first
    assert wakeups(engine.handle(Wakeup(WALL, MONO + 1))) == [MONO + 1 + TIMEOUTS.header_read]
    # The wall clock jumps an hour ahead: nothing runs out (a wall-clock timer fired here).
    early = engine.handle(Wakeup(WALL + 3600, MONO + 5))
    assert not closes(early)
    assert wakeups(early) == [MONO + 1 + TIMEOUTS.header_read]  # asked again, same deadline
    # The wall clock jumps back an hour: the head timer still runs out on time (a wall-clock
    # timer would have stalled for an hour).
    due = engine.handle(Wakeup(WALL - 3600, MONO + 1 + TIMEOUTS.header_read))
    assert to_client(due).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert closes(due)[-1].side is Side.BOTH
    [error] = [c.record for c in due if isinstance(c, Log)]
    assert error.verdict is Verdict.ERROR
    assert error.time == int((WALL - 3600) * 1e9)  # records keep the wall clock


def test_an_idle_pooled_client_gives_its_upstream_back_then_is_closed() -> None:
    engine = http_engine()
    engine.handle(Started(WALL, MONO))
    engine.handle(ClientData(GET, WALL, MONO))
    engine.handle(UpstreamConnected(WALL, MONO))
    out = engine.handle(UpstreamData(OK, WALL, MONO + 0.5))
    assert to_client(out) == OK
    # The release timer (1 s after the last byte) comes first ...
    release = engine.handle(Wakeup(WALL, MONO + 1.5))
    assert release == [ReleaseUpstream(True), RequestWakeup(MONO + 0.5 + TIMEOUTS.idle)]
    # ... then the idle timeout closes the connection quietly (no record).
    assert not closes(engine.handle(Wakeup(WALL, MONO + 30)))
    ended = engine.handle(Wakeup(WALL, MONO + 0.5 + TIMEOUTS.idle))
    assert [c.side for c in closes(ended)] == [Side.BOTH, Side.BOTH]
    assert not [c for c in ended if isinstance(c, Log)]


def test_a_busy_connection_asks_for_no_wakeup_per_request() -> None:
    engine = http_engine()
    engine.handle(Started(WALL, MONO))
    engine.handle(UpstreamConnected(WALL, MONO))
    asked = 0
    for n in range(100):
        asked += len(wakeups(engine.handle(ClientData(GET, WALL, MONO + n / 100))))
        asked += len(wakeups(engine.handle(UpstreamData(OK, WALL, MONO + n / 100))))
    assert asked == 0  # the wakeup asked for at the start comes first and asks again


def test_an_upstream_that_goes_silent_is_timed_out_with_504() -> None:
    engine = http_engine()
    engine.handle(Started(WALL, MONO))
    engine.handle(ClientData(GET, WALL, MONO))
    engine.handle(UpstreamConnected(WALL, MONO))
    engine.handle(Wakeup(WALL, MONO + 1))  # the start's wakeup: asks for the reply deadline
    out = engine.handle(Wakeup(WALL + 1e6, MONO + TIMEOUTS.upstream_reply))
    assert to_client(out).startswith(b"HTTP/1.1 504 ")


def test_a_connection_of_its_own_is_opened_at_once_and_ends_with_its_upstream() -> None:
    engine = EventEngine(kafka_core(PRODUCE_ORDERS), TIMEOUTS)
    assert engine.handle(Started(WALL, MONO))[0] == OpenUpstream("kafka", pooled=False)
    out = engine.handle(UpstreamClosed(WALL, MONO, reset=True))
    assert closes(out)[-1].side is Side.BOTH


def kafka_flooded(count: int) -> EventEngine:
    shared: dict[str, object] = {}
    learnt_registry(shared)
    engine = EventEngine(kafka_core(PRODUCE_ORDERS, shared=shared), TIMEOUTS)
    engine.handle(Started(WALL, MONO))
    out = engine.handle(ClientData(b"".join(flood(count)), WALL, MONO))
    assert len([c for c in out if isinstance(c, Log)]) == 2  # the first, in full
    return engine


def aggregated(commands: Sequence[Command]) -> list[Aggregate | None]:
    return [c.record.aggregate for c in commands if isinstance(c, Log)]


def test_pending_kafka_denial_counts_are_recorded_when_the_client_resets() -> None:
    engine = kafka_flooded(50)
    out = engine.handle(ClientClosed(WALL, MONO + 1, reset=True))
    assert aggregated(out) == [Aggregate(ingress_flow_count=49)] * 2
    assert engine.handle(Stopping(WALL, MONO + 2)) == ()  # once


def test_pending_kafka_denial_counts_are_recorded_when_the_proxy_stops() -> None:
    engine = kafka_flooded(7)
    assert aggregated(engine.handle(Stopping(WALL, MONO + 1))) == [
        Aggregate(ingress_flow_count=6)
    ] * 2


def test_pending_kafka_denial_counts_do_not_wait_for_a_wall_clock_stepped_back() -> None:
    engine = kafka_flooded(5)
    # The next event comes with the wall clock an hour behind: the group is recorded now
    # (it used to wait an hour, until the clock caught up with the group's first time).
    out = engine.handle(ClientData(b"".join(flood(1, first=900)), WALL - 3600, MONO + 1))
    assert aggregated(out) == [Aggregate(ingress_flow_count=4)] * 2


def test_an_idle_h2c_client_on_an_http_port_gets_the_idle_timeout_not_an_error() -> None:
    """h2c with prior knowledge hands the HTTP/1.1 engine's connection to the HTTP/2 engine.
    Once its calls are answered it is idle: closed gracefully after `idle` (GOAWAY NO_ERROR,
    no record), its upstream connection (the session's own, HPACK state and all) never given
    back to the pool meanwhile. It was timed out as a silent upstream after `upstream_reply`:
    GOAWAY INTERNAL_ERROR and an ERROR record for every idle h2c or gRPC-over-HTTP client."""
    from garrison.parsers.http2 import ConnectionTerminated, ResponseReceived, StreamEnded
    from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection

    client, upstream = H2ClientConnection(), H2ServerConnection()
    engine = http_engine()
    commands: list[Command] = list(engine.handle(Started(WALL, MONO)))
    sid = client.send_request(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"deathstar"),
         (b":path", b"/v1/request-landing")],
        end_stream=True,
    )
    commands += engine.handle(ClientData(client.data_to_send(), WALL, MONO))
    commands += engine.handle(UpstreamConnected(WALL, MONO))
    up_bytes = b"".join(
        c.data for c in commands if isinstance(c, Forward | Inject) and c.side is Side.UPSTREAM
    )
    for ev in upstream.receive_data(up_bytes, 0.0):
        if isinstance(ev, StreamEnded):
            upstream.send_headers(ev.stream_id, [(b":status", b"200")], end_stream=True)
    answered = engine.handle(UpstreamData(upstream.data_to_send(), WALL, MONO + 0.5))
    commands += answered
    got = client.receive_data(to_client(commands), 0.0)
    assert any(isinstance(e, ResponseReceived) and e.status == 200 for e in got)
    # Follow the wakeups the engine asks for, as the server would.
    pending = wakeups(commands)
    ended: list[Command] = []
    mono = MONO + 0.5
    while pending and not closes(ended):
        mono = max(mono, min(pending))
        out = list(engine.handle(Wakeup(WALL, mono)))
        assert not [c for c in out if isinstance(c, ReleaseUpstream)], "h2 upstream given back"
        ended += out
        pending = wakeups(out)
    assert mono == MONO + 0.5 + TIMEOUTS.idle  # the idle timeout, not upstream_reply
    assert not [c for c in ended if isinstance(c, Log)]  # a quiet end: no ERROR record
    goaways = [e for e in client.receive_data(to_client(ended), 0.0)
               if isinstance(e, ConnectionTerminated)]
    assert [g.error_code for g in goaways] == [0]
    assert sid == 1
