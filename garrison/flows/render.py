"""The compact one-line rendering of a flow, as `hubble observe` prints it.

    Nov 21 12:00:00.123: default/tiefighter:42690 (ID:31028) -> default/deathstar:80
    (ID:16530) http-request DROPPED (HTTP/1.1 PUT http://deathstar/v1/exhaust-port)

(one line). The layout is Hubble's compact printer: `TIME[ [NODE]]: SRC (ID) ARROW DST (ID)
TYPE VERDICT (SUMMARY)`. A reply is printed from the initiator's side with `<-`, a flow whose
direction is unknown (a datapath drop) with `<>`. Reserved identities print by name
(`(world)`), others as `(ID:n)`. Times are UTC with milliseconds, Go's `Jan _2 15:04:05.000`.

The type column: `http-request`, `kafka-response`, ... for proxy records (`grpc-request` and
`grpc-response` are garrison's, Hubble has no gRPC record); for datapath records the drop
reason (`Policy denied`), the observation point (`to-endpoint`) or
`policy-verdict:<match> <DIRECTION>`, where the verdict reads ALLOWED / DENIED / AUDITED.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime

from garrison.flows.record import (
    MATCH_TYPE_TEXT,
    DropReasonDesc,
    Endpoint,
    EventType,
    FlowRecord,
    Verdict,
)
from garrison.identity.model import RESERVED_BY_ID


@dataclass(frozen=True, slots=True)
class RenderOptions:
    time: bool = True
    node_name: bool = False


DEFAULT_RENDER = RenderOptions()

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_POLICY_VERDICT_TEXT = {
    Verdict.FORWARDED: "ALLOWED",
    Verdict.DROPPED: "DENIED",
    Verdict.ERROR: "DENIED",
    Verdict.AUDIT: "AUDITED",
}


def render_time(time_ns: int) -> str:
    """`Nov 21 12:00:00.123` (UTC; the day padded with a space, as Go's `_2`)."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    t = datetime.fromtimestamp(seconds, UTC)
    return f"{_MONTHS[t.month - 1]} {t.day:>2} {t:%H:%M:%S}.{nanos // 1_000_000:03d}"


def render_identity(identity: int) -> str:
    if identity == 0:
        return "(unknown)"
    reserved = RESERVED_BY_ID.get(identity)
    if reserved is not None:
        return f"({next(iter(reserved.labels)).key})"
    return f"(ID:{identity})"


def render_host(ep: Endpoint) -> str:
    """`namespace/pod:port`, or `ip:port` when the endpoint is no pod (brackets for IPv6)."""
    if ep.pod_name:
        host = f"{ep.namespace}/{ep.pod_name}" if ep.namespace else ep.pod_name
    else:
        host = ep.ip or "-"
    if not ep.port:
        return host
    if ":" in host and _is_ipv6(host):
        return f"[{host}]:{ep.port}"
    return f"{host}:{ep.port}"


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def flow_type_text(record: FlowRecord) -> str:
    if record.l7 is not None:
        return f"{record.l7.protocol}-{record.l7.type.value.lower()}"
    if record.event_type is EventType.DROP:
        reason = record.drop_reason_desc or DropReasonDesc.DROP_REASON_UNKNOWN
        return reason.text
    if record.event_type is EventType.TRACE and record.trace_observation_point is not None:
        return record.trace_observation_point.text
    if record.event_type is EventType.POLICY_VERDICT and record.policy_match_type is not None:
        match = MATCH_TYPE_TEXT[record.policy_match_type]
        return f"policy-verdict:{match} {record.traffic_direction.value}"
    return "UNKNOWN"


def verdict_text(record: FlowRecord) -> str:
    if record.event_type is EventType.POLICY_VERDICT:
        return _POLICY_VERDICT_TEXT[record.verdict]
    return record.verdict.value


def render_compact(record: FlowRecord, options: RenderOptions = DEFAULT_RENDER) -> str:
    """One line, no trailing newline."""
    src, dst = render_host(record.source), render_host(record.destination)
    src_id = render_identity(record.source.identity)
    dst_id = render_identity(record.destination.identity)
    if record.is_reply is None:
        arrow = "<>"
    elif record.is_reply:
        src, dst, src_id, dst_id = dst, src, dst_id, src_id
        arrow = "<-"
    else:
        arrow = "->"
    line = (
        f"{src} {src_id} {arrow} {dst} {dst_id} "
        f"{flow_type_text(record)} {verdict_text(record)} ({record.summary})"
    )
    prefix = render_time(record.time) if options.time else ""
    if options.node_name:
        prefix += f" [{record.node_name}]" if prefix else f"[{record.node_name}]"
    return f"{prefix}: {line}" if prefix else line
