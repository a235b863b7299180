"""The fields of a Hubble flow filter (`source_pod`, `verdict`, `http_path`, ...) and what
each tests on a flow dict: Hubble's server-side filters (pkg/hubble/filters), learnt and
written for flow dicts. `FIELDS[name](values)` gives the test, the values ORed, and where it
can the byte strings a line that passes must contain one of (its *needles*); the values are
checked before (`garrison.flows.query`).

Hubble's vocabulary is here too: its verdicts, event types and trace observation points,
drop reasons, protocols and HTTP status forms.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

import re2

from garrison.flows.build import GRPC_STATUS_NAMES
from garrison.flows.errors import FilterError
from garrison.flows.flowdict import (
    FlowDict,
    as_int,
    obj,
    request_uri_path,
    side_ip,
    side_port,
    text_of,
)
from garrison.flows.record import DropReasonDesc
from garrison.flows.selectors import parse_selector, parsed_labels
from garrison.identity.model import RESERVED
from garrison.policies.l7rules import KAFKA_API_KEYS, KAFKA_API_NAMES

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

HTTP_STATUS_FULL = re.compile(r"^[1-5][0-9]{2}$")
HTTP_STATUS_PREFIX = re.compile(r"^[1-5][0-9]?\+$")

GRPC_STATUS_BY_NAME = {name: code for code, name in GRPC_STATUS_NAMES.items()}


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


TCP_FLAGS = ("SYN", "FIN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")


def parse_tcp_flags(value: str) -> frozenset[str]:
    """`--tcp-flags syn,ack`: the flags a packet must all have (any case)."""
    names = [part.strip().upper() for part in value.split(",")]
    for name in names:
        if name not in TCP_FLAGS:
            raise FilterError(f"--tcp-flags {value!r}: unknown TCP flag {name!r} (write "
                              f"{', '.join(TCP_FLAGS)}, comma-separated)")
    return frozenset(names)


def parse_http_header(value: str) -> tuple[str, str]:
    """`--http-header key:value`, both exact."""
    key, colon, header_value = value.partition(":")
    if not colon:
        raise FilterError(f"--http-header {value!r}: expected name:value")
    return key, header_value


# A DNS name as Hubble's patterns read it, `*` any run of name characters
_NAME_CHARS = r"[-0-9_a-z]+(?:\.[-0-9_a-z]+)*"


def node_name_pattern(values: tuple[str, ...]) -> Any:
    """Hubble's `--node-name` patterns: `[CLUSTER/]NODE`, each part lower case letters,
    digits, `-`, `_`, `.` and `*` (any run of them); a missing part matches any name. A
    record's node name without a cluster is in cluster `default`. A re2 pattern (`fullmatch`):
    the patterns come from readers (the flow API's, the review page's), and Python's engine
    backtracks for hours on `****...x` while holding the GIL of the agent's process."""
    alternatives = []
    for value in values:
        parts = value.split("/")
        if not value or len(parts) > 2:
            raise FilterError(f"--node-name {value!r}: expected [CLUSTER/]NODE")
        cluster, node = parts if len(parts) == 2 else ("", parts[0])
        alternatives.append(f"{_name_pattern(cluster, value)}/{_name_pattern(node, value)}")
    return re2.compile("(?:" + "|".join(alternatives) + ")")


def _name_pattern(text: str, value: str) -> str:
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        return _NAME_CHARS
    out = []
    for ch in text:
        if ch == "*":
            out.append(r"[-.0-9a-z]*")
        elif ch == ".":
            out.append(r"\.")
        elif ch in "-_" or (ch.isdigit() and ch.isascii()) or "a" <= ch <= "z":
            out.append(ch)
        else:
            raise FilterError(f"--node-name {value!r}: {ch!r} cannot be in a node name pattern")
    return "".join(out)


def ip_version(value: str) -> str:
    """Hubble's `--ip-version` words: `4`, `v4`, `ipv4`, `ip4` (and 6); anything else is
    `IP_NOT_USED` (a flow without IP)."""
    v = value.strip().lower()
    if v in ("4", "v4", "ipv4", "ip4"):
        return "IPv4"
    if v in ("6", "v6", "ipv6", "ip6"):
        return "IPv6"
    return "IP_NOT_USED"


def identity_number(value: str) -> int | None:
    v = value.strip()
    if v.isascii() and v.isdigit() and int(v) < 2**32:
        return int(v)
    reserved = RESERVED.get(v.lower())
    return None if reserved is None else reserved.id


# ---------------------------------------------------------------------------------------------
# The fields of a filter


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
            ep = obj(d, which)
            ns, pod = text_of(ep.get("namespace")), text_of(ep.get("pod_name"))
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
            ip = side_ip(d, which)
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
            raw = obj(d, which).get("labels")
            if not isinstance(raw, list):
                raw = []
            labels = parsed_labels(tuple(x for x in raw if isinstance(x, str)))
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
            return side_port(d, which) in ports

        return test, tuple(str(p).encode() for p in sorted(ports))

    return build


def _identity_field(which: str) -> Callable[[tuple[str, ...]], tuple[Test, Needles]]:
    def build(values: tuple[str, ...]) -> tuple[Test, Needles]:
        numbers = frozenset(n for v in values if (n := identity_number(v)) is not None)

        def test(d: FlowDict) -> bool:
            ep = d.get(which) if isinstance(d, Mapping) else None
            return isinstance(ep, Mapping) and as_int(ep.get("identity", 0)) in numbers

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
        number, sub = as_int(event.get("type", 0)), as_int(event.get("sub_type", 0))
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
        l4 = obj(d, "l4")
        if any(isinstance(l4.get(name), Mapping) for name in l4_names):
            return True
        l7 = obj(d, "l7")
        # Hubble: `http` is any record with an HTTP part, gRPC calls included
        return any(isinstance(l7.get(name), Mapping) for name in l7_names)

    return test, _join([_L4_NEEDLES.get(name) for name in sorted(wanted)])


def _http_status_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    full = {v.strip() for v in values if HTTP_STATUS_FULL.match(v.strip())}
    prefixes = tuple(v.strip()[:-1] for v in values if v.strip().endswith("+"))

    def test(d: FlowDict) -> bool:
        code = as_int(obj(obj(d, "l7"), "http").get("code", 0))
        if not code:
            return False  # a request: no status
        text = f"{code:03d}"
        return text in full or text.startswith(prefixes)

    return test, None


def _http_method_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(v.strip().upper() for v in values)

    def test(d: FlowDict) -> bool:
        method = obj(obj(d, "l7"), "http").get("method")
        return isinstance(method, str) and bool(method) and method.upper() in wanted

    return test, None


def _http_path_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    patterns = [re2.compile(v) for v in values]

    def test(d: FlowDict) -> bool:
        url = obj(obj(d, "l7"), "http").get("url")
        path = request_uri_path(url) if isinstance(url, str) else None
        return path is not None and any(p.search(path) is not None for p in patterns)

    return test, None


def _http_url_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    patterns = [re2.compile(v) for v in values]

    def test(d: FlowDict) -> bool:
        url = obj(obj(d, "l7"), "http").get("url")
        return isinstance(url, str) and bool(url) and any(
            p.search(url) is not None for p in patterns
        )

    return test, None


def _l7_text_field(part: str, key: str) -> Callable[[tuple[str, ...]], tuple[Test, Needles]]:
    def build(values: tuple[str, ...]) -> tuple[Test, Needles]:
        wanted = frozenset(v.strip() for v in values)
        return (lambda d: obj(obj(d, "l7"), part).get(key) in wanted), _join(
            [_needle(v) for v in sorted(wanted)]
        )

    return build


def _grpc_status_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    codes = frozenset(
        int(v) if v.isdigit() else GRPC_STATUS_BY_NAME[v] for v in (x.strip().upper()
                                                                    for x in values)
    )

    def test(d: FlowDict) -> bool:
        status = obj(obj(d, "l7"), "grpc").get("status")
        return status is not None and not isinstance(status, bool) and as_int(status) in codes

    return test, None


def _kafka_topic_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(v.strip() for v in values)

    def test(d: FlowDict) -> bool:
        kafka = obj(obj(d, "l7"), "kafka")
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
        key = obj(obj(d, "l7"), "kafka").get("api_key")
        return isinstance(key, str) and key.lower() in accepted

    return test, None


def _tcp_flags_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = [parse_tcp_flags(v) for v in values]

    def test(d: FlowDict) -> bool:
        flags = obj(obj(d, "l4"), "TCP").get("flags")
        if not isinstance(flags, Mapping):
            return False
        # Hubble: a packet with SYN and ACK passes `--tcp-flags syn`
        return any(all(flags.get(name) is True for name in names) for names in wanted)

    return test, None


def _http_header_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(parse_http_header(v) for v in values)

    def test(d: FlowDict) -> bool:
        headers = obj(obj(d, "l7"), "http").get("headers")
        if not isinstance(headers, list):
            return False
        return any(isinstance(h, Mapping) and (h.get("key"), h.get("value")) in wanted
                   for h in headers)

    return test, None


def _node_name_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    pattern = node_name_pattern(values)

    def test(d: FlowDict) -> bool:
        name = text_of(d.get("node_name"))
        if not name:
            return False
        if "/" not in name:
            name = f"default/{name}"
        return pattern.fullmatch(name) is not None

    return test, None


def _ip_version_field(values: tuple[str, ...]) -> tuple[Test, Needles]:
    wanted = frozenset(ip_version(v) for v in values)

    def test(d: FlowDict) -> bool:
        version = obj(d, "IP").get("ipVersion")
        if version in (None, 0, ""):
            version = "IP_NOT_USED"
        elif version in (1, 2):
            version = "IPv4" if version == 1 else "IPv6"
        return version in wanted

    return test, None


FIELDS: Mapping[str, Callable[[tuple[str, ...]], tuple[Test, Needles]]] = {
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
    "http_status_code": _http_status_field,
    "http_method": _http_method_field,
    "http_path": _http_path_field,
    "http_url": _http_url_field,
    "grpc_service": _l7_text_field("grpc", "service"),
    "grpc_method": _l7_text_field("grpc", "method"),
    "grpc_status": _grpc_status_field,
    "kafka_topic": _kafka_topic_field,
    "kafka_api_key": _kafka_api_key_field,
    "tcp_flags": _tcp_flags_field,
    "http_header": _http_header_field,
    "node_name": _node_name_field,
    "ip_version": _ip_version_field,
}
