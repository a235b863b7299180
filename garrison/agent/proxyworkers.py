"""The agent's transparent proxy in several worker processes (`garrison agent --proxy-workers N`).

With N > 1 the agent does not serve its transparent listeners itself: N worker processes each
run a whole `ProxyServer` per L7 parser on the same 127.0.0.1 ports with `SO_REUSEPORT`, and
the kernel spreads the connections the datapath assigns (`bpf_sk_assign`, which selects within
a reuseport group since Linux 6.5) over them. The agent keeps the policy, the flow records and
the metrics endpoint:

- admission: a worker asks the agent for the `Admission` of each new connection (and of its
  live connections when the rule set changed) over its own unix socket pair: a request is a
  length-prefixed orjson object `{"src", "dst", "port"}`; the answer is the agent's
  `Admission`, the destination's `PeerInfo` and whether the destination is another node's
  endpoint, pickled (the agent is the worker's parent and the only other end; the agent
  itself never unpickles anything a worker sends). A worker that cannot reach the agent, or
  gets no answer within `CALL_TIMEOUT`, denies the connection with an ERROR flow record (the
  server's "policy lookup failed"), never allows it;
- ruleset changes: the agent sends every worker the new revision on a second socket pair; the
  worker has its servers re-admit their live connections (`ProxyServer.update_policy`);
- flow records: each worker sends its records back, one frame of JSON lines per event-loop
  turn, on that second socket pair; the agent decodes them (a line that is not a flow record
  is dropped and logged) and hands them to its own sink: one ring, one access log written by
  one process (no torn lines), one order, and the flow and L7 metrics counted once there;
- metrics: the per-process ones (open connections, the upstream pool, accepted connections
  per worker) live in prometheus_client multiprocess files of a per-run directory; the
  agent's endpoint serves its own metrics with those three families summed over the workers
  (`WorkersMetricsView`);
- the agent reads both sockets of every worker on its event loop, as the in-process proxy
  ran there: a thread per socket cost the agent about 100 µs more CPU per request (the
  hand-over of each message between threads);
- supervision: a thread of the agent starts the workers (`python -m
  garrison.agent.proxyworkers`, a fresh interpreter: the agent has threads, so no fork),
  restarts one that exits (0.5 s, doubling up to 30 s while restarts keep failing within
  10 s, as `garrison proxy --workers`), and stops them with the agent (SIGTERM, 5 s, SIGKILL).
  Each worker asks the kernel for SIGUSR1 when that thread ends (`PR_SET_PDEATHSIG`), so none
  outlives an agent killed with SIGKILL, and exits when its sockets to the agent close; a
  worker leaving because the agent is gone removes the run's metrics files.

While workers restart, the ports stay the agent's: it holds one bound, non-listening socket in
each reuseport group (never given a connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from garrison.flows.record import FlowDecodeError, FlowRecord
from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels
from garrison.proxy.commands import PeerInfo
from garrison.proxy.config import ProxyConfig
from garrison.proxy.metrics import (
    MetricsConfig,
    MetricsServer,
    ProxyMetrics,
    use_multiprocess,
    worker_exited,
)
from garrison.proxy.policyview import Admission
from garrison.proxy.server import FlowSink, ProxyServer, ServerSettings, install_uvloop
from garrison.proxy.sockets import listener
from garrison.proxy.workers import RESTART_MAX, schedule_restart

log = logging.getLogger("garrison.agent")

CALL_TIMEOUT = 2.0  # seconds a worker waits for an admission before it denies
START_TIMEOUT = 60.0
STOP_GRACE = 5.0
MAX_REQUEST = 4096  # bytes of one admission request (three short fields)
MAX_RECORDS_FRAME = 64 * 1024 * 1024
MAX_ANSWER = 256 * 1024 * 1024
_HEADER = struct.Struct("!I")
PR_SET_PDEATHSIG = 1
# Metric families each worker process keeps (multiprocess files); every other proxy metric
# the agent counts from the records the workers send it.
WORKER_FAMILIES = frozenset({
    "garrison_proxy_connections",
    "garrison_proxy_upstream_pool_connections",
    "garrison_proxy_accepted_connections",
})

# Kinds of frames on a worker's event socket (the first byte).
_READY = b"r"  # worker -> agent: listening
_RECORDS = b"f"  # worker -> agent: flow records, JSON lines
_REVISION = b"v"  # agent -> worker: the policy revision now


class WorkerChannelError(ConnectionError):
    """The agent's end of a worker's socket is gone or broke a frame."""


# ---- frames ----------------------------------------------------------------------------------


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise WorkerChannelError("the other end closed the socket")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, limit: int) -> bytes:
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if size > limit:
        raise WorkerChannelError(f"a frame of {size} bytes (at most {limit})")
    return _recv_exactly(sock, size)


@dataclass(frozen=True, slots=True)
class AdmissionAnswer:
    """The agent's answer for one connection: what `Agent.admit` said, who the destination
    is (for records) and whether its upstream leaves from the client's address."""

    admission: Admission
    # PeerInfo's fields: a compiled (mypyc) frozen class does not unpickle
    destination: tuple[int, Labels, str, int, str | None, str | None]
    remote: bool


# ---- the agent's side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    count: int
    ports: dict[L7Protocol, int]
    node_name: str
    redact_query_params: tuple[str, ...] = ()
    remote_endpoints: bool = False  # a cluster: ask `remote` per destination
    host: str = "127.0.0.1"


@dataclass(slots=True)
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    events: socket.socket | None = None  # the agent's end
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)


class ProxyWorkers:
    """The worker processes of the agent's transparent proxy, supervised by a thread of their
    own; their sockets are served on the agent's event loop (`loop`; without one, tests, by a
    thread per socket).

    `admit(src, dst, port)` is the agent's `PolicySource.admit`, `destination(ip, port)` its
    ipcache lookup for records, `remote(ip)` its cluster lookup, `revision()` its policy
    revision, `emit(records)` hands a worker's records to the agent's sink (on the loop).
    """

    def __init__(
        self,
        config: WorkersConfig,
        *,
        admit: Callable[[str, str, int], Admission],
        destination: Callable[[str, int], PeerInfo],
        remote: Callable[[str], bool] | None,
        revision: Callable[[], int],
        emit: Callable[[list[FlowRecord]], None],
        metrics_dir: Path,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self._admit = admit
        self._destination = destination
        self._remote = remote
        self._revision = revision
        self._emit = emit
        self.metrics_dir = metrics_dir
        self._loop = loop
        self._slots = [_Slot(i) for i in range(config.count)]
        self._reserved: list[socket.socket] = []
        self._stopping = threading.Event()
        self._wake = threading.Event()  # the supervisor has something to do now
        self._revision_pending = False
        self._supervisor: threading.Thread | None = None
        self._start_error: str | None = None
        self._started = threading.Event()

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.poll() is None]

    # -- start / stop -----------------------------------------------------------------------

    def start(self) -> None:
        """Reserve the ports, start every worker (from the supervising thread: the workers'
        parent-death signal is tied to it) and wait until each listens. Blocking."""
        if not reuseport_assign_supported():
            log.warning("Linux %s does not spread connections the datapath assigns over a "
                        "reuseport group (6.5 does): one proxy worker gets them all; upgrade "
                        "the kernel or run with --proxy-workers 1", os.uname().release)
        self.metrics_dir.mkdir(mode=0o700)
        for port in self.config.ports.values():
            self._reserved.append(
                listener(self.config.host, port, transparent=True, reuse_port=True,
                         listen=False)
            )
        self._supervisor = threading.Thread(target=self._supervise, name="proxy-workers",
                                            daemon=True)
        self._supervisor.start()
        self._started.wait()
        if self._start_error is not None:
            self.stop()
            raise OSError(self._start_error)

    def _wait_ready(self) -> str | None:
        deadline = time.monotonic() + START_TIMEOUT
        for slot in self._slots:
            while not slot.ready.wait(0.05):
                assert slot.proc is not None
                if slot.proc.poll() is not None:
                    return (f"proxy worker {slot.index} {_describe(slot.proc.returncode)} "
                            "before it listened (see its messages above)")
                if time.monotonic() > deadline:
                    return f"proxy worker {slot.index} did not listen within {START_TIMEOUT:.0f} s"
        return None

    def stop(self) -> None:
        """Stop every worker (SIGTERM: each closes its connections and sends what it owes;
        SIGKILL after `STOP_GRACE`), then the threads, the reserved ports and the metrics."""
        self._stopping.set()
        self._wake.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=STOP_GRACE + 5)
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _stop_workers(self) -> None:
        for slot in self._slots:
            if slot.proc is not None and slot.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for slot in self._slots:
            proc = slot.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("proxy worker %d (pid %d) did not stop within %.1f s: killed",
                          slot.index, proc.pid, STOP_GRACE)
                proc.kill()
                proc.wait()
            self._forget(slot)

    # -- supervising ------------------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            for slot in self._slots:
                self._spawn(slot)
            self._start_error = self._wait_ready()
        except OSError as exc:
            self._start_error = f"cannot start the proxy workers: {exc}"
        self._started.set()
        if self._start_error is not None:
            self._stop_workers()
            return
        while True:
            self._wake.wait(0.05)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._tick()
            except Exception:  # the workers depend on this thread: it must go on
                log.exception("supervising the proxy workers failed; going on")
        self._stop_workers()

    def _tick(self) -> None:
        """Send a pending revision, notice exited workers, restart those due."""
        if self._revision_pending:
            self._revision_pending = False
            self._send_revision()
        now = time.monotonic()
        for slot in self._slots:
            proc = slot.proc
            if proc is not None and proc.poll() is not None:
                self._forget(slot)
                delay = schedule_restart(slot, now)
                log.error("proxy worker %d (pid %d) %s; restarting it in %.1f s",
                          slot.index, proc.pid, _describe(proc.returncode), delay)
            elif proc is None and slot.restart_at and now >= slot.restart_at:
                try:
                    self._spawn(slot)
                except OSError as exc:
                    log.error("proxy worker %d: cannot start it again: %s", slot.index, exc)
                    slot.restart_at = now + RESTART_MAX
                    continue
                assert slot.proc is not None
                log.info("proxy worker %d restarted (pid %d)", slot.index, slot.proc.pid)

    def _spawn(self, slot: _Slot) -> None:
        calls_agent, calls_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        events_agent, events_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = {
            "index": slot.index,
            "parent": os.getpid(),
            "calls_fd": calls_worker.fileno(),
            "events_fd": events_worker.fileno(),
            "ports": {proto.value: port for proto, port in self.config.ports.items()},
            "host": self.config.host,
            "node_name": self.config.node_name,
            "redact_query_params": list(self.config.redact_query_params),
            "remote_endpoints": self.config.remote_endpoints,
            "metrics_dir": str(self.metrics_dir),
        }
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "garrison.agent.proxyworkers", orjson.dumps(spec).decode()],
                pass_fds=(calls_worker.fileno(), events_worker.fileno()),
                stdin=subprocess.DEVNULL, env=env,
            )
        except BaseException:
            for sock in (calls_agent, calls_worker, events_agent, events_worker):
                sock.close()
            raise
        calls_worker.close()
        events_worker.close()
        slot.proc = proc
        slot.events = events_agent
        slot.started = time.monotonic()
        slot.restart_at = 0.0
        slot.ready.clear()
        if self._loop is None:  # no event loop (tests): a thread per socket
            threading.Thread(target=self._serve_calls, args=(slot, calls_agent),
                             name=f"proxy-worker-{slot.index}-calls", daemon=True).start()
            threading.Thread(target=self._read_events, args=(slot, events_agent),
                             name=f"proxy-worker-{slot.index}-events", daemon=True).start()
        else:
            calls = _FrameReader(slot, calls_agent, self._loop, MAX_REQUEST, self._on_call)
            events = _FrameReader(slot, events_agent, self._loop, MAX_RECORDS_FRAME,
                                  self._on_events)
            self._loop.call_soon_threadsafe(calls.start)
            self._loop.call_soon_threadsafe(events.start)

    def _on_call(self, reader: _FrameReader, frames: list[bytes]) -> None:
        for request in frames:
            payload = self.answer(reader.slot.index, request)
            if payload is None:
                reader.close()
                return
            try:  # the worker waits for it: its socket takes it at once
                send_frame(reader.sock, payload)
            except OSError:
                reader.close()
                return

    def _on_events(self, reader: _FrameReader, frames: list[bytes]) -> None:
        records: list[FlowRecord] = []
        for frame in frames:
            kind, body = frame[:1], frame[1:]
            if kind == _READY:
                reader.slot.ready.set()
            elif kind == _RECORDS:
                records += _decode_records(reader.slot.index, body)
        if records:
            self._emit(records)

    def _forget(self, slot: _Slot) -> None:
        if slot.proc is not None:
            with contextlib.suppress(OSError):
                worker_exited(slot.proc.pid, self.metrics_dir)
        if slot.events is not None:
            with contextlib.suppress(OSError):
                slot.events.shutdown(socket.SHUT_RDWR)
        slot.proc = None
        slot.events = None

    # -- serving one worker -----------------------------------------------------------------

    def _serve_calls(self, slot: _Slot, sock: socket.socket) -> None:
        """Answer the worker's admission requests until its socket closes. A request that is
        not one (the worker parses hostile traffic) ends the channel: the worker then denies
        everything until it is restarted."""
        with sock:
            while True:
                try:
                    request = recv_frame(sock, MAX_REQUEST)
                except (OSError, WorkerChannelError):
                    return
                payload = self.answer(slot.index, request)
                if payload is None:
                    return
                try:
                    send_frame(sock, payload)
                except OSError:
                    return

    def answer(self, index: int, request: bytes) -> bytes | None:
        """The answer to one admission request of worker `index`: the pickled
        `AdmissionAnswer`, b"" when the agent could not answer (the worker denies), None
        when the request is not one (the channel is closed)."""
        try:
            src, dst, port = _parse_request(request)
            peer = self._destination(dst, port)
            answer = AdmissionAnswer(
                self._admit(src, dst, port),
                (peer.identity, peer.labels, peer.ip, peer.port, peer.namespace, peer.pod_name),
                bool(self._remote(dst)) if self._remote is not None else False,
            )
            return pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except ValueError as exc:
            log.error("proxy worker %d sent a bad admission request (%s): its channel is "
                      "closed, it denies until restarted", index, exc)
            return None
        except Exception:
            log.exception("admission for proxy worker %d failed", index)
            return b""

    def _read_events(self, slot: _Slot, sock: socket.socket) -> None:
        with sock:
            while True:
                try:
                    frame = recv_frame(sock, MAX_RECORDS_FRAME)
                except (OSError, WorkerChannelError):
                    return
                kind, body = frame[:1], frame[1:]
                if kind == _READY:
                    slot.ready.set()
                elif kind == _RECORDS:
                    records = _decode_records(slot.index, body)
                    if records:
                        self._emit(records)

    def policy_changed(self) -> None:
        """The policy changed: the supervising thread tells every worker (the agent calls
        this holding its lock, which a worker's admission may be waiting for)."""
        self._revision_pending = True
        self._wake.set()

    def _send_revision(self) -> None:
        frame = _HEADER.pack(len(_REVISION) + 20) + _REVISION + b"%20d" % self._revision()
        for slot in self._slots:
            sock, proc = slot.events, slot.proc
            if sock is None or proc is None:
                continue
            try:
                with slot.send_lock:
                    sent = sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                continue  # the worker is gone: restarted with the revision in force
            if sent != len(frame):  # it has not read its socket for thousands of changes
                log.error("proxy worker %d (pid %d) does not take policy changes: restarted",
                          slot.index, proc.pid)
                proc.kill()


class _FrameReader:
    """One of a worker's sockets, read on the agent's event loop: its whole frames go to
    `handle(reader, frames)` on the loop (no thread hand-over per message). The socket stays
    blocking for the agent's sends (answers the worker is waiting for, which its socket
    takes at once); reads never wait (MSG_DONTWAIT)."""

    def __init__(self, slot: _Slot, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 limit: int, handle: Callable[[_FrameReader, list[bytes]], None]) -> None:
        self.slot = slot
        self.sock = sock
        self._loop = loop
        self._limit = limit
        self._handle = handle
        self._buffer = bytearray()
        self._closed = False

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if size > self._limit:
                log.error("proxy worker %d sent a frame of %d bytes (at most %d): its channel "
                          "is closed", self.slot.index, size, self._limit)
                self.close()
                return
            if len(buffer) < _HEADER.size + size:
                break
            frames.append(bytes(buffer[_HEADER.size:_HEADER.size + size]))
            del buffer[:_HEADER.size + size]
        if frames:
            self._handle(self, frames)


def reuseport_assign_supported(release: str | None = None) -> bool:
    """Linux 6.5 and later select within a reuseport group for `bpf_sk_assign`."""
    found = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (6, 5)


def _parse_request(data: bytes) -> tuple[str, str, int]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    src, dst, port = obj.get("src"), obj.get("dst"), obj.get("port")
    if not (isinstance(src, str) and isinstance(dst, str) and isinstance(port, int)
            and 0 <= port <= 65535 and len(src) <= 64 and len(dst) <= 64):
        raise ValueError("expected {src: IP, dst: IP, port: 0..65535}")
    return src, dst, port


def _decode_records(index: int, body: bytes) -> list[FlowRecord]:
    records: list[FlowRecord] = []
    for line in body.split(b"\n"):
        if not line:
            continue
        try:
            records.append(FlowRecord.from_json(line))
        except (FlowDecodeError, ValueError, TypeError, KeyError) as exc:
            log.error("proxy worker %d sent a line that is not a flow record (%s): dropped",
                      index, exc)
    return records


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "is running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def new_metrics_dir() -> Path:
    """A name for the workers' metrics files, made by `ProxyWorkers.start` (nothing is left
    in /tmp when the agent fails before it starts them)."""
    return Path(tempfile.gettempdir()) / f"garrison-agent-proxy-metrics-{secrets.token_hex(8)}"


class WorkersMetricsView:
    """The agent's metrics with the per-process proxy families (`WORKER_FAMILIES`) summed
    over the workers' multiprocess files instead of the agent's own (unused) ones."""

    def __init__(self, own: CollectorRegistry, directory: Path) -> None:
        self._own = own
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        for metric in self._own.collect():
            if metric.name not in WORKER_FAMILIES:
                yield metric
        if not self._directory.is_dir():  # no worker started yet
            return
        summed: list[Metric] = []
        for attempt in range(5):
            try:
                workers = MultiProcessCollector(None, path=str(self._directory))  # type: ignore[no-untyped-call]
                summed = list(workers.collect())  # type: ignore[no-untyped-call]
                break
            except (OSError, ValueError):  # a worker's file came or went while it was read
                if attempt == 4:
                    return
                time.sleep(0.02)
        for metric in summed:
            if metric.name in WORKER_FAMILIES:
                yield metric


def serve_metrics(host: str, port: int, own: CollectorRegistry, directory: Path) -> MetricsServer:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkersMetricsView(own, directory))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)


# ---- the worker's side -----------------------------------------------------------------------


class AgentPolicy:
    """A worker's `PolicySource`: each admission asked of the agent, synchronously (the
    server admits in `connection_made`). Any failure raises, and the server denies the
    connection with an ERROR record; a channel that failed once stays failed (a late answer
    would be taken for the next one) and the worker exits to be restarted."""

    def __init__(self, sock: socket.socket, on_broken: Callable[[], None]) -> None:
        self._sock = sock
        self._sock.settimeout(CALL_TIMEOUT)
        self._broken: str | None = None
        self._on_broken = on_broken
        self._destinations: dict[tuple[str, int], PeerInfo] = {}
        self._remote: dict[str, bool] = {}

    def admit(self, src_ip: str, dst_ip: str, dst_port: int) -> Admission:
        if self._broken is not None:
            raise WorkerChannelError(f"the agent is unreachable ({self._broken})")
        try:
            send_frame(self._sock, orjson.dumps({"src": src_ip, "dst": dst_ip, "port": dst_port}))
            payload = recv_frame(self._sock, MAX_ANSWER)
        except (OSError, WorkerChannelError) as exc:
            self._broken = str(exc) or type(exc).__name__
            self._on_broken()
            raise WorkerChannelError(f"the agent is unreachable ({self._broken})") from None
        if not payload:
            raise WorkerChannelError("the agent could not answer for this connection")
        answer = pickle.loads(payload)  # from the agent, this process's parent
        if not isinstance(answer, AdmissionAnswer):
            raise WorkerChannelError("the agent's answer is not an admission")
        if len(self._destinations) > 4096:
            self._destinations.clear()
            self._remote.clear()
        self._destinations[(dst_ip, dst_port)] = PeerInfo(*answer.destination)
        self._remote[dst_ip] = answer.remote
        return answer.admission

    def destination(self, ip: str, port: int) -> PeerInfo:
        """The destination as the agent described it when it admitted the connection."""
        known = self._destinations.get((ip, port))
        if known is not None:
            return known
        return PeerInfo(0, Labels(), ip, port)

    def remote(self, ip: str) -> bool:
        return self._remote.get(ip, False)


class ForwardingSink:
    """A worker's records go to the agent: one frame of JSON lines per event-loop turn
    (`sink` is the `FlowSink` the worker's servers emit to; it forwards here)."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.lost = 0
        self.sink = FlowSink(loop=loop, forward=self.send)

    def send(self, records: list[FlowRecord]) -> None:
        lines: list[bytes] = []
        for record in records:
            try:
                lines.append(record.to_json().encode())
            except Exception:
                log.exception("a flow record could not be encoded and is lost")
        if not lines:
            return
        try:
            with self._lock:
                send_frame(self._sock, _RECORDS + b"\n".join(lines))
        except OSError as exc:
            self.lost += len(lines)
            log.error("%d flow records could not reach the agent: %s", len(lines), exc)


AGENT_GONE = signal.SIGUSR1  # the parent-death signal: not the agent's own SIGTERM


def _die_with_parent(parent: int) -> None:
    """`AGENT_GONE` when the agent's supervising thread ends (the agent killed, even by
    SIGKILL): no worker outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(AGENT_GONE), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), AGENT_GONE)


@dataclass(slots=True)
class _Ending:
    """Why a worker stops: `lost` the agent's answers, or the agent is `gone` altogether."""

    lost: str = ""
    gone: bool = False


async def _run_worker(spec: dict[str, Any], ending: _Ending) -> int:
    loop = asyncio.get_running_loop()
    index = int(spec["index"])
    stop = asyncio.Event()
    calls = socket.socket(fileno=int(spec["calls_fd"]))
    events = socket.socket(fileno=int(spec["events_fd"]))

    def broken() -> None:  # the agent is gone or stuck: exit, to be restarted (or not)
        ending.lost = "no answer from the agent"
        loop.call_soon(stop.set)

    def agent_gone() -> None:
        ending.gone = True
        stop.set()

    policy = AgentPolicy(calls, broken)
    metrics = ProxyMetrics(MetricsConfig(worker=index))
    sink = ForwardingSink(events, loop)
    servers: list[ProxyServer] = []
    try:
        for name, port in spec["ports"].items():
            settings = ServerSettings(
                protocol=L7Protocol(name),
                config=ProxyConfig(node_name=str(spec["node_name"]),
                                   redact_query_params=tuple(spec["redact_query_params"])),
                destination=policy.destination,
                transparent_to=policy.remote if spec["remote_endpoints"] else None,
            )
            server = ProxyServer(settings, policy, sink.sink, metrics=metrics)
            servers.append(server)
            await server.listen_transparent(str(spec["host"]), int(port), reuse_port=True)
        # As `garrison proxy` does: what start-up loaded lives as long as the worker; out of
        # the collector's generations, the collections that per-request garbage triggers do
        # not walk it (in process, about 6% of a request's instructions: BENCHMARKS.md).
        gc.collect()
        gc.freeze()
        with sink._lock:
            send_frame(events, _READY)

        # the socket stays blocking for the records sent (the agent's pace holds the worker
        # back, no record is dropped); the agent's pushes are read without waiting
        reader = _RevisionReader(events, policy, servers, agent_gone)
        loop.add_reader(events.fileno(), reader.readable)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(AGENT_GONE, agent_gone)
        await stop.wait()
        loop.remove_reader(events.fileno())
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                await server.close(grace=0.5)
        sink.sink.flush()
        calls.close()
        events.close()
    if ending.lost:
        log.error("proxy worker %d: %s: exiting, to be restarted", index, ending.lost)
        return 1
    return 0


class _RevisionReader:
    """The agent's pushes on a worker's event socket: a new revision re-admits the live
    connections; the socket closing (the agent is gone) stops the worker."""

    def __init__(self, sock: socket.socket, policy: AgentPolicy, servers: Sequence[ProxyServer],
                 gone: Callable[[], None]) -> None:
        self._sock = sock
        self._policy = policy
        self._servers = servers
        self._gone = gone
        self._buffer = b""

    def readable(self) -> None:
        try:
            data = self._sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._gone()
            return
        self._buffer += data
        changed = False
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if len(self._buffer) < _HEADER.size + size:
                break
            frame = self._buffer[_HEADER.size:_HEADER.size + size]
            self._buffer = self._buffer[_HEADER.size + size:]
            if frame[:1] == _REVISION:  # the policy or the endpoints changed: re-admit
                changed = True
        if changed:
            for server in self._servers:
                server.update_policy(self._policy)


def main(argv: Sequence[str]) -> int:
    spec = orjson.loads(argv[0])
    _die_with_parent(int(spec["parent"]))
    use_multiprocess(Path(spec["metrics_dir"]))
    install_uvloop()
    worker = f"proxy-worker-{spec['index']}"
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {worker} %(levelname)s %(message)s")
    ending = _Ending()
    try:
        return asyncio.run(_run_worker(spec, ending))
    except OSError as exc:
        print(f"garrison agent: proxy worker {spec['index']}: {exc}", file=sys.stderr)
        return 1
    finally:
        if ending.gone:
            # the agent died without its clean-up (SIGKILL): the last worker out removes the
            # run's metrics files (whichever is last finds nothing left to remove)
            directory = Path(spec["metrics_dir"])
            if directory.name.startswith("garrison-agent-proxy-metrics-"):
                shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    # run the module's own copy, not `__main__`'s: the agent's answers name its classes
    from garrison.agent.proxyworkers import main as worker_main

    sys.exit(worker_main(sys.argv[1:]))
