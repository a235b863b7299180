"""Prometheus metrics of the L7 proxy, named after Cilium's with a `garrison_` prefix.

- `garrison_policy_l7_total{rule, proxy_type, direction}` counter: `rule` = received,
  forwarded, denied, parse_errors; `proxy_type` = http, grpc, kafka; `direction` = ingress,
  egress.
- `garrison_proxy_upstream_reply_seconds{protocol, scope}` histogram: `scope` = headers
  (request forwarded → response headers), the only scope recorded.
- `garrison_proxy_connections{proxy_type}` gauge: client connections open now.
- `garrison_proxy_upstream_pool_connections{state}` gauge: `state` = idle, busy (sampled
  by the server every `sweep_interval`, 1 s).
- `garrison_proxy_access_log_errors_total` counter.
- `garrison_proxy_flows_total{verdict}` counter: FORWARDED, DROPPED, AUDIT, ERROR. In the
  agent, every record its sink writes: the datapath's drops and verdicts too.
- `garrison_proxy_destination_selected` gauge (standalone proxy): 1 when a loaded policy
  selects the destination for ingress, 0 when none does (every request is forwarded).
- `garrison_proxy_accepted_connections_total{worker}` counter: client connections each worker
  process accepted (`--workers`: how the kernel spread them).

Cilium's `cilium_policy_l7_total` counts with the same `rule` values (received / forwarded /
denied / parse_errors). Every `rule` × `proxy_type` × `direction` series exists from the start
at 0, so a rate over a counter that never moved is 0 rather than absent.

Each `ProxyMetrics` has its own `CollectorRegistry` (nothing goes to prometheus_client's global
one), so tests and several proxies in one process do not collide.

Several worker processes (`garrison proxy --workers N`): `use_multiprocess(directory)` switches
prometheus_client to its multiprocess mode before the workers make their metrics; each
worker's values live in files of that per-run directory, and the parent serves their sum
(`serve_multiprocess`): counters and histograms summed, the connection and pool gauges summed
over live workers, `destination_selected` the least of the live workers'.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import (
    CONTENT_TYPE_LATEST,
    ThreadingWSGIServer,
    make_wsgi_app,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from garrison.flows.record import (
    DropReasonDesc,
    FlowRecord,
    FlowType,
    L7FlowType,
    TrafficDirection,
    Verdict,
)
from garrison.policies.l7rules import L7Protocol
from garrison.policies.model import Direction

ProtocolLike = L7Protocol | str
DirectionLike = Direction | TrafficDirection | str

RULE_RECEIVED = "received"
RULE_FORWARDED = "forwarded"
RULE_DENIED = "denied"
RULE_PARSE_ERRORS = "parse_errors"
RULES = (RULE_RECEIVED, RULE_FORWARDED, RULE_DENIED, RULE_PARSE_ERRORS)

SCOPE_HEADERS = "headers"  # the reply's head, not its end: the proxy's view of the upstream

# 100 µs to 10 s: the proxy adds tens of µs, upstreams answer in ms to s.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The endpoint usually listens on the node's network (Prometheus scrapes it), in the agent's
# or the proxy's own process: a connection holds a thread and a descriptor, so at most this
# many are served at once (more are closed at once), each for at most this long idle.
MAX_SCRAPE_CONNECTIONS = 64
SCRAPE_TIMEOUT_S = 5.0

log = logging.getLogger("garrison.metrics")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    prefix: str = "garrison"
    worker: int = 0  # the worker process these metrics belong to (`--workers`)


def _proto(proto: ProtocolLike) -> str:
    return str(proto).lower()


def _direction(direction: DirectionLike) -> str:
    return str(direction).lower()


class MetricsServer:
    """The HTTP endpoint serving `/metrics` (any path) from a daemon thread."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._serve_thread = thread

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def forget(self) -> None:
        """In a forked child: close this process's copy of the listening socket (the thread
        serving it is the parent's, and did not come along)."""
        self._server.socket.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._serve_thread.join(timeout=5)


@dataclass(frozen=True, slots=True)
class _L7Series:
    """The labelled children one protocol and direction count into."""

    received: Any
    forwarded: Any
    denied: Any
    parse_errors: Any
    latency: Any  # the `headers` scope of the upstream reply histogram


class ProxyMetrics:
    """The counters the proxy engine and server update. Thread-safe (prometheus_client)."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        cfg = config or MetricsConfig()
        self.registry = CollectorRegistry(auto_describe=True)
        p = cfg.prefix
        self._policy_l7 = Counter(
            f"{p}_policy_l7",
            "L7 requests by what policy did with them",
            ["rule", "proxy_type", "direction"],
            registry=self.registry,
        )
        self._upstream_reply = Histogram(
            f"{p}_proxy_upstream_reply_seconds",
            "Time from forwarding a request to the upstream's response",
            ["protocol", "scope"],
            buckets=cfg.latency_buckets,
            registry=self.registry,
        )
        self._connections = Gauge(
            f"{p}_proxy_connections",
            "Client connections the proxy holds open",
            ["proxy_type"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._pool = Gauge(
            f"{p}_proxy_upstream_pool_connections",
            "Upstream connections in the pool by state",
            ["state"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._accepted = Counter(
            f"{p}_proxy_accepted_connections",
            "Client connections accepted, by worker process",
            ["worker"],
            registry=self.registry,
        ).labels(str(cfg.worker))
        self._access_log_errors = Counter(
            f"{p}_proxy_access_log_errors",
            "Access log writes that failed (the agent keeps the records in its in-memory ring)",
            registry=self.registry,
        )
        self._flows = Counter(
            f"{p}_proxy_flows",
            "Flow records the proxy emitted, by verdict",
            ["verdict"],
            registry=self.registry,
        )
        self._prefix = p
        # only the standalone proxy has one destination: registered on first use
        self._destination_selected: Gauge | None = None
        # The labelled children, by the arguments they were asked for: prometheus_client's
        # `labels()` validates and joins its arguments on every call, several µs each, and the
        # proxy asks for the same few children on every loop turn.
        self._l7_children: dict[tuple[str, ProtocolLike, DirectionLike], Any] = {}
        self._reply_children: dict[tuple[ProtocolLike, str], Any] = {}
        self._flow_children: dict[Verdict, Any] = {}
        self._series: dict[tuple[str, str], _L7Series] = {}  # by (protocol, direction)
        for rule in RULES:
            for proto in L7Protocol:
                for direction in Direction:
                    self._policy_l7.labels(rule, proto.value, direction.value)
        for proto in L7Protocol:
            self._connections.labels(proto.value)
        for state in ("idle", "busy"):
            self._pool.labels(state)
        for verdict in Verdict:
            self._flows.labels(verdict.value)

    # -- connections -------------------------------------------------------------------------

    def connection_opened(self, proto: ProtocolLike) -> None:
        self._connections.labels(_proto(proto)).inc()
        self._accepted.inc()

    def connection_closed(self, proto: ProtocolLike) -> None:
        self._connections.labels(_proto(proto)).dec()

    def set_upstream_pool(self, idle: int, busy: int) -> None:
        self._pool.labels("idle").set(idle)
        self._pool.labels("busy").set(busy)

    def set_destination_selected(self, selected: bool) -> None:
        if self._destination_selected is None:
            self._destination_selected = Gauge(
                f"{self._prefix}_proxy_destination_selected",
                "1 when a loaded policy selects the proxied destination for ingress, else 0",
                registry=self.registry,
                multiprocess_mode="livemin",
            )
        self._destination_selected.set(1 if selected else 0)

    # -- records -----------------------------------------------------------------------------

    def access_log_error(self) -> None:
        self._access_log_errors.inc()

    def count_records(self, records: Iterable[FlowRecord]) -> None:
        """The metrics of a batch of records (one loop turn's): each series is updated once
        with its total, through children resolved once per protocol and direction. A record
        with an aggregate stands for that many flows (repeated Kafka denials)."""
        counts: dict[Any, float] = {}
        latencies: dict[Any, list[float]] = {}
        for record in records:
            verdict = record.verdict
            aggregate = record.aggregate
            flows = 1 if aggregate is None else aggregate.flows
            child = self._flow_children.get(verdict)
            if child is None:
                child = self._flow_children[verdict] = self._flows.labels(verdict.value)
            counts[child] = counts.get(child, 0) + flows
            l7 = record.l7
            if record.type is not FlowType.L7 or l7 is None:
                continue
            series = self._l7_series(l7.protocol, record.traffic_direction)
            if record.drop_reason_desc is DropReasonDesc.PARSE_ERROR:
                # refused as malformed: an ERROR record, or (HTTP/2, whose connection goes
                # on) a request and its 400 answer, DROPPED — never a policy denial
                if verdict is Verdict.ERROR or l7.type is L7FlowType.REQUEST:
                    counts[series.parse_errors] = counts.get(series.parse_errors, 0) + 1
                continue
            if verdict is Verdict.ERROR:
                continue
            if l7.type is L7FlowType.REQUEST:
                counts[series.received] = counts.get(series.received, 0) + flows
                decided = series.denied if verdict is Verdict.DROPPED else series.forwarded
                counts[decided] = counts.get(decided, 0) + flows
            elif verdict is not Verdict.DROPPED and l7.latency_ns is not None:
                values = latencies.get(series.latency)
                if values is None:
                    latencies[series.latency] = [l7.latency_ns / 1e9]
                else:
                    values.append(l7.latency_ns / 1e9)
        for child, amount in counts.items():
            child.inc(amount)
        for child, values in latencies.items():
            for value in values:
                child.observe(value)

    def _l7_series(self, proto: str, direction: str) -> _L7Series:
        key = (proto, direction)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _L7Series(
                self._l7(RULE_RECEIVED, proto, direction),
                self._l7(RULE_FORWARDED, proto, direction),
                self._l7(RULE_DENIED, proto, direction),
                self._l7(RULE_PARSE_ERRORS, proto, direction),
                self._reply(proto, SCOPE_HEADERS),
            )
        return series

    def _l7(self, rule: str, proto: ProtocolLike, direction: DirectionLike) -> Any:
        key = (rule, proto, direction)
        child = self._l7_children.get(key)
        if child is None:
            child = self._l7_children[key] = self._policy_l7.labels(
                rule, _proto(proto), _direction(direction)
            )
        return child

    def _reply(self, proto: ProtocolLike, scope: str) -> Any:
        key = (proto, scope)
        child = self._reply_children.get(key)
        if child is None:
            child = self._reply_children[key] = self._upstream_reply.labels(_proto(proto), scope)
        return child

    # -- exposition --------------------------------------------------------------------------

    def render(self) -> bytes:
        """Prometheus text exposition format (content type `CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's current value (for tests and the agent's status output)."""
        return self.registry.get_sample_value(name, labels or {})

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve the text format over HTTP on host:port (port 0 picks a free one)."""
        return _serve_http(host, port, self.registry)


class _ScrapeHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT_S  # a client that connects and never asks is let go

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per scrape would bury everything else


class _BoundedServer(ThreadingWSGIServer):
    """prometheus_client's thread-per-connection server, with at most
    `MAX_SCRAPE_CONNECTIONS` connections served at once."""

    request_queue_size = MAX_SCRAPE_CONNECTIONS  # socketserver's 5 drops a burst's SYNs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_SCRAPE_CONNECTIONS)
        self._refusing = False
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if not self._refusing:
                log.warning("metrics: %d connections open, closing new ones until some end",
                            MAX_SCRAPE_CONNECTIONS)
            self._refusing = True
            self.shutdown_request(request)
            return
        self._refusing = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: nothing to report


class _BoundedServer6(_BoundedServer):
    address_family = socket.AF_INET6


def _serve_http(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    server_class = _BoundedServer6 if ":" in host else _BoundedServer
    server = make_server(host.strip("[]"), port, make_wsgi_app(registry), server_class,
                         handler_class=_ScrapeHandler)
    thread = threading.Thread(target=server.serve_forever, name="garrison-metrics",
                              daemon=True)
    thread.start()
    return MetricsServer(server, thread)


def use_multiprocess(directory: Path) -> None:
    """Keep the values of every metric made from now on (in this process and the processes
    it forks) in files under `directory`, prometheus_client's multiprocess mode. Its
    documented switch is the environment variable read when the library is imported; the
    proxy has imported it already, so the value class is chosen again here."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]


# Held while the parent reads the workers' files and while it removes a dead worker's.
_FILES = threading.Lock()


class _WorkersSum:
    """prometheus_client's `MultiProcessCollector`, read again when a worker's file changed
    under it (a worker starting, or one marked dead, while it read)."""

    def __init__(self, directory: Path) -> None:
        self._inner = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> list[Metric]:
        for attempt in range(5):
            try:
                with _FILES:
                    return list(self._inner.collect())  # type: ignore[no-untyped-call]
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(0.02)
        return []


def serve_multiprocess(host: str, port: int, directory: Path) -> MetricsServer:
    """Serve the sum of every worker's metrics in `directory` over HTTP on host:port."""
    registry = CollectorRegistry()
    registry.register(_WorkersSum(directory))
    return _serve_http(host, port, registry)


def worker_exited(pid: int, directory: Path) -> None:
    """A worker process is gone: its live gauges stop counting (its counters stay)."""
    with _FILES:
        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
