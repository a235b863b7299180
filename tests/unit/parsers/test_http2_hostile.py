"""A hostile peer: every attack ends in `H2Error` with the right code and a GOAWAY to send,
or in a stream-level reset; memory stays bounded over long connections.

Frames are built with hyperframe and a per-connection hpack encoder, so the bytes are exactly
what an attacker would send, including what no well-behaved library would produce.
"""

from __future__ import annotations

import gc
import tracemalloc

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.http2 import (
    H2_PREFACE,
    ConnectionClosed,
    ConnectionTerminated,
    DataReceived,
    H2Error,
    H2ErrorCode,
    H2Limits,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    starts_with_h2_preface,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection, lib

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]
RESPONSE = [(b":status", b"200")]


class Attacker:
    """A raw client: its own HPACK encoder, frames serialized by hand."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def preface(self) -> bytes:
        return H2_PREFACE + SettingsFrame(0).serialize()

    def headers(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]] = REQUEST,
        *,
        end_stream: bool = True,
        end_headers: bool = True,
    ) -> bytes:
        f = HeadersFrame(stream_id)
        f.data = self.encoder.encode(headers)
        if end_headers:
            f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f.serialize()


def frame(f: Frame, *flags: str) -> bytes:
    for flag in flags:
        f.flags.add(flag)
    return f.serialize()


def rst(stream_id: int, code: int = H2ErrorCode.CANCEL) -> bytes:
    return frame(RstStreamFrame(stream_id, error_code=code))


def data(stream_id: int, payload: bytes, *flags: str) -> bytes:
    return frame(DataFrame(stream_id, data=payload), *flags)


def frames_of(out: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame in bytes we sent."""
    found = []
    while out:
        length = int.from_bytes(out[:3], "big")
        stream = int.from_bytes(out[5:9], "big") & 0x7FFFFFFF
        found.append((out[3], out[4], stream, out[9 : 9 + length]))
        out = out[9 + length :]
    return found


def goaway_code(out: bytes) -> int:
    goaways = [p for t, _, _, p in frames_of(out) if t == 0x7]
    assert goaways, "no GOAWAY queued"
    return int.from_bytes(goaways[-1][4:8], "big")


def server(limits: H2Limits | None = None) -> tuple[H2ServerConnection, Attacker]:
    conn = H2ServerConnection(limits)
    peer = Attacker()
    assert conn.receive_data(peer.preface(), 0.0) == []
    conn.data_to_send()
    return conn, peer


def expect_error(conn: H2ServerConnection, payload: bytes, code: int, now: float = 0.0) -> H2Error:
    with pytest.raises(H2Error) as err:
        conn.receive_data(payload, now)
    assert err.value.error_code == code
    assert goaway_code(conn.data_to_send()) == code
    # The connection is over: later bytes are ignored, nothing more is sent.
    assert conn.receive_data(payload, now + 1) == []
    assert conn.data_to_send() == b""
    assert conn.terminated
    return err.value


# ---- preface and framing ----------------------------------------------------------------------


def test_bad_preface_is_protocol_error() -> None:
    conn = H2ServerConnection()
    conn.data_to_send()
    expect_error(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", H2ErrorCode.PROTOCOL_ERROR)


def test_preface_sniffing() -> None:
    assert starts_with_h2_preface(b"PRI * HT") is None
    assert starts_with_h2_preface(H2_PREFACE + b"\x00") is True
    assert starts_with_h2_preface(b"GET / HTTP/1.1\r\n") is False
    assert starts_with_h2_preface(b"") is None


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # HTTP/1.1 after the preface
        frame(PingFrame(0)),  # a valid frame, but not SETTINGS
        frame(SettingsFrame(0), "ACK"),  # an ACK cannot be the first SETTINGS
    ],
)
def test_first_frame_after_preface_must_be_settings(garbage: bytes) -> None:
    conn = H2ServerConnection()
    expect_error(conn, H2_PREFACE + garbage, H2ErrorCode.PROTOCOL_ERROR)


def test_oversized_frame_is_rejected_from_its_header_alone() -> None:
    conn, _ = server()
    header = (1 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    expect_error(conn, header, H2ErrorCode.FRAME_SIZE_ERROR)


def test_data_on_stream_zero_is_protocol_error() -> None:
    conn, _ = server()
    on_stream_zero = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"  # hyperframe refuses to build it
    expect_error(conn, on_stream_zero, H2ErrorCode.PROTOCOL_ERROR)


# ---- CONTINUATION flood, header list size -----------------------------------------------------


def continuation_block(peer: Attacker, n: int, *, last_ends: bool) -> bytes:
    out = peer.headers(1, end_headers=False)
    for i in range(n):
        flags = ("END_HEADERS",) if last_ends and i == n - 1 else ()
        out += frame(ContinuationFrame(1, data=b""), *flags)
    return out


def test_continuation_flood_is_enhance_your_calm() -> None:
    conn, peer = server(H2Limits(max_continuation_frames=16))
    expect_error(conn, continuation_block(peer, 17, last_ends=False), H2ErrorCode.ENHANCE_YOUR_CALM)


def test_continuation_flood_is_caught_across_many_small_reads() -> None:
    conn, peer = server(H2Limits(max_continuation_frames=16))
    conn.receive_data(peer.headers(1, end_headers=False), 0.0)
    empty = frame(ContinuationFrame(1, data=b""))
    for _ in range(16):
        assert conn.receive_data(empty, 0.0) == []
    expect_error(conn, empty, H2ErrorCode.ENHANCE_YOUR_CALM)


def test_header_block_within_the_continuation_limit_is_a_request() -> None:
    conn, peer = server(H2Limits(max_continuation_frames=16))
    events = conn.receive_data(continuation_block(peer, 16, last_ends=True), 0.0)
    assert isinstance(events[0], RequestReceived)


def test_oversized_header_list_is_enhance_your_calm() -> None:
    conn, peer = server(H2Limits(max_header_list_size=16_384))
    block = peer.encoder.encode([*REQUEST, (b"x-big", b"a" * 20_000)])
    first, rest = block[:16_000], block[16_000:]
    payload = frame(HeadersFrame(1, data=first), "END_STREAM")
    payload += frame(ContinuationFrame(1, data=rest), "END_HEADERS")
    expect_error(conn, payload, H2ErrorCode.ENHANCE_YOUR_CALM)


def test_limits_are_advertised_in_settings() -> None:
    conn = H2ServerConnection(
        H2Limits(max_concurrent_streams=7, max_header_list_size=9999, initial_window_size=12345)
    )
    settings = [f for f in frames_of(conn.data_to_send()) if f[0] == 0x4]
    payload = settings[0][3]
    values = {
        int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
        for i in range(0, len(payload), 6)
    }
    assert values[0x3] == 7  # MAX_CONCURRENT_STREAMS
    assert values[0x6] == 9999  # MAX_HEADER_LIST_SIZE
    assert values[0x4] == 12345  # INITIAL_WINDOW_SIZE
    assert values[0x2] == 0  # ENABLE_PUSH


# ---- streams: concurrency, rapid reset, closed streams -----------------------------------------


def test_more_streams_than_advertised_are_refused() -> None:
    """RFC 9113 §5.1.2: the stream over the limit is refused (REFUSED_STREAM, safe to retry);
    nghttp2 still decodes its header block, so the HPACK state stays in step."""
    conn, peer = server(H2Limits(max_concurrent_streams=3))
    for sid in (1, 3, 5):
        assert isinstance(conn.receive_data(peer.headers(sid), 0.0)[0], RequestReceived)
    assert conn.receive_data(peer.headers(7), 0.0) == []
    refused = [f for f in frames_of(conn.data_to_send()) if f[0] == 0x3]
    assert refused == [(0x3, 0, 7, H2ErrorCode.REFUSED_STREAM.to_bytes(4, "big"))]
    assert not conn.terminated


def test_closed_streams_free_their_slot() -> None:
    conn, peer = server(H2Limits(max_concurrent_streams=3))
    for sid in (1, 3, 5):
        conn.receive_data(peer.headers(sid), 0.0)
    conn.send_headers(1, RESPONSE, end_stream=True)
    conn.data_to_send()  # the answer is out: stream 1 is closed
    assert isinstance(conn.receive_data(peer.headers(7), 0.0)[0], RequestReceived)


def test_rapid_reset_is_enhance_your_calm() -> None:
    conn, peer = server(H2Limits(max_resets_per_second=100))
    burst = b"".join(peer.headers(sid) + rst(sid) for sid in range(1, 20_001, 2))
    err = expect_error(conn, burst, H2ErrorCode.ENHANCE_YOUR_CALM)
    assert "resets" in err.message


def test_resets_below_the_rate_are_fine_and_leave_no_state() -> None:
    limits = H2Limits(max_resets_per_second=100, max_closed_streams=256)
    conn, peer = server(limits)
    now = 0.0
    for sid in range(1, 4001, 2):
        now += 0.011  # ~90 per second
        events = conn.receive_data(peer.headers(sid, end_stream=False) + rst(sid), now)
        assert [type(e) for e in events] == [RequestReceived, StreamReset]
    assert conn.open_streams == ()
    assert len(conn._reset_ids) <= limits.max_closed_streams
    assert not conn._unacked  # (DATA payload is held in C per connection, one frame at most)


def test_data_after_end_stream_is_stream_closed() -> None:
    """nghttp2 treats DATA on a half-closed (remote) stream as a connection error
    (RFC 9113 §5.4.1 allows a stream error to be treated so)."""
    conn, peer = server()
    conn.receive_data(peer.headers(1), 0.0)  # END_STREAM: half-closed (remote)
    expect_error(conn, data(1, b"late"), H2ErrorCode.STREAM_CLOSED)


def test_data_on_a_fully_closed_stream_is_refused_with_stream_closed() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1), 0.0)
    conn.send_headers(1, RESPONSE, end_stream=True)
    conn.data_to_send()
    # A frame that may have crossed the close on the wire: ignored, the connection goes on.
    assert conn.receive_data(data(1, b"late"), 0.0) == []
    assert isinstance(conn.receive_data(peer.headers(3), 0.0)[0], RequestReceived)


def test_data_on_an_idle_stream_is_protocol_error() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1), 0.0)
    expect_error(conn, data(9, b"x"), H2ErrorCode.PROTOCOL_ERROR)


def test_ping_flood_is_enhance_your_calm() -> None:
    conn, _ = server(H2Limits(max_control_frames_per_second=50))
    pings = frame(PingFrame(0, opaque_data=b"12345678")) * 200
    expect_error(conn, pings, H2ErrorCode.ENHANCE_YOUR_CALM)


def test_pings_below_the_rate_are_answered() -> None:
    conn, _ = server(H2Limits(max_control_frames_per_second=50))
    for i in range(200):
        conn.receive_data(frame(PingFrame(0, opaque_data=b"12345678")), i * 0.05)
    acks = [f for f in frames_of(conn.data_to_send()) if f[0] == 0x6]
    assert len(acks) == 200


# ---- flow-control violations ------------------------------------------------------------------


def test_connection_window_overflow_is_flow_control_error() -> None:
    conn, _ = server()
    overflow = frame(WindowUpdateFrame(0, window_increment=2**31 - 1))
    expect_error(conn, overflow, H2ErrorCode.FLOW_CONTROL_ERROR)


def test_stream_window_overflow_resets_that_stream_only() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1) + peer.headers(3), 0.0)
    events = conn.receive_data(frame(WindowUpdateFrame(1, window_increment=2**31 - 1)), 0.0)
    assert events == [
        StreamReset(1, H2ErrorCode.FLOW_CONTROL_ERROR, remote=False, reason="Flow control error")
    ]
    conn.send_headers(3, RESPONSE, end_stream=True)  # the sibling is unaffected
    conn.send_headers(1, RESPONSE, end_stream=True)  # the reset one: silently ignored
    heads = [f for f in frames_of(conn.data_to_send()) if f[0] == 0x1]
    assert [f[2] for f in heads] == [3]


def test_data_beyond_our_window_resets_the_stream_with_flow_control_error() -> None:
    """RFC 9113 §6.9: a stream error (nghttp2's choice) or a connection error may answer it."""
    conn, peer = server(H2Limits(initial_window_size=100))
    # The smaller window binds once the peer has acknowledged our SETTINGS (RFC 9113 §6.5.3).
    conn.receive_data(frame(SettingsFrame(0), "ACK") + peer.headers(1, end_stream=False), 0.0)
    events = conn.receive_data(data(1, b"x" * 101), 0.0)
    assert events == [StreamReset(1, H2ErrorCode.FLOW_CONTROL_ERROR, remote=False)]
    sent = frames_of(conn.data_to_send())
    assert (0x3, 0, 1, H2ErrorCode.FLOW_CONTROL_ERROR.to_bytes(4, "big")) in sent


# ---- GOAWAY and end of transport --------------------------------------------------------------


def handshake(client: H2ClientConnection, server_conn: H2ServerConnection) -> None:
    while True:
        up, down = client.data_to_send(), server_conn.data_to_send()
        if not up and not down:
            return
        server_conn.receive_data(up, 0.0)
        client.receive_data(down, 0.0)


def test_graceful_goaway_from_upstream_lets_lower_streams_finish() -> None:
    client, upstream = H2ClientConnection(), H2ServerConnection()
    handshake(client, upstream)
    first = client.send_request(REQUEST, end_stream=True)
    second = client.send_request(REQUEST, end_stream=True)
    upstream.receive_data(client.data_to_send(), 0.0)
    upstream.close(H2ErrorCode.NO_ERROR, last_stream_id=first)
    upstream.send_headers(first, RESPONSE, end_stream=True)
    events = client.receive_data(upstream.data_to_send(), 0.0)
    assert events[0] == ConnectionTerminated(H2ErrorCode.NO_ERROR, first)
    assert events[1] == StreamReset(second, H2ErrorCode.REFUSED_STREAM, remote=True)
    assert isinstance(events[2], ResponseReceived)
    assert events[2].stream_id == first
    assert client.closing and not client.terminated
    assert client.available_streams == 0
    assert client.open_streams == ()
    with pytest.raises(LocalProtocolError):
        client.send_request(REQUEST)
    with pytest.raises(LocalProtocolError):
        client.send_headers(second + 2, REQUEST)


def test_error_goaway_from_peer_ends_the_connection() -> None:
    conn, _ = server()
    goaway = frame(GoAwayFrame(0, last_stream_id=0, error_code=H2ErrorCode.PROTOCOL_ERROR))
    events = conn.receive_data(goaway, 0.0)
    assert events == [ConnectionTerminated(H2ErrorCode.PROTOCOL_ERROR, 0)]
    assert conn.terminated
    assert conn.receive_data(frame(PingFrame(0)), 1.0) == []


def test_our_graceful_close_refuses_new_streams() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, end_stream=False), 0.0)
    conn.close()
    assert goaway_code(conn.data_to_send()) == H2ErrorCode.NO_ERROR
    events = conn.receive_data(peer.headers(3, end_stream=False) + data(3, b"abc"), 0.0)
    assert events == []  # above our GOAWAY's last stream: never processed (RFC 9113 §6.8)
    assert [f for f in frames_of(conn.data_to_send()) if f[0] in (0x1, 0x0)] == []
    # Stream 1 still finishes.
    events = conn.receive_data(data(1, b"body", "END_STREAM"), 0.0)
    assert isinstance(events[0], DataReceived)
    conn.send_headers(1, RESPONSE, end_stream=True)
    conn.data_to_send()
    assert conn.open_streams == ()


def test_end_of_transport_reports_unfinished_streams() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, end_stream=False) + peer.headers(3), 0.0)
    assert conn.receive_data(b"", 0.0) == [ConnectionClosed((1, 3))]
    assert conn.terminated


# ---- memory over a long connection ------------------------------------------------------------


def exchange(client: H2ClientConnection, upstream: H2ServerConnection, n: int) -> None:
    for _ in range(n):
        sid = client.send_request(REQUEST, end_stream=False)
        client.send_data(sid, b"ping", end_stream=True)
        for ev in upstream.receive_data(client.data_to_send(), 0.0):
            if isinstance(ev, DataReceived):
                upstream.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
                upstream.send_headers(ev.stream_id, RESPONSE)
                upstream.send_data(ev.stream_id, b"pong", end_stream=True)
        for ev in client.receive_data(upstream.data_to_send(), 0.0):
            if isinstance(ev, DataReceived):
                client.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)


MAX_CLOSED = 256


def test_memory_does_not_grow_with_the_number_of_streams() -> None:
    limits = H2Limits(max_closed_streams=MAX_CLOSED)
    client, upstream = H2ClientConnection(limits), H2ServerConnection(limits)
    handshake(client, upstream)
    tracemalloc.start()
    try:
        exchange(client, upstream, 2 * MAX_CLOSED)  # the closed-stream records are now full
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        exchange(client, upstream, 2_000)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 2000 more streams on each side leave (almost) nothing behind.
    assert after - before < 32 * 1024, f"grew by {after - before} bytes"
    for conn in (client, upstream):
        assert conn.open_streams == ()
        assert len(conn._reset_ids) <= limits.max_closed_streams
        assert conn._unacked == {} and conn._send == {} and not conn._sendable
        assert conn.buffered_bytes_total == 0


def test_a_huge_header_table_from_the_peer_does_not_grow_our_encoder() -> None:
    conn, peer = server()
    big_table = frame(SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 2**30}))
    conn.receive_data(big_table, 0.0)
    for sid in range(1, 121, 2):  # distinct response headers, as forwarded answers carry
        conn.receive_data(peer.headers(sid), 0.0)
        conn.send_headers(sid, [(b":status", b"200"), (b"x-request-id", b"%064d" % sid)], True)
    # 60 distinct fields of 108 bytes each: 6.5 kB if the peer's 1 GiB allowance were used.
    assert lib.nghttp2_session_get_hd_deflate_dynamic_table_size(conn._session) <= 4_096


def test_provoked_stream_errors_count_as_resets() -> None:
    """MadeYouReset: streams the peer makes *us* reset are rate-limited like its own resets."""
    conn, peer = server(H2Limits(max_resets_per_second=100))
    overflow = b"".join(
        peer.headers(sid) + frame(WindowUpdateFrame(sid, window_increment=2**31 - 1))
        for sid in range(1, 1001, 2)
    )
    err = expect_error(conn, overflow, H2ErrorCode.ENHANCE_YOUR_CALM)
    assert "resets" in err.message


def test_padding_is_credited_without_being_acknowledged() -> None:
    """`flow_controlled_length` is the payload; nghttp2 credits padding itself, so a padded
    body longer than the window flows while the engine acknowledges payload only."""
    conn, peer = server()
    conn.receive_data(frame(SettingsFrame(0), "ACK") + peer.headers(1, end_stream=False), 0.0)
    for _ in range(400):  # 400 x 1201 bytes on the wire: more than the 262144-byte window
        padded = DataFrame(1, data=b"x" * 1000, pad_length=200)
        padded.flags.add("PADDED")
        (ev,) = conn.receive_data(padded.serialize(), 0.0)
        assert ev == DataReceived(1, b"x" * 1000, 1000, False)
        conn.acknowledge_received_data(1, ev.flow_controlled_length)
        conn.data_to_send()


def test_an_upstream_answering_in_http1_is_named_as_such() -> None:
    """An HTTP/1.1-only upstream behind an h2c client: the operator reads why in the record."""
    conn = H2ClientConnection()
    conn.data_to_send()
    with pytest.raises(H2Error) as err:
        conn.receive_data(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 0.0)
    assert err.value.error_code == H2ErrorCode.PROTOCOL_ERROR
    assert str(err.value) == (
        "the peer answered in HTTP/1.x, not HTTP/2: it does not speak HTTP/2 cleartext "
        "(h2c) with prior knowledge"
    )


@pytest.mark.parametrize("split", [1, 5, 16, 200])
def test_a_client_speaking_http1_is_named_as_such(split: int) -> None:
    """HTTP/1.1 to a port that speaks HTTP/2 only (gRPC): said plainly, at any split."""
    conn = H2ServerConnection()
    conn.data_to_send()
    request = b"GET /doors HTTP/1.1\r\nHost: x\r\n\r\n"
    with pytest.raises(H2Error) as err:
        conn.receive_data(request[:split], 0.0)
        conn.receive_data(request[split:], 0.0)
    assert err.value.error_code == H2ErrorCode.PROTOCOL_ERROR
    assert str(err.value) == (
        "the peer speaks HTTP/1.x, not HTTP/2: this port takes HTTP/2 cleartext (h2c) only"
    )
    assert goaway_code(conn.data_to_send()) == H2ErrorCode.PROTOCOL_ERROR


def test_a_connection_error_keeps_nghttp2s_own_words() -> None:
    """nghttp2 says exactly what was wrong in its GOAWAY's debug data; the error (and so the
    record) says the same, not the generic 'Protocol error'."""
    conn, _ = server()
    err = expect_error(
        conn, frame(WindowUpdateFrame(0, window_increment=0)), H2ErrorCode.PROTOCOL_ERROR
    )
    assert str(err) == "WINDOW_UPDATE: window_size_increment == 0"
