"""Which flows to show: the filters of `garrison observe`, `accesslog summary` and `export`.

A query is a list of terms, one per filter flag of the command line (`--verdict DROPPED`,
`--from-label org=empire`, ...), with the values of a repeated flag merged, and it selects
exactly the flows `hubble observe` selects for the same flags. Hubble's CLI turns the flags
into flow filters, and so does `CompiledQuery` (the names below are Hubble's):

- every flag without `--not` goes into the *allow* list, every flag after a `--not` into one
  *deny* list. A flow is shown when it matches one filter of the allow list (or the list is
  empty) and no filter of the deny list;
- each list holds a *left* and a *right* filter, ORed (one when they are equal). A flag with
  a direction (`--from-pod`, `--to-port`, `--verdict`, `--http-path`...) adds its value to
  both; a flag without one (`--pod`, `--namespace`, `--label`, `--ip`, `--port`,
  `--identity`) adds it to the left filter as the *source*'s and to the right filter as the
  *destination*'s. So `--namespace cilium --port 443` is "from cilium and from port 443, or
  to cilium and to port 443", never a cilium pod calling out to port 443 elsewhere;
- inside a filter, different fields AND and the values of one field OR: `--not --verdict
  DROPPED --not --namespace kube-system` hides dropped flows of kube-system only;
- a pod is `[NAMESPACE/]NAME-PREFIX`, `default` when no namespace is given; `NAMESPACE/` is
  every pod of the namespace. `--namespace` (and `--from-`/`--to-namespace`,
  `--all-namespaces`) is applied to the pod values when the filters are made: it puts its
  namespace in front of every pod value without one, or stands as `NAMESPACE/` alone;
- flags Hubble refuses to combine (`--ip` with `--pod`, `--label` with `--from-label`, ...)
  and a pod outside the namespace given are errors, as are HTTP flags beside a `--type` list
  without `l7`.

`--from-*` is about the record's `source`, `--to-*` its `destination`. For an L7 response
the source is the server (Hubble's convention: a record describes who sent the message).
Where garrison differs on purpose (`--drop-reason-desc` also selects ERROR records, the
`grpc` and `kafka-*` flags, case-insensitive values) docs/observe.md says so.

Queries run on flow *dicts*, the JSON object of an access-log line (Hubble's field names), so
the same code filters a file, standard input and the agent's ring. Reading a large file is
dominated by JSON decoding, so `CompiledQuery.may_match(line)` first rules out lines with a
substring test: each field that can name one gives the byte strings of which a matching line
must contain at least one (`"DROPPED"` for `--verdict DROPPED`). The test is only a necessary
condition, and it is skipped for lines with a backslash, where JSON escapes could hide a
value, so it never drops a line the full match would keep.

Time bounds (`since_ns`, `until_ns`, inclusive) compare the RFC 3339 text garrison writes
(fixed width, UTC) as strings, without parsing it, and parse any other spelling.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, TypeGuard

import re2

from garrison.flows.build import GRPC_STATUS_NAMES
from garrison.flows.codec import format_time, parse_time
from garrison.flows.record import DropReasonDesc, FlowDecodeError, FlowRecord
from garrison.identity.model import RESERVED
from garrison.policies.l7rules import KAFKA_API_KEYS, KAFKA_API_NAMES
from garrison.policies.labels import KNOWN_SOURCES, SOURCE_ANY

FlowDict = Mapping[str, Any]


class FilterError(ValueError):
    """A filter that cannot be read: the message names the flag, the value and why."""


# ---------------------------------------------------------------------------------------------
# Terms


@dataclass(frozen=True, slots=True)
class FilterTerm:
    """One filter flag (`name` without dashes: `from-label`), its values, and whether
    `--not` preceded it. A flag without a value (`--all-namespaces`) has the value `true`."""

    name: str
    values: tuple[str, ...]
    negated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": list(self.values), "negated": self.negated}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FilterTerm:
        try:
            values = data["values"]
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise TypeError("values must be a list of strings")
            return cls(str(data["name"]), tuple(values), bool(data.get("negated", False)))
        except (KeyError, TypeError) as exc:
            raise FilterError(f"not a filter term: {exc}") from exc

    def __str__(self) -> str:
        negation = "--not " if self.negated else ""
        spec = FLAGS.get(self.name)
        if spec is not None and not spec.takes_value:
            return f"{negation}--{self.name}"
        return " ".join(f"{negation}--{self.name} {value}" for value in self.values)


@dataclass(frozen=True, slots=True)
class FlowQuery:
    """The terms (at most one per flag and polarity) and the time bounds, in nanoseconds."""

    terms: tuple[FilterTerm, ...] = ()
    since_ns: int | None = None
    until_ns: int | None = None

    @classmethod
    def of(
        cls,
        flags: Iterable[tuple[str, str, bool]],
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
    ) -> FlowQuery:
        """From (flag, value, negated) in command-line order: values of one flag and polarity
        are merged into one term. Raises FilterError for an unknown flag."""
        merged: dict[tuple[str, bool], list[str]] = {}
        for name, value, negated in flags:
            if name not in FLAGS:
                raise FilterError(f"unknown filter --{name}")
            merged.setdefault((name, negated), []).append(value)
        terms = tuple(FilterTerm(name, tuple(vs), neg) for (name, neg), vs in merged.items())
        return cls(terms, since_ns, until_ns)

    @property
    def is_empty(self) -> bool:
        return not self.terms and self.since_ns is None and self.until_ns is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "terms": [t.to_dict() for t in self.terms],
            "since_ns": self.since_ns,
            "until_ns": self.until_ns,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlowQuery:
        terms = data.get("terms") or []
        if not isinstance(terms, list):
            raise FilterError("terms: expected a list")
        since, until = data.get("since_ns"), data.get("until_ns")
        for what, bound in (("since_ns", since), ("until_ns", until)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                raise FilterError(f"{what}: expected an integer")
        return cls(tuple(FilterTerm.from_dict(t) for t in terms), since, until)

    def compile(self) -> CompiledQuery:
        """Check every value and build the predicate; raises FilterError."""
        return CompiledQuery(self)


# ---------------------------------------------------------------------------------------------
# Reading the parts of a flow dict (absent or mistyped parts read as empty)


def _obj(d: Any, key: str) -> Mapping[str, Any]:
    value = d.get(key) if isinstance(d, Mapping) else None
    return value if isinstance(value, Mapping) else {}


_PORTED = ("TCP", "UDP", "SCTP")


def _l4_ports(d: FlowDict) -> tuple[int, int]:
    for inner in _obj(d, "l4").values():
        if isinstance(inner, Mapping):
            src, dst = inner.get("source_port", 0), inner.get("destination_port", 0)
            if "type" in inner:  # ICMP: shown with the type where a port would be
                dst = inner.get("type", 0)
            return _as_int(src), _as_int(dst)
    return 0, 0


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)  # protobuf's JSON quotes 64-bit integers
    return 0


@dataclass(frozen=True, slots=True)
class FlowSide:
    """One endpoint of a flow dict, with Hubble's fallbacks (`IP.source`, `l4.*.source_port`)."""

    identity: int
    labels: tuple[str, ...]
    namespace: str
    pod_name: str
    ip: str
    port: int


def flow_side(d: FlowDict, which: str) -> FlowSide:
    """`which` is `source` or `destination`."""
    ep = _obj(d, which)
    ip = ep.get("ip")
    if not isinstance(ip, str) or not ip:
        fallback = _obj(d, "IP").get(which, "")
        ip = fallback if isinstance(fallback, str) else ""
    port = _as_int(ep.get("port", 0))
    if not port:
        src, dst = _l4_ports(d)
        port = src if which == "source" else dst
    labels = ep.get("labels")
    return FlowSide(
        identity=_as_int(ep.get("identity", 0)),
        labels=tuple(x for x in labels if isinstance(x, str)) if isinstance(labels, list) else (),
        namespace=_text(ep.get("namespace")),
        pod_name=_text(ep.get("pod_name")),
        ip=ip,
        port=port,
    )


def _side_ip(d: FlowDict, which: str) -> str:
    ip = _obj(d, which).get("ip")
    if isinstance(ip, str) and ip:
        return ip
    fallback = _obj(d, "IP").get(which)
    return fallback if isinstance(fallback, str) else ""


def _side_port(d: FlowDict, which: str) -> int | None:
    """The TCP, UDP or SCTP port of one side, None when the flow has none (Hubble: an ICMP
    flow has no port). Hubble's JSON has it under `l4`; a record without `l4` may still carry
    it on the endpoint."""
    l4 = _obj(d, "l4")
    key = "source_port" if which == "source" else "destination_port"
    for name in _PORTED:
        inner = l4.get(name)
        if isinstance(inner, Mapping):
            return _as_int(inner.get(key, 0))
    if l4:
        return None
    port = _as_int(_obj(d, which).get("port", 0))
    return port or None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def flow_protocol(d: FlowDict) -> str:
    """`grpc`, `http`, `kafka` for proxy records (a gRPC record also has an `http` part),
    else the L4 protocol in lower case (`tcp`, `udp`, `icmpv4`...), `""` when none is named."""
    l7 = _obj(d, "l7")
    if l7:
        for name in ("grpc", "http", "kafka"):
            if name in l7:
                return name
    for name in _obj(d, "l4"):
        return str(name).lower()
    return ""


def url_path(url: str) -> str:
    """The path of `scheme://host/path?query` (or of a bare `/path?query`)."""
    if "://" in url:
        rest = url.split("://", 1)[1]
        slash = rest.find("/")
        url = rest[slash:] if slash >= 0 else "/"
    for stop in "?#":
        url = url.split(stop, 1)[0]
    return url or "/"


_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def request_uri_path(url: str) -> str | None:
    """The decoded path of a request URI as Go's `url.ParseRequestURI` reads it (what
    `hubble observe --http-path` matches): an absolute URL or an absolute path; the query
    is cut at `?` (a `#` is part of the path: a request carries no fragment); `%2F` and
    `%20` are decoded. None for what Go refuses (a relative path, a bad `%` escape)."""
    if not url:
        return None
    if _SCHEME.match(url):
        rest = url.split(":", 1)[1]
        if not rest.startswith("//"):
            return None  # `mailto:x`: opaque, no path
        rest = rest[2:]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        path = rest[cut:]
        if path.startswith("?"):
            path = ""
    elif url.startswith("/"):
        path = url
    else:
        return None
    path = path.split("?", 1)[0]
    if _ESCAPE.search(path):
        return None
    return _unquote(path)


def _unquote(text: str) -> str:
    if "%" not in text:
        return text
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            raw.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            raw += text[i].encode()
            i += 1
    return raw.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Label selectors: Kubernetes' `k=v,k2 in (a,b),!k3`


@dataclass(frozen=True, slots=True)
class _Requirement:
    source: str
    key: str
    op: str  # in | notin | exists | !exists | gt | lt
    values: tuple[str, ...] = ()

    def holds(self, labels: Sequence[tuple[str, str, str]]) -> bool:
        found = [v for s, k, v in labels if k == self.key and self.source in (SOURCE_ANY, s)]
        if self.op == "in":
            return any(v in self.values for v in found)
        if self.op == "notin":
            return not any(v in self.values for v in found)
        if self.op == "exists":
            return bool(found)
        if self.op == "!exists":
            return not found
        bound = int(self.values[0])
        for v in found:
            try:
                number = int(v)
            except ValueError:
                continue
            if (number > bound) if self.op == "gt" else (number < bound):
                return True
        return False


_SET_OP = re.compile(r"^(!?)\s*([^\s=!()<>]+)\s+(in|notin)\s*\(([^()]*)\)$")
_EQ_OP = re.compile(r"^([^\s=!()<>]+)\s*(==|=|!=|>|<)\s*([^\s=!(),<>]*)$")
_KEY = re.compile(r"^(!?)\s*([^\s=!(),<>]+)$")


def _split_selector(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FilterError(f"label selector {text!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise FilterError(f"label selector {text!r}: unbalanced '('")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _source_key(text: str) -> tuple[str, str]:
    if ":" in text:
        source, _, key = text.partition(":")
        if source in KNOWN_SOURCES:
            return source, key
    return SOURCE_ANY, text


def parse_selector(text: str) -> tuple[_Requirement, ...]:
    """Kubernetes' selector text: `k=v` (`==`), `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`,
    `!k`, `k>5`, `k<5`; keys may carry a source (`k8s:app`, `reserved:world`); a key without
    one matches any source. Every requirement must hold on one endpoint. As in Kubernetes'
    parser, an empty list `()` holds the empty value: `k notin ()` is "k absent or not
    empty"."""
    reqs = []
    for part in _split_selector(text):
        if m := _SET_OP.match(part):
            bang, key_text, op, values_text = m.groups()
            if bang:
                raise FilterError(f"label selector {text!r}: '!' before {op!r} in {part!r}")
            values = tuple(dict.fromkeys(v.strip() for v in values_text.split(",")))
            source, key = _source_key(key_text)
            reqs.append(_Requirement(source, key, op, values))
        elif m := _EQ_OP.match(part):
            key_text, op, value = m.groups()
            source, key = _source_key(key_text)
            if op in "<>":
                if not re.fullmatch(r"-?\d+", value):
                    raise FilterError(f"label selector {text!r}: {op!r} needs an integer in "
                                      f"{part!r}")
                reqs.append(_Requirement(source, key, "gt" if op == ">" else "lt", (value,)))
            else:
                reqs.append(_Requirement(source, key, "notin" if op == "!=" else "in",
                                         (value,)))
        elif m := _KEY.match(part):
            bang, key_text = m.groups()
            source, key = _source_key(key_text)
            reqs.append(_Requirement(source, key, "!exists" if bang else "exists"))
        else:
            raise FilterError(
                f"label selector {text!r}: cannot read {part!r} "
                "(write k=v, k!=v, k in (a,b), k notin (a,b), k or !k)"
            )
        if not reqs[-1].key:
            raise FilterError(f"label selector {text!r}: empty key in {part!r}")
    if not reqs:
        raise FilterError("empty label selector")
    return tuple(reqs)


def _parsed_labels(labels: tuple[str, ...]) -> list[tuple[str, str, str]]:
    out = []
    for text in labels:
        key_part, _, value = text.partition("=")
        source, key = _source_key(key_part)
        out.append(("k8s" if source == SOURCE_ANY else source, key, value))
    return out


# ---------------------------------------------------------------------------------------------
# Hubble's vocabulary

VERDICTS = ("FORWARDED", "DROPPED", "AUDIT", "ERROR", "REDIRECTED", "TRACED", "TRANSLATED",
            "VERDICT_UNKNOWN")
"""Hubble's verdicts; garrison writes the first four."""

EVENT_TYPES = {"drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5,
               "trace-sock": 7, "l7": 129, "agent": 130}
"""Cilium's monitor message types by the name `-t` takes."""

TRACE_POINTS = {
    "to-endpoint": 0, "to-proxy": 1, "to-host": 2, "to-stack": 3, "to-overlay": 4,
    "from-endpoint": 5, "from-proxy": 6, "from-host": 7, "from-stack": 8, "from-overlay": 9,
    "from-network": 10, "to-network": 11, "from-crypto": 12, "to-crypto": 13,
}
"""The trace observation points (`-t trace:to-endpoint`), as Cilium numbers them."""

_AGENT_EVENTS = {
    "unspecified": 0, "message": 1, "agent-started": 2, "policy-updated": 3,
    "policy-deleted": 4, "endpoint-regenerate-success": 5, "endpoint-regenerate-failure": 6,
    "endpoint-created": 7, "endpoint-deleted": 8, "ipcache-upserted": 9, "ipcache-deleted": 10,
}

_HUBBLE_DROP_REASON_NAMES = """
DROP_REASON_UNKNOWN INVALID_SOURCE_MAC INVALID_DESTINATION_MAC INVALID_SOURCE_IP POLICY_DENIED
INVALID_PACKET_DROPPED CT_TRUNCATED_OR_INVALID_HEADER CT_MISSING_TCP_ACK_FLAG
CT_UNKNOWN_L4_PROTOCOL CT_CANNOT_CREATE_ENTRY_FROM_PACKET UNSUPPORTED_L3_PROTOCOL
MISSED_TAIL_CALL ERROR_WRITING_TO_PACKET UNKNOWN_L4_PROTOCOL UNKNOWN_ICMPV4_CODE
UNKNOWN_ICMPV4_TYPE UNKNOWN_ICMPV6_CODE UNKNOWN_ICMPV6_TYPE ERROR_RETRIEVING_TUNNEL_KEY
ERROR_RETRIEVING_TUNNEL_OPTIONS INVALID_GENEVE_OPTION UNKNOWN_L3_TARGET_ADDRESS
STALE_OR_UNROUTABLE_IP NO_MATCHING_LOCAL_CONTAINER_FOUND ERROR_WHILE_CORRECTING_L3_CHECKSUM
ERROR_WHILE_CORRECTING_L4_CHECKSUM CT_MAP_INSERTION_FAILED INVALID_IPV6_EXTENSION_HEADER
IP_FRAGMENTATION_NOT_SUPPORTED SERVICE_BACKEND_NOT_FOUND NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT
FAILED_TO_INSERT_INTO_PROXYMAP REACHED_EDT_RATE_LIMITING_DROP_HORIZON
UNKNOWN_CONNECTION_TRACKING_STATE LOCAL_HOST_IS_UNREACHABLE
NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION UNSUPPORTED_L2_PROTOCOL
NO_MAPPING_FOR_NAT_MASQUERADE UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE FIB_LOOKUP_FAILED
ENCAPSULATION_TRAFFIC_IS_PROHIBITED INVALID_IDENTITY UNKNOWN_SENDER NAT_NOT_NEEDED
IS_A_CLUSTERIP FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND FORBIDDEN_ICMPV6_MESSAGE
DENIED_BY_LB_SRC_RANGE_CHECK SOCKET_LOOKUP_FAILED SOCKET_ASSIGN_FAILED
PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL POLICY_DENY VLAN_FILTERED INVALID_VNI
INVALID_TC_BUFFER NO_SID MISSING_SRV6_STATE NAT46 NAT64 AUTH_REQUIRED CT_NO_MAP_FOUND
SNAT_NO_MAP_FOUND INVALID_CLUSTER_ID UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP NO_EGRESS_GATEWAY
UNENCRYPTED_TRAFFIC TTL_EXCEEDED NO_NODE_ID DROP_RATE_LIMITED IGMP_HANDLED IGMP_SUBSCRIBED
MULTICAST_HANDLED DROP_HOST_NOT_READY DROP_EP_NOT_READY DROP_NO_EGRESS_IP DROP_PUNT_PROXY
"""
HUBBLE_DROP_REASONS = frozenset(_HUBBLE_DROP_REASON_NAMES.split())
"""Hubble's `DropReason` names (flow.proto): a saved `--drop-reason-desc` of any of them is
read, though garrison's datapath records only a few."""

DROP_REASONS = frozenset({r.value for r in DropReasonDesc} | HUBBLE_DROP_REASONS)

L4_PROTOCOLS = ("tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "vrrp", "igmp")
L7_PROTOCOLS = ("http", "grpc", "kafka", "dns")

_HTTP_STATUS_FULL = re.compile(r"^[1-5][0-9]{2}$")
_HTTP_STATUS_PREFIX = re.compile(r"^[1-5][0-9]?\+$")

_GRPC_STATUS_BY_NAME = {name: code for code, name in GRPC_STATUS_NAMES.items()}


# ---------------------------------------------------------------------------------------------
# Checking one flag's value (the message names the flag and the fix)


def _check_choice(flag: str, known: Sequence[str]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value.strip().upper() not in known:
            raise FilterError(f"--{flag} {value!r}: expected one of {', '.join(known)}")

    return check


def _check_drop_reason(value: str) -> None:
    if value.strip().upper() not in DROP_REASONS:
        names = ", ".join(r.value for r in DropReasonDesc if r.value != "DROP_REASON_UNKNOWN")
        raise FilterError(f"--drop-reason-desc {value!r}: expected a drop reason ({names}, "
                          "or another of Hubble's)")


def parse_event_type(value: str) -> tuple[int, int | None]:
    """`-t` as Hubble reads it: a type name (`drop`, `trace`, `l7`, `policy-verdict`...) or
    number (`129`), then optionally `:` and a sub type: a number (`drop:133`), or for `trace`
    an observation point (`trace:to-endpoint`), for `agent` an agent event. Returns the type
    (0 matches any) and the sub type (None: any)."""
    text = value.strip()
    name, colon, sub = text.partition(":")
    by_name = EVENT_TYPES.get(name.lower())
    if by_name is not None:
        number = by_name
    elif name.isascii() and name.isdigit() and int(name) < 2**31:
        number = int(name)
    else:
        raise FilterError(
            f"--type {value!r}: not a type name ({', '.join(EVENT_TYPES)}) or number "
            "(write l7, drop, drop:133, trace:to-endpoint or 129)"
        )
    if not colon:
        return number, None
    sub_number: int | None = None
    if by_name == EVENT_TYPES["trace"]:
        sub_number = TRACE_POINTS.get(sub.lower())
    elif by_name == EVENT_TYPES["agent"]:
        sub_number = _AGENT_EVENTS.get(sub.lower())
    if sub_number is None:
        if not (sub.isascii() and sub.isdigit() and int(sub) < 2**31):
            points = ", ".join(TRACE_POINTS)
            raise FilterError(
                f"--type {value!r}: sub type {sub!r} is no number"
                + (f" nor an observation point ({points})" if by_name == 4 else "")
            )
        sub_number = int(sub)
    return number, sub_number


def _check_event_type(value: str) -> None:
    parse_event_type(value)


def _check_direction(value: str) -> None:
    if value.strip().lower() not in ("ingress", "egress"):
        raise FilterError(f"--traffic-direction {value!r}: expected one of INGRESS, EGRESS")


def _check_protocol(value: str) -> None:
    if value.strip().lower() not in (*L4_PROTOCOLS, *L7_PROTOCOLS):
        raise FilterError(f"--protocol {value!r}: expected one of "
                          f"{', '.join((*L4_PROTOCOLS, *L7_PROTOCOLS))}")


def _check_nonempty(flag: str, what: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if not value.strip():
            raise FilterError(f"--{flag}: empty {what}")

    return check


def _check_regex(flag: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        try:
            re2.compile(value)
        except re2.error as exc:
            raise FilterError(f"--{flag} {value!r}: not a regular expression (RE2 syntax, as "
                              f"Hubble's): {exc}") from exc

    return check


def _check_http_status(value: str) -> None:
    v = value.strip()
    if not (_HTTP_STATUS_FULL.match(v) or _HTTP_STATUS_PREFIX.match(v)):
        raise FilterError(f"--http-status {value!r}: expected a status code (403) or one or "
                          "two leading digits and + (4+, 40+)")


def _check_grpc_status(value: str) -> None:
    v = value.strip().upper()
    if not v.isdigit() and v not in _GRPC_STATUS_BY_NAME:
        raise FilterError(f"--grpc-status {value!r}: expected a code (7) or a name "
                          "(PERMISSION_DENIED, OK, ...)")


def _check_kafka_api_key(value: str) -> None:
    v = value.strip().lower()
    if not v.isdigit() and v not in KAFKA_API_KEYS:
        raise FilterError(f"--kafka-api-key {value!r}: expected an API key name (produce, "
                          "fetch, metadata, ...) or number")


def _check_label(flag: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        try:
            parse_selector(value)
        except FilterError as exc:
            raise FilterError(f"--{flag}: {exc}") from None

    return check


def _identity_number(value: str) -> int | None:
    v = value.strip()
    if v.isascii() and v.isdigit() and int(v) < 2**32:
        return int(v)
    reserved = RESERVED.get(v.lower())
    return None if reserved is None else reserved.id


def _check_identity(flag: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if _identity_number(value) is None:
            raise FilterError(f"--{flag} {value!r}: expected a number or a reserved identity "
                              f"({', '.join(RESERVED)})")

    return check


def _check_ip(flag: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError as exc:
            raise FilterError(f"--{flag} {value!r}: not an address or CIDR ({exc})") from exc

    return check


def _check_port(flag: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        v = value.strip()
        if not (v.isascii() and v.isdigit()) or int(v) > 65535:
            raise FilterError(f"--{flag} {value!r}: expected a port, 0-65535")

    return check


def _check_pod(flag: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if not value.strip():
            raise FilterError(f"--{flag}: empty pod name (write NAME for default/NAME, "
                              "NAMESPACE/NAME, or NAMESPACE/ for every pod of a namespace)")

    return check


def _check_namespace(flag: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        v = value.strip()
        if not v or "/" in v:
            raise FilterError(f"--{flag} {value!r}: expected a namespace name")

    return check


def _no_check(value: str) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Hubble's filter construction: a left and a right filter per list


@dataclass
class _Tracker:
    """Hubble's filterTracker: the flags of one list (allow or deny), as two filters of
    field -> values, plus the namespaces applied to the pod fields when they are made."""

    left: dict[str, list[str]] = field(default_factory=dict)
    right: dict[str, list[str]] = field(default_factory=dict)
    ns: list[str] = field(default_factory=list)
    src_ns: list[str] = field(default_factory=list)
    dst_ns: list[str] = field(default_factory=list)
    flags: dict[str, None] = field(default_factory=dict)  # in the order given

    def both(self, name: str, value: str) -> None:
        self.left.setdefault(name, []).append(value)
        self.right.setdefault(name, []).append(value)

    def either(self, noun: str, value: str) -> None:
        self.left.setdefault(f"source_{noun}", []).append(value)
        self.right.setdefault(f"destination_{noun}", []).append(value)

    @property
    def used(self) -> bool:
        return bool(self.flags)

    def filters(self) -> list[dict[str, tuple[str, ...]]]:
        if not self.left and not self.right and not (self.ns or self.src_ns or self.dst_ns):
            return []
        left, right = dict(self.left), dict(self.right)
        for f in (left, right):
            if self.dst_ns:
                _apply_namespaces(f, "destination_pod", self.dst_ns)
            if self.src_ns:
                _apply_namespaces(f, "source_pod", self.src_ns)
        if self.ns:
            _apply_namespaces(left, "source_pod", self.ns)
            _apply_namespaces(right, "destination_pod", self.ns)
        made = [{k: tuple(v) for k, v in f.items()} for f in (left, right)]
        return made[:1] if made[0] == made[1] else made

    def namespace_conflict(self) -> str | None:
        """Hubble's check: a namespaced pod value outside the namespace given."""
        for namespaces, fields in (
            (self.ns, ("source_pod", "destination_pod")),
            (self.src_ns, ("source_pod",)),
            (self.dst_ns, ("destination_pod",)),
        ):
            for ns in namespaces:
                for f in (self.left, self.right):
                    for name in fields:
                        for pod in f.get(name, ()):
                            pod_ns = pod.split("/")[0] if "/" in pod else ""
                            if pod_ns and pod_ns != ns:
                                where = f"--namespace {ns}" if ns else "--all-namespaces"
                                return (f"pod {pod!r} is not in {where}: the filters "
                                        "contradict (drop one, or name the pod's namespace)")
        return None


def _apply_namespaces(f: dict[str, list[str]], name: str, namespaces: list[str]) -> None:
    pods = f.get(name) or [""]
    out = []
    for pod in pods:
        if "/" in pod:
            out.append(pod)
        else:
            out.extend(f"{ns}/{pod}" for ns in namespaces)
    f[name] = out


_CONFLICTS = (
    ("from-ip", "ip", "from-namespace", "namespace", "from-all-namespaces", "all-namespaces"),
    ("from-ip", "ip", "from-pod", "pod"),
    ("to-ip", "ip", "to-namespace", "namespace", "to-all-namespaces", "all-namespaces"),
    ("to-ip", "ip", "to-pod", "pod"),
    ("to-pod", "namespace", "all-namespaces"),
    ("from-pod", "namespace", "all-namespaces"),
    ("label", "from-label"),
    ("label", "to-label"),
    ("port", "to-port"),
    ("port", "from-port"),
    ("identity", "to-identity"),
    ("identity", "from-identity"),
)
"""Hubble's flag groups of which one list (allow or deny) may use one flag only."""


def _conflict(flags: Iterable[str]) -> tuple[str, str] | None:
    given = list(flags)
    for group in _CONFLICTS:
        used = [f for f in given if f in group]
        if len(used) > 1:
            return used[0], used[1]
    return None


_HTTP_FIELDS = {"http_status": "--http-status", "http_method": "--http-method",
                "http_path": "--http-path", "http_url": "--http-url"}


# ---------------------------------------------------------------------------------------------
# The fields of a filter: each becomes a test on a flow dict (values ORed), and where it can
# the byte strings a matching line must contain one of

Test = Callable[[FlowDict], bool]
Needles = tuple[bytes, ...] | None


def _needle(text: str) -> Needles:
    """`"text"` as it appears in a line, when it can be written without escapes."""
    if not text or not text.isascii() or '"' in text or "\\" in text or not text.isprintable():
        return None
    return (f'"{text}"'.encode(),)


def _bare_needle(text: str) -> Needles:
    needle = _needle(text)
    return (needle[0][1:-1],) if needle else None


def _join(needles: list[Needles]) -> Needles:
    if any(n is None for n in needles):
        return None
    return tuple(dict.fromkeys(b for n in needles if n for b in n))


def _namespace_name(value: str) -> tuple[str, str]:
    """Hubble's ParseNamespaceName: `ns/name`, `name` (namespace `default`), `ns/` (any
    name); what follows a second `/` is ignored, as there."""
    parts = value.split("/")
    if len(parts) > 1:
        return parts[0], parts[1]
    return ("", "") if not parts[0] else ("default", parts[0])


def _pod_field(which: str) -> Callable[[tuple[str, ...]], tuple[Test, Needles]]:
    def build(values: tuple[str, ...]) -> tuple[Test, Needles]:
        names = [_namespace_name(v.strip()) for v in values]

        def test(d: FlowDict) -> bool:
            ep = _obj(d, which)
            ns, pod = _text(ep.get("namespace")), _text(ep.get("pod_name"))
            if not ns and not pod:
                return False
            return any((not p or pod.startswith(p)) and (not n or n == ns) for n, p in names)

        needles: list[Needles] = []
        for ns, prefix in names:
            if prefix:
                needle = _needle(prefix)
                needles.append((needle[0][:-1],) if needle else None)  # `"prefix`
            else:
                needles.append(_needle(ns) if ns else None)
        return test, _join(needles)

    return build


def _ip_field(which: str) -> Callable[[tuple[str, ...]], tuple[Test, Needles]]:
    def build(values: tuple[str, ...]) -> tuple[Test, Needles]:
        networks = [ipaddress.ip_network(v.strip(), strict=False) for v in values]

        def test(d: FlowDict) -> bool:
            ip = _side_ip(d, which)
            if not ip:
                return False
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                return False
            return any(address in network for network in networks)

        needles: list[Needles] = [
            _needle(str(n.network_address)) if n.num_addresses == 1 else None for n in networks
        ]
        return test, _join(needles)

    return build


def _label_field(which: str) -> Callable[[tuple[str, ...]], tuple[Test, Needles]]:
    def build(values: tuple[str, ...]) -> tuple[Test, Needles]:
        selectors = [parse_selector(v) for v in values]

        def test(d: FlowDict) -> bool:
            raw = _obj(d, which).get("labels")
            if not isinstance(raw, list):
                raw = []
            labels = _parsed_labels(tuple(x for x in raw if isinstance(x, str)))
            return any(all(r.holds(labels) for r in reqs) for reqs in selectors)

        needles: list[Needles] = []
        for reqs in selectors:
            # a matching line holds one of the values of the first `in` requirement
            found: Needles = None
            for r in reqs:
                if r.op == "in":
                    texts = [_bare_needle(f"{r.key}={v}") for v in r.values]
                    found = _join(texts)
                    break
            needles.append(found)
        return test, _join(needles)

    return build


def _port_field(which: str) -> Callable[[tuple[str, ...]], tuple[Test, Needles]]:
    def build(values: tuple[str, ...]) -> tuple[Test, Needles]:
        ports = frozenset(int(v.strip()) for v in values)

        def test(d: FlowDict) -> bool:
            return _side_port(d, which) in ports

        return test, tuple(str(p).encode() for p in sorted(ports))

    return build


def _identity_field(which: str) -> Callable[[tuple[str, ...]], tuple[Test, Needles]]:
    def build(values: tuple[str, ...]) -> tuple[Test, Needles]:
        numbers = frozenset(n for v in values if (n := _identity_number(v)) is not None)

        def test(d: FlowDict) -> bool:
            ep = d.get(which) if isinstance(d, Mapping) else None
            return isinstance(ep, Mapping) and _as_int(ep.get("identity", 0)) in numbers

        return test, tuple(str(n).encode() for n in sorted(numbers))

    return build


def _verdict_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(v.strip().upper() for v in values)
    unknown = "VERDICT_UNKNOWN" in wanted

    def test(d: FlowDict) -> bool:
        verdict = d.get("verdict")
        if verdict in wanted:
            return True
        return unknown and (verdict is None or verdict == 0)

    return test, None if unknown else _join([_needle(v) for v in sorted(wanted)])


def _drop_reason_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(v.strip().upper() for v in values)

    def test(d: FlowDict) -> bool:
        # Hubble: dropped flows only. garrison's ERROR records (a connection the proxy
        # closed) carry their reason too; AUDIT and FORWARDED ones never match
        return d.get("verdict") in ("DROPPED", "ERROR") and d.get("drop_reason_desc") in wanted

    return test, _join([_needle(v) for v in sorted(wanted)])


def _event_type_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = [parse_event_type(v) for v in values]

    def test(d: FlowDict) -> bool:
        event = d.get("event_type") if isinstance(d, Mapping) else None
        if not isinstance(event, Mapping):
            return False
        number, sub = _as_int(event.get("type", 0)), _as_int(event.get("sub_type", 0))
        return any((not t or t == number) and (s is None or s == sub) for t, s in wanted)

    return test, None


def _direction_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(v.strip().upper() for v in values)
    return (lambda d: d.get("traffic_direction") in wanted), _join(
        [_needle(v) for v in sorted(wanted)]
    )


_L4_NEEDLES = {"tcp": (b'"TCP"',), "udp": (b'"UDP"',), "sctp": (b'"SCTP"',),
               "icmp": (b'"ICMPv4"', b'"ICMPv6"'), "icmpv4": (b'"ICMPv4"',),
               "icmpv6": (b'"ICMPv6"',), "http": (b'"http"',), "grpc": (b'"grpc"',),
               "kafka": (b'"kafka"',)}


def _protocol_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(v.strip().lower() for v in values)
    l4_names = set()
    for name in wanted:
        if name == "icmp":
            l4_names |= {"ICMPv4", "ICMPv6"}
        elif name in L4_PROTOCOLS:
            l4_names.add({"icmpv4": "ICMPv4", "icmpv6": "ICMPv6"}.get(name, name.upper()))
    l7_names = wanted & set(L7_PROTOCOLS)

    def test(d: FlowDict) -> bool:
        l4 = _obj(d, "l4")
        if any(isinstance(l4.get(name), Mapping) for name in l4_names):
            return True
        l7 = _obj(d, "l7")
        # Hubble: `http` is any record with an HTTP part, gRPC calls included
        return any(isinstance(l7.get(name), Mapping) for name in l7_names)

    return test, _join([_L4_NEEDLES.get(name) for name in sorted(wanted)])


def _http_status_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    full = {v.strip() for v in values if _HTTP_STATUS_FULL.match(v.strip())}
    prefixes = tuple(v.strip()[:-1] for v in values if v.strip().endswith("+"))

    def test(d: FlowDict) -> bool:
        code = _as_int(_obj(_obj(d, "l7"), "http").get("code", 0))
        if not code:
            return False  # a request: no status
        text = f"{code:03d}"
        return text in full or text.startswith(prefixes)

    return test, None


def _http_method_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(v.strip().upper() for v in values)

    def test(d: FlowDict) -> bool:
        method = _obj(_obj(d, "l7"), "http").get("method")
        return isinstance(method, str) and bool(method) and method.upper() in wanted

    return test, None


def _http_path_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    patterns = [re2.compile(v) for v in values]

    def test(d: FlowDict) -> bool:
        url = _obj(_obj(d, "l7"), "http").get("url")
        path = request_uri_path(url) if isinstance(url, str) else None
        return path is not None and any(p.search(path) is not None for p in patterns)

    return test, None


def _http_url_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    patterns = [re2.compile(v) for v in values]

    def test(d: FlowDict) -> bool:
        url = _obj(_obj(d, "l7"), "http").get("url")
        return isinstance(url, str) and bool(url) and any(
            p.search(url) is not None for p in patterns
        )

    return test, None


def _l7_text_field(part: str, key: str) -> Callable[[tuple[str, ...]], tuple[Test, Needles]]:
    def build(values: tuple[str, ...]) -> tuple[Test, Needles]:
        wanted = frozenset(v.strip() for v in values)
        return (lambda d: _obj(_obj(d, "l7"), part).get(key) in wanted), _join(
            [_needle(v) for v in sorted(wanted)]
        )

    return build


def _grpc_status_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    codes = frozenset(
        int(v) if v.isdigit() else _GRPC_STATUS_BY_NAME[v] for v in (x.strip().upper()
                                                                    for x in values)
    )

    def test(d: FlowDict) -> bool:
        status = _obj(_obj(d, "l7"), "grpc").get("status")
        return status is not None and not isinstance(status, bool) and _as_int(status) in codes

    return test, None


def _kafka_topic_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(v.strip() for v in values)

    def test(d: FlowDict) -> bool:
        kafka = _obj(_obj(d, "l7"), "kafka")
        topics = kafka.get("topics")
        if isinstance(topics, list) and any(t in wanted for t in topics if isinstance(t, str)):
            return True
        return kafka.get("topic") in wanted

    return test, _join([_needle(v) for v in sorted(wanted)])


def _kafka_api_key_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    accepted: set[str] = set()
    for value in values:
        v = value.strip().lower()
        name = KAFKA_API_NAMES.get(int(v), v) if v.isdigit() else v
        accepted |= {name, str(KAFKA_API_KEYS.get(name, name))}

    def test(d: FlowDict) -> bool:
        key = _obj(_obj(d, "l7"), "kafka").get("api_key")
        return isinstance(key, str) and key.lower() in accepted

    return test, None


_FIELDS: Mapping[str, Callable[[tuple[str, ...]], tuple[Test, Needles]]] = {
    "source_pod": _pod_field("source"),
    "destination_pod": _pod_field("destination"),
    "source_ip": _ip_field("source"),
    "destination_ip": _ip_field("destination"),
    "source_label": _label_field("source"),
    "destination_label": _label_field("destination"),
    "source_port": _port_field("source"),
    "destination_port": _port_field("destination"),
    "source_identity": _identity_field("source"),
    "destination_identity": _identity_field("destination"),
    "verdict": _verdict_field,
    "drop_reason_desc": _drop_reason_field,
    "event_type": _event_type_field,
    "traffic_direction": _direction_field,
    "protocol": _protocol_field,
    "http_status": _http_status_field,
    "http_method": _http_method_field,
    "http_path": _http_path_field,
    "http_url": _http_url_field,
    "grpc_service": _l7_text_field("grpc", "service"),
    "grpc_method": _l7_text_field("grpc", "method"),
    "grpc_status": _grpc_status_field,
    "kafka_topic": _kafka_topic_field,
    "kafka_api_key": _kafka_api_key_field,
}


# ---------------------------------------------------------------------------------------------
# The flags


@dataclass(frozen=True, slots=True)
class FlagSpec:
    """A filter flag: its help text, the check of one value (raises FilterError naming the
    flag), and how a value is added to the filters of its list (`apply`)."""

    name: str
    help: str
    metavar: str
    check: Callable[[str], None]
    apply: Callable[[_Tracker, str], None]
    takes_value: bool = True
    short: str = ""


def _to_both(name: str) -> Callable[[_Tracker, str], None]:
    return lambda tracker, value: tracker.both(name, value)


def _flags() -> dict[str, FlagSpec]:
    def both(name: str, help_: str, metavar: str, check: Callable[[str], None],
             short: str = "") -> FlagSpec:
        return FlagSpec(name, help_, metavar, check, _to_both(name.replace("-", "_")),
                        short=short)

    specs = [
        both("verdict", f"{', '.join(VERDICTS[:5])}, ...", "VERDICT",
             _check_choice("verdict", VERDICTS)),
        both("drop-reason-desc", "POLICY_DENIED, POLICY_DENY, PARSE_ERROR, ... (dropped and "
             "error records)", "REASON", _check_drop_reason),
        FlagSpec("type", "TYPE[:SUBTYPE]: l7, drop, policy-verdict, trace, a number (129); "
                 "drop:133, trace:to-endpoint", "TYPE", _check_event_type,
                 _to_both("event_type"), short="t"),
        both("traffic-direction", "ingress or egress", "DIRECTION", _check_direction),
        both("protocol", "tcp, udp, icmp, http (gRPC included), grpc, kafka, ...", "PROTO",
             _check_protocol),
        both("http-method", "HTTP method (GET, PUT, ...)", "METHOD",
             _check_nonempty("http-method", "method")),
        both("http-path", "regular expression (RE2) searched in the decoded URL path",
             "REGEX", _check_regex("http-path")),
        both("http-url", "regular expression (RE2) searched in the whole URL", "REGEX",
             _check_regex("http-url")),
        both("http-status", "status code (403) or one or two digits and + (5+, 40+)",
             "STATUS", _check_http_status),
        both("grpc-service", "gRPC service (pkg.Service)", "SERVICE",
             _check_nonempty("grpc-service", "service")),
        both("grpc-method", "gRPC method (GetName)", "METHOD",
             _check_nonempty("grpc-method", "method")),
        both("grpc-status", "gRPC status code or name (7, PERMISSION_DENIED)", "STATUS",
             _check_grpc_status),
        both("kafka-topic", "Kafka topic named by the request", "TOPIC",
             _check_nonempty("kafka-topic", "topic")),
        both("kafka-api-key", "Kafka API key name or number (produce, 0)", "KEY",
             _check_kafka_api_key),
    ]
    sided: list[tuple[str, str, str, Callable[[str], Callable[[str], None]], str]] = [
        ("label", "labels match the selector (k=v,k2 in (a,b),!k3)", "SELECTOR", _check_label,
         "l"),
        ("identity", "numeric identity or reserved name (world)", "ID", _check_identity, ""),
        ("ip", "address or CIDR", "CIDR", _check_ip, ""),
        ("port", "TCP, UDP or SCTP port number", "PORT", _check_port, ""),
        ("pod", "pod name prefix: NAME (in default), NS/NAME, or NS/ (every pod of NS)",
         "[NS/]NAME", _check_pod, ""),
    ]
    for noun, help_, metavar, make_check, short in sided:
        specs.append(FlagSpec(f"from-{noun}", f"source: {help_}", metavar,
                              make_check(f"from-{noun}"), _to_both(f"source_{noun}")))
        specs.append(FlagSpec(f"to-{noun}", f"destination: {help_}", metavar,
                              make_check(f"to-{noun}"), _to_both(f"destination_{noun}")))
        specs.append(FlagSpec(
            noun, f"source or destination: {help_}", metavar, make_check(noun),
            lambda tracker, value, noun=noun: tracker.either(noun, value),  # type: ignore[misc]
            short=short,
        ))
    for prefix, attr, what in (("from-", "src_ns", "source"), ("to-", "dst_ns", "destination"),
                               ("", "ns", "source or destination")):
        specs.append(FlagSpec(
            f"{prefix}namespace", f"{what}: in this namespace", "NS",
            _check_namespace(f"{prefix}namespace"),
            lambda tracker, value, attr=attr: getattr(tracker, attr).append(  # type: ignore[misc]
                value.strip()),
            short="n" if not prefix else "",
        ))
        specs.append(FlagSpec(
            f"{prefix}all-namespaces", f"{what}: in any namespace (a bare --pod NAME is "
            "then any pod NAME)", "", _no_check,
            lambda tracker, value, attr=attr: getattr(tracker, attr).append(""),  # type: ignore[misc]
            takes_value=False, short="A" if not prefix else "",
        ))
    return {spec.name: spec for spec in specs}


FLAGS: Mapping[str, FlagSpec] = _flags()
"""Every filter flag by name, in the order `--help` lists them."""


# ---------------------------------------------------------------------------------------------
# Compiled


_TIME_PREFIX = b'{"time":"'
_TIME_LEN = len("2024-11-21T12:00:00.123456789Z")  # at line[9:39], after _TIME_PREFIX


def _fixed_time(text: Any) -> TypeGuard[str]:
    return isinstance(text, str) and len(text) == _TIME_LEN and text[-1] == "Z" and (
        text[10] == "T" and text[19] == "."
    )


def _all_of(tests: list[Test]) -> Test:
    if not tests:
        return lambda d: True
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        a, b = tests
        return lambda d: a(d) and b(d)
    return lambda d: all(t(d) for t in tests)


def _build_list(tracker: _Tracker, negated: bool) -> tuple[list[Test], list[list[Needles]]]:
    """The filters of one list, as tests, and per filter the needles of its fields."""
    where = "--not " if negated else ""
    pair = _conflict(tracker.flags)
    if pair is not None:
        raise FilterError(f"filters {where}--{pair[0]} and {where}--{pair[1]} cannot be "
                          "combined (as in Hubble): keep one of them")
    problem = tracker.namespace_conflict()
    if problem is not None:
        raise FilterError(problem)
    tests: list[Test] = []
    needles: list[list[Needles]] = []
    for f in tracker.filters():
        types = [parse_event_type(v) for v in f.get("event_type", ())]
        if types and not any(t == EVENT_TYPES["l7"] for t, _ in types):
            used = next(flag for name, flag in _HTTP_FIELDS.items() if name in f) if any(
                name in f for name in _HTTP_FIELDS) else None
            if used is not None:
                raise FilterError(f"{where}{used} needs --type l7 among the types given "
                                  "(HTTP fields are only in l7 records, as Hubble says)")
        built = [_FIELDS[name](values) for name, values in f.items()]
        tests.append(_all_of([t for t, _ in built]))
        needles.append([n for _, n in built if n is not None])
    return tests, needles


class CompiledQuery:
    """A query ready to run. `matches(flow_dict)` is the whole test; `may_match(line)` the
    cheap necessary condition on the raw line; `matches_record(record)` for FlowRecords."""

    __slots__ = ("_match", "_needles", "_since", "_until", "query")

    def __init__(self, query: FlowQuery) -> None:
        self.query = query
        allow, deny = _Tracker(), _Tracker()
        for term in query.terms:
            spec = FLAGS.get(term.name)
            if spec is None:
                raise FilterError(f"unknown filter --{term.name}")
            if not term.values:
                raise FilterError(f"--{term.name}: no value")
            tracker = deny if term.negated else allow
            tracker.flags[term.name] = None
            for value in term.values:
                spec.check(value)
                spec.apply(tracker, value)
        allowed, allow_needles = _build_list(allow, False)
        denied, _ = _build_list(deny, True)
        self._match = _combine(allowed, denied)
        # a line may match when it could match one allow filter: all of its needle groups
        self._needles: tuple[tuple[tuple[bytes, ...], ...], ...] | None = None
        if allowed and all(allow_needles):
            self._needles = tuple(
                tuple(n for n in groups if n is not None) for groups in allow_needles
            )
        self._since = None if query.since_ns is None else format_time(query.since_ns)
        self._until = None if query.until_ns is None else format_time(query.until_ns)

    @property
    def selects_all(self) -> bool:
        return self.query.is_empty

    def may_match(self, line: bytes) -> bool:
        """False only when no flow written as `line` can match."""
        bounded = self._since is not None or self._until is not None
        if bounded and line.startswith(_TIME_PREFIX) and line[39:40] == b'"':
            stamp = line[9:39].decode("ascii", "replace")
            if _fixed_time(stamp) and not self._in_time(stamp):
                return False
        if self._needles is None or b"\\" in line:
            return True
        return any(
            all(any(n in line for n in group) for group in groups) for groups in self._needles
        )

    def _in_time(self, stamp: str) -> bool:
        if self._since is not None and stamp < self._since:
            return False
        return not (self._until is not None and stamp > self._until)

    def matches(self, d: FlowDict) -> bool:
        if self._since is not None or self._until is not None:
            stamp = d.get("time")
            if _fixed_time(stamp):
                if not self._in_time(stamp):
                    return False
            else:
                try:
                    ns = parse_time(stamp) if isinstance(stamp, str) else None
                except FlowDecodeError:
                    ns = None
                if ns is None:
                    return False  # a record without a readable time is outside any bound
                if self.query.since_ns is not None and ns < self.query.since_ns:
                    return False
                if self.query.until_ns is not None and ns > self.query.until_ns:
                    return False
        return self._match(d)

    def matches_record(self, record: FlowRecord) -> bool:
        return self.selects_all or self.matches(record.to_dict())


def _combine(allowed: list[Test], denied: list[Test]) -> Test:
    """Hubble's Apply: one allow filter matches (or there are none) and no deny filter."""
    if len(allowed) == 1:
        allow = allowed[0]
    elif allowed:

        def allow(d: FlowDict) -> bool:
            return any(t(d) for t in allowed)

    else:
        allow = _always
    if not denied:
        return allow
    hidden = denied[0] if len(denied) == 1 else (lambda d: any(t(d) for t in denied))
    if allow is _always:
        return lambda d: not hidden(d)
    return lambda d: allow(d) and not hidden(d)


def _always(d: FlowDict) -> bool:
    return True


MATCH_ALL = FlowQuery().compile()


# ---------------------------------------------------------------------------------------------
# Time bounds from the command line

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")
_UNIT_NS = {
    "ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
    "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000,
}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAIVE = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)$")
# Hubble's short RFC 3339 layouts: to the hour (`2006-01-02T15Z07:00`) or the minute
_SHORT = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2})(:\d{2})?([Zz]|[+-]\d{2}:\d{2})$")


def parse_duration_ns(text: str) -> int | None:
    """A Go duration (`90s`, `5m`, `1h30m`, `1.5h`, `300ms`, `0`, `-5m`) or days (`2d`) in
    nanoseconds; None when `text` is no duration."""
    text = text.strip()
    sign = 1
    if text[:1] in "+-" and text:
        sign, text = (-1 if text[0] == "-" else 1), text[1:]
    if text == "0":
        return 0
    if not text:
        return None
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return sign * int(total) if pos == len(text) and pos else None


def parse_time_bound(text: str, now_ns: int, flag: str = "since") -> int:
    """A `--since` / `--until` value, as Hubble reads it: a duration back from now (`5m`,
    `1h30m`), an RFC 3339 time, also to the minute or hour (`2026-12-05T11:59Z`,
    `2026-12-05T11+01:00`), a date (`2026-12-05`, UTC) or an RFC 1123 time (`Sat, 05 Dec
    2026 11:59:00 +0000`, `... GMT`); and garrison's `now` and `2026-12-05 11:59[:SS]` (UTC)."""
    value = text.strip()
    if value.lower() == "now":
        return now_ns
    duration = parse_duration_ns(value)
    if duration is not None:
        return now_ns - duration
    if _DATE.match(value):
        value += "T00:00:00Z"
    elif m := _SHORT.match(value):
        date, hour, minute, zone = m.groups()
        value = f"{date}T{hour}{minute or ':00'}:00{zone}"
    elif m := _NAIVE.match(value):
        date, clock = m.groups()
        if clock.count(":") == 1:
            clock += ":00"
        value = f"{date}T{clock}Z"
    try:
        return parse_time(value)
    except (FlowDecodeError, ValueError):
        pass
    rfc1123 = _rfc1123(value)
    if rfc1123 is not None:
        return rfc1123
    raise FilterError(
        f"--{flag} {text!r}: expected a duration (30s, 5m, 1h30m, 2d), a time "
        "(2026-12-05T11:59:00Z, 2026-12-05T11:59Z, 2026-12-05, 2026-12-05 11:59, "
        "Sat, 05 Dec 2026 11:59:00 +0000) or now"
    )


_RFC1123 = re.compile(r"^[A-Za-z]{3}, \d{1,2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} "
                      r"([+-]\d{4}|GMT|UTC|UT|Z)$")


def _rfc1123(value: str) -> int | None:
    """`Mon, 02 Jan 2006 15:04:05 -0700` (Go's RFC1123Z, what Hubble reads) or with `GMT`;
    other zone names are refused: their offset is not known."""
    if not _RFC1123.match(value):
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp()) * 1_000_000_000  # whole seconds only
