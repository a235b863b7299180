#!/usr/bin/env python3
"""Record real HTTP/2 traffic (grpcio and curl) as test fixtures under tests/data/http2/.

A grpcio server serves the door-manager service (examples/grpc/doors.py) on 127.0.0.1; a
recording relay, also on 127.0.0.1, sits in front of it. Real clients talk through the relay:

- a grpcio channel: unary calls, concurrent unary calls, server- and client-streaming calls;
- `curl --http2-prior-knowledge`: a GET with a query string and a POST with a body (the grpcio
  server answers them as it answers any non-gRPC request).

Each scenario is one TCP connection; its two byte streams are stored unchanged:

    tests/data/http2/<scenario>.client.bin   client -> server
    tests/data/http2/<scenario>.server.bin   server -> client
    tests/data/http2/index.json              frame list and decoded header blocks per file

The index is built here with a plain frame-header reader and the `hpack` decoder, independent
of garrison's parser, so the tests can compare what the parser reports with it.

Usage: .venv/bin/python scripts/capture_http2_fixtures.py  (a few seconds)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import hpack

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "http2"
LOOPBACK = "127.0.0.1"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_TYPES = {
    0: "DATA",
    1: "HEADERS",
    2: "PRIORITY",
    3: "RST_STREAM",
    4: "SETTINGS",
    5: "PUSH_PROMISE",
    6: "PING",
    7: "GOAWAY",
    8: "WINDOW_UPDATE",
    9: "CONTINUATION",
}


def load_doors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doors", REPO / "examples/grpc/doors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- recording relay --------------------------------------------------------------------------


class RecordingRelay:
    """127.0.0.1:port → upstream; records the next accepted connection's two byte streams."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.client_bytes = bytearray()
        self.server_bytes = bytearray()
        self._pumps: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept_one, daemon=True)
        self._accepter.start()

    def _accept_one(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection((LOOPBACK, self.upstream_port))
        for src, dst, sink in (
            (client, upstream, self.client_bytes),
            (upstream, client, self.server_bytes),
        ):
            pump = threading.Thread(target=self._pump, args=(src, dst, sink), daemon=True)
            pump.start()
            self._pumps.append(pump)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, sink: bytearray) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                sink += chunk
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def finish(self, timeout: float = 10.0) -> tuple[bytes, bytes]:
        self._accepter.join(timeout)
        for pump in self._pumps:
            pump.join(timeout)
        self.listener.close()
        return bytes(self.client_bytes), bytes(self.server_bytes)


# ---- scenarios --------------------------------------------------------------------------------


def grpc_unary(doors: ModuleType, target: str) -> list[dict[str, Any]]:
    calls = []
    with grpc.insecure_channel(target) as channel:
        get_name = channel.unary_unary(doors.path("GetName"))
        get_location = channel.unary_unary(doors.path("GetLocation"))
        set_code = channel.unary_unary(doors.path("SetAccessCode"))
        reply = get_name(doors.message((1, "front")), timeout=10)
        calls.append({"method": "GetName", "reply": reply.hex()})
        reply = get_location(doors.message((1, "front")), timeout=10)
        calls.append({"method": "GetLocation", "reply": reply.hex()})
        reply = set_code(
            doors.message((1, "front"), (2, "1234")),
            timeout=10,
            metadata=(("x-request-id", "capture-1"),),
        )
        calls.append({"method": "SetAccessCode", "reply": reply.hex()})
    return calls


def grpc_concurrent(doors: ModuleType, target: str) -> list[dict[str, Any]]:
    with grpc.insecure_channel(target) as channel:
        get_name = channel.unary_unary(doors.path("GetName"))
        get_name(doors.message((1, "warmup")), timeout=10)  # connection up before the burst
        futures = [get_name.future(doors.message((1, f"d{i}")), timeout=10) for i in range(6)]
        return [{"method": "GetName", "reply": f.result().hex()} for f in futures]


def grpc_streaming(doors: ModuleType, target: str) -> list[dict[str, Any]]:
    calls = []
    with grpc.insecure_channel(target) as channel:
        get_status = channel.unary_stream(doors.path("GetStatus"))
        replies = [r.hex() for r in get_status(doors.message((1, "front")), timeout=10)]
        calls.append({"method": "GetStatus", "replies": replies})
        maintenance = channel.stream_unary(doors.path("RequestMaintenance"))
        requests = iter([doors.message((1, "front"), (2, f"hinge {i}")) for i in range(3)])
        reply = maintenance(requests, timeout=10)
        calls.append({"method": "RequestMaintenance", "reply": reply.hex()})
    return calls


def curl(*args: str) -> Callable[[ModuleType, str], list[dict[str, Any]]]:
    """curl with prior knowledge; BODY in an argument is the framed GetName request."""

    def run(doors: ModuleType, target: str) -> list[dict[str, Any]]:
        with tempfile.NamedTemporaryFile(suffix=".bin") as body:
            body.write(doors.frame(doors.message((1, "front"))))
            body.flush()
            argv = ["curl", "--http2-prior-knowledge", "-sS", "-o", "/dev/null"]
            argv += ["-w", "%{http_code}"]
            argv += [a.replace("TARGET", target).replace("BODY", body.name) for a in args]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return [{"args": list(args), "http_code": done.stdout.strip()}]

    return run


SCENARIOS: dict[str, Callable[[ModuleType, str], list[dict[str, Any]]]] = {
    "grpc_unary": grpc_unary,
    "grpc_concurrent": grpc_concurrent,
    "grpc_streaming": grpc_streaming,
    "curl_get": curl("-H", "x-door: front", "http://TARGET/v1/doors/front?verbose=1"),
    "curl_post": curl(
        "-H",
        "content-type: text/plain",
        "--data-binary",
        "open sesame",
        "http://TARGET/v1/doors/front/open",
    ),
    # curl as a bare gRPC client: a full gRPC answer from grpcio to curl's encoder.
    "curl_grpc": curl(
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        "@BODY",
        "http://TARGET/doors.DoorManager/GetName",
    ),
}


# ---- index: frames and header blocks, read without garrison -----------------------------------


def describe(data: bytes, *, client: bool) -> dict[str, Any]:
    pos = len(PREFACE) if client else 0
    frames: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    decoder = hpack.Decoder()
    pending: tuple[int, bytearray, bool] | None = None
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        payload = data[pos + 9 : pos + 9 + length]
        frames.append(
            {
                "offset": pos,
                "type": FRAME_TYPES.get(ftype, str(ftype)),
                "flags": flags,
                "stream": stream,
                "length": length,
            }
        )
        pos += 9 + length
        if ftype == 1:  # HEADERS: strip padding and priority
            body = payload
            if flags & 0x8:
                body = body[1 : len(body) - body[0]]
            if flags & 0x20:
                body = body[5:]
            pending = (stream, bytearray(body), bool(flags & 0x1))
        elif ftype == 9 and pending is not None:
            pending[1].extend(payload)
        if ftype in (1, 9) and flags & 0x4 and pending is not None:
            headers = decoder.decode(bytes(pending[1]), raw=True)
            blocks.append(
                {
                    "stream": pending[0],
                    "end_stream": pending[2],
                    "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
                }
            )
            pending = None
    assert pos == len(data), "capture ends inside a frame"
    return {"size": len(data), "frames": frames, "header_blocks": blocks}


def main() -> int:
    if shutil.which("curl") is None:
        print("curl is needed (apt-get install curl)", file=sys.stderr)
        return 1
    doors = load_doors()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([doors.handler()])
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    DATA.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "clients": {
            "grpcio": grpc.__version__,
            "curl": subprocess.run(
                ["curl", "--version"], capture_output=True, text=True, check=True
            ).stdout.split("\n")[0],
        },
        "scenarios": [],
    }
    try:
        for name, run in SCENARIOS.items():
            relay = RecordingRelay(port)
            calls = run(doors, f"{LOOPBACK}:{relay.port}")
            client_bytes, server_bytes = relay.finish()
            (DATA / f"{name}.client.bin").write_bytes(client_bytes)
            (DATA / f"{name}.server.bin").write_bytes(server_bytes)
            index["scenarios"].append(
                {
                    "name": name,
                    "calls": calls,
                    "client_file": f"{name}.client.bin",
                    "server_file": f"{name}.server.bin",
                    "client": describe(client_bytes, client=True),
                    "server": describe(server_bytes, client=False),
                }
            )
            print(f"{name}: {len(client_bytes)} bytes up, {len(server_bytes)} bytes down")
    finally:
        server.stop(None)
    (DATA / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
