"""The proxy's typed configuration: limits and timeouts, in one place, passed in."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from garrison.parsers.http1 import HTTP1Limits
from garrison.parsers.http2 import H2Limits
from garrison.parsers.kafka import KafkaLimits
from garrison.policies.l7rules import L7Protocol


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `header_read`: a client must deliver a complete request head (HTTP/1.1) or
    its first frame (HTTP/2, Kafka) this soon after connecting or after its previous request.
    `idle`: a connection with nothing in flight is closed after this long.

    Kafka connections have their own `kafka_idle` and `kafka_upstream_reply` (`for_protocol`):
    Kafka clients keep a connection to each broker they may need, idle for minutes (brokers
    close them after 10, `connections.max.idle.ms`; librdkafka reports a broker that closes
    sooner as down), and a broker holds a JoinGroup answer until the group's rebalance ends
    (up to the client's `max.poll.interval.ms`, 5 minutes by default)."""

    connect: float = 5.0
    header_read: float = 10.0
    idle: float = 60.0
    upstream_reply: float = 60.0
    kafka_idle: float = 600.0
    kafka_upstream_reply: float = 330.0

    def for_protocol(self, protocol: L7Protocol) -> Timeouts:
        """The timeouts a connection of this protocol runs with."""
        if protocol is not L7Protocol.KAFKA:
            return self
        return replace(self, idle=self.kafka_idle, upstream_reply=self.kafka_upstream_reply)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    http1: HTTP1Limits = field(default_factory=HTTP1Limits)
    http2: H2Limits = field(default_factory=H2Limits)
    kafka: KafkaLimits = field(default_factory=KafkaLimits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: int = 10_000
    # Bytes buffered towards one side before the other side's reading is paused.
    write_buffer_high: int = 256 * 1024
    write_buffer_low: int = 64 * 1024
    # Query parameters whose values flow records show as [REDACTED] (exact name, decoded).
    redact_query_params: tuple[str, ...] = ()
    node_name: str = ""
