"""The HTTP/1.1 deny answers, parsed back by real clients (http.client, curl) over loopback.

A tiny engine-like server reads requests with HTTP1RequestParser and answers `/denied...` with
`http1_access_denied` (discarding the body, as the deny module tells the engine to) and
anything else with a 200 `ok`, so keep-alive and pipelining after a denial are exercised with
real client parsers.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from garrison.parsers.http1 import (
    ConnectionClosed,
    HTTP1Error,
    HTTP1RequestParser,
    MessageCompleted,
    RequestReceived,
)
from garrison.proxy.deny import HTTP1_DENIED_BODY, http1_access_denied, http1_error_response

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"


def test_exact_bytes() -> None:
    assert http1_access_denied(keep_alive=True) == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 15\r\nContent-Type: text/plain\r\n\r\n"
        b"Access denied\r\n"
    )
    assert http1_access_denied(keep_alive=False) == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 15\r\nContent-Type: text/plain\r\n"
        b"Connection: close\r\n\r\nAccess denied\r\n"
    )
    assert http1_access_denied(b"HTTP/1.0", keep_alive=True) == (
        b"HTTP/1.0 403 Forbidden\r\nContent-Length: 15\r\nContent-Type: text/plain\r\n"
        b"Connection: keep-alive\r\n\r\nAccess denied\r\n"
    )
    assert len(HTTP1_DENIED_BODY) == 15
    assert http1_error_response(400) == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n"
        b"Connection: close\r\n\r\nBad Request\r\n"
    )


def test_refuses_what_it_cannot_say() -> None:
    with pytest.raises(ValueError):
        http1_error_response(299)
    with pytest.raises(ValueError):
        http1_error_response(403)  # a denial is http1_access_denied
    with pytest.raises(ValueError):
        http1_access_denied(b"HTTP/2", keep_alive=True)


def _serve(conn: socket.socket) -> None:
    parser = HTTP1RequestParser()
    request: RequestReceived | None = None
    with conn:
        while True:
            data = conn.recv(65536)
            try:
                parser.receive_data(data)
                for event in parser.events():
                    if isinstance(event, RequestReceived):
                        request = event
                        if event.path.startswith("/denied"):
                            parser.discard_body()
                    elif isinstance(event, MessageCompleted):
                        assert request is not None
                        if request.path.startswith("/denied"):
                            answer = http1_access_denied(
                                request.version, keep_alive=request.keep_alive
                            )
                        else:
                            answer = OK
                        conn.sendall(answer)
                        if not request.keep_alive:
                            return
                    elif isinstance(event, ConnectionClosed):
                        return
            except HTTP1Error as exc:
                conn.sendall(http1_error_response(exc.status))
                return


@pytest.fixture
def server() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # wake up often to notice the end of the test
    port: int = listener.getsockname()[1]
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(timeout=5)
    listener.close()


class _Unclosable:
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def close(self) -> None:
        """http.client closes the file after each body; the next response is still to come."""


class _SharedFile:
    """Lets several http.client responses read one connection in order (pipelining)."""

    def __init__(self, stream: Any) -> None:
        self._stream = _Unclosable(stream)

    def makefile(self, *args: Any, **kwargs: Any) -> Any:
        return self._stream


def test_http_client_sees_403_access_denied(server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("PUT", "/denied/exhaust-port", body=b"x" * 100)
    response = conn.getresponse()
    assert (response.status, response.reason) == (403, "Forbidden")
    assert response.getheader("Content-Type") == "text/plain"
    assert response.read() == b"Access denied\r\n"
    assert not response.will_close
    conn.request("GET", "/v1/")  # the same connection goes on
    second = conn.getresponse()
    assert (second.status, second.read()) == (200, b"ok\n")
    conn.close()


def test_closing_denial(server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", "/denied", headers={"Connection": "close"})
    response = conn.getresponse()
    assert response.status == 403 and response.will_close
    assert response.read() == b"Access denied\r\n"
    conn.close()


def test_pipelined_denied_then_allowed(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(
            b"POST /denied HTTP/1.1\r\nHost: deathstar\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
            b"GET /v1/ HTTP/1.1\r\nHost: deathstar\r\n\r\n"
        )
        stream = sock.makefile("rb")
        first = http.client.HTTPResponse(_SharedFile(stream))  # type: ignore[arg-type]
        first.begin()
        assert (first.status, first.read()) == (403, b"Access denied\r\n")
        second = http.client.HTTPResponse(_SharedFile(stream))  # type: ignore[arg-type]
        second.begin()
        assert (second.status, second.read()) == (200, b"ok\n")


def test_http10_keep_alive_denial(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"GET /denied HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        stream = sock.makefile("rb")
        response = http.client.HTTPResponse(_SharedFile(stream))  # type: ignore[arg-type]
        response.begin()
        assert response.status == 403 and not response.will_close
        assert response.read() == b"Access denied\r\n"
        sock.sendall(b"GET /v1/ HTTP/1.0\r\n\r\n")
        again = http.client.HTTPResponse(_SharedFile(stream))  # type: ignore[arg-type]
        again.begin()
        assert again.status == 200


def test_parse_error_answer(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: deathstar\r\nX: a\r\n folded\r\n\r\n")
        stream = sock.makefile("rb")
        response = http.client.HTTPResponse(_SharedFile(stream))  # type: ignore[arg-type]
        response.begin()
        assert (response.status, response.will_close) == (400, True)
        assert response.read() == b"Bad Request\r\n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl: apt-get install curl")
def test_curl_sees_403_then_reuses_the_connection(server: int, tmp_path: Any) -> None:
    result = subprocess.run(
        [
            "curl",
            "-s",
            "--http1.1",
            "-o",
            str(tmp_path / "denied"),
            "-w",
            "%{http_code} %{num_connects}\\n",
            f"http://127.0.0.1:{server}/denied/exhaust-port",
            "-o",
            str(tmp_path / "allowed"),
            "-w",
            "%{http_code} %{num_connects}\\n",
            f"http://127.0.0.1:{server}/v1/",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert result.stdout.decode().split("\n")[:2] == ["403 1", "200 0"]
    assert (tmp_path / "denied").read_bytes() == b"Access denied\r\n"
    assert (tmp_path / "allowed").read_bytes() == b"ok\n"
