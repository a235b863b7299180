"""The HTTP/2 engine's flow control and stream resets, between two live HTTP/2 peers.

Flow control: a slow reader on either side stalls the writer on the other through the HTTP/2
windows; what the engine holds never exceeds the windows it advertised; every byte arrives,
in order, once the reader reads. Resets travel both ways and leave no state behind.
"""

from __future__ import annotations

import os

import pytest

from garrison.parsers.http2 import DataReceived, H2Limits, ResponseReceived, StreamReset
from garrison.proxy.config import ProxyConfig
from tests.unit.proxy.test_engine_h2_harness import Pipe, doors, grpc_rules

ALL = grpc_rules(None)


def big_replies(size: int, count: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def read_all(p: SlowPipe, sid: int, step: int) -> None:
    """The client peer reads `step` bytes at a time until the call ends, checking the
    engine's bound each time."""
    limits = p.config.http2
    seen = 0
    received = 0
    for _ in range(100_000):
        p.pump()
        assert (
            p.engine.buffered_bytes <= limits.initial_window_size + limits.max_buffered_per_stream
        )
        for ev in p.client_events[seen:]:
            if isinstance(ev, DataReceived) and ev.stream_id == sid:
                received += ev.flow_controlled_length
        seen = len(p.client_events)
        pending = received - p.acked
        if pending <= 0:
            if p.status(sid)[0] is not None:
                return
            raise AssertionError("stalled: nothing to read and the call is not over")
        n = min(step, pending)
        p.client.acknowledge_received_data(sid, n)
        p.acked += n
    raise AssertionError("the call never finished")


class SlowPipe(Pipe):
    acked = 0


@pytest.mark.parametrize(
    ("client_window", "size", "count"), [(16, 3_000, 4), (1_000, 20_000, 10), (65_535, 40_000, 20)]
)
def test_slow_client_stalls_the_upstream_and_gets_every_byte(
    client_window: int, size: int, count: int
) -> None:
    """The client's window never grows past its initial size, so it reads at most that much
    per round trip."""
    replies = big_replies(size, count)
    p = SlowPipe(
        ALL,
        client_limits=H2Limits(initial_window_size=client_window),
        handler=lambda m, r: replies,
        client_acks=False,
    )
    sid = p.call("GetStatus", doors.message((1, "a")))
    p.pump()
    # The engine acknowledged only what the client took: the upstream holds the rest.
    assert p.engine.buffered_bytes <= p.config.http2.initial_window_size
    if size * count > p.config.http2.initial_window_size + client_window:
        assert p.upstream.buffered_bytes_total > 0
    read_all(p, sid, step=client_window)
    assert p.replies(sid) == replies
    assert p.status(sid) == (0, None)
    assert p.engine.open_calls == 0 and p.engine.buffered_bytes == 0


def test_slow_upstream_stalls_the_client() -> None:
    """A client-streaming upload to an upstream that does not read: the engine holds no more
    than the window it advertised to the client, the rest waits in the client's own queue."""
    p = Pipe(ALL, upstream_limits=H2Limits(initial_window_size=1_000), upstream_acks=False)
    sid = p.call("RequestMaintenance", end=False)
    p.pump()
    message = doors.message((1, "x"), (2, "y" * 10_000))
    for _ in range(40):
        p.client.send_data(sid, doors.frame(message))
        p.pump()
        assert p.engine.buffered_bytes <= p.config.http2.initial_window_size
    assert p.client.buffered_bytes(sid) > 0  # the client is the one waiting
    (usid,) = p.upstream_requests
    assert len(p.upstream_bodies[usid]) == 1_000  # the upstream's window, not more
    # The upstream starts reading: everything arrives, in order.
    p.upstream_acks = True
    p.upstream.acknowledge_received_data(usid, len(p.upstream_bodies[usid]))
    p.client.send_data(sid, b"", end_stream=True)
    p.pump()
    assert doors.unframe(p.upstream_bodies[usid]) == [message] * 40
    assert p.replies(sid) == [doors.message((1, "T-1"), (2, 40))]
    assert p.engine.open_calls == 0 and p.engine.buffered_bytes == 0


def test_queue_caps_below_the_window_hold_bytes_in_the_call() -> None:
    """Caps smaller than the windows (a config a user may choose): SendBufferFullError never
    escapes, bytes wait in the call, still unacknowledged, and all arrive."""
    limits = H2Limits(
        initial_window_size=65_535, max_buffered_per_stream=1_000, max_buffered_per_connection=2_000
    )
    replies = big_replies(30_000, 4)
    p = SlowPipe(
        ALL,
        config=ProxyConfig(http2=limits),
        client_limits=H2Limits(initial_window_size=10),
        handler=lambda m, r: replies,
        client_acks=False,
    )
    sid = p.call("GetStatus", doors.message((1, "a")))
    p.pump()
    assert p.engine.buffered_bytes <= limits.initial_window_size + limits.max_buffered_per_stream
    read_all(p, sid, step=3_000)
    assert p.replies(sid) == replies
    assert p.engine.open_calls == 0


def test_concurrent_streams_share_the_connection_window() -> None:
    replies = big_replies(100_000, 3)
    p = Pipe(ALL, handler=lambda m, r: replies)
    sids = [p.call("GetStatus", doors.message((1, str(i)))) for i in range(8)]
    p.pump()
    for sid in sids:
        assert p.replies(sid) == replies
        assert p.status(sid) == (0, None)
    assert p.engine.open_calls == 0 and p.engine.buffered_bytes == 0


def test_many_sequential_calls_leave_no_state() -> None:
    p = Pipe(grpc_rules("GetName"))
    for i in range(300):
        sid = p.call("GetName" if i % 3 else "SetAccessCode", doors.message((1, str(i))))
        p.pump()
        assert p.status(sid)[0] == (0 if i % 3 else 7)
    assert p.engine.open_calls == 0 and p.engine.buffered_bytes == 0
    assert len(p.records) == 600


# ---- resets --------------------------------------------------------------------------------------


def test_client_reset_reaches_the_upstream() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    sid = p.call("RequestMaintenance", doors.message((1, "a")), end=False)
    p.pump()
    (usid,) = p.upstream_requests
    p.client.reset_stream(sid, 8)  # CANCEL, as a gRPC client cancelling or timing out
    p.pump()
    resets = [e for e in p.upstream_events if isinstance(e, StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [(usid, 8)]
    assert p.engine.open_calls == 0
    # Only the request record: a reset call gets no response record.
    assert [r.l7.type.value for r in p.records if r.l7] == ["REQUEST"]


def test_client_reset_of_a_call_waiting_for_a_stream_slot() -> None:
    p = Pipe(ALL, upstream_limits=H2Limits(max_concurrent_streams=1), handler=lambda m, r: None)
    first = p.call("GetName", doors.message((1, "a")))
    p.pump()
    waiting = p.call("GetName", doors.message((1, "b")))
    p.pump()
    assert p.engine.open_calls == 2 and len(p.upstream_requests) == 1
    p.client.reset_stream(waiting, 8)
    p.pump()
    assert p.engine.open_calls == 1
    (usid,) = p.upstream_requests
    p.upstream.send_headers(usid, [(b":status", b"200")])
    p.upstream.send_trailers(usid, [(b"grpc-status", b"0")])
    p.pump()
    assert p.status(first) == (0, None)
    assert len(p.upstream_requests) == 1  # the cancelled call never reached the upstream
    assert p.engine.open_calls == 0


@pytest.mark.parametrize("code", [2, 8, 11])
def test_upstream_reset_reaches_the_client(code: int) -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    sid = p.call("GetStatus", doors.message((1, "a")))
    p.pump()
    (usid,) = p.upstream_requests
    p.upstream.send_headers(usid, [(b":status", b"200")])
    p.upstream.reset_stream(usid, code)
    p.pump()
    assert p.client_resets(sid) == [code]
    assert p.engine.open_calls == 0


def test_upstream_answer_then_no_error_reset_reaches_the_client_in_order() -> None:
    """The upstream answers before the client finished its upload, then resets with
    NO_ERROR: the client gets the whole answer first, then the reset; its later DATA is
    discarded."""
    replies = big_replies(50_000, 2)
    p = SlowPipe(
        ALL,
        client_limits=H2Limits(initial_window_size=1_000),
        handler=lambda m, r: None,
        client_acks=False,
    )
    sid = p.call("RequestMaintenance", doors.message((1, "a")), end=False)
    p.pump()
    (usid,) = p.upstream_requests
    p.upstream.send_headers(usid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    for reply in replies:
        p.upstream.send_data(usid, doors.frame(reply))
    p.upstream.send_trailers(usid, [(b"grpc-status", b"0")])
    p.upstream.reset_stream(usid, 0)
    p.pump()
    assert p.client_resets(sid) == []  # not yet: the answer is still being written
    p.client.send_data(sid, doors.frame(doors.message((1, "late"))))
    read_all(p, sid, step=10_000)
    assert p.replies(sid) == replies
    assert p.status(sid) == (0, None)
    p.pump()
    assert p.client_resets(sid) == [0]
    assert p.engine.open_calls == 0


def test_trailers_only_error_answer_is_relayed() -> None:
    p = Pipe(ALL, handler=lambda m, r: None)
    sid = p.call("GetName", doors.message((1, "a")))
    p.pump()
    (usid,) = p.upstream_requests
    p.upstream.send_headers(
        usid,
        [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"5"),
            (b"grpc-message", b"no such door"),
        ],
        end_stream=True,
    )
    p.pump()
    assert p.status(sid) == (5, "no such door")
    first = p.client_stream(sid)[0]
    assert isinstance(first, ResponseReceived) and first.end_stream
    response = [r for r in p.records if r.is_reply]
    assert [r.l7.grpc.status for r in response if r.l7 and r.l7.grpc] == [5]
