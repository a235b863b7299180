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
- `latency_ns` is a JSON number (protobuf's JSON mapping would quote a uint64).

Absent values are omitted, as protobuf's JSON mapping does: a request has no `code`, a flow
whose reply state is unknown (a drop) has no `is_reply`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
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

    The first three are Hubble's names and Cilium's drop codes; the rest are garrison's: the
    datapath found no proxy listener for a redirected port, the proxy could not parse a frame,
    could not reach or read the upstream, or failed inside.
    """

    DROP_REASON_UNKNOWN = "DROP_REASON_UNKNOWN"
    POLICY_DENIED = "POLICY_DENIED"  # enforced direction, no allow matched
    POLICY_DENY = "POLICY_DENY"  # an explicit deny rule matched
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
    DropReasonDesc.PROXY_NOT_LISTENING: "Proxy not listening",
    DropReasonDesc.PARSE_ERROR: "L7 parse error",
    DropReasonDesc.UPSTREAM_ERROR: "Upstream error",
    DropReasonDesc.PROXY_ERROR: "Proxy error",
}
_DROP_CODE = {DropReasonDesc.POLICY_DENIED: 133, DropReasonDesc.POLICY_DENY: 181}


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
_MATCH_NUMBER = {
    MatchType.NONE: 0,
    MatchType.L3_ONLY: 1,
    MatchType.L3_L4: 2,
    MatchType.L4_ONLY: 3,
    MatchType.ALL: 4,
    MatchType.L3_PROTO: 5,
    MatchType.PROTO_ONLY: 6,
}
_MATCH_BY_NUMBER = {number: match for match, number in _MATCH_NUMBER.items()}
MATCH_TYPE_TEXT: Mapping[MatchType, str] = {
    MatchType.NONE: "none",
    MatchType.L3_ONLY: "L3-Only",
    MatchType.L3_L4: "L3-L4",
    MatchType.L4_ONLY: "L4-Only",
    MatchType.ALL: "all",
    MatchType.L3_PROTO: "L3-Proto",
    MatchType.PROTO_ONLY: "Proto-Only",
}


def match_type_number(match: MatchType) -> int:
    return _MATCH_NUMBER[match]


class L4Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


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

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.identity, self.labels, self.namespace, self.pod_name, self.ip, port)


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
        return cls(**{name: bool(bits & bit) for name, bit in _TCP_FLAG_BITS})

    @classmethod
    def parse(cls, text: str) -> TCPFlags:
        """`"SYN, ACK"` (any separator of commas and spaces, any case)."""
        names = {part.lower() for part in re.split(r"[,\s]+", text) if part}
        unknown = names - {name for name, _ in _TCP_FLAG_BITS}
        if unknown:
            raise ValueError(f"unknown TCP flags: {', '.join(sorted(unknown))}")
        return cls(**{name: True for name in names})

    def names(self) -> list[str]:
        """Set flags in the order Hubble's summary lists them."""
        order = ("syn", "ack", "rst", "fin", "psh")
        return [name.upper() for name in order if getattr(self, name)]


# Bits of the TCP header's flags byte.
_TCP_FLAG_BITS = (("fin", 0x01), ("syn", 0x02), ("rst", 0x04), ("psh", 0x08), ("ack", 0x10))


@dataclass(frozen=True, slots=True)
class Layer4:
    """The transport protocol; the ports are on the endpoints. `flags` only for TCP packets
    the datapath saw (None for proxy records, which describe a connection, not a packet)."""

    protocol: L4Protocol = L4Protocol.TCP
    flags: TCPFlags | None = None


@dataclass(frozen=True, slots=True)
class HTTPHeader:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class HTTP:
    """`code` is 0 for requests. `url` is `scheme://host/path?query` when the host is known."""

    method: str = ""
    url: str = ""
    protocol: str = ""
    code: int = 0
    headers: tuple[HTTPHeader, ...] = ()


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


@dataclass(frozen=True, slots=True)
class GRPC:
    """A gRPC call: `pkg.Service` and `Method`; `status` is the grpc-status of a response
    (None for requests, or when the response carried none)."""

    service: str = ""
    method: str = ""
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Layer7:
    type: L7FlowType = L7FlowType.REQUEST
    latency_ns: int | None = None
    http: HTTP | None = None
    kafka: Kafka | None = None
    grpc: GRPC | None = None

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

    @classmethod
    def from_ref(cls, ref: RuleRef) -> Policy:
        spec = f"specs[{ref.spec_index}]." if ref.has_specs else ""
        return cls(
            name=ref.name,
            namespace=ref.namespace or "",
            kind=ref.kind.value,
            rule=f"{spec}{ref.section}[{ref.rule_index}]",
        )


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

    @property
    def protocol(self) -> str:
        """`http`, `grpc`, `kafka` for proxy records, `l3` for datapath ones."""
        if self.type is FlowType.L3_L4 or self.l7 is None:
            return "l3"
        return self.l7.protocol

    def to_dict(self) -> dict[str, Any]:
        return _record_to_dict(self)

    def to_json(self) -> str:
        """One line of JSON (ASCII only, no newline inside)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlowRecord:
        try:
            return _record_from_dict(data)
        except FlowDecodeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FlowDecodeError(f"not a flow record: {exc}") from exc

    @classmethod
    def from_json(cls, line: str | bytes) -> FlowRecord:
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise FlowDecodeError(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise FlowDecodeError("a flow record is a JSON object")
        return cls.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Time


def format_time(time_ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds: `2024-11-21T12:00:00.123456789Z`."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})\Z"
)


def parse_time(text: str) -> int:
    """RFC 3339 (any fraction up to nanoseconds, `Z` or an offset) to nanoseconds."""
    m = _RFC3339.match(text)
    if m is None:
        raise FlowDecodeError(f"not an RFC 3339 time: {text!r}")
    date, clock, fraction, zone = m.groups()
    offset = "+00:00" if zone in ("Z", "z") else zone
    whole = datetime.fromisoformat(f"{date}T{clock}{offset}")
    nanos = int((fraction or "").ljust(9, "0"))
    return int(whole.timestamp()) * 1_000_000_000 + nanos


# ---------------------------------------------------------------------------------------------
# JSON encoding


def _endpoint_to_dict(ep: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {"identity": ep.identity}
    if ep.namespace:
        out["namespace"] = ep.namespace
    if ep.labels:
        out["labels"] = list(ep.labels)
    if ep.pod_name:
        out["pod_name"] = ep.pod_name
    if ep.ip:
        out["ip"] = ep.ip
    if ep.port:
        out["port"] = ep.port
    return out


def _l4_to_dict(l4: Layer4, src: Endpoint, dst: Endpoint) -> dict[str, Any]:
    inner: dict[str, Any] = {"source_port": src.port, "destination_port": dst.port}
    if l4.flags is not None:
        inner["flags"] = {name: True for name in l4.flags.names()}
    return {l4.protocol.value: inner}


def _http_to_dict(http: HTTP) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if http.code:
        out["code"] = http.code
    if http.method:
        out["method"] = http.method
    if http.url:
        out["url"] = http.url
    if http.protocol:
        out["protocol"] = http.protocol
    if http.headers:
        out["headers"] = [{"key": h.key, "value": h.value} for h in http.headers]
    return out


def _kafka_to_dict(kafka: Kafka) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kafka.error_code is not None:
        out["error_code"] = kafka.error_code
    if kafka.api_version is not None:
        out["api_version"] = kafka.api_version
    if kafka.api_key:
        out["api_key"] = kafka.api_key
    if kafka.correlation_id is not None:
        out["correlation_id"] = kafka.correlation_id
    if kafka.topic:
        out["topic"] = kafka.topic
    if kafka.topics:
        out["topics"] = list(kafka.topics)
    return out


def _grpc_to_dict(grpc: GRPC) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if grpc.service:
        out["service"] = grpc.service
    if grpc.method:
        out["method"] = grpc.method
    if grpc.status is not None:
        out["status"] = grpc.status
    return out


def _l7_to_dict(l7: Layer7) -> dict[str, Any]:
    out: dict[str, Any] = {"type": l7.type.value}
    if l7.latency_ns is not None:
        out["latency_ns"] = l7.latency_ns
    if l7.http is not None:
        out["http"] = _http_to_dict(l7.http)
    if l7.kafka is not None:
        out["kafka"] = _kafka_to_dict(l7.kafka)
    if l7.grpc is not None:
        out["grpc"] = _grpc_to_dict(l7.grpc)
    return out


def _policy_to_dict(policy: Policy) -> dict[str, Any]:
    out: dict[str, Any] = {"name": policy.name}
    if policy.namespace:
        out["namespace"] = policy.namespace
    if policy.kind:
        out["kind"] = policy.kind
    if policy.rule:
        out["rule"] = policy.rule
    return out


def _event_sub_type(record: FlowRecord) -> int:
    if record.event_type is EventType.DROP and record.drop_reason_desc is not None:
        return record.drop_reason_desc.code
    if record.event_type is EventType.TRACE and record.trace_observation_point is not None:
        return record.trace_observation_point.code
    return 0


def _ip_version(address: str) -> str:
    return "IPv6" if ":" in address else "IPv4"


def _record_to_dict(r: FlowRecord) -> dict[str, Any]:
    # Key order follows Hubble's Flow message.
    out: dict[str, Any] = {"time": format_time(r.time), "verdict": r.verdict.value}
    if r.source.ip or r.destination.ip:
        out["IP"] = {
            "source": r.source.ip,
            "destination": r.destination.ip,
            "ipVersion": _ip_version(r.source.ip or r.destination.ip),
        }
    if r.l4 is not None:
        out["l4"] = _l4_to_dict(r.l4, r.source, r.destination)
    out["source"] = _endpoint_to_dict(r.source)
    out["destination"] = _endpoint_to_dict(r.destination)
    out["Type"] = r.type.value
    if r.node_name:
        out["node_name"] = r.node_name
    if r.l7 is not None:
        out["l7"] = _l7_to_dict(r.l7)
    event: dict[str, Any] = {"type": int(r.event_type)}
    sub_type = _event_sub_type(r)
    if sub_type:
        event["sub_type"] = sub_type
    out["event_type"] = event
    out["traffic_direction"] = r.traffic_direction.value
    if r.policy_match_type is not None:
        out["policy_match_type"] = _MATCH_NUMBER[r.policy_match_type]
    if r.trace_observation_point is not None:
        out["trace_observation_point"] = r.trace_observation_point.value
    if r.drop_reason_desc is not None:
        out["drop_reason_desc"] = r.drop_reason_desc.value
    if r.is_reply is not None:
        out["is_reply"] = r.is_reply
    if r.summary:
        out["Summary"] = r.summary
    if r.error:
        out["error"] = r.error
    for key in ("egress_allowed_by", "ingress_allowed_by", "egress_denied_by", "ingress_denied_by"):
        policies: tuple[Policy, ...] = getattr(r, key)
        if policies:
            out[key] = [_policy_to_dict(p) for p in policies]
    return out


# ---------------------------------------------------------------------------------------------
# JSON decoding


def _obj(data: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FlowDecodeError(f"{key}: expected an object")
    return value


def _int(value: Any, what: str) -> int:
    # protobuf's JSON mapping quotes 64-bit integers: accept "123" as well as 123.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FlowDecodeError(f"{what}: expected an integer")
    return int(value)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise FlowDecodeError(f"{what}: expected a string")
    return value


def _endpoint_from_dict(
    data: Mapping[str, Any] | None, fallback_ip: str, fallback_port: int
) -> Endpoint:
    if data is None:
        return Endpoint(ip=fallback_ip, port=fallback_port)
    labels = data.get("labels") or []
    if not isinstance(labels, list):
        raise FlowDecodeError("labels: expected a list")
    return Endpoint(
        identity=_int(data.get("identity", 0), "identity"),
        labels=tuple(_str(label, "label") for label in labels),
        namespace=_str(data.get("namespace", ""), "namespace"),
        pod_name=_str(data.get("pod_name", ""), "pod_name"),
        ip=_str(data.get("ip", fallback_ip), "ip"),
        port=_int(data.get("port", fallback_port), "port"),
    )


def _l4_from_dict(data: Mapping[str, Any] | None) -> tuple[Layer4 | None, int, int]:
    if data is None:
        return None, 0, 0
    for proto in L4Protocol:
        inner = _obj(data, proto.value)
        if inner is None:
            continue
        flags_data = _obj(inner, "flags")
        flags = None
        if flags_data is not None:
            known = {name for name, _ in _TCP_FLAG_BITS}
            flags = TCPFlags(
                **{k.lower(): bool(v) for k, v in flags_data.items() if k.lower() in known}
            )
        src = _int(inner.get("source_port", 0), "source_port")
        dst = _int(inner.get("destination_port", 0), "destination_port")
        return Layer4(protocol=proto, flags=flags), src, dst
    return None, 0, 0  # ICMP and others: not modelled


def _l7_from_dict(data: Mapping[str, Any] | None) -> Layer7 | None:
    if data is None:
        return None
    http_data = _obj(data, "http")
    http = None
    if http_data is not None:
        headers = http_data.get("headers") or []
        if not isinstance(headers, list):
            raise FlowDecodeError("headers: expected a list")
        http = HTTP(
            method=_str(http_data.get("method", ""), "method"),
            url=_str(http_data.get("url", ""), "url"),
            protocol=_str(http_data.get("protocol", ""), "protocol"),
            code=_int(http_data.get("code", 0), "code"),
            headers=tuple(
                HTTPHeader(_str(h["key"], "header key"), _str(h.get("value", ""), "header value"))
                for h in headers
            ),
        )
    kafka_data = _obj(data, "kafka")
    kafka = None
    if kafka_data is not None:
        topics = kafka_data.get("topics") or []
        if not isinstance(topics, list):
            raise FlowDecodeError("topics: expected a list")
        error_code = kafka_data.get("error_code")
        version = kafka_data.get("api_version")
        correlation = kafka_data.get("correlation_id")
        kafka = Kafka(
            api_key=_str(kafka_data.get("api_key", ""), "api_key"),
            api_version=None if version is None else _int(version, "api_version"),
            correlation_id=None if correlation is None else _int(correlation, "correlation_id"),
            topic=_str(kafka_data.get("topic", ""), "topic"),
            topics=tuple(_str(t, "topic") for t in topics),
            error_code=None if error_code is None else _int(error_code, "error_code"),
        )
    grpc_data = _obj(data, "grpc")
    grpc = None
    if grpc_data is not None:
        status = grpc_data.get("status")
        grpc = GRPC(
            service=_str(grpc_data.get("service", ""), "service"),
            method=_str(grpc_data.get("method", ""), "method"),
            status=None if status is None else _int(status, "status"),
        )
    latency = data.get("latency_ns")
    return Layer7(
        type=L7FlowType(data.get("type", "REQUEST")),
        latency_ns=None if latency is None else _int(latency, "latency_ns"),
        http=http,
        kafka=kafka,
        grpc=grpc,
    )


def _policies_from(data: Mapping[str, Any], key: str) -> tuple[Policy, ...]:
    items = data.get(key) or []
    if not isinstance(items, list):
        raise FlowDecodeError(f"{key}: expected a list")
    return tuple(
        Policy(
            name=_str(p.get("name", ""), "policy name"),
            namespace=_str(p.get("namespace", ""), "policy namespace"),
            kind=_str(p.get("kind", ""), "policy kind"),
            rule=_str(p.get("rule", ""), "policy rule"),
        )
        for p in items
    )


def _record_from_dict(data: Mapping[str, Any]) -> FlowRecord:
    ip = _obj(data, "IP") or {}
    l4, src_port, dst_port = _l4_from_dict(_obj(data, "l4"))
    event = _obj(data, "event_type") or {}
    l7 = _l7_from_dict(_obj(data, "l7"))
    flow_type = FlowType(data.get("Type", "L7" if l7 is not None else "L3_L4"))
    default_event = EventType.ACCESS_LOG if flow_type is FlowType.L7 else EventType.TRACE
    match = data.get("policy_match_type")
    obs = data.get("trace_observation_point")
    reason = data.get("drop_reason_desc")
    is_reply = data.get("is_reply")
    if is_reply is not None and not isinstance(is_reply, bool):
        raise FlowDecodeError("is_reply: expected a boolean")
    return FlowRecord(
        time=parse_time(_str(data["time"], "time")),
        verdict=Verdict(data["verdict"]),
        type=flow_type,
        event_type=EventType(_int(event.get("type", default_event), "event_type")),
        traffic_direction=TrafficDirection(
            data.get("traffic_direction", TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN.value)
        ),
        source=_endpoint_from_dict(
            _obj(data, "source"), _str(ip.get("source", ""), "IP.source"), src_port
        ),
        destination=_endpoint_from_dict(
            _obj(data, "destination"), _str(ip.get("destination", ""), "IP.destination"), dst_port
        ),
        is_reply=is_reply,
        l4=l4,
        l7=l7,
        drop_reason_desc=None if reason is None else DropReasonDesc(reason),
        policy_match_type=None if match is None else _MATCH_BY_NUMBER[_int(match, "match")],
        trace_observation_point=None if obs is None else TraceObservationPoint(obs),
        ingress_allowed_by=_policies_from(data, "ingress_allowed_by"),
        egress_allowed_by=_policies_from(data, "egress_allowed_by"),
        ingress_denied_by=_policies_from(data, "ingress_denied_by"),
        egress_denied_by=_policies_from(data, "egress_denied_by"),
        summary=_str(data.get("Summary", ""), "Summary"),
        node_name=_str(data.get("node_name", ""), "node_name"),
        error=_str(data.get("error", ""), "error"),
    )
