"""garrison.parsers.nghttp2 against h2 as an independent peer: what that peer sees on the wire."""

from __future__ import annotations

import os
import subprocess
import sys

import h2.config
import h2.connection
import h2.events
import pytest
from hpack import NeverIndexedHeaderTuple

from garrison.parsers import nghttp2_build
from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.http2 import (
    DataReceived,
    H2Error,
    H2ErrorCode,
    NeverIndexed,
    RequestReceived,
    StreamEnded,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"vault"),
    (b":path", b"/vault.Vault/Get"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def _peer() -> h2.connection.H2Connection:
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    peer.initiate_connection()
    return peer


def _exchange(peer: h2.connection.H2Connection, conn: H2ServerConnection) -> list[object]:
    events = conn.receive_data(peer.data_to_send(), 0.0)
    peer.receive_data(conn.data_to_send())
    return events


def test_the_build_is_fresh() -> None:
    assert nghttp2_build.is_fresh()


def test_a_request_arrives_as_typed_events_and_the_answer_reaches_the_peer() -> None:
    peer, conn = _peer(), H2ServerConnection()
    peer.send_headers(1, REQUEST)
    peer.send_data(1, b"\0\0\0\0\2hi", end_stream=True)
    events = _exchange(peer, conn)
    req = events[0]
    assert isinstance(req, RequestReceived) and req.grpc is not None
    assert (req.grpc.service, req.grpc.method) == ("vault.Vault", "Get")
    assert events[1:] == [DataReceived(1, b"\0\0\0\0\2hi", 7, True), StreamEnded(1)]
    conn.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    assert conn.send_data(1, b"\0\0\0\0\1x") == 6
    conn.send_trailers(1, [(b"grpc-status", b"0")])
    seen = peer.receive_data(conn.data_to_send())
    kinds = [type(e).__name__ for e in seen]
    assert kinds == ["ResponseReceived", "DataReceived", "TrailersReceived", "StreamEnded"]


def test_credentials_are_sent_never_indexed_and_the_peers_mark_is_kept() -> None:
    peer, conn = _peer(), H2ServerConnection()
    peer.send_headers(1, [*REQUEST, NeverIndexedHeaderTuple(b"x-token", b"s3cret")],
                      end_stream=True)
    (req, _ended) = _exchange(peer, conn)
    assert isinstance(req, RequestReceived)
    assert type(req.headers[-1]) is NeverIndexed  # the peer's mark, as nghttp2 reports it
    conn.send_headers(
        1,
        [(b":status", b"200"), req.headers[-1], (b"authorization", b"Basic x"),
         (b"x-plain", b"v")],
        end_stream=True,
    )
    (response, *_rest) = peer.receive_data(conn.data_to_send())
    fields = {bytes(h[0]): type(h) for h in response.headers}
    assert fields[b"x-token"] is NeverIndexedHeaderTuple
    assert fields[b"authorization"] is NeverIndexedHeaderTuple
    assert fields[b"x-plain"] is not NeverIndexedHeaderTuple


@pytest.mark.parametrize("prevalidated", [False, True])
def test_credentials_given_as_text_are_sent_never_indexed_too(prevalidated: bool) -> None:
    """Fields given as text are encoded before the never-indexed test, so a credential named
    in text is still never indexed (on both the checked and the pre-validated path)."""
    peer = _peer()
    conn = H2ServerConnection(prevalidated_headers=prevalidated)
    peer.send_headers(1, REQUEST, end_stream=True)
    _exchange(peer, conn)
    conn.send_headers(
        1,
        [(":status", "200"), ("authorization", "Basic x"), ("cookie", "a=b"), ("x-plain", "v")],
        end_stream=True,
    )
    (response, *_rest) = peer.receive_data(conn.data_to_send())
    fields = {bytes(h[0]): (type(h), bytes(h[1])) for h in response.headers}
    assert fields[b"authorization"] == (NeverIndexedHeaderTuple, b"Basic x")
    assert fields[b"cookie"] == (NeverIndexedHeaderTuple, b"a=b")  # short cookies too
    assert fields[b"x-plain"][0] is not NeverIndexedHeaderTuple


def test_a_bad_preface_is_a_typed_error_with_a_goaway() -> None:
    conn = H2ServerConnection()
    with pytest.raises(H2Error) as err:
        conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert err.value.error_code == H2ErrorCode.PROTOCOL_ERROR
    out, types = conn.data_to_send(), []
    while out:  # our SETTINGS and WINDOW_UPDATE, then the GOAWAY
        types.append(out[3])
        out = out[9 + int.from_bytes(out[:3], "big") :]
    assert types[-1] == 0x7
    assert conn.receive_data(b"more", 0.0) == []


@pytest.mark.parametrize(
    "field",
    [(b"X-Upper", b"v"), (b"x-nl", b"a\nb"), (b"x-space", b" v"), (b"connection", b"close"),
     (b"te", b"gzip")],
)
def test_blocks_that_are_not_prevalidated_are_checked_before_they_are_sent(
    field: tuple[bytes, bytes],
) -> None:
    """nghttp2 sends what it is given: an edited block (not pre-validated) is checked here."""
    client = H2ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.send_request([*REQUEST, field])
    sid = client.send_request(REQUEST)  # nothing was sent for the refused block
    assert sid == 1


def test_a_stale_build_fails_loudly_with_the_fix() -> None:
    """A binding built from other declarations is refused at import, naming the command."""
    code = (
        "import garrison.parsers.nghttp2_build as b\n"
        "b.digest = lambda: 'other'\n"
        "try:\n"
        "    import garrison.parsers.nghttp2\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "GARRISON_PURE": "1"},
    )
    assert "binding is stale" in done.stdout and "make setup" in done.stdout
