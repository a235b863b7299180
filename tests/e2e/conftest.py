"""Shared end-to-end fixtures: real processes on loopback, started and stopped by PID.

For every protocol's end-to-end tests:

    def test_x(proxy_runner, deathstar):
        proxy = proxy_runner(
            protocol="http",
            policy_files=[STARWARS / "sw_l3_l4_l7_policy.yaml"],
            dst_labels="org=empire,class=deathstar",
            peers=[f"{TIEFIGHTER}/32=org=empire,class=tiefighter"],
            upstream=deathstar,
            dport=80,
        )
        ... connect to proxy.address from a source address (TIEFIGHTER) ...
        record = proxy.wait_record(lambda r: r.verdict is Verdict.DROPPED)

`proxy_runner(...)` starts `garrison proxy` as a subprocess on a free port of `listen_host`,
waits until it listens, and returns a `ProxyHandle` (address, access-log path, records, stderr,
`reload()` = SIGHUP, `stop()`); every proxy it started is stopped by PID when the test ends,
also on failure. `run_process(...)` does the same for any server (`ServerProcess`), waiting for
a TCP port to accept. `deathstar` is the Star Wars HTTP app (one per test module).

Client source addresses: bind clients to `TIEFIGHTER` (127.0.0.2) or `XWING` (127.0.0.3); the
whole 127.0.0.0/8 is local on Linux.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from garrison.flows.record import FlowRecord
from garrison.parsers.http1 import (
    BodyReceived,
    ConnectionClosed,
    HTTP1ResponseParser,
    MessageCompleted,
    ResponseReceived,
)

REPO = Path(__file__).resolve().parents[2]
STARWARS = REPO / "examples" / "starwars"
PYTHON = sys.executable
TIEFIGHTER = "127.0.0.2"
XWING = "127.0.0.3"
TIEFIGHTER_PEER = f"{TIEFIGHTER}/32=org=empire,class=tiefighter"
XWING_PEER = f"{XWING}/32=org=alliance,class=xwing"
DEATHSTAR_LABELS = "org=empire,class=deathstar"

Address = tuple[str, int]
_LISTENING = re.compile(r"listening on (\S+):(\d+) ")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepts(address: Address, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
    """SIGTERM the process by its PID, then SIGKILL if it lingers; its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


@dataclass
class ServerProcess:
    """A child process (started by a test) with its output in files."""

    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    address: Address = ("", 0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def stop(self) -> int | None:
        return stop_pid(self.proc)


def start_process(
    argv: Sequence[str], log_dir: Path, name: str, env: dict[str, str] | None = None
) -> ServerProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    with out.open("wb") as fout, err.open("wb") as ferr:
        proc = subprocess.Popen(
            list(argv), stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL, cwd=REPO,
            env={**os.environ, **(env or {})},
        )
    return ServerProcess(proc, out, err)


def wait_until(
    check: Callable[[], bool], what: str, timeout: float, proc: ServerProcess | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(
                f"{what}: the process exited with {proc.proc.returncode}:\n{proc.output()}"
            )
        time.sleep(0.02)
    extra = f"\n{proc.output()}" if proc is not None else ""
    raise AssertionError(f"{what}: not within {timeout}s{extra}")


@dataclass
class ProxyHandle:
    """A running `garrison proxy`."""

    process: ServerProcess
    address: Address
    access_log: Path
    metrics: Address | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.process.stderr.read_text(errors="replace")

    def records(self) -> list[FlowRecord]:
        """Every record in the access log so far (whole lines only)."""
        if not self.access_log.exists():
            return []
        text = self.access_log.read_text()
        lines = text.split("\n")[:-1]  # a line being written has no newline yet
        return [FlowRecord.from_json(line) for line in lines if line.strip()]

    def wait_records(
        self, predicate: Callable[[FlowRecord], bool], count: int = 1, timeout: float = 5.0
    ) -> list[FlowRecord]:
        """The matching records, once there are at least `count` of them."""
        found: list[FlowRecord] = []

        def check() -> bool:
            nonlocal found
            found = [r for r in self.records() if predicate(r)]
            return len(found) >= count

        wait_until(check, f"{count} matching access-log record(s)", timeout, self.process)
        return found

    def wait_record(
        self, predicate: Callable[[FlowRecord], bool], timeout: float = 5.0
    ) -> FlowRecord:
        return self.wait_records(predicate, 1, timeout)[-1]

    def reload(self) -> None:
        """SIGHUP: reload the policy files."""
        os.kill(self.pid, signal.SIGHUP)

    def stop(self) -> int | None:
        return self.process.stop()


def start_proxy(
    log_dir: Path,
    *,
    protocol: str,
    policy_files: Sequence[str | Path],
    dst_labels: str,
    upstream: Address,
    peers: Sequence[str] = (),
    dport: int | None = None,
    dst_namespace: str | None = None,
    listen_host: str = "127.0.0.1",
    metrics: bool = False,
    verbose: bool = True,
    extra_args: Sequence[str] = (),
    name: str = "proxy",
    timeout: float = 30.0,
) -> ProxyHandle:
    """Start `garrison proxy` on a free port of `listen_host` and wait until it listens."""
    access_log = log_dir / f"{name}-access.log"
    argv = [
        PYTHON, "-m", "garrison.cli.main", "proxy",
        "--listen", f"{listen_host}:0",
        "--upstream", f"{upstream[0]}:{upstream[1]}",
        "--protocol", protocol,
        "--dst-labels", dst_labels,
        "--access-log", str(access_log),
    ]
    for path in policy_files:
        argv += ["-f", str(path)]
    for peer in peers:
        argv += ["--peer", peer]
    if dport is not None:
        argv += ["--dport", str(dport)]
    if dst_namespace is not None:
        argv += ["--dst-namespace", dst_namespace]
    metrics_address = None
    if metrics:
        metrics_address = (listen_host, free_port(listen_host))
        argv += ["--metrics", f"{metrics_address[0]}:{metrics_address[1]}"]
    if verbose:
        argv.append("-v")
    argv += list(extra_args)
    process = start_process(argv, log_dir, name)
    bound: list[Address] = []

    def listening() -> bool:
        match = _LISTENING.search(process.stderr.read_text(errors="replace"))
        if match:
            bound.append((match.group(1), int(match.group(2))))
        return bool(match)

    try:
        wait_until(listening, "garrison proxy listening", timeout, process)
    except BaseException:
        process.stop()
        raise
    return ProxyHandle(process, bound[0], access_log, metrics_address, argv)


def start_deathstar(log_dir: Path, host: str = "127.0.0.1", timeout: float = 30.0) -> ServerProcess:
    port = free_port(host)
    process = start_process(
        [PYTHON, str(STARWARS / "deathstar.py"), "--listen", f"{host}:{port}"],
        log_dir, f"deathstar-{port}",
    )
    process.address = (host, port)
    try:
        wait_until(lambda: accepts((host, port)), "deathstar listening", timeout, process)
    except BaseException:
        process.stop()
        raise
    return process


ProxyRunner = Callable[..., ProxyHandle]


@pytest.fixture
def proxy_runner(tmp_path: Path) -> Iterator[ProxyRunner]:
    """`proxy_runner(protocol=..., policy_files=..., dst_labels=..., upstream=..., ...)`:
    start a proxy (arguments of `start_proxy`); all are stopped by PID at the end."""
    started: list[ProxyHandle] = []

    def run(**kwargs: object) -> ProxyHandle:
        kwargs.setdefault("name", f"proxy{len(started)}")
        handle = start_proxy(tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(handle)
        return handle

    try:
        yield run
    finally:
        for handle in started:
            handle.stop()


@pytest.fixture(scope="module")
def deathstar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Address]:
    """The Star Wars HTTP app on a free loopback port, for one test module."""
    process = start_deathstar(tmp_path_factory.mktemp("deathstar"))
    try:
        yield process.address
    finally:
        process.stop()


# ---- a raw HTTP/1.1 client: exact bytes out, responses framed by the project's own parser ----


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes  # as on the wire (chunk framing included)
    raw: bytes  # head and body as received

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.decode().lower() == name.lower():
                return value.decode("latin-1")
        return None


def connect(address: Address, source: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def request(method: str, path: str, host: str = "deathstar", body: bytes | None = None,
            headers: dict[str, str] | None = None, close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Reader:
    """Reads responses from a socket, in order; `methods` are the requests' methods."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = HTTP1ResponseParser()
        self.closed = False

    def read(self, methods: list[str], timeout: float = 5.0) -> list[Response]:
        for method in methods:
            self.parser.expect_response(method)
        out: list[Response] = []
        current: Response | None = None
        deadline = time.monotonic() + timeout
        while len(out) < len(methods):
            event = self.parser.next_event()
            if event is None:
                if self.closed:
                    break
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    self.closed = True
                self.parser.receive_data(data)
                continue
            if isinstance(event, ResponseReceived):
                current = Response(event.status, list(event.headers), b"", event.raw_head)
            elif isinstance(event, BodyReceived):
                assert current is not None
                current.body += event.data
                current.raw += event.data
            elif isinstance(event, MessageCompleted):
                assert current is not None
                if current.status >= 200:
                    out.append(current)
                current = None
            elif isinstance(event, ConnectionClosed):
                break
        return out

    def at_eof(self, timeout: float = 2.0) -> bool:
        """The peer closed (no more bytes) within `timeout`."""
        if self.closed:
            return True
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return data == b""


def exchange(address: Address, source: str, raw: bytes, methods: list[str],
             timeout: float = 5.0) -> list[Response]:
    with connect(address, source, timeout) as sock:
        sock.sendall(raw)
        return Reader(sock).read(methods, timeout)


def get_json(address: Address, path: str) -> Any:
    """GET straight from a server (not through the proxy)."""
    responses = exchange(address, "127.0.0.1", request("GET", path, close=True), ["GET"])
    return json.loads(responses[0].body)
