"""The connection-engine protocol (sans-io): events in, commands out.

The server (`garrison.proxy.server`) only knows `ConnectionEngine`: one `handle(event)` per
input (`garrison.proxy.commands`: client / upstream bytes, upstream connected / failed /
closed, client closed (FIN or reset), wakeup, ruleset changed, stopping) returning the
commands to execute (send, open / release an upstream, close, request a wakeup at a
monotonic time, pause the client, emit a record). It probes nothing.

`make_engine` builds the protocol's `EngineCore` (`engine_http1.HTTPEngine`,
`engine_h2.H2Engine`, `engine_kafka.KafkaEngine`: the protocol state machines, called with
wall-clock `now` for their records); the server wraps it in `EventEngine`, the one event
dispatcher every protocol shares. It owns the connection's timers, all on the monotonic clock
carried by the events:

- `head`: a request head (HTTP/1.1) or first frame must be complete `header_read` seconds
  after its first byte (after the connection opened, for the first one);
- `client`: a request body must keep coming (`idle` seconds of silence at most);
- `upstream`: an answer is owed: `upstream_reply` seconds of silence both ways at most;
- `idle`: nothing in flight: after `release_idle_after` seconds (the server's default: 20 ms)
  a pooled upstream goes back to the pool (`ReleaseUpstream`) and the core drops its parsers
  (`compact`); after `idle` the connection is closed.

So an idle keep-alive connection holds neither an upstream connection nor parsers (issue 17:
at most 2 KB each), while a client that sends its next request within `release_idle_after`
keeps both: giving them back after every answer and taking them again cost an allowed HTTP/1.1
request 10-18 µs of CPU more (bench/proxy_http.py, 2026-12-07).

A timer is requested lazily: a `RequestWakeup` only when the next deadline is earlier than
the one already asked for; a wakeup that comes early asks again. So keeping a busy
connection's timers costs no command per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from garrison.policies.l7rules import L7Protocol, L7RuleSet
from garrison.proxy.commands import (
    ClientClosed,
    ClientData,
    Close,
    Command,
    ConnectionContext,
    Event,
    OpenUpstream,
    PauseClient,
    ReleaseUpstream,
    RequestWakeup,
    RulesetChanged,
    Side,
    Started,
    Stopping,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamData,
    UpstreamFailed,
    Wakeup,
)
from garrison.proxy.config import ProxyConfig, Timeouts


class ConnectionEngine(Protocol):
    """One proxied connection's enforcement state machine, as the server drives it."""

    def handle(self, event: Event) -> Sequence[Command]: ...


class EngineCore(Protocol):
    """A protocol's state machine, driven by `EventEngine` (wall-clock `now` for records)."""

    @property
    def pooled_upstream(self) -> bool:
        """Upstream connections come from the shared pool (else one of its own, at once);
        read again when the core's `client_data` starts with an `OpenUpstream` (h2c)."""
        ...

    @property
    def upstream_protocol(self) -> str:
        """What it speaks upstream at the start (the pool never mixes protocols; a core whose
        upstream protocol changes says so with an `OpenUpstream` command: HTTP/1.1 → h2c)."""
        ...

    @property
    def upstream_reusable(self) -> bool:
        """Nothing in flight upstream: the connection may serve another client."""
        ...

    @property
    def pipeline_full(self) -> bool:
        """Enough requests wait for answers: stop reading the client."""
        ...

    @property
    def waiting(self) -> str:
        """"idle", "head", "client", "upstream" (or "closed"): which timer applies."""
        ...

    def compact(self) -> None: ...

    def client_data(self, data: bytes, now: float) -> Sequence[Command]: ...

    def upstream_data(self, data: bytes, now: float) -> Sequence[Command]: ...

    def client_eof(self, now: float) -> Sequence[Command]: ...

    def upstream_eof(self, now: float) -> Sequence[Command]: ...

    def upstream_unavailable(self, reason: str, now: float) -> Sequence[Command]: ...

    def timeout(self, waiting: str, now: float) -> Sequence[Command]: ...

    def update_ruleset(self, ruleset: L7RuleSet) -> None: ...

    def stop(self, reason: str, now: float) -> Sequence[Command]:
        """The connection ends now (reset without FIN, or the proxy stops): the records
        still owed (e.g. pending aggregated denials); nothing can be written any more."""
        ...

    def abort(self, reason: str, now: float) -> Sequence[Command]: ...


_NEVER = float("inf")


class EventEngine:
    """`ConnectionEngine` for any `EngineCore`: event dispatch, timers, upstream handling."""

    __slots__ = (
        "_attached",
        "_core",
        "_done",
        "_head_started",
        "_last_client",
        "_last_upstream",
        "_paused",
        "_pooled",
        "_release_after",
        "_released",
        "_timeouts",
        "_wake_at",
        "_was_idle",
    )

    def __init__(
        self, core: EngineCore, timeouts: Timeouts, release_idle_after: float = 0.02
    ) -> None:
        # `release_idle_after`: an idle pooled client gives its upstream back this soon.
        self._core = core
        self._timeouts = timeouts
        self._release_after = release_idle_after
        self._pooled = core.pooled_upstream
        self._attached = False  # an upstream connection is attached
        self._released = False  # idle, and the upstream went back to the pool
        self._paused = False  # PauseClient(True) is in force
        self._done = False
        self._last_client = 0.0
        self._last_upstream = 0.0
        self._head_started = 0.0
        self._was_idle = True
        self._wake_at = _NEVER  # the wakeup asked for (monotonic), none pending: inf

    def handle(self, event: Event) -> Sequence[Command]:
        kind = type(event)
        core = self._core
        if kind is ClientData:
            data: bytes = event.data  # type: ignore[union-attr]
            mono = event.mono
            self._last_client = mono
            if self._was_idle:
                self._head_started = mono
                self._was_idle = False
                self._released = False
            done = core.client_data(data, event.now)
            if self._pooled and done and type(done[0]) is OpenUpstream:
                # The core changed its upstream protocol (HTTP/1.1 -> h2c): is the connection
                # still one to give back when idle?
                self._pooled = core.pooled_upstream
            return self._after(done, mono)
        if kind is UpstreamData:
            mono = event.mono
            self._last_upstream = mono
            return self._after(core.upstream_data(event.data, event.now), mono)  # type: ignore[union-attr]
        if kind is Wakeup:
            return self._wakeup(event.now, event.mono)
        if kind is Started:
            mono = event.mono
            self._last_client = self._head_started = mono
            out: list[Command] = [OpenUpstream(core.upstream_protocol, pooled=self._pooled)]
            return self._after(out, mono)
        if kind is UpstreamConnected:
            self._attached = True
            self._last_upstream = event.mono
            return ()
        if kind is ClientClosed:
            if event.reset:  # type: ignore[union-attr]
                return self._stop("client connection reset", event.now)
            return self._after(core.client_eof(event.now), event.mono)
        if kind is UpstreamClosed:
            self._attached = False
            out = list(core.upstream_eof(event.now))
            # A pooled client goes on with another upstream connection for its next request;
            # one with a connection of its own cannot go on without it.
            out.append(
                ReleaseUpstream(False) if self._pooled
                else Close(Side.BOTH, "upstream closed the connection")
            )
            return self._after(out, event.mono)
        if kind is UpstreamFailed:
            out = list(core.upstream_unavailable(event.reason, event.now))  # type: ignore[union-attr]
            out.append(Close(Side.BOTH, "upstream unavailable"))
            return out
        if kind is RulesetChanged:
            core.update_ruleset(event.ruleset)  # type: ignore[union-attr]
            return ()
        if kind is Stopping:
            return self._stop("proxy stopping", event.now)
        raise TypeError(f"unknown event {event!r}")

    # -- endings ----------------------------------------------------------------------------------

    def _stop(self, reason: str, now: float) -> Sequence[Command]:
        if self._done:
            return ()
        self._done = True
        out = list(self._core.stop(reason, now))
        if self._pooled and self._attached:
            self._attached = False
            out.append(ReleaseUpstream(self._core.upstream_reusable))
        return out

    # -- timers -----------------------------------------------------------------------------------

    def _after(self, out: Sequence[Command], mono: float) -> Sequence[Command]:
        """After the core ran: flow control and the next deadline, as commands if needed."""
        core = self._core
        waiting = core.waiting
        if waiting == "idle":
            self._was_idle = True
        extra: list[Command] | None = None
        if self._pooled:
            if self._attached and out:
                last = out[-1]
                if type(last) is Close and last.side is Side.BOTH:
                    # The connection ends: its upstream may serve another client (a client
                    # that ends each connection after one request still reuses upstreams).
                    self._attached = False
                    reusable = core.upstream_reusable and not last.error
                    out = [*out[:-1], ReleaseUpstream(reusable), last]
            full = core.pipeline_full
            if full is not self._paused:
                self._paused = full
                extra = [PauseClient(full)]
        due = self._deadline(waiting)
        if due < self._wake_at:
            self._wake_at = due
            if extra is None:
                extra = [RequestWakeup(due)]
            else:
                extra.append(RequestWakeup(due))
        if extra is None:
            return out
        return [*out, *extra]

    def _deadline(self, waiting: str) -> float:
        """When the timer of what the core waits for runs out (monotonic)."""
        timeouts = self._timeouts
        if waiting == "idle":
            quiet_since = max(self._last_client, self._last_upstream)
            if self._pooled and not self._released:
                return quiet_since + self._release_after
            return quiet_since + timeouts.idle
        if waiting == "head":
            return self._head_started + timeouts.header_read
        if waiting == "client":
            return self._last_client + timeouts.idle
        if waiting == "upstream":
            return max(self._last_upstream, self._last_client) + timeouts.upstream_reply
        return _NEVER

    def _wakeup(self, now: float, mono: float) -> Sequence[Command]:
        self._wake_at = _NEVER
        core = self._core
        waiting = core.waiting
        due = self._deadline(waiting)
        if mono < due:  # early (a deadline moved on): ask again for the new one
            return self._after((), mono)
        if waiting == "idle" and self._pooled and not self._released:
            # Idle a moment: the upstream connection may serve other clients (not given back
            # after every response: borrowing per request costs more than keeping it), and
            # the core drops what it does not need while idle.
            self._released = True
            out: list[Command] = []
            if self._attached:
                self._attached = False
                out.append(ReleaseUpstream(core.upstream_reusable))
            core.compact()
            return self._after(out, mono)
        if waiting == "upstream" and self._pooled and not self._attached:
            return self._after((), mono)  # still connecting: the connect timeout applies
        out = list(core.timeout(waiting, now))
        out.append(Close(Side.BOTH, f"timeout ({waiting})"))
        return out


def make_engine(context: ConnectionContext, config: ProxyConfig) -> EngineCore:
    """The protocol state machine for the connection's L7 protocol (the server wraps it in
    `EventEngine`)."""
    if context.protocol is L7Protocol.HTTP:
        from garrison.proxy.engine_http1 import HTTPEngine

        return HTTPEngine(context, config)
    if context.protocol is L7Protocol.GRPC:
        from garrison.proxy.engine_h2 import H2Engine

        return H2Engine(context, config)
    from garrison.proxy.engine_kafka import KafkaEngine

    return KafkaEngine(context, config)
