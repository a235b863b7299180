"""The flow record: one verdict of the datapath or the proxy, with Hubble's field names.

A `FlowRecord` is what operators review: who talked to whom (identity, labels, pod, address),
what was decided (verdict, drop reason, the policy rules that allowed or denied) and, for
proxied traffic, the L7 request or response. `to_json()` gives one line of the access log with
the keys `hubble observe -o json` uses; `from_json()` reads it back (and reads Hubble's own
JSON flows too: unknown keys are ignored).

Where garrison's JSON differs from Hubble's, on purpose:

- `source` / `destination` also carry `ip` and `port` (the project's flow-record spec); the
  Hubble keys `IP` {source, destination, ipVersion} and `l4` {TCP {source_port, ...}} are
  written as well, derived from the same values, so Hubble recipes (`jq .IP.source`) work.
- `l7.kafka.topics` lists every topic a request names. Hubble's `topic` holds one topic (the
  first); a Produce or Fetch can name many and a review must see them all.
- `l7.grpc` {service, method, status} describes gRPC calls (Hubble shows gRPC only as HTTP/2;
  gRPC records carry the `http` part as well).
- `error` holds the reason of an ERROR verdict; `drop_reason_desc` is also set on L7 denials
  and proxy errors (Hubble leaves it empty for L7).
- policy refs (`ingress_allowed_by`, ...) carry `rule`, the section of the policy that decided
  (`specs[0].ingress[1]`), beside Hubble's {name, namespace, kind}.
- `l7.http.raw_target` is the request-target as the client sent it, when the proxy normalized
  it (`url` holds the normalized form, what policy matched and what went upstream).
- `latency_ns` is a JSON number (protobuf's JSON mapping would quote a uint64).

Absent values are omitted, as protobuf's JSON mapping does: a request has no `code`, a flow
whose reply state is unknown (a drop) has no `is_reply`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from garrison.policies.labels import Labels
from garrison.policies.mapstate import DropReason, MatchType
from garrison.policies.model import Direction
from garrison.policies.refs import RuleRef


class FlowDecodeError(ValueError):
    """A JSON flow record that cannot be read."""


class Verdict(StrEnum):
    FORWARDED = "FORWARDED"
    DROPPED = "DROPPED"
    AUDIT = "AUDIT"  # computed as a deny, let through because the endpoint is in audit mode
    ERROR = "ERROR"  # the proxy could not decide (bad frame, upstream failure): closed


class FlowType(StrEnum):
    """Hubble's `Type`."""

    L3_L4 = "L3_L4"
    L7 = "L7"


class TrafficDirection(StrEnum):
    INGRESS = "INGRESS"
    EGRESS = "EGRESS"
    TRAFFIC_DIRECTION_UNKNOWN = "TRAFFIC_DIRECTION_UNKNOWN"

    @classmethod
    def of(cls, direction: Direction | TrafficDirection | str) -> TrafficDirection:
        if isinstance(direction, TrafficDirection):
            return direction
        return cls(str(direction).upper())


class DropReasonDesc(StrEnum):
    """Why a flow was dropped (Hubble's `drop_reason_desc`).

    The datapath's reasons are Hubble's names and Cilium's drop codes; the last four are
    garrison's: the datapath found no proxy listener for a redirected port, the proxy could not
    parse a frame, could not reach or read the upstream, or failed inside.
    """

    DROP_REASON_UNKNOWN = "DROP_REASON_UNKNOWN"
    POLICY_DENIED = "POLICY_DENIED"  # enforced direction, no allow matched
    POLICY_DENY = "POLICY_DENY"  # an explicit deny rule matched
    INVALID_SOURCE_IP = "INVALID_SOURCE_IP"
    INVALID_PACKET_DROPPED = "INVALID_PACKET_DROPPED"
    UNSUPPORTED_L3_PROTOCOL = "UNSUPPORTED_L3_PROTOCOL"  # IPv6: garrison enforces IPv4 only
    CT_MAP_INSERTION_FAILED = "CT_MAP_INSERTION_FAILED"
    IP_FRAGMENTATION_NOT_SUPPORTED = "IP_FRAGMENTATION_NOT_SUPPORTED"
    NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION = (
        "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION"
    )
    PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL = "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL"
    PROXY_NOT_LISTENING = "PROXY_NOT_LISTENING"
    PARSE_ERROR = "PARSE_ERROR"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    PROXY_ERROR = "PROXY_ERROR"

    @classmethod
    def of(cls, reason: DropReason | DropReasonDesc | str) -> DropReasonDesc:
        return cls(str(reason))

    @property
    def text(self) -> str:
        """Cilium's wording, what `hubble observe` prints as the type of a drop."""
        return _DROP_TEXT[self]

    @property
    def code(self) -> int:
        """Cilium's numeric drop reason (the event's sub type); 0 for garrison's own."""
        return _DROP_CODE.get(self, 0)


_DROP_TEXT = {
    DropReasonDesc.DROP_REASON_UNKNOWN: "Unknown drop reason",
    DropReasonDesc.POLICY_DENIED: "Policy denied",
    DropReasonDesc.POLICY_DENY: "Policy denied by denylist",
    DropReasonDesc.INVALID_SOURCE_IP: "Invalid source ip",
    DropReasonDesc.INVALID_PACKET_DROPPED: "Invalid packet",
    DropReasonDesc.UNSUPPORTED_L3_PROTOCOL: "Unsupported L3 protocol",
    DropReasonDesc.CT_MAP_INSERTION_FAILED: "CT: Map insertion failed",
    DropReasonDesc.IP_FRAGMENTATION_NOT_SUPPORTED: "IP fragmentation not supported",
    DropReasonDesc.NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION: (
        "No configuration available to perform policy decision"
    ),
    DropReasonDesc.PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL: (
        "Proxy redirection not supported for protocol"
    ),
    DropReasonDesc.PROXY_NOT_LISTENING: "Proxy not listening",
    DropReasonDesc.PARSE_ERROR: "L7 parse error",
    DropReasonDesc.UPSTREAM_ERROR: "Upstream error",
    DropReasonDesc.PROXY_ERROR: "Proxy error",
}
_DROP_CODE = {
    DropReasonDesc.INVALID_SOURCE_IP: 132,
    DropReasonDesc.POLICY_DENIED: 133,
    DropReasonDesc.INVALID_PACKET_DROPPED: 134,
    DropReasonDesc.UNSUPPORTED_L3_PROTOCOL: 139,
    DropReasonDesc.CT_MAP_INSERTION_FAILED: 155,
    DropReasonDesc.IP_FRAGMENTATION_NOT_SUPPORTED: 157,
    DropReasonDesc.NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION: 165,
    DropReasonDesc.PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL: 180,
    DropReasonDesc.POLICY_DENY: 181,
}


class EventType(IntEnum):
    """Cilium's monitor message types (Hubble's `event_type.type`)."""

    DROP = 1
    TRACE = 4
    POLICY_VERDICT = 5
    ACCESS_LOG = 129  # an L7 record from the proxy


class TraceObservationPoint(StrEnum):
    """Where the datapath saw a forwarded packet (Hubble's `trace_observation_point`)."""

    TO_ENDPOINT = "TO_ENDPOINT"
    TO_PROXY = "TO_PROXY"
    TO_HOST = "TO_HOST"
    TO_STACK = "TO_STACK"
    FROM_ENDPOINT = "FROM_ENDPOINT"
    FROM_PROXY = "FROM_PROXY"
    FROM_HOST = "FROM_HOST"
    FROM_STACK = "FROM_STACK"
    FROM_NETWORK = "FROM_NETWORK"
    TO_NETWORK = "TO_NETWORK"

    @property
    def text(self) -> str:
        """`to-endpoint`, as `hubble observe` prints it."""
        return self.value.lower().replace("_", "-")

    @property
    def code(self) -> int:
        return _TRACE_CODE[self]


# Cilium's TraceObservationPoint numbers (the trace event's sub type).
_TRACE_CODE = {
    TraceObservationPoint.TO_ENDPOINT: 0,
    TraceObservationPoint.TO_PROXY: 1,
    TraceObservationPoint.TO_HOST: 2,
    TraceObservationPoint.TO_STACK: 3,
    TraceObservationPoint.FROM_ENDPOINT: 5,
    TraceObservationPoint.FROM_PROXY: 6,
    TraceObservationPoint.FROM_HOST: 7,
    TraceObservationPoint.FROM_STACK: 8,
    TraceObservationPoint.FROM_NETWORK: 10,
    TraceObservationPoint.TO_NETWORK: 11,
}

# Hubble's `policy_match_type` is Cilium's PolicyMatchType number; `hubble observe` prints the
# name after `policy-verdict:`.
MATCH_TYPE_NUMBER: Mapping[MatchType, int] = {
    MatchType.NONE: 0,
    MatchType.L3_ONLY: 1,
    MatchType.L3_L4: 2,
    MatchType.L4_ONLY: 3,
    MatchType.ALL: 4,
    MatchType.L3_PROTO: 5,
    MatchType.PROTO_ONLY: 6,
}
MATCH_TYPE_BY_NUMBER: Mapping[int, MatchType] = {n: m for m, n in MATCH_TYPE_NUMBER.items()}
MATCH_TYPE_TEXT: Mapping[MatchType, str] = {
    MatchType.NONE: "none",
    MatchType.L3_ONLY: "L3-Only",
    MatchType.L3_L4: "L3-L4",
    MatchType.L4_ONLY: "L4-Only",
    MatchType.ALL: "all",
    MatchType.L3_PROTO: "L3-Proto",
    MatchType.PROTO_ONLY: "Proto-Only",
}


class L4Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"
    ICMPV4 = "ICMPv4"  # Hubble's `l4.ICMPv4 {type, code}`: the type is the destination port

    @classmethod
    def of(cls, text: str) -> L4Protocol:
        """`tcp`, `TCP`, `icmpv4`...: protocol names are case-insensitive."""
        for proto in cls:
            if proto.value.upper() == text.upper():
                return proto
        raise ValueError(f"unknown L4 protocol {text!r}")


class L7FlowType(StrEnum):
    REQUEST = "REQUEST"
    RESPONSE = "RESPONSE"


# ---------------------------------------------------------------------------------------------
# Parts


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of a flow. `labels` are `source:key=value` strings, sorted.

    `ip` is "" and `port` 0 when unknown (a port is meaningless for L3-only traffic).
    """

    identity: int = 0
    labels: tuple[str, ...] = ()
    namespace: str = ""
    pod_name: str = ""
    ip: str = ""
    port: int = 0
    # The endpoint's JSON text, made on first use: a connection's records share endpoints, and
    # their labels are most of a line.
    _json: str = field(default="", init=False, repr=False, compare=False, hash=False)

    def __init__(
        self,
        identity: int = 0,
        labels: tuple[str, ...] = (),
        namespace: str = "",
        pod_name: str = "",
        ip: str = "",
        port: int = 0,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "identity", identity)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "namespace", namespace)
        object.__setattr__(self, "pod_name", pod_name)
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "_json", "")

    @classmethod
    def of(
        cls,
        identity: int,
        labels: Labels | Iterable[str] = (),
        *,
        namespace: str | None = None,
        pod_name: str = "",
        ip: str = "",
        port: int = 0,
    ) -> Endpoint:
        """Build from garrison's `Labels`; the namespace defaults to the namespace label."""
        if isinstance(labels, Labels):
            if namespace is None:
                namespace = labels.namespace
            texts = tuple(str(label) for label in labels)
        else:
            texts = tuple(sorted(labels))
        return cls(
            identity=identity,
            labels=texts,
            namespace=namespace or "",
            pod_name=pod_name,
            ip=ip,
            port=port,
        )


@dataclass(frozen=True, slots=True)
class TCPFlags:
    syn: bool = False
    ack: bool = False
    fin: bool = False
    rst: bool = False
    psh: bool = False

    @classmethod
    def from_bits(cls, bits: int) -> TCPFlags:
        """From the TCP header's flags byte, as the datapath's drop event carries it."""
        return cls(**{name: bool(bits & bit) for name, bit in TCP_FLAG_BITS})

    def names(self) -> list[str]:
        """Set flags in the order Hubble's summary lists them."""
        order = ("syn", "ack", "rst", "fin", "psh")
        return [name.upper() for name in order if getattr(self, name)]


# Bits of the TCP header's flags byte.
TCP_FLAG_BITS = (("fin", 0x01), ("syn", 0x02), ("rst", 0x04), ("psh", 0x08), ("ack", 0x10))


@dataclass(frozen=True, slots=True)
class Layer4:
    """The transport protocol; the ports are on the endpoints. `flags` only for TCP packets
    the datapath saw (None for proxy records, which describe a connection, not a packet)."""

    protocol: L4Protocol = L4Protocol.TCP
    flags: TCPFlags | None = None

    def __init__(
        self,
        protocol: L4Protocol = L4Protocol.TCP,
        flags: TCPFlags | None = None,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "protocol", protocol)
        object.__setattr__(self, "flags", flags)


@dataclass(frozen=True, slots=True)
class HTTPHeader:
    key: str
    value: str

    def __init__(self, key: str, value: str) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "value", value)


@dataclass(frozen=True, slots=True)
class HTTP:
    """`code` is 0 for requests. `url` is `scheme://host/path?query` when the host is known,
    with the path as the proxy normalized, matched and forwarded it. `raw_target` (garrison's,
    not Hubble's) is the request-target exactly as the client sent it, set on request records
    only when it differs from what `url` shows (`/v1/./x/../y` became `/v1/y`)."""

    method: str = ""
    url: str = ""
    protocol: str = ""
    code: int = 0
    headers: tuple[HTTPHeader, ...] = ()
    raw_target: str = ""

    def __init__(
        self,
        method: str = "",
        url: str = "",
        protocol: str = "",
        code: int = 0,
        headers: tuple[HTTPHeader, ...] = (),
        raw_target: str = "",
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "protocol", protocol)
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "raw_target", raw_target)


@dataclass(frozen=True, slots=True)
class Kafka:
    """`api_key` by name (`produce`, as Cilium's rules and Hubble write it; the number for keys
    that have no name). `topic` is Hubble's single topic (the first one); `topics` all the
    topics the request names. `error_code` is None for requests; every field is empty in the
    record of a frame the proxy could not parse."""

    api_key: str = ""
    api_version: int | None = None
    correlation_id: int | None = None
    topic: str = ""
    topics: tuple[str, ...] = ()
    error_code: int | None = None

    def __init__(
        self,
        api_key: str = "",
        api_version: int | None = None,
        correlation_id: int | None = None,
        topic: str = "",
        topics: tuple[str, ...] = (),
        error_code: int | None = None,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "api_key", api_key)
        object.__setattr__(self, "api_version", api_version)
        object.__setattr__(self, "correlation_id", correlation_id)
        object.__setattr__(self, "topic", topic)
        object.__setattr__(self, "topics", topics)
        object.__setattr__(self, "error_code", error_code)


@dataclass(frozen=True, slots=True)
class GRPC:
    """A gRPC call: `pkg.Service` and `Method`; `status` is the grpc-status of a response
    (None for requests, or when the response carried none)."""

    service: str = ""
    method: str = ""
    status: int | None = None

    def __init__(self, service: str = "", method: str = "", status: int | None = None) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "service", service)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "status", status)


@dataclass(frozen=True, slots=True)
class Layer7:
    type: L7FlowType = L7FlowType.REQUEST
    latency_ns: int | None = None
    http: HTTP | None = None
    kafka: Kafka | None = None
    grpc: GRPC | None = None

    def __init__(
        self,
        type: L7FlowType = L7FlowType.REQUEST,
        latency_ns: int | None = None,
        http: HTTP | None = None,
        kafka: Kafka | None = None,
        grpc: GRPC | None = None,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "latency_ns", latency_ns)
        object.__setattr__(self, "http", http)
        object.__setattr__(self, "kafka", kafka)
        object.__setattr__(self, "grpc", grpc)

    @property
    def protocol(self) -> str:
        """`grpc`, `http` or `kafka` (`l7` when the record names none)."""
        if self.grpc is not None:
            return "grpc"
        if self.http is not None:
            return "http"
        if self.kafka is not None:
            return "kafka"
        return "l7"


@dataclass(frozen=True, slots=True)
class Policy:
    """A policy that allowed or denied (Hubble's {name, namespace, kind}) and the `rule`
    inside it (`specs[0].ingress[1]`). `namespace` is "" for cluster-wide policies."""

    name: str
    namespace: str = ""
    kind: str = ""
    rule: str = ""

    def __init__(self, name: str, namespace: str = "", kind: str = "", rule: str = "") -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "namespace", namespace)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "rule", rule)

    @classmethod
    def from_ref(cls, ref: RuleRef) -> Policy:
        spec = f"specs[{ref.spec_index}]." if ref.has_specs else ""
        return cls(
            name=ref.name,
            namespace=ref.namespace or "",
            kind=ref.kind.value,
            rule=f"{spec}{ref.section}[{ref.rule_index}]",
        )


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Hubble's flow aggregation counters: one record that stands for this many flows (its
    own included), by direction. The record's time is the first flow's."""

    ingress_flow_count: int = 0
    egress_flow_count: int = 0
    unknown_direction_flow_count: int = 0

    def __init__(
        self,
        ingress_flow_count: int = 0,
        egress_flow_count: int = 0,
        unknown_direction_flow_count: int = 0,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "ingress_flow_count", ingress_flow_count)
        object.__setattr__(self, "egress_flow_count", egress_flow_count)
        object.__setattr__(self, "unknown_direction_flow_count", unknown_direction_flow_count)

    @classmethod
    def of(cls, direction: TrafficDirection, count: int) -> Aggregate:
        if direction is TrafficDirection.INGRESS:
            return cls(ingress_flow_count=count)
        if direction is TrafficDirection.EGRESS:
            return cls(egress_flow_count=count)
        return cls(unknown_direction_flow_count=count)

    @property
    def flows(self) -> int:
        """How many flows the record stands for, in every direction."""
        return self.ingress_flow_count + self.egress_flow_count + self.unknown_direction_flow_count

    def to_dict(self) -> dict[str, int]:
        counts = {
            "ingress_flow_count": self.ingress_flow_count,
            "egress_flow_count": self.egress_flow_count,
            "unknown_direction_flow_count": self.unknown_direction_flow_count,
        }
        return {key: value for key, value in counts.items() if value}


# ---------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowRecord:
    """One flow. `time` is nanoseconds since the epoch (UTC).

    `source` is who sent the packet or message this record describes: for an L7 response the
    server, with `is_reply` True (Hubble's convention; the compact rendering turns it around).
    `is_reply` is None when unknown (datapath drops).
    """

    time: int
    verdict: Verdict
    type: FlowType
    event_type: EventType
    traffic_direction: TrafficDirection
    source: Endpoint
    destination: Endpoint
    is_reply: bool | None = None
    l4: Layer4 | None = None
    l7: Layer7 | None = None
    drop_reason_desc: DropReasonDesc | None = None
    policy_match_type: MatchType | None = None
    trace_observation_point: TraceObservationPoint | None = None
    ingress_allowed_by: tuple[Policy, ...] = ()
    egress_allowed_by: tuple[Policy, ...] = ()
    ingress_denied_by: tuple[Policy, ...] = ()
    egress_denied_by: tuple[Policy, ...] = ()
    summary: str = ""
    node_name: str = ""
    error: str = ""
    aggregate: Aggregate | None = None
    # garrison's: the answer a DROPPED packet got instead of silence, `icmp` or `tcp-reset`
    # (`endpoint config NAME deny-response=...`); Hubble has no such field
    deny_response: str = ""

    def __init__(
        self,
        *,
        time: int,
        verdict: Verdict,
        type: FlowType,
        event_type: EventType,
        traffic_direction: TrafficDirection,
        source: Endpoint,
        destination: Endpoint,
        is_reply: bool | None = None,
        l4: Layer4 | None = None,
        l7: Layer7 | None = None,
        drop_reason_desc: DropReasonDesc | None = None,
        policy_match_type: MatchType | None = None,
        trace_observation_point: TraceObservationPoint | None = None,
        ingress_allowed_by: tuple[Policy, ...] = (),
        egress_allowed_by: tuple[Policy, ...] = (),
        ingress_denied_by: tuple[Policy, ...] = (),
        egress_denied_by: tuple[Policy, ...] = (),
        summary: str = "",
        node_name: str = "",
        error: str = "",
        aggregate: Aggregate | None = None,
        deny_response: str = "",
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "verdict", verdict)
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "event_type", event_type)
        object.__setattr__(self, "traffic_direction", traffic_direction)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "destination", destination)
        object.__setattr__(self, "is_reply", is_reply)
        object.__setattr__(self, "l4", l4)
        object.__setattr__(self, "l7", l7)
        object.__setattr__(self, "drop_reason_desc", drop_reason_desc)
        object.__setattr__(self, "policy_match_type", policy_match_type)
        object.__setattr__(self, "trace_observation_point", trace_observation_point)
        object.__setattr__(self, "ingress_allowed_by", ingress_allowed_by)
        object.__setattr__(self, "egress_allowed_by", egress_allowed_by)
        object.__setattr__(self, "ingress_denied_by", ingress_denied_by)
        object.__setattr__(self, "egress_denied_by", egress_denied_by)
        object.__setattr__(self, "summary", summary)
        object.__setattr__(self, "node_name", node_name)
        object.__setattr__(self, "error", error)
        object.__setattr__(self, "aggregate", aggregate)
        object.__setattr__(self, "deny_response", deny_response)

    # The JSON codec lives in `garrison.flows.codec` (it needs every type of this module).

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, as Python values."""
        from garrison.flows.codec import record_to_dict

        return record_to_dict(self)

    def to_json(self) -> str:
        """One line of JSON (ASCII only, no newline inside) with Hubble's keys."""
        from garrison.flows.codec import record_to_json

        return record_to_json(self)

    @classmethod
    def from_json(cls, line: str | bytes) -> FlowRecord:
        """Read a line of the access log (or of `hubble observe -o json`)."""
        from garrison.flows.codec import record_from_json

        return record_from_json(line)
