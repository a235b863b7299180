"""`garrison accesslog summary --what-if POLICY...`: replay recorded decisions against a
candidate policy set and list what would newly be denied or allowed.

Pure: flow records in (the JSON dicts of an access log or the agent), a report out.

Which records are decisions:
- L3_L4 records of a new connection (TCP SYN without ACK, or any UDP/SCTP record) that are
  not replies;
- L7 request records (HTTP, gRPC over HTTP/2, Kafka).
Others (responses, replies, established TCP segments, ICMP, records without labels) are
not replayed; the report counts them as skipped.

Each decision is asked of the candidate exactly as `garrison policy trace` asks it: the
source and destination labels the record carries (their identities are numbered for the
replay only, as trace does), the destination port and protocol, and for L7 records the
request (HTTP method, path and query, host and headers; gRPC as the HTTP/2 `POST
/pkg.Service/Method` it is; Kafka API key, version and topics), matched by the proxy's own
matchers. The recorded outcome is allowed for FORWARDED and denied for DROPPED and AUDIT
(AUDIT is what the policy in force would have denied); ERROR records are not replayed.

A change is a decision whose candidate outcome differs from the recorded one: *newly denied*
(recorded allowed, the candidate denies) or *newly allowed* (recorded denied, the candidate
allows). Changes are grouped by source, destination and request, with a count, the first
and last time, and the candidate's rules: for a denial the rule that denies (an explicit
deny, an L7 deny rule, or the rules that switch the direction to default-deny), for an
allow the rules that allow.

A peer outside the cluster (labels `reserved:world`, with or without the recording agent's
`cidr:` label) is replayed by its address, as `policy trace --dst-ip` does: the candidate's
CIDR rules match it by the longest prefix they name. Limits (documented): a record that
names no labels is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any
from urllib.parse import urlsplit

from garrison.flows.codec import parse_time
from garrison.policies.l7rules import L7RuleSet, kafka_api_key
from garrison.policies.labels import LabelError, Labels, parse_label
from garrison.policies.model import Policy, Protocol
from garrison.policies.refs import RuleRef
from garrison.policies.resolve import ResolverConfig
from garrison.policies.trace import (
    HTTPRequestSpec,
    KafkaRequestSpec,
    L7RequestSpec,
    TraceEndpoint,
    TraceResult,
    match_l7,
    trace,
)

NEWLY_DENIED = "newly denied"
NEWLY_ALLOWED = "newly allowed"

_ALLOWED = {"FORWARDED": True, "DROPPED": False, "AUDIT": False}
_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}


@dataclass(frozen=True, slots=True)
class _Question:
    """One distinct decision to ask the candidate (records with the same one share it)."""

    source: Labels
    source_ns: str | None
    destination: Labels
    destination_ns: str | None
    port: int
    protocol: Protocol
    request: L7RequestSpec | None
    # a peer outside the cluster: its address (its labels are then the recorder's, unused)
    source_ip: IPv4Address | IPv6Address | None = None
    destination_ip: IPv4Address | IPv6Address | None = None


@dataclass(slots=True)
class WhatIfChange:
    change: str  # NEWLY_DENIED | NEWLY_ALLOWED
    source: str
    destination: str
    request: str
    recorded: str  # the recorded verdict(s), e.g. FORWARDED
    denied_at: str | None  # L3_L4 | L7 for a newly denied decision
    rules: tuple[str, ...]
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "change": self.change,
            "source": self.source,
            "destination": self.destination,
            "request": self.request,
            "recorded": self.recorded,
            "denied_at": self.denied_at,
            "rules": list(self.rules),
            "count": self.count,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
        }


@dataclass(slots=True)
class WhatIfReport:
    records_read: int = 0
    decisions: int = 0  # records replayed
    unchanged: int = 0
    skipped: int = 0  # records that are not decisions, or could not be replayed
    changes: list[WhatIfChange] = field(default_factory=list)

    @property
    def newly_denied(self) -> int:
        return sum(c.count for c in self.changes if c.change == NEWLY_DENIED)

    @property
    def newly_allowed(self) -> int:
        return sum(c.count for c in self.changes if c.change == NEWLY_ALLOWED)

    def to_dict(self) -> dict[str, object]:
        return {
            "records_read": self.records_read,
            "decisions": self.decisions,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "newly_denied": self.newly_denied,
            "newly_allowed": self.newly_allowed,
            "changes": [c.to_dict() for c in self.changes],
        }


class WhatIf:
    """Feed records with `add()`, then take the `report()`."""

    def __init__(self, policies: Sequence[Policy], config: ResolverConfig | None = None) -> None:
        self._policies = tuple(policies)
        self._config = config
        self._answers: dict[_Question, TraceResult] = {}
        # Without audited policies, one trace per (source, destination, port, protocol): each
        # request is then matched against the rule sets its lookups found, with matchers
        # compiled once per rule set (a log of many distinct paths stays fast).
        self._fast = not any(p.audit for p in self._policies)
        self._connections: dict[_Question, TraceResult] = {}
        self._matchers: dict[int, tuple[L7RuleSet, Any]] = {}
        self._groups: dict[tuple[str, str, str, str], WhatIfChange] = {}
        self._report = WhatIfReport()

    def add(self, record: Mapping[str, Any]) -> None:
        self._report.records_read += 1
        decision = _decision(record)
        if decision is None:
            self._report.skipped += 1
            return
        question, recorded_allowed, verdict, request_text = decision
        answer = self._answers.get(question)
        if answer is None:
            answer = self._answers[question] = self._ask(question)
        self._report.decisions += 1
        if answer.allowed == recorded_allowed:
            self._report.unchanged += 1
            return
        change = NEWLY_ALLOWED if answer.allowed else NEWLY_DENIED
        source = _who(record.get("source") or {})
        destination = _who(record.get("destination") or {}, question.port)
        key = (change, source, destination, request_text)
        group = self._groups.get(key)
        time_ns = _time_ns(record)
        if group is None:
            refs = answer.allowed_by if answer.allowed else answer.denied_by
            group = self._groups[key] = WhatIfChange(
                change, source, destination, request_text, verdict,
                None if answer.allowed else answer.denied_at,
                tuple(_rule(r) for r in refs) or (("default deny",) if not answer.allowed
                                                   else ("not enforced",)),
                first_ns=time_ns, last_ns=time_ns,
            )
        elif verdict not in group.recorded.split(","):
            group.recorded += f",{verdict}"
        group.count += 1
        group.first_ns = min(group.first_ns, time_ns) if group.first_ns else time_ns
        group.last_ns = max(group.last_ns, time_ns)

    def _ask(self, question: _Question) -> TraceResult:
        if not self._fast or question.request is None:
            return self._trace(question)
        key = replace(question, request=None)
        base = self._connections.get(key)
        if base is None:
            base = self._connections[key] = self._answers.get(key) or self._trace(key)
        steps = []
        for step in base.steps:
            found = step.lookup
            if found is not None and found.allowed and found.redirect is not None and (
                found.l7 is not None
            ):
                verdict = match_l7(found.l7, question.request, self._matchers)
                step = replace(step, l7=verdict, l7_evaluated=verdict is not None)
            steps.append(step)
        return replace(base, steps=tuple(steps), request=question.request, notes=())

    def _trace(self, question: _Question) -> TraceResult:
        return trace(
            self._policies,
            TraceEndpoint(question.source, question.source_ns, address=question.source_ip),
            TraceEndpoint(question.destination, question.destination_ns,
                          address=question.destination_ip),
            question.port,
            question.protocol,
            question.request,
            self._config,
        )

    def report(self) -> WhatIfReport:
        out = self._report
        out.changes = sorted(
            self._groups.values(),
            key=lambda c: (c.change != NEWLY_DENIED, -c.count, c.source, c.destination,
                           c.request),
        )
        return out


def what_if(
    records: Iterable[Mapping[str, Any]],
    policies: Sequence[Policy],
    config: ResolverConfig | None = None,
) -> WhatIfReport:
    replay = WhatIf(policies, config)
    for record in records:
        replay.add(record)
    return replay.report()


def _rule(ref: RuleRef) -> str:
    return str(ref)


def _who(side: Mapping[str, Any], port: int | None = None) -> str:
    name = side.get("pod_name")
    namespace = side.get("namespace")
    labels_of = _labels(side)
    if name:
        who = f"{namespace}/{name}" if namespace else str(name)
    elif labels_of is not None and _outside(side, labels_of) is not None:
        who = str(side.get("ip"))  # outside the cluster: the address is what it is replayed as
    else:
        labels = [str(label) for label in side.get("labels") or ()]
        own = [lab for lab in labels if "io.kubernetes.pod.namespace=" not in lab]
        who = ",".join(own) or str(side.get("ip") or "?")
    return f"{who}:{port}" if port is not None else who


def _time_ns(record: Mapping[str, Any]) -> int:
    text = record.get("time")
    if not isinstance(text, str):
        return 0
    try:
        return parse_time(text)
    except ValueError:
        return 0


def _labels(side: Mapping[str, Any]) -> Labels | None:
    texts = side.get("labels")
    if not texts or not isinstance(texts, list):
        return None
    try:
        return Labels.of(parse_label(str(text)) for text in texts)
    except (LabelError, ValueError):
        return None


_WORLD_KEYS = {"world", "world-ipv4", "world-ipv6"}


def _outside(side: Mapping[str, Any], labels: Labels) -> IPv4Address | IPv6Address | None:
    """The address of a peer outside the cluster (its labels say world, and at most the
    recording agent's CIDR prefix), else None."""
    if not any(lab.source == "reserved" and lab.key in _WORLD_KEYS for lab in labels.items):
        return None
    if not all(lab.source == "cidr" or (lab.source == "reserved" and lab.key in _WORLD_KEYS)
               for lab in labels.items):
        return None
    try:
        return ip_address(str(side.get("ip") or ""))
    except ValueError:
        return None


def _decision(
    record: Mapping[str, Any],
) -> tuple[_Question, bool, str, str] | None:
    """(question, recorded allowed, recorded verdict, request text) or None: not replayed."""
    verdict = record.get("verdict")
    if verdict not in _ALLOWED or record.get("is_reply"):
        return None
    src, dst = record.get("source") or {}, record.get("destination") or {}
    src_labels, dst_labels = _labels(src), _labels(dst)
    if src_labels is None or dst_labels is None:
        return None
    l4 = record.get("l4") or {}
    proto_name = next((name for name in _PROTOCOLS if name in l4), None)
    if proto_name is None:
        return None
    ports = l4[proto_name] or {}
    port = ports.get("destination_port")
    if not isinstance(port, int):
        return None
    protocol = _PROTOCOLS[proto_name]
    request: L7RequestSpec | None = None
    kind = record.get("Type")
    if kind == "L7":
        l7 = record.get("l7") or {}
        if l7.get("type") != "REQUEST":
            return None
        found = _request(l7)
        if found is None:
            return None
        request, text = found
    elif kind == "L3_L4":
        flags = ports.get("flags") or {}
        if protocol is Protocol.TCP and not (flags.get("SYN") and not flags.get("ACK")):
            return None
        text = f"{protocol.value}/{port}"
    else:
        return None
    question = _Question(
        src_labels, src.get("namespace"), dst_labels, dst.get("namespace"), port, protocol,
        request, _outside(src, src_labels), _outside(dst, dst_labels),
    )
    return question, _ALLOWED[verdict], str(verdict), text


def _request(l7: Mapping[str, Any]) -> tuple[L7RequestSpec, str] | None:
    http = l7.get("http")
    if isinstance(http, Mapping):
        method = str(http.get("method") or "")
        url = urlsplit(str(http.get("url") or ""))
        path = url.path or "/"
        if url.query:
            path += f"?{url.query}"
        headers = tuple(
            (str(h.get("key", "")), str(h.get("value", "")))
            for h in http.get("headers") or () if isinstance(h, Mapping)
        )
        host = next((v for k, v in headers if k.lower() in ("host", ":authority")), None)
        host = host or url.netloc or None
        grpc = any(k.lower() == "content-type" and v.startswith("application/grpc")
                   for k, v in headers)
        text = f"gRPC {path.strip('/')}" if grpc else f"HTTP {method} {path}"
        return HTTPRequestSpec(method, path, host, headers), text
    kafka = l7.get("kafka")
    if isinstance(kafka, Mapping):
        name = kafka.get("api_key")
        key = kafka_api_key(name) if isinstance(name, str | int) else None
        if key is None:
            return None
        topics = tuple(str(t) for t in kafka.get("topics") or ())
        if not topics and kafka.get("topic"):
            topics = (str(kafka["topic"]),)
        version = kafka.get("api_version")
        text = f"Kafka {name}" + (f" {','.join(topics)}" if topics else "")
        return KafkaRequestSpec(
            key, version if isinstance(version, int) else None,
            str(kafka["client_id"]) if kafka.get("client_id") else None, topics,
        ), text
    return None
