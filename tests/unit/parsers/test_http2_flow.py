"""Flow control both ways: never past the peer's window, queued bytes flushed on
WINDOW_UPDATE, hard caps on the queues, inbound windows that open only when acknowledged.

Two wrappers talk to each other (the receiving side is also h2, which would raise
FLOW_CONTROL_ERROR on a single byte past its window); frame sizes are checked on the wire.
"""

from __future__ import annotations

import pytest
from hyperframe.frame import SettingsFrame

from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.http2 import (
    DataFlushed,
    DataReceived,
    H2Event,
    H2Limits,
    RequestReceived,
    SendBufferFullError,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]
RESPONSE = [(b":status", b"200")]


def data_frame_sizes(out: bytes) -> list[int]:
    sizes = []
    while out:
        length = int.from_bytes(out[:3], "big")
        if out[3] == 0x0:
            sizes.append(length)
        out = out[9 + length :]
    return sizes


def pair(
    client_limits: H2Limits | None = None, server_limits: H2Limits | None = None
) -> tuple[H2ClientConnection, H2ServerConnection]:
    client, server = H2ClientConnection(client_limits), H2ServerConnection(server_limits)
    while True:
        up, down = client.data_to_send(), server.data_to_send()
        if not up and not down:
            return client, server
        server.receive_data(up, 0.0)
        client.receive_data(down, 0.0)


def open_stream(client: H2ClientConnection, server: H2ServerConnection) -> int:
    sid = client.send_request(REQUEST, end_stream=False)
    (req,) = server.receive_data(client.data_to_send(), 0.0)
    assert isinstance(req, RequestReceived)
    server.send_headers(sid, RESPONSE)
    client.receive_data(server.data_to_send(), 0.0)
    return sid


def body_of(events: list[H2Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def test_peer_with_tiny_window_gets_no_more_than_its_window() -> None:
    client, server = pair(client_limits=H2Limits(initial_window_size=10))
    sid = open_stream(client, server)
    payload = bytes(range(100))

    assert server.send_data(sid, payload, end_stream=True) == 10
    assert server.buffered_bytes(sid) == 90
    out = server.data_to_send()
    assert data_frame_sizes(out) == [10]

    received: list[H2Event] = []
    flushed: list[DataFlushed] = []
    while out:
        events = client.receive_data(out, 0.0)
        received += events
        for ev in events:
            if isinstance(ev, DataReceived):
                assert len(ev.data) <= 10
                client.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
        up = client.data_to_send()
        if not up:
            break
        flushed += [e for e in server.receive_data(up, 0.0) if isinstance(e, DataFlushed)]
        out = server.data_to_send()
        assert all(size <= 10 for size in data_frame_sizes(out))

    assert body_of(received, sid) == payload
    assert isinstance(received[-1], StreamEnded)
    assert sum(f.length for f in flushed) == 90
    assert flushed[-1].buffered == 0
    assert server.buffered_bytes_total == 0


def test_connection_window_is_shared_by_streams() -> None:
    client, server = pair(
        client_limits=H2Limits(initial_window_size=50_000, connection_window_size=65_535)
    )
    a, b = open_stream(client, server), open_stream(client, server)
    sent = server.send_data(a, b"a" * 50_000) + server.send_data(b, b"b" * 50_000)
    assert sent == 65_535
    assert sum(data_frame_sizes(server.data_to_send())) == 65_535
    assert server.buffered_bytes_total == 100_000 - 65_535


def test_frames_respect_the_peers_max_frame_size() -> None:
    client, server = pair()
    sid = open_stream(client, server)
    server.send_data(sid, b"x" * 100_000)
    assert max(data_frame_sizes(server.data_to_send())) == 16_384


def test_stream_queue_cap_raises_and_queues_nothing() -> None:
    client, server = pair(
        client_limits=H2Limits(initial_window_size=10),
        server_limits=H2Limits(max_buffered_per_stream=1_000),
    )
    sid = open_stream(client, server)
    assert server.send_capacity(sid) == 1_010
    assert server.send_data(sid, b"x" * 1_010) == 10
    assert server.send_capacity(sid) == 0
    with pytest.raises(SendBufferFullError):
        server.send_data(sid, b"y")
    assert server.buffered_bytes(sid) == 1_000
    # Nothing of the refused call went anywhere: the stream carries exactly 1010 bytes of x.
    client.receive_data(server.data_to_send(), 0.0)


def test_connection_queue_cap_counts_every_stream() -> None:
    client, server = pair(
        client_limits=H2Limits(initial_window_size=10),
        server_limits=H2Limits(max_buffered_per_stream=1_000, max_buffered_per_connection=1_500),
    )
    a, b = open_stream(client, server), open_stream(client, server)
    server.send_data(a, b"a" * 1_010)
    assert server.send_capacity(b) == 510
    with pytest.raises(SendBufferFullError):
        server.send_data(b, b"b" * 511)
    assert server.send_data(b, b"b" * 510) == 10
    assert server.buffered_bytes_total == 1_500


def test_trailers_wait_for_queued_data() -> None:
    client, server = pair(client_limits=H2Limits(initial_window_size=10))
    sid = open_stream(client, server)
    server.send_data(sid, b"z" * 25)
    server.send_trailers(sid, [(b"grpc-status", b"0")])
    events: list[H2Event] = []
    while down := server.data_to_send():
        new = client.receive_data(down, 0.0)
        events += new
        for ev in new:
            if isinstance(ev, DataReceived):
                client.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
        if up := client.data_to_send():
            server.receive_data(up, 0.0)
    kinds = [type(e) for e in events]
    assert kinds[-2:] == [TrailersReceived, StreamEnded]
    assert body_of(events, sid) == b"z" * 25
    with pytest.raises(LocalProtocolError):
        server.send_data(sid, b"late")


def test_reset_drops_the_queue_and_later_sends_are_ignored() -> None:
    client, server = pair(client_limits=H2Limits(initial_window_size=10))
    sid = open_stream(client, server)
    server.send_data(sid, b"q" * 500)
    client.reset_stream(sid)
    events = server.receive_data(client.data_to_send(), 0.0)
    assert events == [StreamReset(sid, 0x8, remote=True)]
    assert server.buffered_bytes_total == 0
    assert server.send_data(sid, b"more") == 0
    server.send_trailers(sid, [(b"grpc-status", b"0")])
    assert data_frame_sizes(server.data_to_send()) == [10]  # only what went before the reset


def test_inbound_window_opens_only_when_acknowledged() -> None:
    client, server = pair(server_limits=H2Limits(initial_window_size=1_000))
    sid = open_stream(client, server)
    assert client.send_data(sid, b"u" * 5_000) == 1_000
    got = server.receive_data(client.data_to_send(), 0.0)
    assert len(body_of(got, sid)) == 1_000
    # Not acknowledged: no WINDOW_UPDATE, the client stays blocked however often we talk.
    assert server.data_to_send() == b""
    assert client.buffered_bytes(sid) == 4_000
    server.acknowledge_received_data(sid, 1_000)
    flushed = client.receive_data(server.data_to_send(), 0.0)
    assert flushed == [DataFlushed(sid, 1_000, 3_000)]


def test_reset_stream_credits_its_unacknowledged_bytes_to_the_connection() -> None:
    client, server = pair(
        server_limits=H2Limits(initial_window_size=60_000, connection_window_size=65_535)
    )
    a, b = open_stream(client, server), open_stream(client, server)
    client.send_data(a, b"a" * 60_000)
    server.receive_data(client.data_to_send(), 0.0)  # never acknowledged
    assert client.send_data(b, b"b" * 10_000) == 5_535  # the connection window is nearly gone
    server.receive_data(client.data_to_send(), 0.0)
    server.acknowledge_received_data(b, 5_535)
    client.reset_stream(a)
    server.receive_data(client.data_to_send(), 0.0)  # a's 60000 bytes are credited back
    flushed = client.receive_data(server.data_to_send(), 0.0)
    assert flushed == [DataFlushed(b, 10_000 - 5_535, 0)]
    server.acknowledge_received_data(a, 60_000)  # late acknowledgement: harmless


def test_a_larger_initial_window_from_settings_flushes_queues() -> None:
    client, server = pair(client_limits=H2Limits(initial_window_size=10))
    sid = open_stream(client, server)
    server.send_data(sid, b"s" * 100)
    server.data_to_send()
    client.data_to_send()
    # INITIAL_WINDOW_SIZE grows, as a peer may send it at any time
    events = server.receive_data(SettingsFrame(0, settings={0x4: 1_000}).serialize(), 0.0)
    assert events == [DataFlushed(sid, 90, 0)]


def test_sending_on_a_stream_that_never_existed_is_a_local_error() -> None:
    _, server = pair()
    with pytest.raises(LocalProtocolError):
        server.send_data(7, b"x")
    with pytest.raises(LocalProtocolError):
        server.reset_stream(7)


def test_open_window_lets_the_peer_send_that_much_at_once() -> None:
    client, server = pair(
        server_limits=H2Limits(initial_window_size=1_000, connection_window_size=65_535)
    )
    sid = open_stream(client, server)
    server.open_window(sid, 100_000)  # a body the server will throw away as it comes
    client.receive_data(server.data_to_send(), 0.0)
    assert client.send_data(sid, b"u" * 100_000, end_stream=True) == 100_000
    got = server.receive_data(client.data_to_send(), 0.0)
    assert len(body_of(got, sid)) == 100_000
    server.send_data(sid, b"", end_stream=True)
    server.data_to_send()
    server.open_window(sid, 100_000)  # ended both ways: nothing to open
    assert server.data_to_send() == b""
