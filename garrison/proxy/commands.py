"""The events a connection engine is given and the commands it answers with (sans-io).

The engine (pure, one per proxied connection, `garrison.proxy.engine`) turns every input into
commands; the asyncio server (`garrison.proxy.server`) executes them in order. Nothing here
does I/O, and the server knows no engine by name: it only calls `engine.handle(event)`.

    engine = make_engine(context, config)
    for cmd in engine.handle(Started(now, mono)): ...
    for cmd in engine.handle(ClientData(data, now, mono)): ...

Every event carries `now` (wall clock, `time.time()`: record timestamps only) and `mono`
(`time.monotonic()`: every timer). A step of the wall clock therefore moves record times but
never fires or stalls a timeout.

Events: `Started` (the connection was admitted), `ClientData` / `UpstreamData` (bytes),
`ClientClosed` (FIN, or `reset`: the connection ended without one), `UpstreamConnected`,
`UpstreamFailed` (a connect failed), `UpstreamClosed` (FIN or `reset`), `Wakeup` (a time
the engine asked for with `RequestWakeup` has come), `RulesetChanged` (a policy reload),
`Stopping` (the proxy stops: hand over what is owed, e.g. pending aggregated records).

Commands, executed in the order given:
- `Forward(side, data)`: relay bytes the peer sent (possibly normalized) to `side`;
- `Inject(side, data)`: bytes garrison itself answers with (deny answers, errors) to `side`;
- `Close(side, reason)`: close `side` (BOTH = the whole proxied connection) after writing
  what was queued for it; `linger=True`: the client may still be sending what garrison
  refused to read (a denied request's body), so its side is half-closed after the answer
  and what it still sends is read and thrown away (bounded), as nginx's lingering close
  does: closing with unread bytes would reset the connection and lose the answer;
- `OpenUpstream(protocol, pooled)`: `pooled=False`: connect a connection of this client's
  own now; `pooled=True`: borrow one speaking `protocol` from the per-destination pool when
  bytes are next sent upstream without one (and again after each release);
- `ReleaseUpstream(reusable)`: give the upstream connection back to the pool (`reusable`)
  or close it;
- `RequestWakeup(at)`: deliver a `Wakeup` at monotonic time `at` (replaces an earlier one);
- `PauseClient(paused)`: stop / resume reading the client (too many requests in flight);
- `Log(record)`: emit a flow record (access log, ring, metrics). `Log.later(build, *args)`
  is the same record built only when first read: the server reads it after the loop turn's
  bytes are written, so making records is not on the path of the bytes it describes. `build`
  must only read values that do not change afterwards (the engines pass their arguments).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from garrison.flows.record import Endpoint, FlowRecord
from garrison.policies.l7rules import L7Protocol, L7RuleSet
from garrison.policies.labels import Labels


class Side(StrEnum):
    CLIENT = "client"
    UPSTREAM = "upstream"
    BOTH = "both"


class TrafficDirection(StrEnum):
    """Whose policy the proxy enforces: the destination's ingress or the source's egress."""

    INGRESS = "INGRESS"
    EGRESS = "EGRESS"


@dataclass(frozen=True, slots=True)
class Forward:
    side: Side
    data: bytes

    def __init__(self, side: Side, data: bytes) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "side", side)
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class Inject:
    side: Side
    data: bytes

    def __init__(self, side: Side, data: bytes) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "side", side)
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class Close:
    side: Side
    reason: str = ""
    error: bool = False  # the close is the result of an error (protocol or internal)
    linger: bool = False  # half-close the client, read and discard what it still sends

    def __init__(
        self, side: Side, reason: str = "", error: bool = False, linger: bool = False
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "side", side)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "error", error)
        object.__setattr__(self, "linger", linger)


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    protocol: str
    pooled: bool = False

    def __init__(self, protocol: str, pooled: bool = False) -> None:
        object.__setattr__(self, "protocol", protocol)
        object.__setattr__(self, "pooled", pooled)


@dataclass(frozen=True, slots=True)
class ReleaseUpstream:
    reusable: bool

    def __init__(self, reusable: bool) -> None:
        object.__setattr__(self, "reusable", reusable)


@dataclass(frozen=True, slots=True)
class RequestWakeup:
    at: float  # time.monotonic()

    def __init__(self, at: float) -> None:
        object.__setattr__(self, "at", at)


@dataclass(frozen=True, slots=True)
class PauseClient:
    paused: bool


class Log:
    """Emit a flow record; equal to another `Log` of an equal record."""

    __slots__ = ("_args", "_build", "_record")
    __match_args__ = ("record",)

    def __init__(
        self,
        record: FlowRecord | None = None,
        *,
        build: Callable[..., FlowRecord] | None = None,
        args: tuple[Any, ...] = (),
    ) -> None:
        if (record is None) == (build is None):
            raise TypeError("Log takes a record or a build function, not both")
        self._record: FlowRecord | None = record
        self._build: Callable[..., FlowRecord] | None = build
        self._args: tuple[Any, ...] = args

    @classmethod
    def later(cls, build: Callable[..., FlowRecord], *args: Any) -> Log:
        """A record made by `build(*args)` when first read (see the module's docstring)."""
        return Log(None, build=build, args=args)  # not `cls(...)`: compiled, a direct call

    @property
    def record(self) -> FlowRecord:
        record = self._record
        if record is None:
            assert self._build is not None
            record = self._record = self._build(*self._args)
            self._build, self._args = None, ()
        return record

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Log):
            return NotImplemented
        return self.record == other.record

    def __hash__(self) -> int:
        return hash(self.record)

    def __repr__(self) -> str:
        return f"Log(record={self.record!r})"


Command = (
    Forward | Inject | Close | Log | OpenUpstream | ReleaseUpstream | RequestWakeup | PauseClient
)


# ---- events ---------------------------------------------------------------------------------
# The events of every read (ClientData, UpstreamData) or request (UpstreamConnected) write their
# `__init__` out ("Initialisers" in garrison/native.py); those that come once per connection
# keep the generated one.


@dataclass(frozen=True, slots=True)
class Started:
    """The connection was admitted and its engine made."""

    now: float
    mono: float


@dataclass(frozen=True, slots=True)
class ClientData:
    data: bytes
    now: float
    mono: float

    def __init__(self, data: bytes, now: float, mono: float) -> None:
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "now", now)
        object.__setattr__(self, "mono", mono)


@dataclass(frozen=True, slots=True)
class UpstreamData:
    data: bytes
    now: float
    mono: float

    def __init__(self, data: bytes, now: float, mono: float) -> None:
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "now", now)
        object.__setattr__(self, "mono", mono)


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client sent FIN (`reset=False`: answers may still be owed) or the connection
    ended without one (`reset=True`: nothing can be written any more)."""

    now: float
    mono: float
    reset: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamConnected:
    """An upstream connection was attached: a new one, or (HTTP/1.1) one from the pool, for
    every request of a keep-alive client."""

    now: float
    mono: float

    def __init__(self, now: float, mono: float) -> None:
        object.__setattr__(self, "now", now)
        object.__setattr__(self, "mono", mono)


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    reason: str
    now: float
    mono: float


@dataclass(frozen=True, slots=True)
class UpstreamClosed:
    """The upstream sent FIN (`reset=False`) or its connection was lost without one."""

    now: float
    mono: float
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Wakeup:
    now: float
    mono: float


@dataclass(frozen=True, slots=True)
class RulesetChanged:
    ruleset: L7RuleSet
    now: float
    mono: float


@dataclass(frozen=True, slots=True)
class Stopping:
    """The proxy stops: the connection is closed next; hand over what is still owed."""

    now: float
    mono: float


Event = (
    Started | ClientData | UpstreamData | ClientClosed | UpstreamConnected | UpstreamFailed
    | UpstreamClosed | Wakeup | RulesetChanged | Stopping
)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One end of a proxied connection, as flow records describe it."""

    identity: int
    labels: Labels
    ip: str
    port: int
    namespace: str | None = None
    pod_name: str | None = None


def flow_endpoint(peer: PeerInfo) -> Endpoint:
    """How a flow record names one end of a proxied connection."""
    return Endpoint.of(
        peer.identity,
        peer.labels,
        namespace=peer.namespace,
        pod_name=peer.pod_name or "",
        ip=peer.ip,
        port=peer.port,
    )


_CLIENT_LABELS_KEY = "proxy.client_labels"  # in ConnectionContext.shared
_MAX_CACHED_CLIENTS = 256


def client_endpoint(context: ConnectionContext) -> Endpoint:
    """`flow_endpoint(context.source)`, its label texts shared with every other connection of
    the same identity to the same upstream (they are most of an endpoint: an idle connection
    keeps only its address of its own)."""
    peer = context.source
    cache = context.shared.get(_CLIENT_LABELS_KEY)
    if not isinstance(cache, dict):
        cache = {}
        context.shared[_CLIENT_LABELS_KEY] = cache
    key = (peer.identity, peer.labels, peer.namespace, peer.pod_name)
    model = cache.get(key)
    if not isinstance(model, Endpoint):
        if len(cache) >= _MAX_CACHED_CLIENTS:
            cache.clear()
        model = cache[key] = flow_endpoint(peer)
    return Endpoint(model.identity, model.labels, model.namespace, model.pod_name, peer.ip,
                    peer.port)


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """Everything an engine needs about its connection; built by the server.

    `ruleset` is the L7 rule set for (destination endpoint, port, source identity) in
    `direction`. `host_hint` is used to render URLs when the request has no Host.
    `advertise`: in standalone Kafka mode, the proxy's own listen address, which the engine
    writes into Metadata and FindCoordinator responses so clients stay on the proxy.
    `shared`: state shared by every connection to the same upstream (the Kafka engine keeps
    the broker's topic-id registry there); the server owns it, engines only read/write keys
    of their own protocol.
    """

    source: PeerInfo
    destination: PeerInfo
    direction: TrafficDirection
    protocol: L7Protocol
    ruleset: L7RuleSet
    node_name: str = ""
    host_hint: str | None = None
    audit: bool = False
    advertise: tuple[str, int] | None = None
    shared: dict[str, object] = field(default_factory=dict)
