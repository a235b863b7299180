"""Deny answers decoded by real clients: grpcio and curl against a loopback server whose only
HTTP/2 implementation is `H2ServerConnection` (threads here do the I/O; the wrapper stays
sans-io).

The server holds its answers until every call of the test is open on the one connection, then
denies one call and serves the others, so the deny provably leaves its siblings running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from garrison.parsers.errors import ParserError
from garrison.parsers.http2 import (
    DataReceived,
    RequestReceived,
    StreamEnded,
)
from garrison.parsers.nghttp2 import H2ServerConnection
from garrison.proxy.deny import grpc_permission_denied_headers, http2_access_denied

DOORS_PY = Path(__file__).resolve().parents[3] / "examples" / "grpc" / "doors.py"


def load_doors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doors", DOORS_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


doors = load_doors()
DENIED_GRPC = {"doors.DoorManager/GetName", "doors.DoorManager/SetAccessCode"}


class DoorServer:
    """Serves doors.DoorManager (and plain HTTP) with H2ServerConnection, one thread per
    connection. Answers wait until `hold_until` requests are open on the connection."""

    def __init__(self, hold_until: int = 1) -> None:
        self.hold_until = hold_until
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.max_open_at_answer = 0
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._stop = False
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while not self._stop:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, sock: socket.socket) -> None:
        conn = H2ServerConnection()
        requests: dict[int, RequestReceived] = {}
        bodies: dict[int, bytes] = {}
        complete: list[int] = []
        try:
            sock.sendall(conn.data_to_send())
            while True:
                data = sock.recv(65536)
                for ev in conn.receive_data(data, time.monotonic()):
                    if isinstance(ev, RequestReceived):
                        requests[ev.stream_id] = ev
                        bodies[ev.stream_id] = b""
                    elif isinstance(ev, DataReceived):
                        bodies[ev.stream_id] += ev.data
                        conn.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
                    elif isinstance(ev, StreamEnded):
                        complete.append(ev.stream_id)
                if len(requests) >= self.hold_until and complete:
                    self.max_open_at_answer = max(self.max_open_at_answer, len(conn.open_streams))
                    # Denied calls first, while their siblings are still waiting.
                    complete.sort(key=lambda sid: not self._denied(requests[sid]))
                    for sid in complete:
                        self._answer(conn, requests[sid], bodies[sid])
                    complete.clear()
                sock.sendall(conn.data_to_send())
                if not data:
                    return
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client closed first (a channel closing does): nothing left to answer
        except (OSError, ParserError) as exc:
            self.errors.append(exc)
        finally:
            sock.close()

    @staticmethod
    def _denied(req: RequestReceived) -> bool:
        if req.is_grpc:
            return req.grpc is None or f"{req.grpc.service}/{req.grpc.method}" in DENIED_GRPC
        return req.path == "/v1/secret"

    def _answer(self, conn: H2ServerConnection, req: RequestReceived, body: bytes) -> None:
        sid = req.stream_id
        if self._denied(req):
            if req.is_grpc:
                conn.send_trailers_only(sid, grpc_permission_denied_headers())
            else:
                headers, deny_body = http2_access_denied()
                conn.send_headers(sid, headers)
                conn.send_data(sid, deny_body, end_stream=True)
            return
        if not req.is_grpc:
            conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"3")])
            conn.send_data(sid, b"ok\n", end_stream=True)
            return
        assert req.grpc is not None
        (request,) = doors.unframe(body)
        method = req.grpc.method
        if method == "GetStatus":
            replies = list(doors.get_status(request, None))
        elif method == "GetLocation":
            replies = [doors.get_location(request, None)]
        else:
            raise AssertionError(f"unexpected {method}")
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        for reply in replies:
            conn.send_data(sid, doors.frame(reply))
        conn.send_trailers(sid, [(b"grpc-status", b"0")])

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        for t in self._threads:
            t.join(5)


@contextmanager
def door_server(hold_until: int = 1) -> Iterator[DoorServer]:
    server = DoorServer(hold_until)
    try:
        yield server
    finally:
        server.close()
    assert server.errors == []


def test_grpc_deny_is_permission_denied_and_siblings_succeed() -> None:
    with door_server(hold_until=3) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = doors.message((1, "front"))
            get_name = channel.unary_unary(doors.path("GetName"))
            get_location = channel.unary_unary(doors.path("GetLocation"))
            get_status = channel.unary_stream(doors.path("GetStatus"))
            denied = get_name.future(request, timeout=10)
            allowed = get_location.future(request, timeout=10)
            streaming = get_status(request, timeout=10)

            with pytest.raises(grpc.RpcError) as err:
                denied.result()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "Access denied"
            assert doors.decode(allowed.result()) == {1: b"HQ", 2: 3}
            statuses = [doors.decode(m) for m in streaming]
            assert [s.get(3, 0) for s in statuses] == [0, 1, 2]
        assert server.connections == 1
        # All three calls were open when the first answer (the deny) went out.
        assert server.max_open_at_answer == 3


def test_malformed_grpc_path_is_denied_the_grpc_way() -> None:
    with door_server() as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        bad = channel.unary_unary("/doors.DoorManager/GetName/../GetLocation")
        with pytest.raises(grpc.RpcError) as err:
            bad(doors.message((1, "front")), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def curl(url: str) -> bytes:
    # One transfer per curl: curl 7.88 fails a second stream on a reused prior-knowledge
    # connection with "Error in the HTTP2 framing layer" against any server (grpcio too).
    done = subprocess.run(
        ["curl", "--http2-prior-knowledge", "-sS", "-i", url],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl with HTTP/2 (nghttp2)")
def test_curl_sees_403_access_denied() -> None:
    with door_server() as server:
        denied = curl(f"http://127.0.0.1:{server.port}/v1/secret")
        allowed = curl(f"http://127.0.0.1:{server.port}/v1/ok")
    assert denied.startswith(b"HTTP/2 403")
    assert b"content-length: 15\r\n" in denied
    assert denied.endswith(b"\r\n\r\nAccess denied\r\n")
    assert allowed.startswith(b"HTTP/2 200")
    assert allowed.endswith(b"ok\n")
