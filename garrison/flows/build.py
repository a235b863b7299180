"""Builders of flow records: what the proxy engine and the datapath event reader call.

Pure functions: the caller passes the time (nanoseconds since the epoch), the endpoints and
what was decided. Each builder fills Hubble's `Summary` the way Hubble's parsers word it, puts
the policy refs under `ingress_*` or `egress_*` by direction, and (for HTTP and gRPC) passes the
HTTP part through `redacted_http()`, so a record that exists has had its secrets removed.

L7 builders take `client` and `server`. A request record goes client → server; a response
record goes server → client with `is_reply` True, as Hubble records responses. Both keep the
direction of the policy that applied (INGRESS when the proxy enforces the server's ingress).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

from garrison.flows.record import (
    GRPC,
    HTTP,
    DropReasonDesc,
    Endpoint,
    EventType,
    FlowRecord,
    FlowType,
    Kafka,
    L4Protocol,
    L7FlowType,
    Layer4,
    Layer7,
    Policy,
    TCPFlags,
    TraceObservationPoint,
    TrafficDirection,
    Verdict,
)
from garrison.flows.redact import DEFAULT_REDACTION, HeaderPairs, RedactionConfig, redacted_http
from garrison.policies.l7rules import KAFKA_API_NAMES, L7Protocol
from garrison.policies.mapstate import DropReason, MatchType
from garrison.policies.model import Direction
from garrison.policies.refs import RuleRef

DirectionLike = Direction | TrafficDirection | str
ReasonLike = DropReason | DropReasonDesc | str

GRPC_STATUS_NAMES: dict[int, str] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

_TCP = Layer4(L4Protocol.TCP)


# ---------------------------------------------------------------------------------------------
# Shared pieces


class _Refs(NamedTuple):
    ingress_allowed_by: tuple[Policy, ...] = ()
    egress_allowed_by: tuple[Policy, ...] = ()
    ingress_denied_by: tuple[Policy, ...] = ()
    egress_denied_by: tuple[Policy, ...] = ()


# A proxy names the same few rules in every record: convert each RuleRef once. A memo of a pure
# function of frozen values (bounded), not state a caller could observe.
_policy_of = functools.lru_cache(maxsize=4096)(Policy.from_ref)
_NO_REFS = _Refs()


# The refs of one record are nearly always the one rule that allowed it, the same object
# request after request: remember its `_Refs` by that object's identity (the entry holds the
# object, so the id cannot be reused while it is there), which also gives the codec the same
# tuples to reuse their JSON. Bounded; forgotten all at once when full.
_ONE_REF: dict[tuple[int, bool, TrafficDirection], tuple[RuleRef, _Refs]] = {}
_ONE_REF_SIZE = 1024


def _refs(
    direction: TrafficDirection, allowed_by: Sequence[RuleRef], denied_by: Sequence[RuleRef]
) -> _Refs:
    if not allowed_by and not denied_by:
        return _NO_REFS
    if len(allowed_by) + len(denied_by) == 1:
        ref = allowed_by[0] if allowed_by else denied_by[0]
        key = (id(ref), bool(allowed_by), direction)
        entry = _ONE_REF.get(key)
        if entry is not None and entry[0] is ref:
            return entry[1]
        refs = _new_refs(direction, allowed_by, denied_by)
        if len(_ONE_REF) >= _ONE_REF_SIZE:
            _ONE_REF.clear()
        _ONE_REF[key] = (ref, refs)
        return refs
    return _new_refs(direction, allowed_by, denied_by)


def _new_refs(
    direction: TrafficDirection, allowed_by: Sequence[RuleRef], denied_by: Sequence[RuleRef]
) -> _Refs:
    allowed = tuple(_policy_of(ref) for ref in allowed_by)
    denied = tuple(_policy_of(ref) for ref in denied_by)
    if direction is TrafficDirection.EGRESS:
        return _Refs(egress_allowed_by=allowed, egress_denied_by=denied)
    return _Refs(ingress_allowed_by=allowed, ingress_denied_by=denied)


def _reason(verdict: Verdict, reason: ReasonLike | None) -> DropReasonDesc | None:
    if reason is not None:
        return DropReasonDesc.of(reason)
    # An L7 deny is a policy decision with no deny rule behind it (L7 has no deny rules).
    return DropReasonDesc.POLICY_DENIED if verdict is Verdict.DROPPED else None


def http_url(host: str, target: str, scheme: str = "http") -> str:
    """Hubble's URL: `http://host/path?query`; an absolute-form target is kept as it is."""
    if "://" in target or not host:
        return target
    return f"{scheme}://{host}{target}"


def raw_target_of(raw_target: str, path: str, url: str) -> str:
    """The request-target as sent, kept in the record only when the proxy changed it: "" when
    it is the (normalized) path or the URL the record shows."""
    if not raw_target or raw_target in (path, url):
        return ""
    return raw_target


def l4_summary(l4: Layer4 | None) -> str:
    """`TCP Flags: SYN, ACK` as Hubble words the summary of a TCP packet."""
    if l4 is None:
        return ""
    if l4.protocol is L4Protocol.TCP and l4.flags is not None:
        return "TCP Flags: " + ", ".join(l4.flags.names())
    return l4.protocol.value


def kafka_api_name(api_key: int | str) -> str:
    """`produce` for 0; the number as text for keys without a name."""
    if isinstance(api_key, str):
        return api_key
    return KAFKA_API_NAMES.get(api_key, str(api_key))


def _ms(latency_ns: int) -> int:
    return latency_ns // 1_000_000


def _l7_record(
    *,
    time_ns: int,
    verdict: Verdict,
    direction: DirectionLike,
    client: Endpoint,
    server: Endpoint,
    l7: Layer7,
    summary: str,
    allowed_by: Sequence[RuleRef],
    denied_by: Sequence[RuleRef],
    drop_reason: ReasonLike | None,
    node_name: str,
    error: str = "",
) -> FlowRecord:
    tdir = TrafficDirection.of(direction)
    reply = l7.type is L7FlowType.RESPONSE
    refs = _refs(tdir, allowed_by, denied_by)
    return FlowRecord(
        time=time_ns,
        verdict=verdict,
        type=FlowType.L7,
        event_type=EventType.ACCESS_LOG,
        traffic_direction=tdir,
        source=server if reply else client,
        destination=client if reply else server,
        is_reply=reply,
        l4=_TCP,
        l7=l7,
        drop_reason_desc=_reason(verdict, drop_reason),
        summary=summary,
        node_name=node_name,
        error=error,
        ingress_allowed_by=refs.ingress_allowed_by,
        egress_allowed_by=refs.egress_allowed_by,
        ingress_denied_by=refs.ingress_denied_by,
        egress_denied_by=refs.egress_denied_by,
    )


# ---------------------------------------------------------------------------------------------
# HTTP


def l7_http_request(
    *,
    time_ns: int,
    verdict: Verdict,
    direction: DirectionLike,
    client: Endpoint,
    server: Endpoint,
    method: str,
    path: str,
    host: str = "",
    scheme: str = "http",
    protocol: str = "HTTP/1.1",
    headers: HeaderPairs = (),
    allowed_by: Sequence[RuleRef] = (),
    denied_by: Sequence[RuleRef] = (),
    drop_reason: ReasonLike | None = None,
    node_name: str = "",
    redaction: RedactionConfig = DEFAULT_REDACTION,
    raw_target: str = "",
    error: str = "",
) -> FlowRecord:
    """An HTTP request the proxy forwarded (FORWARDED), denied (DROPPED) or let through in
    audit mode (AUDIT). `path` is the request target as forwarded (normalized); `raw_target`
    the target as the client sent it (kept as `raw_target` when it differs); `error`: why a
    request the proxy refused as malformed (400, PARSE_ERROR) was refused."""
    url = http_url(host, path, scheme)
    http = redacted_http(
        method=method,
        url=url,
        protocol=protocol,
        headers=headers,
        config=redaction,
        raw_target=raw_target_of(raw_target, path, url),
    )
    return _l7_record(
        time_ns=time_ns,
        verdict=verdict,
        direction=direction,
        client=client,
        server=server,
        l7=Layer7(type=L7FlowType.REQUEST, http=http),
        summary=f"{http.protocol} {http.method} {http.url}",
        allowed_by=allowed_by,
        denied_by=denied_by,
        drop_reason=drop_reason,
        node_name=node_name,
        error=error,
    )


def l7_http_response(
    *,
    time_ns: int,
    verdict: Verdict,
    direction: DirectionLike,
    client: Endpoint,
    server: Endpoint,
    method: str,
    path: str,
    code: int,
    latency_ns: int,
    host: str = "",
    scheme: str = "http",
    protocol: str = "HTTP/1.1",
    headers: HeaderPairs = (),
    allowed_by: Sequence[RuleRef] = (),
    denied_by: Sequence[RuleRef] = (),
    drop_reason: ReasonLike | None = None,
    node_name: str = "",
    redaction: RedactionConfig = DEFAULT_REDACTION,
    error: str = "",
) -> FlowRecord:
    """The response to a request: the server's (FORWARDED) or the proxy's 403 (DROPPED).
    `latency_ns` runs from the request to the response headers; `error` as for the
    request."""
    http = redacted_http(
        method=method,
        url=http_url(host, path, scheme),
        protocol=protocol,
        headers=headers,
        config=redaction,
        code=code,
    )
    return _l7_record(
        time_ns=time_ns,
        verdict=verdict,
        direction=direction,
        client=client,
        server=server,
        l7=Layer7(type=L7FlowType.RESPONSE, latency_ns=latency_ns, http=http),
        summary=f"{http.protocol} {http.code} {_ms(latency_ns)}ms ({http.method} {http.url})",
        allowed_by=allowed_by,
        denied_by=denied_by,
        drop_reason=drop_reason,
        node_name=node_name,
        error=error,
    )


# ---------------------------------------------------------------------------------------------
# Kafka


def _kafka_topic_text(kafka: Kafka) -> str:
    if len(kafka.topics) > 1:
        return "topics " + ", ".join(f"'{t}'" for t in kafka.topics)
    return f"topic '{kafka.topic}'"


def l7_kafka_request(
    *,
    time_ns: int,
    verdict: Verdict,
    direction: DirectionLike,
    client: Endpoint,
    server: Endpoint,
    api_key: int | str,
    api_version: int,
    correlation_id: int,
    topics: Sequence[str] = (),
    allowed_by: Sequence[RuleRef] = (),
    denied_by: Sequence[RuleRef] = (),
    drop_reason: ReasonLike | None = None,
    node_name: str = "",
) -> FlowRecord:
    """A Kafka request: forwarded, or denied (answered by the proxy with error 29/30/31).
    `topics`: every topic the request names, in request order (none for topicless APIs)."""
    kafka = Kafka(
        api_key=kafka_api_name(api_key),
        api_version=api_version,
        correlation_id=correlation_id,
        topic=topics[0] if topics else "",
        topics=tuple(topics),
    )
    return _l7_record(
        time_ns=time_ns,
        verdict=verdict,
        direction=direction,
        client=client,
        server=server,
        l7=Layer7(type=L7FlowType.REQUEST, kafka=kafka),
        summary=(
            f"Kafka request {kafka.api_key} correlation id {kafka.correlation_id} "
            f"{_kafka_topic_text(kafka)}"
        ),
        allowed_by=allowed_by,
        denied_by=denied_by,
        drop_reason=drop_reason,
        node_name=node_name,
    )


def l7_kafka_response(
    *,
    time_ns: int,
    verdict: Verdict,
    direction: DirectionLike,
    client: Endpoint,
    server: Endpoint,
    api_key: int | str,
    api_version: int,
    correlation_id: int,
    error_code: int,
    latency_ns: int,
    topics: Sequence[str] = (),
    allowed_by: Sequence[RuleRef] = (),
    denied_by: Sequence[RuleRef] = (),
    drop_reason: ReasonLike | None = None,
    node_name: str = "",
) -> FlowRecord:
    """A Kafka response: the broker's, or the proxy's deny answer (DROPPED, `error_code` 29)."""
    kafka = Kafka(
        api_key=kafka_api_name(api_key),
        api_version=api_version,
        correlation_id=correlation_id,
        topic=topics[0] if topics else "",
        topics=tuple(topics),
        error_code=error_code,
    )
    return _l7_record(
        time_ns=time_ns,
        verdict=verdict,
        direction=direction,
        client=client,
        server=server,
        l7=Layer7(type=L7FlowType.RESPONSE, latency_ns=latency_ns, kafka=kafka),
        summary=(
            f"Kafka response {kafka.api_key} correlation id {kafka.correlation_id} "
            f"{_kafka_topic_text(kafka)} return code {error_code}"
        ),
        allowed_by=allowed_by,
        denied_by=denied_by,
        drop_reason=drop_reason,
        node_name=node_name,
    )


# ---------------------------------------------------------------------------------------------
# gRPC


def grpc_status_text(status: int | None) -> str:
    if status is None:
        return "status unknown"
    return f"{status} {GRPC_STATUS_NAMES.get(status, 'UNKNOWN_STATUS')}"


def l7_grpc_request(
    *,
    time_ns: int,
    verdict: Verdict,
    direction: DirectionLike,
    client: Endpoint,
    server: Endpoint,
    service: str,
    method: str,
    authority: str = "",
    headers: HeaderPairs = (),
    allowed_by: Sequence[RuleRef] = (),
    denied_by: Sequence[RuleRef] = (),
    drop_reason: ReasonLike | None = None,
    node_name: str = "",
    redaction: RedactionConfig = DEFAULT_REDACTION,
    raw_target: str = "",
) -> FlowRecord:
    """A gRPC call (`service` = `pkg.Service`). The HTTP/2 request is recorded too, under
    `http`, so HTTP filters and Hubble tooling see it; its headers are gRPC metadata.
    `raw_target`: the `:path` as sent (kept when it differs from `/service/method`)."""
    path = f"/{service}/{method}"
    url = http_url(authority, path)
    http = redacted_http(
        method="POST",
        url=url,
        protocol="HTTP/2",
        headers=headers,
        config=redaction,
        raw_target=raw_target_of(raw_target, path, url),
    )
    return _l7_record(
        time_ns=time_ns,
        verdict=verdict,
        direction=direction,
        client=client,
        server=server,
        l7=Layer7(type=L7FlowType.REQUEST, http=http, grpc=GRPC(service=service, method=method)),
        summary=f"gRPC {service}/{method}",
        allowed_by=allowed_by,
        denied_by=denied_by,
        drop_reason=drop_reason,
        node_name=node_name,
    )


def l7_grpc_response(
    *,
    time_ns: int,
    verdict: Verdict,
    direction: DirectionLike,
    client: Endpoint,
    server: Endpoint,
    service: str,
    method: str,
    status: int | None,
    latency_ns: int,
    http_code: int = 200,
    authority: str = "",
    headers: HeaderPairs = (),
    allowed_by: Sequence[RuleRef] = (),
    denied_by: Sequence[RuleRef] = (),
    drop_reason: ReasonLike | None = None,
    node_name: str = "",
    redaction: RedactionConfig = DEFAULT_REDACTION,
) -> FlowRecord:
    """The end of a gRPC call: the server's status, or the proxy's PERMISSION_DENIED (7).
    `status` is None when the server's response carried no grpc-status."""
    http = redacted_http(
        method="POST",
        url=http_url(authority, f"/{service}/{method}"),
        protocol="HTTP/2",
        headers=headers,
        config=redaction,
        code=http_code,
    )
    return _l7_record(
        time_ns=time_ns,
        verdict=verdict,
        direction=direction,
        client=client,
        server=server,
        l7=Layer7(
            type=L7FlowType.RESPONSE,
            latency_ns=latency_ns,
            http=http,
            grpc=GRPC(service=service, method=method, status=status),
        ),
        summary=f"gRPC {grpc_status_text(status)} {_ms(latency_ns)}ms ({service}/{method})",
        allowed_by=allowed_by,
        denied_by=denied_by,
        drop_reason=drop_reason,
        node_name=node_name,
    )


# ---------------------------------------------------------------------------------------------
# Proxy errors


def proxy_error(
    *,
    time_ns: int,
    direction: DirectionLike,
    client: Endpoint,
    server: Endpoint,
    protocol: L7Protocol | str,
    error: str,
    reason: ReasonLike = DropReasonDesc.PARSE_ERROR,
    node_name: str = "",
) -> FlowRecord:
    """The proxy closed a connection without a decision: a frame it could not parse, an
    upstream it could not reach, an internal failure. Verdict ERROR; nothing was forwarded
    after the error. `error` says what happened, for the operator."""
    proto = L7Protocol(str(protocol))
    if proto is L7Protocol.KAFKA:
        l7 = Layer7(kafka=Kafka())
    elif proto is L7Protocol.GRPC:
        l7 = Layer7(http=HTTP(protocol="HTTP/2"), grpc=GRPC())
    else:
        l7 = Layer7(http=HTTP())
    return _l7_record(
        time_ns=time_ns,
        verdict=Verdict.ERROR,
        direction=direction,
        client=client,
        server=server,
        l7=l7,
        summary=error,
        allowed_by=(),
        denied_by=(),
        drop_reason=reason,
        node_name=node_name,
        error=error,
    )


# ---------------------------------------------------------------------------------------------
# L3/L4 (datapath events)

_SYN = TCPFlags(syn=True)


def _l4(protocol: L4Protocol | str | None, flags: TCPFlags | None) -> Layer4 | None:
    """None: a protocol flow records do not model (the record still says who and why)."""
    if protocol is None:
        return None
    proto = protocol if isinstance(protocol, L4Protocol) else L4Protocol.of(protocol)
    return Layer4(proto, flags if proto is L4Protocol.TCP else None)


def l3_l4_drop(
    *,
    time_ns: int,
    direction: DirectionLike,
    source: Endpoint,
    destination: Endpoint,
    reason: ReasonLike,
    protocol: L4Protocol | str | None = L4Protocol.TCP,
    flags: TCPFlags | None = _SYN,
    denied_by: Sequence[RuleRef] = (),
    is_reply: bool | None = None,
    node_name: str = "",
    deny_response: str = "",
) -> FlowRecord:
    """A packet the datapath dropped (a drop event): `Policy denied DROPPED (TCP Flags: SYN)`.
    `is_reply` None = unknown, as Hubble has it for drops. `denied_by`: the deny rules of a
    POLICY_DENY drop. `deny_response`: the answer sent instead of silence (`icmp`,
    `tcp-reset`), if any."""
    tdir = TrafficDirection.of(direction)
    l4 = _l4(protocol, flags)
    refs = _refs(tdir, (), denied_by)
    return FlowRecord(
        time=time_ns,
        verdict=Verdict.DROPPED,
        type=FlowType.L3_L4,
        event_type=EventType.DROP,
        traffic_direction=tdir,
        source=source,
        destination=destination,
        is_reply=is_reply,
        l4=l4,
        drop_reason_desc=DropReasonDesc.of(reason),
        summary=l4_summary(l4),
        node_name=node_name,
        ingress_allowed_by=refs.ingress_allowed_by,
        egress_allowed_by=refs.egress_allowed_by,
        ingress_denied_by=refs.ingress_denied_by,
        egress_denied_by=refs.egress_denied_by,
        deny_response=deny_response,
    )


def l3_l4_verdict(
    *,
    time_ns: int,
    direction: DirectionLike,
    source: Endpoint,
    destination: Endpoint,
    verdict: Verdict,
    match_type: MatchType,
    protocol: L4Protocol | str | None = L4Protocol.TCP,
    flags: TCPFlags | None = _SYN,
    allowed_by: Sequence[RuleRef] = (),
    denied_by: Sequence[RuleRef] = (),
    drop_reason: ReasonLike | None = None,
    node_name: str = "",
) -> FlowRecord:
    """The policy decision on the first packet of a connection (a policy-verdict event):
    `policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)`. FORWARDED, DROPPED, or AUDIT
    (would have been dropped; audit mode let it through)."""
    tdir = TrafficDirection.of(direction)
    l4 = _l4(protocol, flags)
    reason = None
    if verdict in (Verdict.DROPPED, Verdict.AUDIT) or drop_reason is not None:
        reason = DropReasonDesc.of(drop_reason or DropReasonDesc.POLICY_DENIED)
    refs = _refs(tdir, allowed_by, denied_by)
    return FlowRecord(
        time=time_ns,
        verdict=verdict,
        type=FlowType.L3_L4,
        event_type=EventType.POLICY_VERDICT,
        traffic_direction=tdir,
        source=source,
        destination=destination,
        is_reply=False,  # verdicts are taken on a connection's first packet
        l4=l4,
        drop_reason_desc=reason,
        policy_match_type=match_type,
        summary=l4_summary(l4),
        node_name=node_name,
        ingress_allowed_by=refs.ingress_allowed_by,
        egress_allowed_by=refs.egress_allowed_by,
        ingress_denied_by=refs.ingress_denied_by,
        egress_denied_by=refs.egress_denied_by,
    )


def l3_l4_trace(
    *,
    time_ns: int,
    source: Endpoint,
    destination: Endpoint,
    observation_point: TraceObservationPoint,
    direction: DirectionLike = TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN,
    protocol: L4Protocol | str | None = L4Protocol.TCP,
    flags: TCPFlags | None = _SYN,
    is_reply: bool | None = None,
    node_name: str = "",
) -> FlowRecord:
    """A packet the datapath forwarded (a trace event): `to-endpoint FORWARDED (TCP Flags:
    SYN)`, or `to-proxy` for a connection redirected to the proxy."""
    l4 = _l4(protocol, flags)
    return FlowRecord(
        time=time_ns,
        verdict=Verdict.FORWARDED,
        type=FlowType.L3_L4,
        event_type=EventType.TRACE,
        traffic_direction=TrafficDirection.of(direction),
        source=source,
        destination=destination,
        is_reply=is_reply,
        l4=l4,
        trace_observation_point=observation_point,
        summary=l4_summary(l4),
        node_name=node_name,
    )
