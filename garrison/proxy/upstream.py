"""Upstream connections: the protocol object of one upstream socket, and a per-destination
pool of idle HTTP/1.1 keep-alive connections shared by every client connection.

The pool is keyed by (address, protocol, source): a connection is only ever handed to a client
connection that speaks the protocol it was opened for (an HTTP/2 client's preface must never
go down an idle HTTP/1.1 connection, which the upstream would read as a `PRI *` request), and
a connection that leaves from a client's own address (`source`: transparent, toward another
node's endpoint, which judges the client by that address) only to a connection of that same
client address — never one client's identity lent to another.

A client connection borrows an upstream connection when its engine first forwards bytes and,
for HTTP/1.1, gives it back as soon as nothing is in flight (or the client leaves) if the
engine reports it reusable (the last response is complete and kept the connection alive). So
1,000 idle keep-alive clients hold no upstream connection, and a keep-alive client takes the
most recently released one (usually its own again) for its next request.

An idle pooled connection that the upstream closes, or that sends anything, is dropped. Idle
connections older than `idle_timeout` are closed (keep it below the upstream's own keep-alive
timeout, so the proxy rarely sends a request on a connection the upstream is closing).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from garrison.proxy.sockets import upstream_socket

Address = tuple[str, int]
# What an upstream connection speaks: ALPN-style names ("http/1.1", "h2", "kafka").
HTTP1 = "http/1.1"


class UpstreamOwner(Protocol):
    """What an upstream connection reports to while a client connection holds it."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_eof(self) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...

    def upstream_pause_writing(self) -> None: ...

    def upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream. Dispatches to its owner; idle in the pool it has none."""

    __slots__ = (
        "_early",
        "_paused_writing",
        "address",
        "closed",
        "idle_since",
        "owner",
        "pool",
        "protocol",
        "source",
        "transport",
    )

    def __init__(
        self, address: Address, pool: UpstreamPool | None, protocol: str = HTTP1,
        source: str | None = None,
    ) -> None:
        self.address = address
        self.protocol = protocol
        self.source = source  # the client address it leaves from; None: the node's own
        self.pool = pool
        self.owner: UpstreamOwner | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused_writing = False
        # Bytes an upstream that speaks first (an HTTP/2 server's SETTINGS) sent before the
        # connection was handed to its first owner; None once handed out.
        self._early: bytearray | None = bytearray()

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            early = self._early
            if early:  # still undelivered: it comes first
                self._early = None
                data = bytes(early) + data
            owner.upstream_data(data)
        elif self._early is not None:  # new, not attached yet: keep it for the owner
            self._early += data
            if self.transport is not None:
                self.transport.pause_reading()
        else:  # an idle connection must not speak: drop it
            self.close()

    def eof_received(self) -> bool:
        owner = self.owner
        if owner is not None:
            owner.upstream_eof()
            return True  # the owner decides when to close
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.pool is not None:
            self.pool.forget(self)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.upstream_lost(exc)

    def pause_writing(self) -> None:
        self._paused_writing = True
        if self.owner is not None:
            self.owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self.owner is not None:
            self.owner.upstream_resume_writing()

    # -- use -------------------------------------------------------------------------------------

    @property
    def writing_paused(self) -> bool:
        return self._paused_writing

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        if not self._early:
            self._early = None
        elif self.owner is not None:
            # Delivered after the owner's attach has written what it queued while connecting
            # (an HTTP/2 preface must precede our answer to the server's SETTINGS): on the
            # next turn of the loop, or with the next bytes read if those come first.
            asyncio.get_running_loop().call_soon(self._deliver_early)

    def _deliver_early(self) -> None:
        early, owner = self._early, self.owner
        if early and owner is not None and not self.closed:
            self._early = None
            owner.upstream_data(bytes(early))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            if self.pool is not None:
                self.pool.forget(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
            if self.pool is not None:
                self.pool.forget(self)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """`max_idle`: idle connections kept per destination; `idle_timeout`: seconds an idle
    connection is kept; `connect_timeout`: seconds to connect."""

    max_idle: int = 256
    idle_timeout: float = 15.0
    connect_timeout: float = 5.0


@dataclass(slots=True)
class PoolStats:
    idle: int = 0
    busy: int = 0
    connects: int = 0
    reuses: int = 0


class UpstreamConnectError(OSError):
    """The upstream could not be reached (refused, unreachable, timed out)."""


class UpstreamPool:
    """Upstream connections by destination address; idle ones are reused (LIFO: the most
    recently used connection is the least likely to have been closed by the upstream)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: PoolConfig | None = None,
        *,
        mark: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self.config = config or PoolConfig()
        self._mark = mark
        self._idle: dict[tuple[Address, str, str | None], deque[UpstreamConnection]] = {}
        self._clock = clock
        self.stats = PoolStats()

    def take_idle(
        self, address: Address, protocol: str = HTTP1, source: str | None = None
    ) -> UpstreamConnection | None:
        """An idle connection to `address` speaking `protocol`, leaving from `source`, now
        busy; None if none."""
        idle = self._idle.get((address, protocol, source))
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            self.stats.idle -= 1
            self.stats.busy += 1
            self.stats.reuses += 1
            return conn
        return None

    async def connect(
        self, address: Address, protocol: str = HTTP1, source: str | None = None
    ) -> UpstreamConnection:
        """A new connection to `address` for `protocol`, busy (raises UpstreamConnectError).
        `source`: leave from this client address (transparent) instead of the node's own."""
        host, port = address
        try:
            sock = upstream_socket(host, self._mark, source)
        except OSError as exc:  # the source address, or no socket at all (EMFILE, ENOBUFS)
            raise UpstreamConnectError(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            ) from exc
        try:
            await asyncio.wait_for(
                self._loop.sock_connect(sock, address), self.config.connect_timeout
            )
            _, conn = await self._loop.create_connection(
                lambda: UpstreamConnection(address, self, protocol, source), sock=sock
            )
        except TimeoutError as exc:
            sock.close()
            raise UpstreamConnectError(
                f"connecting to {host}:{port} timed out after {self.config.connect_timeout}s"
            ) from exc
        except OSError as exc:
            sock.close()
            raise UpstreamConnectError(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            sock.close()
            raise
        self.stats.connects += 1
        self.stats.busy += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """A busy connection whose conversation is complete and kept alive: make it idle."""
        conn.owner = None
        self.stats.busy -= 1
        if conn.closed or conn.writing_paused:
            conn.close()
            return
        idle = self._idle.setdefault((conn.address, conn.protocol, conn.source), deque())
        if len(idle) >= self.config.max_idle:
            conn.close()
            return
        conn.resume_reading()  # an idle connection must notice the upstream closing it
        conn.idle_since = self._clock()
        idle.append(conn)
        self.stats.idle += 1

    def discard(self, conn: UpstreamConnection) -> None:
        """A busy connection that cannot be reused: close it."""
        conn.owner = None
        self.stats.busy -= 1
        conn.pool = None
        conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        """`conn` closed: if it was idle, it is gone from the pool."""
        idle = self._idle.get((conn.address, conn.protocol, conn.source))
        if idle is not None and conn.owner is None:
            try:
                idle.remove(conn)
            except ValueError:
                return
            self.stats.idle -= 1

    def expire(self) -> None:
        """Close idle connections older than `idle_timeout` (call periodically)."""
        limit = self._clock() - self.config.idle_timeout
        for idle in self._idle.values():
            while idle and idle[0].idle_since < limit:
                conn = idle.popleft()
                self.stats.idle -= 1
                conn.pool = None
                conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                conn = idle.popleft()
                conn.pool = None
                conn.close()
        self._idle.clear()
        self.stats.idle = 0
