"""The proxy's asyncio I/O shell (uvloop): accept, admit, pump bytes, execute engine commands.

    server = ProxyServer(ServerSettings(protocol=L7Protocol.HTTP), policy, sink)
    await server.listen_standalone("127.0.0.1", 8080, upstream=("127.0.0.1", 80))
    # or, for the datapath (root): await server.listen_transparent("0.0.0.0", 15001)
    ...
    server.update_policy(new_policy)   # new connections get it; live ones at the next request
    await server.close()

Per accepted connection: the `PolicySource` says who the client is and whether L3/L4 policy
admits it. Not admitted → the connection is closed without a byte (as the datapath drops a
SYN) and a DROPPED L3_L4 record is logged. Admitted → a `ConnectionContext`, an engine from
`make_engine`, and the pump: bytes from either side go to the engine, its commands are
executed in order (`Forward` / `Inject` write, `Close` closes after what was queued, `Log`
goes to the `FlowSink`).

- Upstream: in transparent mode the original destination (`getsockname()` of the accepted
  socket), in standalone mode the configured address. HTTP/1.1 engines borrow a connection
  from the per-destination `UpstreamPool` when they forward, keep it while the client keeps
  sending, and give it back (if the engine says it is reusable) when the client has been
  idle `release_idle_after` (20 ms) or leaves: an idle keep-alive client holds no upstream
  connection (nor parsers: see `garrison.proxy.engine`); other engines get their own
  connection at once.
- Backpressure both ways: when one side's transport buffers more than `write_buffer_high`
  bytes, the other side's reading is paused until it drains below `write_buffer_low`. So is
  the client's while its upstream is being connected, while too many pipelined requests
  wait for answers (`pipeline_full`), and while the client leaves its answers unread (a
  client pipelining denied requests without reading the 403s). A slow reader cannot make
  the proxy buffer more than `write_buffer_high` per direction per connection, plus the
  answers to the one read (up to 256 KiB) being handled when the mark was crossed.
- Timers: the engine asks for a wakeup at a monotonic time (`RequestWakeup`); a sweep every
  `sweep_interval` seconds (on the loop's monotonic clock) hands `Wakeup` to the connections
  whose time has come, and one shared timer those due sooner than that (the release of an
  idle client's upstream, `release_idle_after`). The engine decides what ran out
  (`garrison.proxy.engine`): a request head `header_read` seconds after its first byte (408),
  an answer owed `upstream_reply` (504), a connection with nothing in flight `idle`. The wall
  clock (`time.time()`) only stamps records: stepping it neither fires nor stalls a timeout.
- `max_connections`: connections beyond it are closed at once and logged as ERROR.
- Any exception inside an engine or while executing its commands closes that connection with
  an ERROR record; commands after the failure are not executed, so nothing the engine had not
  yet decided is forwarded, and no other connection is touched.

The server knows no engine by name and probes nothing: it makes each connection's engine
with `make_engine`, wraps it in the shared `EventEngine`, and only calls `handle(event)`
(`garrison.proxy.commands`); what the upstream is (its own, or borrowed from the pool and
given back), when to wake, when to stop reading the client all come back as commands. When
the client's connection ends without a FIN, and when the proxy stops, the engine is told
(`ClientClosed(reset=True)`, `Stopping`) and hands over the records it still owes (the Kafka
engine's aggregated denials).

Policy reload (`update_policy`): new connections are admitted with the new policy. Live
connections keep their L3/L4 admission (as the datapath keeps established connections), and
engines that can (`update_ruleset`, the HTTP/1.1 engine) match their next request against the
new L7 rules; a client the new policy no longer admits at L3/L4 is denied every further request
(an empty rule set) rather than keeping the old, wider rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO, cast

from garrison.flows.build import l3_l4_drop, l3_l4_verdict, proxy_error
from garrison.flows.record import (
    DropReasonDesc,
    Endpoint,
    FlowRecord,
    Verdict,
)
from garrison.flows.render import render_compact
from garrison.flows.store import FlowStore
from garrison.flows.writer import AccessLogError, AccessLogWriter
from garrison.policies.l7rules import L7Protocol, L7RuleSet
from garrison.policies.mapstate import DropReason
from garrison.proxy.commands import (
    ClientClosed,
    ClientData,
    Close,
    Command,
    ConnectionContext,
    Event,
    Forward,
    Inject,
    Log,
    OpenUpstream,
    PauseClient,
    PeerInfo,
    ReleaseUpstream,
    RequestWakeup,
    RulesetChanged,
    Side,
    Started,
    Stopping,
    TrafficDirection,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamData,
    UpstreamFailed,
    Wakeup,
)
from garrison.proxy.config import ProxyConfig
from garrison.proxy.engine import ConnectionEngine, EventEngine, make_engine
from garrison.proxy.metrics import ProxyMetrics
from garrison.proxy.policyview import Admission, PolicySource
from garrison.proxy.sockets import PROXY_UPSTREAM_MARK, listener, system_backlog
from garrison.proxy.upstream import (
    Address,
    PoolConfig,
    UpstreamConnectError,
    UpstreamConnection,
    UpstreamPool,
)

__all__ = [
    "FlowSink",
    "ProxyServer",
    "ServerSettings",
    "StaticDestination",
    "install_uvloop",
]

log = logging.getLogger("garrison.proxy")

DestinationLookup = Callable[[str, int], PeerInfo]


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed (it is a dependency)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# ---- records --------------------------------------------------------------------------------


class FlowSink:
    """Where `Log` commands go: the in-memory ring, the access log, metrics, and (`-v`) a
    compact line on a text stream.

    The ring (`store`) is the agent's, which `observe` and the flow API read; the standalone
    `garrison proxy` has no reader for one and keeps none (records go to its access log and
    `-v`): 4,096 records held only to be evicted cost it ~10 % of a denied request's CPU.

    Records are gathered during one turn of the event loop and handled at its end, after the
    bytes of that turn were written: records an engine made with `Log.later` are built then,
    go to the ring (and the `-v` stream), the access-log lines are written in one system call
    (`write_many`) in emission order, and the metrics are counted once per series
    (`ProxyMetrics.count_records`). So a
    record reaches `observe` one loop turn after its decision, and making it is not on the
    path of the request. A failed write is counted in metrics and reported once per failure
    streak; the records stay in the ring, if any. Without a loop (tests), everything is done
    at once.
    """

    def __init__(
        self,
        *,
        store: FlowStore | None = None,
        writer: AccessLogWriter | None = None,
        metrics: ProxyMetrics | None = None,
        verbose: TextIO | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        forward: Callable[[list[FlowRecord]], None] | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.metrics = metrics
        self.verbose = verbose
        self._loop = loop
        # a proxy worker of the agent: each turn's records go to `forward` (to the agent's
        # own sink) instead of the ring, the access log and the metrics here
        self._forward = forward
        self._pending: list[FlowRecord | Log] = []
        self._scheduled = False
        self._failing = False

    def emit(self, record: FlowRecord | Log) -> None:
        """Take a record, or a `Log` command whose record is built at the end of the turn."""
        self._pending.append(record)
        if not self._scheduled:
            if self._loop is None:
                self.flush()
                return
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        records = _built(pending)
        if self._forward is not None:
            self._forward(records)
            return
        if self.store is not None:
            self.store.extend(records)
        if self.verbose is not None:
            with contextlib.suppress(OSError, ValueError):
                for record in records:
                    print(render_compact(record), file=self.verbose, flush=True)
        if self.metrics is not None:
            self.metrics.count_records(records)
        if self.writer is None:
            return
        try:
            self.writer.write_many(records)
        except AccessLogError as exc:
            if self.metrics is not None:
                self.metrics.access_log_error()
            if not self._failing:
                kept = ("stay in the in-memory ring" if self.store is not None
                        else "are lost: the standalone proxy keeps no ring")
                log.error("%s (records %s)", exc, kept)
            self._failing = True
        else:
            self._failing = False


def _built(pending: list[FlowRecord | Log]) -> list[FlowRecord]:
    """The records of `pending`, in order; a record that cannot be built is reported, not
    allowed to take the others with it (the decision it describes was already carried out)."""
    records: list[FlowRecord] = []
    for item in pending:
        if isinstance(item, Log):
            try:
                records.append(item.record)
            except Exception:
                log.exception("a flow record could not be built and is lost")
        else:
            records.append(item)
    return records


# ---- settings -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaticDestination:
    """The destination of every connection in standalone mode: one endpoint."""

    peer: PeerInfo

    def __call__(self, ip: str, port: int) -> PeerInfo:
        return self.peer


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How one proxy server behaves.

    `destination`: describes the original destination (identity, labels) for records; the
    agent passes its ipcache lookup. `upstream_mark`: SO_MARK of upstream sockets (transparent
    mode uses the datapath's mark by default; None = no mark). `advertise`: the proxy's own
    address, for the Kafka engine to write into Metadata answers. `transparent_to`: in
    transparent mode, the destination IPs whose upstream connections leave from the client's
    own address (another node's endpoints, which judge the client by it; the agent passes
    its cluster's lookup); None or False: from the node's address.
    """

    protocol: L7Protocol = L7Protocol.HTTP
    config: ProxyConfig = field(default_factory=ProxyConfig)
    direction: TrafficDirection = TrafficDirection.INGRESS
    destination: DestinationLookup | None = None
    upstream_mark: int | None = None
    advertise: tuple[str, int] | None = None
    transparent_to: Callable[[str], bool] | None = None
    pool: PoolConfig | None = None
    sweep_interval: float = 1.0
    # A pooled (HTTP/1.1) client idle this long returns its upstream connection to the pool.
    release_idle_after: float = 0.02
    # A lingering close (`Close(linger=True)`) reads and discards at most this much, this
    # long, of what the client still sends after its answer, then closes (nginx's
    # lingering_time is 30 s).
    linger_bytes: int = 64 * 1024 * 1024
    linger_time: float = 10.0


# ---- one client connection ------------------------------------------------------------------

_PAUSE_UPSTREAM_FULL = 1
_PAUSE_CONNECTING = 2
_PAUSE_PIPELINE = 4
_PAUSE_CLIENT_FULL = 8  # answers pile up unread: reading more requests would pile up more

_FORWARD = Forward
_INJECT = Inject
_LOG = Log
_WAKEUP = RequestWakeup
_PAUSE = PauseClient
_RELEASE = ReleaseUpstream
_OPEN = OpenUpstream
_NEVER = float("inf")
_MAX_LOCAL_ADDRESSES = 4096
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_SOON_SLACK = 0.002  # seconds a wakeup of the shared short timer may come early
_CLIENT = Side.CLIENT
_UPSTREAM = Side.UPSTREAM


class _ClientConnection(asyncio.Protocol):
    """One accepted client connection and the upstream connection it borrows or owns."""

    __slots__ = (
        "_client_write_paused",
        "_connecting",
        "_linger_timer",
        "_lingered",
        "_pause_client",
        "_pending_up",
        "client_eof",
        "closed",
        "context",
        "dst",
        "engine",
        "pooled",
        "protocol",
        "server",
        "src",
        "transparent",
        "transport",
        "upstream",
        "upstream_address",
        "wake_at",
    )

    def __init__(self, server: ProxyServer, transparent: bool) -> None:
        self.server = server
        self.transparent = transparent
        self.transport: asyncio.Transport | None = None
        self.engine: ConnectionEngine | None = None
        self.context: ConnectionContext | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_address: Address = ("", 0)
        self.pooled = False
        self.closed = False
        self.client_eof = False
        self._pending_up: list[bytes] | None = None  # forwarded while the upstream connects
        self._linger_timer: asyncio.TimerHandle | None = None  # set while lingering
        self._lingered = 0  # bytes read and thrown away while lingering
        self._connecting: asyncio.Task[None] | None = None
        self._pause_client = 0  # reasons the client's reading is paused (bit set)
        self._client_write_paused = False
        self.protocol = server.upstream_protocol  # what the upstream speaks (pool key)
        self.wake_at = _NEVER  # monotonic time of the engine's next Wakeup
        self.src: tuple[str, int] = ("", 0)
        self.dst: tuple[str, int] = ("", 0)

    # -- accept -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, transport)  # uvloop: no subclass
        server = self.server
        now = time.time()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        # Every connection from one address shares its text, to one address its tuple.
        self.src = (sys.intern(str(peer[0])), int(peer[1])) if peer else ("", 0)
        self.dst = server.local_address(str(local[0]), int(local[1])) if local else ("", 0)
        if len(server.connections) >= server.config.max_connections:
            transport.abort()
            self.closed = True
            server.sink.emit(server.error_record(self, "too many connections", now))
            return
        try:
            admission = server.policy.admit(self.src[0], self.dst[0], self.dst[1])
        except Exception as exc:  # a broken policy source must not take the server down
            log.exception("policy lookup failed for %s", self.src)
            transport.abort()
            self.closed = True
            server.sink.emit(server.error_record(self, f"policy lookup failed: {exc}", now))
            return
        if not admission.allowed:
            transport.abort()  # no answer, as the datapath drops the SYN
            self.closed = True
            server.sink.emit(server.l3_l4_drop_record(self, admission, now))
            return
        if not admission.lookup.allowed:  # admitted only because of audit mode
            server.sink.emit(server.l3_l4_audit_record(self, admission, now))
        try:
            self.context = server.context_for(self, admission)
            self.engine = EventEngine(
                make_engine(self.context, server.config),
                server.config.timeouts.for_protocol(self.context.protocol),
                server.settings.release_idle_after,
            )
        except Exception as exc:
            log.exception("cannot build an engine for %s", self.src)
            transport.abort()
            self.closed = True
            server.sink.emit(server.error_record(self, f"proxy error: {exc}", now))
            return
        server.connections.add(self)
        if server.metrics is not None:
            server.metrics.connection_opened(server.settings.protocol)
        transport.set_write_buffer_limits(
            high=server.config.write_buffer_high, low=server.config.write_buffer_low
        )
        self.upstream_address = server.upstream_for(self.dst)
        self.dispatch(Started(now, time.monotonic()))

    def dispatch(self, event: Event) -> None:
        """Hand `event` to the engine and execute its commands; any failure ends this
        connection (only) with an ERROR record."""
        engine = self.engine
        if engine is None:
            return
        try:
            self._run(engine.handle(event))
        except Exception as exc:
            self._internal_error(exc, event.now)

    # -- client side --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        engine = self.engine
        if engine is None or self.closed:
            if self._linger_timer is not None:
                self._lingered += len(data)
                if self._lingered > self.server.settings.linger_bytes:
                    self._end_linger()
            return
        now = time.time()
        try:
            self._run(engine.handle(ClientData(data, now, time.monotonic())))
        except Exception as exc:
            self._internal_error(exc, now)

    def eof_received(self) -> bool:
        engine = self.engine
        self.client_eof = True
        if engine is None or self.closed:
            if self._linger_timer is not None:
                self._end_linger()
            return False
        self.dispatch(ClientClosed(time.time(), time.monotonic()))
        return not self.closed  # keep the transport half-open while answers are owed

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
            self.server.lingering.discard(self)
        if self.engine is None or self.closed:
            return
        # Gone without our close (a reset, or a FIN after which it stopped reading): the
        # engine hands over what it still owes (records) and gives its upstream back.
        self.dispatch(ClientClosed(time.time(), time.monotonic(), reset=True))
        self.closed = True
        self._teardown()

    def pause_writing(self) -> None:
        self._client_write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()
        self._pause(_PAUSE_CLIENT_FULL)

    def resume_writing(self) -> None:
        self._client_write_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()
        self._resume(_PAUSE_CLIENT_FULL)

    # -- upstream side (called by UpstreamConnection) -----------------------------------------

    def upstream_data(self, data: bytes) -> None:
        engine = self.engine
        if engine is None or self.closed:
            return
        now = time.time()
        try:
            self._run(engine.handle(UpstreamData(data, now, time.monotonic())))
        except Exception as exc:
            self._internal_error(exc, now)

    def upstream_eof(self) -> None:
        engine = self.engine
        if engine is None or self.closed:
            return
        self.dispatch(UpstreamClosed(time.time(), time.monotonic()))

    def upstream_lost(self, exc: Exception | None) -> None:
        conn = self.upstream
        if conn is None or self.closed:
            return
        self.upstream = None
        self.server.pool.discard(conn)
        self.dispatch(UpstreamClosed(time.time(), time.monotonic(), reset=exc is not None))

    def upstream_pause_writing(self) -> None:
        self._pause(_PAUSE_UPSTREAM_FULL)

    def upstream_resume_writing(self) -> None:
        self._resume(_PAUSE_UPSTREAM_FULL)

    # -- commands -----------------------------------------------------------------------------

    def _run(self, commands: Sequence[Command]) -> None:
        """Execute in order. Bytes for one side are gathered and written with one call (a
        response head and its body are one segment, not two system calls); a `Close` writes
        what was gathered before it first."""
        to_client: list[bytes] = []
        to_upstream: list[bytes] = []
        for command in commands:
            kind = type(command)
            if kind is _FORWARD or kind is _INJECT:
                if command.side is _CLIENT:  # type: ignore[union-attr]
                    to_client.append(command.data)  # type: ignore[union-attr]
                else:
                    to_upstream.append(command.data)  # type: ignore[union-attr]
            elif kind is _LOG:
                self.server.sink.emit(command)  # type: ignore[arg-type]
            elif kind is _WAKEUP:
                at: float = command.at  # type: ignore[union-attr]
                self.wake_at = at
                self.server.wake_at(self, at)
            elif kind is _PAUSE:
                if command.paused:  # type: ignore[union-attr]
                    self._pause(_PAUSE_PIPELINE)
                elif self._pause_client & _PAUSE_PIPELINE:
                    self._resume(_PAUSE_PIPELINE)
            else:
                self._write(to_client, to_upstream)
                to_client, to_upstream = [], []
                if kind is _RELEASE:
                    self._release_upstream(command.reusable)  # type: ignore[union-attr]
                elif kind is _OPEN:
                    self._open_upstream(command)  # type: ignore[arg-type]
                else:
                    self._close(command)  # type: ignore[arg-type]
        if to_client or to_upstream:
            self._write(to_client, to_upstream)

    def _write(self, to_client: list[bytes], to_upstream: list[bytes]) -> None:
        if self.closed:
            return
        if to_upstream:
            self._to_upstream(
                to_upstream[0] if len(to_upstream) == 1 else b"".join(to_upstream)
            )
        if to_client and self.transport is not None:
            self.transport.write(to_client[0] if len(to_client) == 1 else b"".join(to_client))

    def _to_upstream(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
            return
        if self._connecting is None:
            conn = (
                self.server.pool.take_idle(
                    self.upstream_address, self._upstream_protocol(), self._upstream_source()
                )
                if self.pooled else None
            )
            if conn is not None:
                self._attach(conn)
                conn.write(data)
                return
            self._start_connect()
        if self._pending_up is None:
            self._pending_up = [data]
        else:
            self._pending_up.append(data)

    def _close(self, command: Close) -> None:
        side = command.side
        if side is Side.UPSTREAM:
            self._drop_upstream()
            return
        if side is Side.CLIENT and self.upstream is not None:
            if self.transport is not None:
                self.transport.close()
            return
        if command.linger:
            self._linger()
            return
        self._close_all()

    def _linger(self) -> None:
        """Close after the answer without resetting the client: half-close (FIN once the
        answer is written), then read and throw away what it still sends until it closes,
        `linger_bytes` were read or `linger_time` passed. Closing a socket with unread bytes
        sends a reset, and the client would lose the answer it has not read yet."""
        transport = self.transport
        if self.closed or transport is None or self.client_eof or not transport.can_write_eof():
            self._close_all()
            return
        self.closed = True
        self._teardown()
        transport.write_eof()
        transport.resume_reading()
        server = self.server
        server.lingering.add(self)
        self._linger_timer = asyncio.get_running_loop().call_later(
            server.settings.linger_time, self._end_linger
        )

    def _end_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.server.lingering.discard(self)
        if self.transport is not None:
            self.transport.close()

    def _open_upstream(self, command: OpenUpstream) -> None:
        """Connect now (a connection of its own) or, pooled, borrow one when bytes are next
        sent upstream without one."""
        self.pooled = command.pooled
        self.protocol = command.protocol
        if not command.pooled and self.upstream is None and self._connecting is None:
            self._start_connect()

    def _release_upstream(self, reusable: bool) -> None:
        """Give the upstream connection back to the pool (`reusable`) or close it."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            if reusable:
                self.server.pool.release(conn)
            else:
                self.server.pool.discard(conn)
        if self._pause_client & _PAUSE_UPSTREAM_FULL:
            self._resume(_PAUSE_UPSTREAM_FULL)

    # -- upstream connections -----------------------------------------------------------------

    def _start_connect(self) -> None:
        self._pause(_PAUSE_CONNECTING)
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.server.pool.connect(
                self.upstream_address, self._upstream_protocol(), self._upstream_source()
            )
        except UpstreamConnectError as failed:
            self._connecting = None
            self._upstream_unavailable(str(failed))
            return
        except asyncio.CancelledError:
            self._connecting = None
            raise
        except Exception as exc:
            self._connecting = None
            self._internal_error(exc, time.time())
            return
        self._connecting = None
        if self.closed:
            self.server.pool.discard(conn)
            return
        assert conn.transport is not None  # once per connection: every client uses the same
        conn.transport.set_write_buffer_limits(
            high=self.server.config.write_buffer_high, low=self.server.config.write_buffer_low
        )
        self._attach(conn)
        pending, self._pending_up = self._pending_up, None
        for data in pending or ():
            conn.write(data)
        self._resume(_PAUSE_CONNECTING)

    def _upstream_protocol(self) -> str:
        """What the engine speaks upstream now (`OpenUpstream`): the pool hands out and takes
        back connections by it (an HTTP/1.1 engine that took an h2c client speaks "h2")."""
        return self.protocol

    def _upstream_source(self) -> str | None:
        """The client's address when the upstream leaves from it (`transparent_to`)."""
        leave_from_client = self.server.settings.transparent_to
        if self.transparent and leave_from_client is not None and leave_from_client(
            self.upstream_address[0]
        ):
            return self.src[0]
        return None

    def _attach(self, conn: UpstreamConnection) -> None:
        conn.owner = self
        self.upstream = conn
        if self._client_write_paused:
            conn.pause_reading()
        else:
            conn.resume_reading()
        self.dispatch(UpstreamConnected(time.time(), time.monotonic()))

    def _drop_upstream(self) -> None:
        self._release_upstream(False)

    def _upstream_unavailable(self, reason: str) -> None:
        engine = self.engine
        if engine is None or self.closed:
            return
        self._pending_up = None
        self.dispatch(UpstreamFailed(reason, time.time(), time.monotonic()))

    # -- flow control -------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._pause_client and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._pause_client |= reason

    def _resume(self, reason: int) -> None:
        was = self._pause_client
        self._pause_client &= ~reason
        if was and not self._pause_client and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- endings ------------------------------------------------------------------------------

    def wakeup(self, mono: float) -> None:
        """The time the engine asked for has come."""
        if self.engine is None or self.closed:
            return
        self.wake_at = _NEVER
        self.dispatch(Wakeup(time.time(), mono))

    def _internal_error(self, exc: Exception, now: float) -> None:
        """Anything unexpected: this connection ends with an ERROR record, nothing else."""
        if self.closed:
            return
        log.error("connection %s:%s: internal error: %r", *self.src, exc, exc_info=exc)
        self.server.sink.emit(self.server.error_record(self, f"proxy error: {exc!r}", now))
        self._abort_all()

    def _close_all(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._teardown()

    def _abort_all(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.owner = None
            self.server.pool.discard(conn)
        self._teardown()

    def _teardown(self) -> None:
        server = self.server
        if self in server.connections:
            server.connections.discard(self)
            if server.metrics is not None:
                server.metrics.connection_closed(server.settings.protocol)
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        self._pending_up = None
        conn, self.upstream = self.upstream, None
        if conn is not None:  # not given back (`ReleaseUpstream`) by the engine: not reusable
            server.pool.discard(conn)


# ---- the server -----------------------------------------------------------------------------


class ProxyServer:
    """Listeners of one L7 protocol, their connections, the upstream pool and the policy."""

    def __init__(
        self,
        settings: ServerSettings,
        policy: PolicySource,
        sink: FlowSink,
        *,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.config = settings.config
        self.upstream_protocol = str(settings.protocol)  # shared by the connections
        self.policy = policy
        self.sink = sink
        self.metrics = metrics if metrics is not None else sink.metrics
        self.connections: set[_ClientConnection] = set()
        self.lingering: set[_ClientConnection] = set()  # closed, draining the client
        self._servers: list[asyncio.AbstractServer] = []
        self._upstream: Address | None = None
        self._shared: dict[Address, dict[str, object]] = {}
        self._local: dict[Address, Address] = {}  # `local_address`
        self._sweeper: asyncio.Task[None] | None = None
        # Wakeups due before the next sweep: (monotonic time, sequence, connection), a heap.
        self._soon: list[tuple[float, int, _ClientConnection]] = []
        self._soon_count = 0
        self._soon_timer: asyncio.TimerHandle | None = None  # the one armed, if any
        self._soon_due = _NEVER
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # kept: looked up once
        self._pool: UpstreamPool | None = None
        self.addresses: list[tuple[str, int]] = []

    @property
    def pool(self) -> UpstreamPool:
        assert self._pool is not None, "the server is not listening"
        return self._pool

    # -- listening ----------------------------------------------------------------------------

    async def listen_standalone(
        self, host: str, port: int, *, upstream: Address, reuse_port: bool = False
    ) -> tuple[str, int]:
        """Listen on host:port and proxy every connection to `upstream`."""
        self._upstream = upstream
        sock = listener(host, port, reuse_port=reuse_port)
        return await self._serve(sock, transparent=False)

    async def listen_transparent(
        self, host: str, port: int, *, reuse_port: bool = False
    ) -> tuple[str, int]:
        """A transparent (`IP_TRANSPARENT`) listener for connections the datapath steers to
        the proxy; each goes upstream to its original destination, with `upstream_mark`
        (default: the datapath's proxy mark). Needs CAP_NET_ADMIN."""
        sock = listener(host, port, transparent=True, reuse_port=reuse_port)
        return await self._serve(sock, transparent=True)

    async def _serve(self, sock: socket.socket, *, transparent: bool) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            mark = self.settings.upstream_mark
            if transparent and mark is None:
                mark = PROXY_UPSTREAM_MARK
            self._pool = UpstreamPool(
                loop, self.settings.pool or PoolConfig(
                    connect_timeout=self.config.timeouts.connect
                ), mark=mark,
            )
        try:
            # create_server listens again, with 100 unless told: keep the system's maximum.
            server = await loop.create_server(
                lambda: _ClientConnection(self, transparent), sock=sock,
                backlog=system_backlog(),
            )
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        name = sock.getsockname()
        address = (str(name[0]), int(name[1]))
        self.addresses.append(address)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        return address

    # -- per connection -----------------------------------------------------------------------

    def local_address(self, host: str, port: int) -> Address:
        """The accepted connections' local address, one tuple for all connections to it (in
        transparent mode, one per original destination)."""
        key = (host, port)
        known = self._local.get(key)
        if known is None:
            if len(self._local) >= _MAX_LOCAL_ADDRESSES:
                self._local.clear()
            known = self._local[key] = (sys.intern(host), port)
        return known

    def upstream_for(self, original_destination: Address) -> Address:
        return self._upstream if self._upstream is not None else original_destination

    def context_for(self, conn: _ClientConnection, admission: Admission) -> ConnectionContext:
        settings = self.settings
        upstream = self.upstream_for(conn.dst)
        shared = self._shared.get(upstream)
        if shared is None:
            shared = self._shared[upstream] = {}
        return ConnectionContext(
            source=PeerInfo(
                admission.identity,
                admission.labels,
                conn.src[0],
                conn.src[1],
                admission.namespace,
                admission.pod_name,
            ),
            destination=self.destination_of(conn.dst),
            direction=self._direction(admission),
            protocol=settings.protocol,
            ruleset=admission.ruleset,
            node_name=self.config.node_name,
            host_hint=None,
            audit=admission.audit,
            advertise=self.advertise_to(conn),
            shared=shared,
        )

    def advertise_to(self, conn: _ClientConnection) -> Address | None:
        """The address Kafka answers name as the broker's: the proxy's own. Listening on a
        wildcard (0.0.0.0, ::), that is the address this client reached the proxy at: a
        client told to connect to 0.0.0.0 would connect to its own host."""
        advertise = self.settings.advertise
        if advertise is not None and advertise[0] in _WILDCARD_HOSTS and conn.dst[0]:
            return conn.dst
        return advertise

    def destination_of(self, dst: Address) -> PeerInfo:
        lookup = self.settings.destination
        if lookup is not None:
            return lookup(dst[0], dst[1])
        from garrison.policies.labels import Labels

        return PeerInfo(0, Labels(), dst[0], dst[1])

    def _direction(self, admission: Admission | None) -> TrafficDirection:
        """The side whose rules judge the connection, as its records say."""
        if admission is None or admission.direction is None:
            return self.settings.direction
        return TrafficDirection(admission.direction.value.upper())

    def _source_endpoint(self, conn: _ClientConnection, admission: Admission | None) -> Endpoint:
        if admission is None:
            return Endpoint(ip=conn.src[0], port=conn.src[1])
        return Endpoint.of(
            admission.identity,
            admission.labels,
            namespace=admission.namespace,
            pod_name=admission.pod_name or "",
            ip=conn.src[0],
            port=conn.src[1],
        )

    def _destination_endpoint(self, conn: _ClientConnection) -> Endpoint:
        peer = self.destination_of(conn.dst)
        return Endpoint.of(
            peer.identity,
            peer.labels,
            namespace=peer.namespace,
            pod_name=peer.pod_name or "",
            ip=peer.ip,
            port=peer.port,
        )

    def l3_l4_drop_record(
        self, conn: _ClientConnection, admission: Admission, now: float
    ) -> FlowRecord:
        reason = admission.lookup.drop_reason or DropReason.POLICY_DENIED
        denied_by = admission.lookup.refs if reason is DropReason.POLICY_DENY else ()
        return l3_l4_drop(
            time_ns=int(now * 1e9),
            direction=self._direction(admission),
            source=self._source_endpoint(conn, admission),
            destination=self._destination_endpoint(conn),
            reason=reason,
            denied_by=denied_by,
            node_name=self.config.node_name,
        )

    def l3_l4_audit_record(
        self, conn: _ClientConnection, admission: Admission, now: float
    ) -> FlowRecord:
        """A connection L3/L4 policy would have dropped, admitted because of audit mode."""
        reason = admission.lookup.drop_reason or DropReason.POLICY_DENIED
        return l3_l4_verdict(
            time_ns=int(now * 1e9),
            direction=self._direction(admission),
            source=self._source_endpoint(conn, admission),
            destination=self._destination_endpoint(conn),
            verdict=Verdict.AUDIT,
            match_type=admission.lookup.match_type,
            denied_by=admission.lookup.refs if reason is DropReason.POLICY_DENY else (),
            drop_reason=reason,
            node_name=self.config.node_name,
        )

    def error_record(self, conn: _ClientConnection, reason: str, now: float) -> FlowRecord:
        context = conn.context
        if context is not None:
            src = context.source
            source = Endpoint.of(
                src.identity, src.labels, namespace=src.namespace, pod_name=src.pod_name or "",
                ip=src.ip, port=src.port,
            )
        else:
            source = self._source_endpoint(conn, None)
        return proxy_error(
            time_ns=int(now * 1e9),
            direction=context.direction if context is not None else self.settings.direction,
            client=source,
            server=self._destination_endpoint(conn),
            protocol=self.settings.protocol,
            error=reason,
            reason=DropReasonDesc.PROXY_ERROR,
            node_name=self.config.node_name,
        )

    # -- policy -------------------------------------------------------------------------------

    def update_policy(self, policy: PolicySource) -> None:
        """Swap the policy: new connections are admitted by it; live connections' engines
        that support it match their next request against the new L7 rules."""
        self.policy = policy
        for conn in list(self.connections):
            if conn.engine is None or conn.closed:
                continue
            try:
                admission = policy.admit(conn.src[0], conn.dst[0], conn.dst[1])
                ruleset = admission.ruleset if admission.allowed else L7RuleSet(
                    self.settings.protocol, ()
                )
            except Exception as exc:
                conn._internal_error(exc, time.time())
                continue
            conn.dispatch(RulesetChanged(ruleset, time.time(), time.monotonic()))

    # -- timers -------------------------------------------------------------------------------

    def wake_at(self, conn: _ClientConnection, at: float) -> None:
        """`conn`'s engine asked for a wakeup at monotonic time `at`: the sweep delivers it,
        or the shared timer when it is due before the next sweep could (20 ms)."""
        now = time.monotonic()
        if at - now >= self.settings.sweep_interval:
            return
        self._soon_count += 1
        heapq.heappush(self._soon, (at, self._soon_count, conn))
        if at < self._soon_due:
            self._soon_due = at
            self._arm(max(0.0, at - now))

    def _arm(self, delay: float) -> None:
        """Arm the shared timer `delay` seconds from now, in place of the one armed. One at a
        time: a wakeup delivered by `_wake_soon` that asks again arms it from inside, and the
        one `_wake_soon` then armed on top of it used to run on too, each such turn adding a
        timer that re-armed itself while any wakeup was pending (tens of thousands of empty
        timer runs a second under load). The loop is looked up once (`get_running_loop` is a
        `getpid` system call on Python 3.11)."""
        if self._soon_timer is not None:
            self._soon_timer.cancel()
        loop = self._timer_loop
        if loop is None:
            loop = self._timer_loop = asyncio.get_running_loop()
        self._soon_timer = loop.call_later(delay, self._wake_soon)

    def _wake_soon(self) -> None:
        self._soon_timer = None
        self._soon_due = _NEVER
        now = time.monotonic()
        soon = self._soon
        # The loop's timers run to the millisecond: what is due within `_SOON_SLACK` is woken
        # now (a timer asked for that little would come back before it is due, again and again).
        while soon and soon[0][0] <= now + _SOON_SLACK:
            at, _, conn = heapq.heappop(soon)
            if conn.wake_at <= at:  # still the time asked for (not delivered or replaced)
                conn.wakeup(max(now, at))  # its engine may ask again: `wake_at` arms for it
        if soon and soon[0][0] < self._soon_due:
            self._soon_due = soon[0][0]
            self._arm(max(_SOON_SLACK, self._soon_due - now))

    async def _sweep(self) -> None:
        interval = self.settings.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep(time.monotonic())
            except Exception:  # the sweeper must survive anything
                log.exception("timer sweep failed")

    def sweep(self, mono: float) -> None:
        """Wake the connections whose requested time (`RequestWakeup`, monotonic) has come;
        the sweeper calls this every `sweep_interval` seconds with `time.monotonic()`."""
        for conn in list(self.connections):
            if conn.wake_at <= mono:
                conn.wakeup(mono)
        if self._pool is not None:
            self._pool.expire()
            if self.metrics is not None:
                # Sampled here rather than on every change: a keep-alive client takes and
                # gives back its upstream connection with every request.
                stats = self._pool.stats
                self.metrics.set_upstream_pool(stats.idle, stats.busy)

    # -- shutdown -----------------------------------------------------------------------------

    async def close(self, grace: float = 0.0) -> None:
        """Stop listening, close every connection (after `grace` seconds), flush records."""
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        if grace > 0 and self.connections:
            deadline = time.monotonic() + grace
            while self.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        for conn in list(self.connections):
            # Engines hand over what they still owe (Kafka's aggregated denials) first.
            conn.dispatch(Stopping(time.time(), time.monotonic()))
            conn._close_all()
        for conn in list(self.lingering):
            conn._end_linger()
        if self._soon_timer is not None:
            self._soon_timer.cancel()
            self._soon_timer = None
        self._soon.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._pool is not None:
            self._pool.close()
        self.sink.flush()
