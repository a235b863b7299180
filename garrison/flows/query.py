"""Which flows to show: the filters of `garrison observe`, `accesslog summary` and `export`.

A query is a list of terms, one per filter flag of the command line (`--verdict DROPPED`,
`--from-label org=empire`, ...), with Hubble's conventions:

- terms of different flags combine with AND;
- the values of one flag, repeated or comma-free lists, combine with OR
  (`--verdict DROPPED --verdict ERROR`: either);
- `--not` negates the flag that follows it; negated values of one flag are one negated term
  (`--not --verdict FORWARDED --not --verdict AUDIT`: neither);
- `--from-*` is about the record's `source`, `--to-*` its `destination`, the flag without a
  direction (`--label`, `--ip`, `--pod`, ...) matches when either side does. For an L7 response
  the source is the server (Hubble's convention: a record describes who sent the message).

Queries run on flow *dicts*, the JSON object of an access-log line (Hubble's field names), so
the same code filters a file, standard input and the agent's ring. Reading a large file is
dominated by JSON decoding, so `CompiledQuery.may_match(line)` first rules out lines with a
substring test: each positive term that can name one gives the byte strings of which a
matching line must contain at least one (`"DROPPED"` for `--verdict DROPPED`). The test is
only a necessary condition, and it is skipped for lines with a backslash, where JSON escapes
could hide a value, so it never drops a line the full match would keep.

Time bounds (`since_ns`, `until_ns`, inclusive) compare the RFC 3339 text garrison writes
(fixed width, UTC) as strings, without parsing it, and parse any other spelling.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

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
    """One filter flag (`name` without dashes: `from-label`), its values, ORed, and whether
    `--not` preceded it."""

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


def _l4_ports(d: FlowDict) -> tuple[int, int]:
    for inner in _obj(d, "l4").values():
        if isinstance(inner, Mapping):
            src, dst = inner.get("source_port", 0), inner.get("destination_port", 0)
            if "type" in inner:  # ICMP: Hubble's port filters see the type as the port
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


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _sides(d: FlowDict, which: str) -> tuple[FlowSide, ...]:
    if which == "from":
        return (flow_side(d, "source"),)
    if which == "to":
        return (flow_side(d, "destination"),)
    return (flow_side(d, "source"), flow_side(d, "destination"))


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


# ---------------------------------------------------------------------------------------------
# Label selectors: `k=v,k2 in (a,b),!k3`


@dataclass(frozen=True, slots=True)
class _Requirement:
    source: str
    key: str
    op: str  # in | notin | exists | !exists
    values: tuple[str, ...] = ()

    def holds(self, labels: Sequence[tuple[str, str, str]]) -> bool:
        found = [v for s, k, v in labels if k == self.key and self.source in (SOURCE_ANY, s)]
        if self.op == "in":
            return any(v in self.values for v in found)
        if self.op == "notin":
            return not any(v in self.values for v in found)
        if self.op == "exists":
            return bool(found)
        return not found


_SET_OP = re.compile(r"^(!?)\s*([^\s=!()]+)\s+(in|notin)\s*\(([^()]*)\)$")
_EQ_OP = re.compile(r"^([^\s=!()]+)\s*(==|=|!=)\s*([^\s=!(),]*)$")
_KEY = re.compile(r"^(!?)\s*([^\s=!(),]+)$")


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
    `!k`; keys may carry a source (`k8s:app`, `reserved:world`); a key without one matches any
    source. Every requirement must hold on one endpoint."""
    reqs = []
    for part in _split_selector(text):
        if m := _SET_OP.match(part):
            bang, key_text, op, values_text = m.groups()
            if bang:
                raise FilterError(f"label selector {text!r}: '!' before {op!r} in {part!r}")
            values = tuple(v.strip() for v in values_text.split(",") if v.strip())
            if not values:
                raise FilterError(f"label selector {text!r}: empty value list in {part!r}")
            source, key = _source_key(key_text)
            reqs.append(_Requirement(source, key, op, values))
        elif m := _EQ_OP.match(part):
            key_text, op, value = m.groups()
            source, key = _source_key(key_text)
            reqs.append(_Requirement(source, key, "notin" if op == "!=" else "in", (value,)))
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
# The flags

Test = Callable[[FlowDict], bool]


@dataclass(frozen=True, slots=True)
class FlagSpec:
    """A filter flag: its help text and how one of its values becomes a test on a flow dict
    (and, where it can, the byte strings a matching line must contain one of)."""

    name: str
    help: str
    metavar: str
    compile: Callable[[str], tuple[Test, tuple[bytes, ...] | None]]


def _needle(text: str) -> tuple[bytes, ...] | None:
    """`"text"` as it appears in a line, when it can be written without escapes."""
    if not text or not text.isascii() or '"' in text or "\\" in text or not text.isprintable():
        return None
    return (f'"{text}"'.encode(),)


def _bare_needle(text: str) -> tuple[bytes, ...] | None:
    needle = _needle(text)
    return (needle[0][1:-1],) if needle else None


def _choice(value: str, known: Iterable[str], flag: str) -> str:
    upper = value.strip().upper()
    names = list(known)
    if upper not in names:
        raise FilterError(f"--{flag} {value!r}: expected one of {', '.join(names)}")
    return upper


def _verdict(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    v = _choice(value, ("FORWARDED", "DROPPED", "AUDIT", "ERROR"), "verdict")
    return (lambda d: d.get("verdict") == v), _needle(v)


def _drop_reason(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    v = _choice(value, [r.value for r in DropReasonDesc], "drop-reason-desc")
    return (lambda d: d.get("drop_reason_desc") == v), _needle(v)


_EVENT_TYPES = {"drop": 1, "trace": 4, "policy-verdict": 5, "l7": 129}


def _event_type(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    name, _, sub = value.strip().lower().partition(":")
    if name not in _EVENT_TYPES:
        raise FilterError(
            f"--type {value!r}: expected one of {', '.join(_EVENT_TYPES)} "
            "(trace may name an observation point: trace:to-endpoint)"
        )
    number = _EVENT_TYPES[name]
    point = ""
    if sub:
        if name != "trace":
            raise FilterError(f"--type {value!r}: only trace takes a sub type (trace:to-proxy)")
        point = sub.upper().replace("-", "_")

    def test(d: FlowDict) -> bool:
        if _as_int(_obj(d, "event_type").get("type", 0)) != number:
            return False
        return not point or d.get("trace_observation_point") == point

    return test, None


def _direction(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    v = _choice(value, ("INGRESS", "EGRESS"), "traffic-direction")
    return (lambda d: d.get("traffic_direction") == v), _needle(v)


_PROTOCOLS = ("tcp", "udp", "sctp", "icmpv4", "icmp", "http", "grpc", "kafka")


def _protocol(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    v = value.strip().lower()
    if v not in _PROTOCOLS:
        raise FilterError(f"--protocol {value!r}: expected one of tcp, udp, sctp, icmp, http, "
                          "grpc, kafka")
    if v in ("http", "grpc", "kafka"):
        return (lambda d: flow_protocol(d) == v), (f'"{v}"'.encode(),)
    if v == "icmp":
        v = "icmpv4"

    def test(d: FlowDict) -> bool:
        return any(str(name).lower() == v for name in _obj(d, "l4"))

    return test, None


def _http_method(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    v = value.strip().upper()
    if not v:
        raise FilterError("--http-method: empty method")

    def test(d: FlowDict) -> bool:
        method = _obj(_obj(d, "l7"), "http").get("method")
        return isinstance(method, str) and method.upper() == v

    return test, None


def _http_path(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    try:
        pattern = re.compile(value)
    except re.error as exc:
        raise FilterError(f"--http-path {value!r}: not a regular expression: {exc}") from exc

    def test(d: FlowDict) -> bool:
        url = _obj(_obj(d, "l7"), "http").get("url")
        return isinstance(url, str) and pattern.search(url_path(url)) is not None

    return test, None


_STATUS = re.compile(r"^([1-5])(\d{0,2})(\+?)$")


def _http_status(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    """`403` exactly, or a prefix and `+`: `5+` any 5xx, `40+` 400-409."""
    m = _STATUS.match(value.strip())
    if m is None or (not m.group(3) and len(m.group(1) + m.group(2)) != 3):
        raise FilterError(f"--http-status {value!r}: expected a status code (403) or a prefix "
                          "and + (4+, 50+)")
    prefix = m.group(1) + m.group(2)
    exact = not m.group(3)

    def test(d: FlowDict) -> bool:
        code = _as_int(_obj(_obj(d, "l7"), "http").get("code", 0))
        if not code:
            return False
        text = str(code)
        return text == prefix if exact else (len(text) == 3 and text.startswith(prefix))

    return test, None


Compiler = Callable[[str], tuple[Test, tuple[bytes, ...] | None]]


def _l7_field(part: str, key: str, flag: str) -> Compiler:
    def compile_(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
        v = value.strip()
        if not v:
            raise FilterError(f"--{flag}: empty value")
        return (lambda d: _obj(_obj(d, "l7"), part).get(key) == v), _needle(v)

    return compile_


_GRPC_STATUS_BY_NAME = {name: code for code, name in GRPC_STATUS_NAMES.items()}


def _grpc_status(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    v = value.strip().upper()
    if v.isdigit():
        code = int(v)
    elif v in _GRPC_STATUS_BY_NAME:
        code = _GRPC_STATUS_BY_NAME[v]
    else:
        raise FilterError(f"--grpc-status {value!r}: expected a code (7) or a name "
                          "(PERMISSION_DENIED, OK, ...)")

    def test(d: FlowDict) -> bool:
        status = _obj(_obj(d, "l7"), "grpc").get("status")
        return status is not None and _as_int(status) == code and not isinstance(status, bool)

    return test, None


def _kafka_topic(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    v = value.strip()
    if not v:
        raise FilterError("--kafka-topic: empty topic")

    def test(d: FlowDict) -> bool:
        kafka = _obj(_obj(d, "l7"), "kafka")
        topics = kafka.get("topics")
        if isinstance(topics, list) and v in topics:
            return True
        return kafka.get("topic") == v

    return test, _needle(v)


def _kafka_api_key(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
    v = value.strip().lower()
    if v.isdigit():
        name = KAFKA_API_NAMES.get(int(v), v)
    elif v in KAFKA_API_KEYS:
        name = v
    else:
        raise FilterError(f"--kafka-api-key {value!r}: expected an API key name (produce, "
                          "fetch, metadata, ...) or number")
    number = str(KAFKA_API_KEYS.get(name, name))

    def test(d: FlowDict) -> bool:
        key = _obj(_obj(d, "l7"), "kafka").get("api_key")
        return isinstance(key, str) and key.lower() in (name, number)

    return test, None


def _label(which: str) -> Compiler:
    def compile_(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
        reqs = parse_selector(value)

        def test(d: FlowDict) -> bool:
            for side in _sides(d, which):
                labels = _parsed_labels(side.labels)
                if all(r.holds(labels) for r in reqs):
                    return True
            return False

        # a line that matches holds one of the values of the first `in` requirement
        needles = None
        for r in reqs:
            if r.op == "in":
                texts = [_bare_needle(f"{r.key}={v}") for v in r.values]
                if all(texts):
                    needles = tuple(t[0] for t in texts if t)
                break
        return test, needles

    return compile_


def _identity(which: str) -> Compiler:
    def compile_(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
        v = value.strip()
        if v.isdigit():
            number = int(v)
        elif v.lower() in RESERVED:
            number = RESERVED[v.lower()].id
        else:
            raise FilterError(f"--{_flag(which, 'identity')} {value!r}: expected a number or a "
                              f"reserved identity ({', '.join(RESERVED)})")

        def test(d: FlowDict) -> bool:
            return any(side.identity == number for side in _sides(d, which))

        return test, (str(number).encode(),)

    return compile_


def _ip(which: str) -> Compiler:
    def compile_(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError as exc:
            raise FilterError(f"--{_flag(which, 'ip')} {value!r}: not an address or CIDR "
                              f"({exc})") from exc

        def test(d: FlowDict) -> bool:
            for side in _sides(d, which):
                if not side.ip:
                    continue
                try:
                    if ipaddress.ip_address(side.ip) in network:
                        return True
                except ValueError:
                    continue
            return False

        single = network.num_addresses == 1
        return test, _needle(str(network.network_address)) if single else None

    return compile_


def _port(which: str) -> Compiler:
    def compile_(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
        v = value.strip()
        if not v.isdigit() or not 0 < int(v) < 65536:
            raise FilterError(f"--{_flag(which, 'port')} {value!r}: expected a port, 1-65535")
        number = int(v)

        def test(d: FlowDict) -> bool:
            return any(side.port == number for side in _sides(d, which))

        return test, (v.encode(),)

    return compile_


def _namespace(which: str) -> Compiler:
    def compile_(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
        v = value.strip()
        if not v:
            raise FilterError(f"--{_flag(which, 'namespace')}: empty namespace")

        def test(d: FlowDict) -> bool:
            return any(side.namespace == v for side in _sides(d, which))

        return test, _needle(v)

    return compile_


def _pod(which: str) -> Compiler:
    """`namespace/prefix` or `prefix`: the pod (endpoint) name starts with the prefix."""

    def compile_(value: str) -> tuple[Test, tuple[bytes, ...] | None]:
        namespace, slash, prefix = value.strip().rpartition("/")
        if not prefix:
            raise FilterError(f"--{_flag(which, 'pod')} {value!r}: empty pod name")

        def test(d: FlowDict) -> bool:
            for side in _sides(d, which):
                if slash and side.namespace != namespace:
                    continue
                if side.pod_name.startswith(prefix):
                    return True
            return False

        needle = _needle(prefix)
        return test, (needle[0][:-1],) if needle else None  # `"prefix`: the name starts so

    return compile_


def _flag(which: str, noun: str) -> str:
    return f"{which}-{noun}" if which else noun


def _flags() -> dict[str, FlagSpec]:
    specs = [
        FlagSpec("verdict", "FORWARDED, DROPPED, AUDIT or ERROR", "VERDICT", _verdict),
        FlagSpec("drop-reason-desc", "POLICY_DENIED, POLICY_DENY, PROXY_NOT_LISTENING, ...",
                 "REASON", _drop_reason),
        FlagSpec("type", "l7, drop, policy-verdict or trace[:OBSERVATION-POINT]", "TYPE",
                 _event_type),
        FlagSpec("traffic-direction", "ingress or egress", "DIRECTION", _direction),
        FlagSpec("protocol", "tcp, udp, icmp, http, grpc or kafka", "PROTO", _protocol),
        FlagSpec("http-method", "HTTP method (GET, PUT, ...)", "METHOD", _http_method),
        FlagSpec("http-path", "regular expression searched in the URL path", "REGEX",
                 _http_path),
        FlagSpec("http-status", "status code (403) or prefix and + (5+, 40+)", "STATUS",
                 _http_status),
        FlagSpec("grpc-service", "gRPC service (pkg.Service)", "SERVICE",
                 _l7_field("grpc", "service", "grpc-service")),
        FlagSpec("grpc-method", "gRPC method (GetName)", "METHOD",
                 _l7_field("grpc", "method", "grpc-method")),
        FlagSpec("grpc-status", "gRPC status code or name (7, PERMISSION_DENIED)", "STATUS",
                 _grpc_status),
        FlagSpec("kafka-topic", "Kafka topic named by the request", "TOPIC", _kafka_topic),
        FlagSpec("kafka-api-key", "Kafka API key name or number (produce, 0)", "KEY",
                 _kafka_api_key),
    ]
    sided = [
        ("label", "labels match the selector (k=v,k2 in (a,b),!k3)", "SELECTOR", _label),
        ("identity", "numeric identity or reserved name (world)", "ID", _identity),
        ("ip", "address or CIDR", "CIDR", _ip),
        ("port", "port number", "PORT", _port),
        ("namespace", "namespace", "NS", _namespace),
        ("pod", "endpoint name prefix, optionally NS/ in front", "[NS/]NAME", _pod),
    ]
    for noun, help_, metavar, make in sided:
        specs.append(FlagSpec(f"from-{noun}", f"source: {help_}", metavar, make("from")))
        specs.append(FlagSpec(f"to-{noun}", f"destination: {help_}", metavar, make("to")))
        specs.append(FlagSpec(noun, f"either side: {help_}", metavar, make("")))
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


class CompiledQuery:
    """A query ready to run. `matches(flow_dict)` is the whole test; `may_match(line)` the
    cheap necessary condition on the raw line; `matches_record(record)` for FlowRecords."""

    __slots__ = ("_needles", "_since", "_tests", "_until", "query")

    def __init__(self, query: FlowQuery) -> None:
        self.query = query
        tests: list[Test] = []
        needles: list[tuple[bytes, ...]] = []
        for term in query.terms:
            spec = FLAGS.get(term.name)
            if spec is None:
                raise FilterError(f"unknown filter --{term.name}")
            if not term.values:
                raise FilterError(f"--{term.name}: no value")
            compiled = [spec.compile(value) for value in term.values]
            tests.append(_any_of([test for test, _ in compiled], term.negated))
            term_needles = [n for _, n in compiled]
            if not term.negated and all(n is not None for n in term_needles):
                needles.append(tuple(b for n in term_needles if n for b in n))
        self._tests = tuple(tests)
        self._needles = tuple(needles)
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
        if not self._needles or b"\\" in line:
            return True
        return all(any(n in line for n in needles) for needles in self._needles)

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
        return all(test(d) for test in self._tests)

    def matches_record(self, record: FlowRecord) -> bool:
        return self.selects_all or self.matches(record.to_dict())


def _any_of(tests: list[Test], negated: bool) -> Test:
    if len(tests) == 1:
        only = tests[0]
        return (lambda d: not only(d)) if negated else only
    if negated:
        return lambda d: not any(t(d) for t in tests)
    return lambda d: any(t(d) for t in tests)


MATCH_ALL = FlowQuery().compile()


# ---------------------------------------------------------------------------------------------
# Time bounds from the command line

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_NS = {
    "ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
    "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000,
}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAIVE = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)$")


def parse_duration_ns(text: str) -> int | None:
    """`90s`, `5m`, `1h30m`, `1.5h`, `2d` in nanoseconds; None when `text` is no duration."""
    text = text.strip()
    if not text:
        return None
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return int(total) if pos == len(text) and pos else None


def parse_time_bound(text: str, now_ns: int, flag: str = "since") -> int:
    """A `--since` / `--until` value: a duration back from now (`5m`, `1h30m`), `now`, an RFC
    3339 time, or a date and time without a zone (`2024-11-21 12:00`, `2024-11-21`), read as
    UTC like every time garrison writes."""
    value = text.strip()
    if value.lower() == "now":
        return now_ns
    duration = parse_duration_ns(value)
    if duration is not None:
        return now_ns - duration
    if _DATE.match(value):
        value += "T00:00:00"
    if m := _NAIVE.match(value):
        date, clock = m.groups()
        if clock.count(":") == 1:
            clock += ":00"
        value = f"{date}T{clock}Z"
    try:
        return parse_time(value)
    except (FlowDecodeError, ValueError):
        raise FilterError(
            f"--{flag} {text!r}: expected a duration (30s, 5m, 1h30m, 2d), a time "
            "(2024-11-21T12:00:00Z, 2024-11-21 12:00, 2024-11-21) or now"
        ) from None
