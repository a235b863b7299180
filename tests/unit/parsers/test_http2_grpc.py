"""gRPC on top of the HTTP/2 wrapper: which requests are gRPC calls, what a malformed one
reports, how statuses are read, and the exact frames of the deny answers."""

from __future__ import annotations

import pytest

from garrison.parsers.grpc import GrpcCall, grpc_call, grpc_status
from garrison.parsers.http2 import (
    NeverIndexed,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection
from garrison.proxy.deny import grpc_permission_denied_headers, http2_access_denied


def pair() -> tuple[H2ClientConnection, H2ServerConnection]:
    client, server = H2ClientConnection(), H2ServerConnection()
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    server.receive_data(client.data_to_send(), 0.0)
    return client, server


def request(
    path: bytes,
    content_types: tuple[bytes, ...] = (b"application/grpc",),
    method: bytes = b"POST",
) -> RequestReceived:
    client, server = pair()
    headers = [(b":method", method), (b":scheme", b"http"), (b":path", path)]
    headers += [(b":authority", b"doors:50051"), (b"te", b"trailers")]
    headers += [(b"content-type", ct) for ct in content_types]
    client.send_request(headers, end_stream=True)
    event = server.receive_data(client.data_to_send(), 0.0)[0]
    assert isinstance(event, RequestReceived)
    return event


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/doors.DoorManager/GetName", GrpcCall("doors.DoorManager", "GetName")),
        ("/Greeter/SayHello", GrpcCall("Greeter", "SayHello")),
        ("/a.b_c.D1/_m2", GrpcCall("a.b_c.D1", "_m2")),
        ("/grpc.health.v1.Health/Check", GrpcCall("grpc.health.v1.Health", "Check")),
    ],
)
def test_well_formed_grpc_paths(path: str, expected: GrpcCall) -> None:
    assert grpc_call("POST", path) == (expected, None)


@pytest.mark.parametrize(
    "path",
    [
        "/doors.DoorManager/GetName/../SetAccessCode",
        "/doors.DoorManager/GetName?x=1",
        "/doors.DoorManager/Get%4Eame",
        "/doors.DoorManager%2FGetName",
        "//doors.DoorManager/GetName",
        "/doors.DoorManager/",
        "/doors.DoorManager",
        "/.DoorManager/GetName",
        "/doors..DoorManager/GetName",
        "/doors.DoorManager/Get-Name",
        "/1doors.DoorManager/GetName",
        "doors.DoorManager/GetName",
        "/doors.DoorManager/GetName/",
        "/doors.DoorManager/GetName\n",
        "/",
        "*",
    ],
)
def test_malformed_grpc_paths_give_a_reason(path: str) -> None:
    call, reason = grpc_call("POST", path)
    assert call is None
    assert reason is not None and "not /package.Service/Method" in reason


def test_grpc_needs_post() -> None:
    assert grpc_call("GET", "/doors.DoorManager/GetName") == (
        None,
        "gRPC request with method GET, not POST",
    )


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/grpc",
        b"application/grpc+proto",
        b"Application/GRPC+json",
        b"application/grpc-web",
    ],
)
def test_grpc_content_types(content_type: bytes) -> None:
    ev = request(b"/doors.DoorManager/GetName", (content_type,))
    assert ev.grpc == GrpcCall("doors.DoorManager", "GetName")
    assert ev.grpc_error is None
    assert ev.is_grpc


@pytest.mark.parametrize("content_types", [(), (b"application/json",), (b"text/grpc",)])
def test_not_grpc_without_a_grpc_content_type(content_types: tuple[bytes, ...]) -> None:
    ev = request(b"/doors.DoorManager/GetName", content_types)
    assert (ev.grpc, ev.grpc_error, ev.is_grpc) == (None, None, False)


def test_malformed_grpc_request_is_flagged_for_the_engine() -> None:
    ev = request(b"/doors.DoorManager/GetName?debug=1")
    assert ev.grpc is None
    assert ev.is_grpc
    assert (
        ev.grpc_error
        == "gRPC path '/doors.DoorManager/GetName?debug=1' is not /package.Service/Method"
    )


def test_two_content_types_are_malformed() -> None:
    ev = request(b"/doors.DoorManager/GetName", (b"application/grpc", b"application/json"))
    assert ev.grpc is None
    assert ev.grpc_error == "gRPC request with more than one content-type"


def test_grpc_get_is_malformed() -> None:
    ev = request(b"/doors.DoorManager/GetName", method=b"GET")
    assert ev.grpc is None and ev.is_grpc


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"0", 0),
        (b"7", 7),
        (b"16", 16),
        (None, None),
        (b"", None),
        (b"-1", None),
        (b"7a", None),
        (b"99999999999", None),
    ],
)
def test_grpc_status_values(raw: bytes | None, expected: int | None) -> None:
    assert grpc_status(raw) == expected


def frames_of(out: bytes) -> list[tuple[int, int, int, bytes]]:
    found = []
    while out:
        length = int.from_bytes(out[:3], "big")
        found.append((out[3], out[4], int.from_bytes(out[5:9], "big"), out[9 : 9 + length]))
        out = out[9 + length :]
    return found


def test_grpc_deny_is_one_headers_frame_with_end_stream() -> None:
    client, server = pair()
    grpc_headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/doors.DoorManager/SetAccessCode"),
        (b":authority", b"doors"),
        (b"content-type", b"application/grpc"),
    ]
    denied = client.send_request(grpc_headers)
    sibling = client.send_request(grpc_headers)
    client.send_data(denied, b"\x00\x00\x00\x00\x00", end_stream=True)
    server.receive_data(client.data_to_send(), 0.0)

    server.send_trailers_only(denied, grpc_permission_denied_headers())
    out = server.data_to_send()
    frames = frames_of(out)
    assert [(t, flags, sid) for t, flags, sid, _ in frames] == [(0x1, 0x4 | 0x1, denied)]

    events = client.receive_data(out, 0.0)
    assert events == [
        ResponseReceived(
            denied,
            200,
            (
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"7"),
                (b"grpc-message", b"Access denied"),
            ),
            end_stream=True,
            grpc_status=7,
        ),
        StreamEnded(denied),
    ]
    # The sibling is still open on both sides and completes normally.
    assert server.open_streams == (sibling,)
    server.send_headers(sibling, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_trailers(sibling, [(b"grpc-status", b"0")])
    events = client.receive_data(server.data_to_send(), 0.0)
    assert [type(e) for e in events] == [ResponseReceived, TrailersReceived, StreamEnded]
    assert isinstance(events[1], TrailersReceived) and events[1].grpc_status == 0


def test_http2_access_denied_answer() -> None:
    headers, body = http2_access_denied()
    assert headers[0] == (b":status", b"403")
    assert (b"content-length", b"15") in headers
    assert body == b"Access denied\r\n" and len(body) == 15
    client, server = pair()
    sid = client.send_request(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/v1/x"), (b":authority", b"a")],
        end_stream=True,
    )
    server.receive_data(client.data_to_send(), 0.0)
    server.send_headers(sid, headers)
    server.send_data(sid, body, end_stream=True)
    events = client.receive_data(server.data_to_send(), 0.0)
    assert isinstance(events[0], ResponseReceived) and events[0].status == 403
    assert b"".join(getattr(e, "data", b"") for e in events) == b"Access denied\r\n"


def test_forwarding_keeps_the_never_indexed_mark() -> None:
    """A credential the client marked never-indexed is forwarded never-indexed."""
    client, proxy_side = pair()
    upstream_side, upstream = pair()
    secret = NeverIndexed((b"authorization", b"Bearer s3cret"))
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/doors.DoorManager/GetName"),
        (b":authority", b"doors"),
        (b"content-type", b"application/grpc"),
        secret,
    ]
    client.send_request(headers, end_stream=True)
    (req, _) = proxy_side.receive_data(client.data_to_send(), 0.0)
    assert isinstance(req, RequestReceived)
    assert type(req.headers[-1]) is NeverIndexed

    upstream_side.send_request(req.headers, end_stream=True)
    wire = upstream_side.data_to_send()
    (forwarded, _) = upstream.receive_data(wire, 0.0)
    assert isinstance(forwarded, RequestReceived)
    assert forwarded.headers == req.headers
    # The receiver saw a never-indexed literal (RFC 7541 §6.2.3): no HPACK table on the
    # forwarding hop holds the credential.
    assert type(forwarded.headers[-1]) is NeverIndexed


def test_authority_falls_back_to_host_and_connect_has_no_path() -> None:
    client, server = pair()
    client.send_request(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"), (b"host", b"doors")],
        end_stream=True,
    )
    client.send_request([(b":method", b"CONNECT"), (b":authority", b"doors:443")])
    events = server.receive_data(client.data_to_send(), 0.0)
    get, connect = (e for e in events if isinstance(e, RequestReceived))
    assert (get.method, get.authority, get.path, get.scheme) == ("GET", "doors", "/x", "http")
    assert (connect.method, connect.authority, connect.path, connect.scheme) == (
        "CONNECT",
        "doors:443",
        None,
        None,
    )


@pytest.mark.parametrize("as_text", [False, True])
@pytest.mark.parametrize("plain_credential", [True, False])
def test_prevalidated_connections_send_the_same_bytes_and_never_index_credentials(
    plain_credential: bool, as_text: bool
) -> None:
    """Skipping the outbound field checks for already validated blocks changes nothing on the
    wire: a credential (marked or not by the sender) still goes out never-indexed, and
    fields given as text go out UTF-8 as h2 would send them."""
    auth = (b"authorization", b"Bearer s3cret")
    headers: list[tuple[bytes | str, bytes | str]] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/doors.DoorManager/GetName"),
        (b":authority", b"doors"),
        (b"content-type", b"application/grpc"),
        (b"cookie", b"a=b"),
        (b"x-drink", "caf\u00e9".encode()),
        auth if plain_credential else NeverIndexed(auth),
    ]
    if as_text:
        headers = [
            NeverIndexed((h[0].decode(), h[1].decode()))  # type: ignore[arg-type,union-attr]
            if isinstance(h, NeverIndexed)
            else (h[0].decode(), h[1].decode())  # type: ignore[union-attr]
            for h in headers
        ]
    wires = []
    for prevalidated in (False, True):
        client = H2ClientConnection(prevalidated_headers=prevalidated)
        server = H2ServerConnection()
        server.receive_data(client.data_to_send(), 0.0)
        client.receive_data(server.data_to_send(), 0.0)
        client.data_to_send()
        client.send_request(headers, end_stream=True)
        wire = client.data_to_send()
        wires.append(wire)
        (req, *_) = server.receive_data(wire, 0.0)
        assert isinstance(req, RequestReceived)
        sent = dict(req.headers)
        assert sent[b"authorization"] == b"Bearer s3cret"
        assert type(req.headers[-1]) is NeverIndexed  # sent never-indexed, however given
        (cookie,) = [h for h in req.headers if h[0] == b"cookie"]
        assert type(cookie) is NeverIndexed  # a short cookie too
    assert wires[0] == wires[1]


def test_prevalidated_server_sends_text_fields_as_h2_would() -> None:
    """A response (1xx, final, trailers) given as text goes out UTF-8 encoded, the same
    bytes with and without the outbound field checks."""
    blocks: list[list[tuple[bytes | str, bytes | str]]] = [
        [(":status", "103"), ("link", "</a.css>")],
        [(":status", "200"), ("content-type", "application/grpc"), ("x-drink", "caf\u00e9")],
        [("grpc-status", "0")],
    ]
    wires = []
    for prevalidated in (False, True):
        client = H2ClientConnection()
        server = H2ServerConnection(prevalidated_headers=prevalidated)
        server.receive_data(client.data_to_send(), 0.0)
        client.receive_data(server.data_to_send(), 0.0)
        request = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/a.B/C"),
            (b":authority", b"doors"),
            (b"content-type", b"application/grpc"),
        ]
        sid = client.send_request(request, end_stream=True)
        server.receive_data(client.data_to_send(), 0.0)
        server.data_to_send()
        server.send_headers(sid, blocks[0])
        server.send_headers(sid, blocks[1])
        server.send_trailers(sid, blocks[2])
        wire = server.data_to_send()
        wires.append(wire)
        events = client.receive_data(wire, 0.0)
        informational, response = [e for e in events if isinstance(e, ResponseReceived)]
        assert (informational.status, response.status) == (103, 200)
        assert (b"x-drink", "caf\u00e9".encode()) in response.headers
        (trailers,) = [e for e in events if isinstance(e, TrailersReceived)]
        assert trailers.grpc_status == 0
    assert wires[0] == wires[1]
