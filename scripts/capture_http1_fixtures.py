#!/usr/bin/env python3
"""Capture the raw HTTP/1.1 bytes real clients send, for the parser's fixture tests.

Starts a recording HTTP/1.1 server on 127.0.0.1 (an ephemeral port; nothing else is
contacted), runs curl (`--http1.1`) and Python's http.client / urllib against it, and writes
for each client connection:

    tests/data/http1/<name>.bin           every byte the client sent, as received
    tests/data/http1/<name>.response.bin  every byte the server answered
    tests/data/http1/fixtures.json        what the stdlib server (an independent parser) saw
                                          per request, plus the normalized path garrison must
                                          produce, written by hand below

Run: .venv/bin/python scripts/capture_http1_fixtures.py   (needs curl in PATH)
"""

from __future__ import annotations

import http.client
import io
import json
import socketserver
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "http1"


class _Tee(io.BufferedIOBase):
    """A read-side file that remembers every byte the handler consumed."""

    def __init__(self, inner: Any, record: bytearray) -> None:
        self._inner = inner
        self._record = record

    def readline(self, size: int | None = -1) -> bytes:
        data: bytes = self._inner.readline(size)
        self._record += data
        return data

    def read(self, size: int | None = -1) -> bytes:
        data: bytes = self._inner.read(size)
        self._record += data
        return data


class _WriteTee(io.BufferedIOBase):
    def __init__(self, inner: Any, record: bytearray) -> None:
        self._inner = inner
        self._record = record

    def write(self, data: Any) -> int:
        self._record += bytes(data)
        written: int = self._inner.write(data)
        return written

    def flush(self) -> None:
        self._inner.flush()


class _Connection:
    def __init__(self) -> None:
        self.received = bytearray()
        self.sent = bytearray()
        self.requests: list[dict[str, Any]] = []


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[_Connection]] = []

    def setup(self) -> None:
        super().setup()
        self.record = _Connection()
        self.connections.append(self.record)
        self.rfile = _Tee(self.rfile, self.record.received)
        self.wfile = _WriteTee(self.wfile, self.record.sent)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> tuple[bytes, bool, int | None]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return body, True, None
                body += self.rfile.read(size)
                self.rfile.read(2)
        length = self.headers.get("Content-Length")
        if length is None:
            return b"", False, None
        return self.rfile.read(int(length)), False, int(length)

    def _answer(self) -> None:
        body, chunked, length = self._read_body()
        payload = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.record.requests.append(
            {
                "method": self.command,
                "target": self.path,
                "version": self.request_version,
                "host": self.headers.get("Host"),
                "keep_alive": not self.close_connection,
                "chunked": chunked,
                "content_length": length,
                "body": body.decode("latin-1"),
                "headers": [[k, v] for k, v in self.headers.items()],
            }
        )

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _capture(server: _Server, name: str, client: str, run: Any, paths: list[str]) -> dict[str, Any]:
    before = len(_Recorder.connections)
    run()
    # The handler thread may still be finishing the connection: wait until it records it all.
    for _ in range(200):
        done = _Recorder.connections[before:]
        if done and len(done[0].requests) == len(paths):
            break
        threading.Event().wait(0.01)
    connections = _Recorder.connections[before:]
    if len(connections) != 1:
        raise SystemExit(f"{name}: expected one connection, got {len(connections)}")
    record = connections[0]
    if len(record.requests) != len(paths):
        raise SystemExit(f"{name}: expected {len(paths)} requests, got {len(record.requests)}")
    (OUT / f"{name}.bin").write_bytes(bytes(record.received))
    (OUT / f"{name}.response.bin").write_bytes(bytes(record.sent))
    for request, path in zip(record.requests, paths, strict=True):
        request["path"] = path
    return {"file": f"{name}.bin", "client": client, "requests": record.requests}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    server = _Server(("127.0.0.1", 0), _Recorder)
    port = server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    curl_version = subprocess.run(
        ["curl", "--version"], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    curl = f"curl {curl_version}"
    py = f"python {sys.version.split()[0]}"

    def run_curl(*args: str, stdin: bytes | None = None) -> Any:
        return lambda: subprocess.run(
            ["curl", "-s", "--http1.1", *args],
            input=stdin,
            capture_output=True,
            check=True,
            timeout=30,
        )

    def http_client_keepalive() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/ships?class=x-wing&page=2")
        conn.getresponse().read()
        conn.request(
            "POST",
            "/v1/request-landing",
            body=b'{"ship": "falcon"}',
            headers={"Content-Type": "application/json"},
        )
        conn.getresponse().read()
        conn.close()

    def http_client_chunked() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = iter([b"part one;", b"", b"part two"])
        conn.request("PUT", "/v1/logs", body=body, encode_chunked=True)
        conn.getresponse().read()
        conn.close()

    def urllib_get() -> None:
        with urllib.request.urlopen(f"{base}/v1/%7edroid/./specs?q=a%2fb", timeout=10) as r:
            r.read()

    fixtures = [
        _capture(server, "curl_get", curl, run_curl(f"{base}/v1/status"), ["/v1/status"]),
        _capture(
            server,
            "curl_post",
            curl,
            run_curl("-d", "hello=world&x=1", f"{base}/v1/request-landing"),
            ["/v1/request-landing"],
        ),
        _capture(
            server,
            "curl_chunked",
            curl,
            run_curl(
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                "@-",
                f"{base}/v1/upload",
                stdin=b"first line\nsecond line\n" * 40,
            ),
            ["/v1/upload"],
        ),
        _capture(
            server,
            "curl_keepalive",
            curl,
            run_curl(f"{base}/v1/a", f"{base}/v1/b?x=1"),
            ["/v1/a", "/v1/b?x=1"],
        ),
        _capture(
            server,
            "python_http_client",
            py,
            http_client_keepalive,
            ["/v1/ships?class=x-wing&page=2", "/v1/request-landing"],
        ),
        _capture(server, "python_http_client_chunked", py, http_client_chunked, ["/v1/logs"]),
        _capture(server, "python_urllib", py, urllib_get, ["/v1/~droid/specs?q=a%2Fb"]),
    ]
    server.shutdown()
    (OUT / "fixtures.json").write_text(json.dumps(fixtures, indent=2, sort_keys=True) + "\n")
    for fixture in fixtures:
        print(f"{fixture['file']}: {len(fixture['requests'])} request(s) from {fixture['client']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
