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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import re2

from garrison.flows.codec import format_time, parse_time
from garrison.flows.errors import FilterError
from garrison.flows.filterfields import (
    DROP_REASONS,
    EVENT_TYPES,
    FIELDS,
    GRPC_STATUS_BY_NAME,
    HTTP_STATUS_FULL,
    HTTP_STATUS_PREFIX,
    L4_PROTOCOLS,
    L7_PROTOCOLS,
    VERDICTS,
    Needles,
    Test,
    identity_number,
    node_name_pattern,
    parse_event_type,
    parse_http_header,
    parse_tcp_flags,
)
from garrison.flows.flowdict import (
    FlowDict,
    FlowSide,
    flow_protocol,
    flow_side,
    request_uri_path,
    url_path,
)
from garrison.flows.record import DropReasonDesc, FlowDecodeError, FlowRecord
from garrison.flows.selectors import parse_selector
from garrison.flows.timebounds import parse_duration_ns, parse_time_bound
from garrison.identity.model import RESERVED
from garrison.policies.l7rules import KAFKA_API_KEYS

__all__ = [
    "FLAGS",
    "MATCH_ALL",
    "CompiledQuery",
    "FilterError",
    "FilterTerm",
    "FlagSpec",
    "FlowDict",
    "FlowQuery",
    "FlowSide",
    "flow_protocol",
    "flow_side",
    "parse_duration_ns",
    "parse_event_type",
    "parse_selector",
    "parse_time_bound",
    "request_uri_path",
    "url_path",
]


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
        options = re2.Options()
        options.log_errors = False  # RE2 would log the error on stderr itself
        try:
            re2.compile(value, options)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            raise FilterError(f"--{flag} {value!r}: not a regular expression (RE2 syntax, as "
                              f"Hubble's): {reason}") from exc

    return check


def _check_http_status(value: str) -> None:
    v = value.strip()
    if not (HTTP_STATUS_FULL.match(v) or HTTP_STATUS_PREFIX.match(v)):
        raise FilterError(f"--http-status {value!r}: expected a status code (403) or one or "
                          "two leading digits and + (4+, 40+)")


def _check_grpc_status(value: str) -> None:
    v = value.strip().upper()
    if not v.isdigit() and v not in GRPC_STATUS_BY_NAME:
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


def _check_identity(flag: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if identity_number(value) is None:
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


def _parses(parse: Callable[[str], object]) -> Callable[[str], None]:
    """A check that reads the value as the filter will (the parser raises FilterError)."""

    def check(value: str) -> None:
        parse(value)

    return check


def _no_check(value: str) -> None:
    return None


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


_HTTP_FIELDS = {"http_status_code": "--http-status", "http_method": "--http-method",
                "http_path": "--http-path", "http_url": "--http-url",
                "http_header": "--http-header"}


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
        # the filter field of a flag is its name, as Hubble's FlowFilter spells it
        field_name = {"http-status": "http_status_code"}.get(name, name.replace("-", "_"))
        return FlagSpec(name, help_, metavar, check, _to_both(field_name), short=short)

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
        both("http-header", "HTTP header NAME:VALUE, both exact", "NAME:VALUE",
             _parses(parse_http_header)),
        both("tcp-flags", "TCP flags the packet has, all of them (syn; syn,ack)", "FLAGS",
             _parses(parse_tcp_flags)),
        both("node-name", "node name pattern [CLUSTER/]NODE, * any run of name characters",
             "PATTERN", _parses(lambda value: node_name_pattern((value,)))),
        both("ip-version", "4, 6, or none (flows without IP)", "VERSION", _no_check),
        FlagSpec("ipv4", "IPv4 flows only (--ip-version 4)", "", _no_check,
                 lambda tracker, value: tracker.both("ip_version", "4"), takes_value=False,
                 short="4"),
        FlagSpec("ipv6", "IPv6 flows only (--ip-version 6)", "", _no_check,
                 lambda tracker, value: tracker.both("ip_version", "6"), takes_value=False,
                 short="6"),
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
        built = [FIELDS[name](values) for name, values in f.items()]
        tests.append(_all_of([t for t, _ in built]))
        needles.append([n for _, n in built if n is not None])
    return tests, needles


class CompiledQuery:
    """A query ready to run. `matches(flow_dict)` is the whole test; `may_match(line)` the
    cheap necessary condition on the raw line; `matches_record(record)` for FlowRecords."""

    __slots__ = ("_match", "_pretest", "_raw", "_since", "_until", "query")

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
        self._raw = (allow.filters(), deny.filters())
        self._match = _combine(allowed, denied)
        # a line may match when it could match one allow filter: all of its needle groups
        self._pretest: Callable[[bytes], bool] | None = None
        if allowed and all(allow_needles):
            self._pretest = _any_line([
                _all_groups([n for n in groups if n is not None]) for groups in allow_needles
            ])
        self._since = None if query.since_ns is None else format_time(query.since_ns)
        self._until = None if query.until_ns is None else format_time(query.until_ns)

    @property
    def selects_all(self) -> bool:
        return self.query.is_empty

    def raw_filters(self) -> dict[str, list[dict[str, list[str]]]]:
        """The allow and deny lists, as `hubble observe --print-raw-filters` shows them: each
        filter maps Hubble's FlowFilter field names (`source_pod`, `verdict`) to the values
        given, namespaces applied; an empty list is left out."""
        out: dict[str, list[dict[str, list[str]]]] = {}
        for name, filters in zip(("allowlist", "denylist"), self._raw, strict=True):
            if filters:
                out[name] = [
                    {k: list(f[k]) for k in sorted(f, key=_field_place)} for f in filters
                ]
        return out

    def may_match(self, line: bytes) -> bool:
        """False only when no flow written as `line` can match."""
        bounded = self._since is not None or self._until is not None
        if bounded and line.startswith(_TIME_PREFIX) and line[39:40] == b'"':
            stamp = line[9:39].decode("ascii", "replace")
            if _fixed_time(stamp) and not self._in_time(stamp):
                return False
        pretest = self._pretest
        if pretest is None or b"\\" in line:
            return True
        return pretest(line)

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


LineTest = Callable[[bytes], bool]


def _all_groups(groups: list[tuple[bytes, ...]]) -> LineTest:
    """A line that holds one needle of every group (written out for one or two needles: this
    runs for every line of a log)."""
    singles = tuple(g[0] for g in groups if len(g) == 1)
    several = tuple(g for g in groups if len(g) > 1)
    if not several and len(singles) == 1:
        only = singles[0]
        return lambda line: only in line
    if not several and len(singles) == 2:
        a, b = singles
        return lambda line: a in line and b in line
    return lambda line: all(n in line for n in singles) and all(
        any(n in line for n in g) for g in several
    )


def _any_line(tests: list[LineTest]) -> LineTest:
    if len(tests) == 1:
        return tests[0]
    return lambda line: any(t(line) for t in tests)


# Hubble's FlowFilter fields in the order flow.proto declares them (its JSON's order)
_FIELD_ORDER = (
    "source_ip", "source_pod", "source_label", "destination_ip", "destination_pod",
    "destination_label", "traffic_direction", "verdict", "drop_reason_desc", "event_type",
    "http_status_code", "protocol", "source_port", "destination_port", "http_method",
    "http_path", "http_url", "http_header", "tcp_flags", "node_name", "ip_version",
    "source_identity", "destination_identity",
)


def _field_place(name: str) -> tuple[int, str]:
    """Hubble's fields in its order, garrison's own (`grpc_*`, `kafka_*`) after them."""
    return (_FIELD_ORDER.index(name), "") if name in _FIELD_ORDER else (len(_FIELD_ORDER), name)


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
