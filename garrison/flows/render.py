"""Flows as people read them: Hubble's compact line, its `dict` block and its table.

    Nov 21 12:00:00.123: default/tiefighter:42690 (ID:31028) -> default/deathstar:80
    (ID:16530) http-request DROPPED (HTTP/1.1 PUT http://deathstar/v1/exhaust-port)

(one line). The compact layout is Hubble's: `TIME[ [NODE]]: SRC (ID) ARROW DST (ID) TYPE
VERDICT (SUMMARY)`. A reply is printed from the initiator's side with `<-`, a flow whose
direction is unknown (a datapath drop) with `<>`. Reserved identities print by name
(`(world)`), others as `(ID:n)`. Times are UTC with milliseconds, Go's `Jan _2 15:04:05.000`.

The type column: `http-request`, `kafka-response`, ... for proxy records (`grpc-request` and
`grpc-response` are garrison's, Hubble has no gRPC record); for datapath records the drop
reason (`Policy denied`), the observation point (`to-endpoint`) or
`policy-verdict:<match> <DIRECTION>`, where the verdict reads ALLOWED / DENIED / AUDITED.
A request whose target the proxy normalized ends in `(normalized from /v1/./x/../y)`: the
target as the client sent it (`l7.http.raw_target`).

Everything renders from the flow's JSON object (an access-log line, decoded), so a file, the
agent's answer and a `FlowRecord` (through `to_dict()`) print the same.
`policy_names` appends the rules that decided: `[ingress allowed by CiliumNetworkPolicy
default/rule1 ingress[0]]`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from garrison.flows.codec import parse_time
from garrison.flows.query import FlowDict, FlowSide, flow_side
from garrison.flows.record import (
    MATCH_TYPE_BY_NUMBER,
    MATCH_TYPE_TEXT,
    DropReasonDesc,
    FlowDecodeError,
    FlowRecord,
)
from garrison.identity.model import RESERVED_BY_ID


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """`color`: ANSI colours for the verdict (a terminal); `policy_names`: the deciding rules."""

    time: bool = True
    node_name: bool = False
    color: bool = False
    policy_names: bool = False


DEFAULT_RENDER = RenderOptions()

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_POLICY_VERDICT_TEXT = {
    "FORWARDED": "ALLOWED",
    "DROPPED": "DENIED",
    "ERROR": "DENIED",
    "AUDIT": "AUDITED",
}
_COLOR = {"FORWARDED": "32", "ALLOWED": "32", "DROPPED": "31", "DENIED": "31",
          "ERROR": "31", "AUDIT": "33", "AUDITED": "33"}
_POLICY_LISTS = (
    ("ingress_allowed_by", "ingress allowed by"),
    ("egress_allowed_by", "egress allowed by"),
    ("ingress_denied_by", "ingress denied by"),
    ("egress_denied_by", "egress denied by"),
)


def render_time(time_ns: int) -> str:
    """`Nov 21 12:00:00.123` (UTC; the day padded with a space, as Go's `_2`)."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    t = datetime.fromtimestamp(seconds, UTC)
    return f"{_MONTHS[t.month - 1]} {t.day:>2} {t:%H:%M:%S}.{nanos // 1_000_000:03d}"


def render_time_text(text: Any) -> str:
    """The compact time of an RFC 3339 `time` field; `-` when there is none to read."""
    if isinstance(text, str) and len(text) >= 23 and text[4] == "-" and text[10] == "T" and (
        text[19] == "." and text.endswith("Z")
    ):
        month = int(text[5:7]) if text[5:7].isdigit() else 0
        if 1 <= month <= 12:  # garrison's own spelling: slice, do not parse
            day = text[8:10].lstrip("0")
            return f"{_MONTHS[month - 1]} {day:>2} {text[11:19]}.{text[20:23]}"
    if isinstance(text, str):
        try:
            return render_time(parse_time(text))
        except FlowDecodeError:
            pass
    return "-"


def render_identity(identity: int) -> str:
    if identity == 0:
        return "(unknown)"
    reserved = RESERVED_BY_ID.get(identity)
    if reserved is not None:
        return f"({next(iter(reserved.labels)).key})"
    return f"(ID:{identity})"


class _Host(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def pod_name(self) -> str: ...
    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...


def render_host(ep: _Host) -> str:
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


def _obj(d: Any, key: str) -> Mapping[str, Any]:
    value = d.get(key) if isinstance(d, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _event_type(d: FlowDict) -> int:
    value = _obj(d, "event_type").get("type", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def flow_type_text(d: FlowDict) -> str:
    l7 = _obj(d, "l7")
    if l7:
        protocol = next((p for p in ("grpc", "http", "kafka") if p in l7), "l7")
        kind = l7.get("type", "REQUEST")
        return f"{protocol}-{str(kind).lower()}"
    event = _event_type(d)
    if event == 1:
        try:
            return DropReasonDesc(d.get("drop_reason_desc", "DROP_REASON_UNKNOWN")).text
        except ValueError:
            return str(d.get("drop_reason_desc"))
    point = d.get("trace_observation_point")
    if event == 4 and isinstance(point, str):
        return point.lower().replace("_", "-")
    match = d.get("policy_match_type")
    if event == 5 and isinstance(match, int) and match in MATCH_TYPE_BY_NUMBER:
        direction = d.get("traffic_direction", "TRAFFIC_DIRECTION_UNKNOWN")
        return f"policy-verdict:{MATCH_TYPE_TEXT[MATCH_TYPE_BY_NUMBER[match]]} {direction}"
    return "UNKNOWN"


def verdict_text(d: FlowDict) -> str:
    verdict = str(d.get("verdict", "VERDICT_UNKNOWN"))
    if _event_type(d) == 5:
        return _POLICY_VERDICT_TEXT.get(verdict, verdict)
    return verdict


def policy_names(d: FlowDict) -> list[str]:
    """`ingress allowed by CiliumNetworkPolicy default/rule1 ingress[0]`, one per rule."""
    out = []
    for key, what in _POLICY_LISTS:
        items = d.get(key)
        if not isinstance(items, list):
            continue
        for p in items:
            if isinstance(p, Mapping):
                out.append(f"{what} {policy_text(p)}")
    return out


def policy_text(p: Mapping[str, Any]) -> str:
    """`CiliumNetworkPolicy default/rule1 ingress[0]` from a {name, namespace, kind, rule}."""
    name = f"{p['namespace']}/{p.get('name', '')}" if p.get("namespace") else p.get("name", "")
    return " ".join(str(part) for part in (p.get("kind"), name, p.get("rule")) if part)


def _sides(d: FlowDict) -> tuple[str, str, str]:
    """Source and destination as printed (the initiator first), and the arrow."""
    src, dst = flow_side(d, "source"), flow_side(d, "destination")
    src_text = f"{render_host(src)} {render_identity(src.identity)}"
    dst_text = f"{render_host(dst)} {render_identity(dst.identity)}"
    is_reply = d.get("is_reply")
    if is_reply is True:
        return dst_text, src_text, "<-"
    if is_reply is False:
        return src_text, dst_text, "->"
    return src_text, dst_text, "<>"


# What a log line may hold that a terminal would obey rather than show: C0 and C1 controls
# (ESC starts a sequence that can clear the screen or retitle the window, CR lets text
# overwrite the verdict, LF forges a line of its own) and the bidi controls that reorder
# text. A path or a name in a record is the client's; printed, each reads as its escape.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(m: re.Match[str]) -> str:
    ch = m.group()
    code = ord(ch)
    return _SHORT_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def safe_text(text: str) -> str:
    """`text` with the characters a terminal would act on written as escapes (`\\x1b`,
    `\\n`, `\\u202e`)."""
    return _UNSAFE.sub(_escape_one, text) if _UNSAFE.search(text) else text


def _paint(text: str, options: RenderOptions) -> str:
    code = _COLOR.get(text) if options.color else None
    return f"\x1b[{code}m{text}\x1b[0m" if code else text


def render_compact_flow(d: FlowDict, options: RenderOptions = DEFAULT_RENDER) -> str:
    """One line, no trailing newline."""
    left, right, arrow = _sides(d)
    summary = d.get("Summary", "")
    head = f"{left} {arrow} {right} {flow_type_text(d)} "
    line = f"({summary})"
    raw = _obj(_obj(d, "l7"), "http").get("raw_target")
    if raw:
        line += f" (normalized from {raw})"
    answer = d.get("deny_response")
    if answer:
        line += f" (answered with {answer})"
    if options.policy_names:
        names = policy_names(d)
        if names:
            line += f" [{'; '.join(names)}]"
    prefix = render_time_text(d.get("time")) if options.time else ""
    if options.node_name:
        node = d.get("node_name", "")
        prefix += f" [{node}]" if prefix else f"[{node}]"
    line = (f"{safe_text(head)}{_paint(safe_text(verdict_text(d)), options)} "
            f"{safe_text(line)}")
    return f"{safe_text(prefix)}: {line}" if prefix else line


def render_compact(record: FlowRecord, options: RenderOptions = DEFAULT_RENDER) -> str:
    """The compact line of a record (the proxy's `-v`)."""
    return render_compact_flow(record.to_dict(), options)


def render_dict_flow(d: FlowDict, options: RenderOptions = DEFAULT_RENDER) -> str:
    """Hubble's `-o dict`: one `KEY: value` line per field, keys right-aligned, then a
    `------------` separator line (included, without a final newline)."""
    left, right, _ = _sides(d)
    rows = [
        ("TIMESTAMP", safe_text(render_time_text(d.get("time")))),
        ("SOURCE", safe_text(left)),
        ("DESTINATION", safe_text(right)),
        ("TYPE", safe_text(flow_type_text(d))),
        ("VERDICT", _paint(safe_text(verdict_text(d)), options)),
        ("SUMMARY", safe_text(str(d.get("Summary", "")))),
    ]
    if options.node_name:
        rows.insert(1, ("NODE", safe_text(str(d.get("node_name", "")))))
    if options.policy_names:
        rows.extend(("POLICY", safe_text(name)) for name in policy_names(d))
    return "\n".join(f"{key:>11}: {value}" for key, value in rows) + "\n------------"


TABLE_HEADER = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")


def table_row(d: FlowDict, options: RenderOptions = DEFAULT_RENDER) -> tuple[str, ...]:
    """The cells of Hubble's `-o table` for one flow (uncoloured: colour breaks alignment)."""
    left, right, _ = _sides(d)
    row = [render_time_text(d.get("time")), left, right, flow_type_text(d), verdict_text(d),
           str(d.get("Summary", ""))]
    if options.node_name:
        row.insert(1, str(d.get("node_name", "")))
    if options.policy_names:
        row.append("; ".join(policy_names(d)))
    return tuple(map(safe_text, row))


def table_header(options: RenderOptions = DEFAULT_RENDER) -> tuple[str, ...]:
    header = list(TABLE_HEADER)
    if options.node_name:
        header.insert(1, "NODE")
    if options.policy_names:
        header.append("POLICIES")
    return tuple(header)


def render_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first one the header) aligned in columns two spaces apart, as Go's
    tabwriter does for `hubble observe -o table`; the last column is not padded."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        cells.append(row[-1])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


__all__ = [
    "DEFAULT_RENDER",
    "FlowSide",
    "RenderOptions",
    "flow_type_text",
    "policy_names",
    "policy_text",
    "render_compact",
    "render_compact_flow",
    "render_dict_flow",
    "render_host",
    "render_identity",
    "render_table",
    "render_time",
    "render_time_text",
    "safe_text",
    "table_header",
    "table_row",
    "verdict_text",
]
