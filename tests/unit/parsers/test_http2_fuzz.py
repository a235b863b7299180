"""Hypothesis against `receive_data`: whatever the peer sends after a valid preface, the only
exception is `H2Error`, and after one the connection has a GOAWAY to send and stays quiet.

Raw bytes rarely get past the first frame header, so a second strategy builds frames with
well-formed headers and arbitrary types, flags, stream ids and payloads, mixed with real
HPACK-encoded requests, to reach the stream state machines.
"""

from __future__ import annotations

import hpack
from hyperframe.frame import HeadersFrame, SettingsFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from garrison.parsers.http2 import (
    H2_PREFACE,
    H2Error,
    H2Limits,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = H2Limits(max_concurrent_streams=8, max_continuation_frames=4, initial_window_size=4096)
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


def raw_frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream_id.to_bytes(4, "big")
    return head + payload


@st.composite
def frames(draw: st.DrawFn, encoder: hpack.Encoder) -> bytes:
    kind = draw(st.sampled_from(["raw", "raw", "raw", "request"]))
    stream_id = draw(st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]))
    if kind == "request":
        f = HeadersFrame(stream_id or 1, data=encoder.encode(REQUEST))
        for flag in draw(st.sets(st.sampled_from(["END_HEADERS", "END_STREAM", "PADDED"]))):
            f.flags.add(flag)
        return f.serialize()
    return raw_frame(
        draw(st.integers(0, 12)),
        draw(st.integers(0, 255)),
        stream_id | draw(st.sampled_from([0, 0x80000000])),  # the reserved bit
        draw(st.binary(max_size=40)),
    )


def feed_all(conn: H2ServerConnection | H2ClientConnection, chunks: list[bytes]) -> None:
    now = 0.0
    try:
        for chunk in chunks:
            now += 0.001
            conn.receive_data(chunk, now)
    except H2Error as err:
        assert err.error_code is not None
        assert conn.data_to_send()  # the GOAWAY
        assert conn.receive_data(b"\x00" * 9, now) == []
        assert conn.data_to_send() == b""
    else:
        conn.data_to_send()


def server() -> H2ServerConnection:
    conn = H2ServerConnection(LIMITS)
    conn.receive_data(H2_PREFACE + SettingsFrame(0).serialize(), 0.0)
    return conn


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=200), max_size=5))
def test_arbitrary_bytes_after_the_preface(chunks: list[bytes]) -> None:
    feed_all(server(), chunks)


@FUZZ
@given(st.data())
def test_arbitrary_frames_to_a_server(data: st.DataObject) -> None:
    encoder = hpack.Encoder()
    stream = b"".join(data.draw(st.lists(frames(encoder), max_size=12)))
    cut = data.draw(st.integers(0, len(stream)))
    feed_all(server(), [c for c in (stream[:cut], stream[cut:]) if c])


@FUZZ
@given(st.data())
def test_arbitrary_frames_to_a_client_with_requests_in_flight(data: st.DataObject) -> None:
    conn = H2ClientConnection(LIMITS)
    for _ in range(3):
        sid = conn.send_request(REQUEST)
        conn.send_data(sid, b"x" * 100)
    encoder = hpack.Encoder()
    stream = SettingsFrame(0).serialize() + b"".join(
        data.draw(st.lists(frames(encoder), max_size=12))
    )
    feed_all(conn, [stream])
