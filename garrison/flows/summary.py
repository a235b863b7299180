"""What an access log says, in one page: `garrison accesslog summary`.

A `SummaryBuilder` reads flow dicts (the JSON object of an access-log line, Hubble's field
names) one at a time and keeps only counters, so a log of any length is summarised in bounded
memory; `result()` gives an `AccessLogSummary`, which `to_dict()` turns into the `-o json`
output. Nothing here reads files: the caller decodes the lines, counts the ones it could not
decode and passes that number to `result(skipped=n)`. A record with missing or mistyped parts
is counted as far as it can be (one without `time` is counted in the verdicts but not in the
time series); a value that is not a JSON object is counted as skipped.

Definitions
-----------

**Record**: every flow given to `add()`.

**Decision**: a record that decides something once: an L7 record (`Type` `L7`) that is not a
reply (`is_reply` is not true), or an L3/L4 record (`Type` `L3_L4`) of event type 5
(policy-verdict) or 1 (drop). L7 responses repeat their request's decision and traces (event
type 4) report forwarded packets; neither is a decision. The datapath writes two records for
one denied connection attempt, a policy-verdict DENIED record and a drop record; so when the
log holds any drop record, policy-verdict records with verdict DROPPED are not counted as
decisions (their drop record is). A log without drop records (filtered to policy verdicts,
say) counts its policy-verdict denials instead. A client retransmits a SYN that got no
answer (Linux: after 1, 2, 4, 8, 16 and 32 s), and the datapath records each copy: a denied
SYN of the same TCP 5-tuple (source and destination address and port) and event type as one
seen at most `syn_retry_window_s` (64 s) before it is the same decision, counted as a record
but not again as a decision (`retried_syns` says how many there were).

**Verdict counts**: FORWARDED, DROPPED, AUDIT, ERROR, and `other` for a missing or unknown
verdict; once over all records, once over decisions.

**Top denied**: the decisions with verdict DROPPED, and the ERROR records of requests the
proxy could not parse (`drop_reason_desc` PARSE_ERROR: refused, as nothing unparsed is
forwarded), grouped by source, destination and what was asked, largest group first (then the
earliest). Source and destination are named the same way: identity, namespace and labels
(the replicas of a workload have different pod names but the same labels); the pod name when
an endpoint has no labels, the address when it has neither. The pod names seen are kept
beside (`pods`, at most 5 per side). Labels are shown short: without the `k8s:` source prefix
and without the namespace labels (`io.kubernetes.pod.namespace`,
`io.cilium.k8s.namespace.labels.*`), as the namespace is shown on its own; other sources stay
(`reserved:world`). What was asked (` PARSE_ERROR` added for a parse error):

- HTTP: the method and the path pattern of `l7.http.url`: the path without query and
  fragment, each segment of only digits read as `{n}`, a UUID as `{uuid}`, a hexadecimal
  string of 8 or more characters with a digit as `{hex}`:
  `/v1/ships/42/parts/9f86d081884c7d65` is `/v1/ships/{n}/parts/{hex}`;
- gRPC (`l7.grpc`): `service/method`;
- Kafka: the API key and a topic, one group per topic of `l7.kafka.topics` (`topic` when
  there is no list; a request naming no topic groups as the API key alone);
- L3/L4: protocol and destination port, and the drop reason: `TCP/80 POLICY_DENIED`.

**Rate over time**: decisions per time bucket, by verdict. The builder counts per 1-second
bucket; past 100,000 buckets it coarsens them all to 60 s, then 3600 s (then days), so the
memory stays bounded on a log of months. The displayed interval is the smallest of 1, 5, 10,
15, 30, 60, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400 s (a multiple of the kept
granularity) that gives at most `max_buckets` buckets, whole days beyond that; or
`interval_s`, raised to a multiple of the kept granularity (and to fewer than 100,000
buckets). Buckets start at multiples of the interval since the epoch (UTC), and the ones
between the first and the last decision without any are included with zeros.
`RateSeries.rows()` gives them for a table: a run of two or more empty buckets is one
`QuietSpan`.

**Per policy rule**: for each rule section named by a decision's `ingress_allowed_by` /
`egress_allowed_by` (counted as *allowed*) or `ingress_denied_by` / `egress_denied_by`
(*denied*; *audited* when the record's verdict is AUDIT): the counts and when it was first
and last seen. An L3/L4 denial named by both records of a denied connection attempt counts
once: a rule's L3/L4 denials are the larger of its drop-record and its policy-verdict counts.
Given `known_rules` (every rule section of the policies in force, `rule_keys(policies)`), the
sections no decision named are listed as *never matched*: candidates for removal. Rules are
listed by namespace, policy name and kind, then in the order a policy writes its sections
(`specs[i]`, then ingress, ingressDeny, egress, egressDeny, by index).

Denied groups and rules are kept one entry per distinct key: their memory grows with the
variety of peers, path patterns and rules, not with the length of the log.

JSON (`AccessLogSummary.to_dict()`)
-----------------------------------

Times are RFC 3339 strings as in the log (`null` when no record had one)::

    {
      "records_read": int, "records_skipped": int, "retried_syns": int,
      "first_time": str | null, "last_time": str | null,
      "verdicts": {"records": COUNTS, "decisions": COUNTS},
      "top_denied": {"total_groups": int, "groups": [
        {"count": int, "first_seen": str | null, "last_seen": str | null,
         "source": PEER, "destination": PEER, "protocol": str, "what": str,
         "verdict": str}]},
      "rate": {"interval_s": int, "granularity_s": int, "buckets": [
        {"start": str, "count": int, "rate_per_s": float,
         "forwarded": int, "dropped": int, "audit": int, "error": int, "other": int}]},
      "rules": {"policies_given": bool,
                "matched": [{"kind", "namespace", "name", "rule", "text": str,
                             "allowed", "denied", "audited": int,
                             "first_seen", "last_seen": str | null}],
                "never_matched": [{"kind", "namespace", "name", "rule", "text": str}]}
    }

COUNTS is {"total", "forwarded", "dropped", "audit", "error", "other": int}. PEER is
{"identity": int, "namespace": str, "pod_name": str, "labels": [str], "ip": str,
"text": str, "pods": [str]}: the parts the group is keyed on, the others empty (no
`pod_name` when there are labels; `ip` only when there is neither), and the pod names seen.
`verdict` is DROPPED, or ERROR for parse errors. `protocol` is `http`,
`grpc`, `kafka`, `l7`, or the L4 protocol in lower case (`tcp`). `never_matched` is empty
when `policies_given` is false.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from garrison.flows.codec import format_time, parse_time
from garrison.flows.record import Policy as PolicyRef
from garrison.flows.render import render_identity
from garrison.policies.model import Policy

# Slots of a verdict counter. `_VERDICT_DENIED` is a policy-verdict record's DROPPED, kept apart
# until the end shows whether drop records stand for it.
_FORWARDED, _DROPPED, _AUDIT, _ERROR, _OTHER, _VERDICT_DENIED = range(6)
_DENIED_SLOTS = frozenset((_DROPPED, _VERDICT_DENIED))
_VERDICT_SLOT = {"FORWARDED": _FORWARDED, "DROPPED": _DROPPED, "AUDIT": _AUDIT, "ERROR": _ERROR}

MAX_KEPT_BUCKETS = 100_000
"""Above this many time buckets the builder coarsens them (1 s → 60 s → 3600 s → days)."""

_GRANULARITIES = (1, 60, 3600, 86400)
DISPLAY_INTERVALS = (
    1, 5, 10, 15, 30, 60, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400,
)
"""The intervals a rate table may use, in seconds (whole days beyond the last)."""

_DAY = 86400
_NS = 1_000_000_000
_MEMO_SIZE = 4096
_MAX_SYNS = 65536  # denied SYNs remembered before the ones past the window are forgotten

_NAMESPACE_LABEL = "io.kubernetes.pod.namespace="
_NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."
_L4_NAMES = ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6")

# Rule statistics slots: allowed, denied (L7 and others), audited, L3/L4 denials by drop
# records, L3/L4 denials by policy-verdict records, first and last seen (ns or None).
_ALLOWED, _DENIED, _AUDITED, _DENIED_DROP, _DENIED_VERDICT, _FIRST, _LAST = range(7)


# ---------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True, slots=True)
class SummaryConfig:
    """`top`: how many denied groups to keep; `max_buckets`: the most time buckets the
    interval is chosen for; `interval_s`: a fixed interval instead (None: choose);
    `syn_retry_window_s`: how long after a denied SYN a copy of it is a retransmission
    (0: never)."""

    top: int = 10
    max_buckets: int = 60
    interval_s: int | None = None
    syn_retry_window_s: float = 64.0

    def __post_init__(self) -> None:
        if self.syn_retry_window_s < 0:
            raise ValueError(f"syn_retry_window_s must be 0 or more, not "
                             f"{self.syn_retry_window_s}")
        if self.top < 0:
            raise ValueError(f"top must be 0 or more, not {self.top}")
        if self.max_buckets < 1:
            raise ValueError(f"max_buckets must be 1 or more, not {self.max_buckets}")
        if self.interval_s is not None and self.interval_s < 1:
            raise ValueError(f"interval_s must be 1 or more, not {self.interval_s}")


DEFAULT_SUMMARY = SummaryConfig()


@dataclass(frozen=True, slots=True)
class VerdictCounts:
    """Records by verdict; `other` holds missing and unknown verdicts."""

    forwarded: int = 0
    dropped: int = 0
    audit: int = 0
    error: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.forwarded + self.dropped + self.audit + self.error + self.other

    def to_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "audit": self.audit,
            "error": self.error,
            "other": self.other,
        }

    @classmethod
    def _of(cls, slots: list[int], with_verdict_denials: bool) -> VerdictCounts:
        extra = slots[_VERDICT_DENIED] if with_verdict_denials else 0
        return cls(slots[_FORWARDED], slots[_DROPPED] + extra, slots[_AUDIT], slots[_ERROR],
                   slots[_OTHER])


@dataclass(frozen=True, slots=True)
class PeerKey:
    """One side of a denied group: the parts it is keyed on, the rest empty.

    `labels` are short (`class=xwing`, `reserved:world`), sorted.
    """

    identity: int = 0
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()
    ip: str = ""

    @property
    def text(self) -> str:
        """`default class=deathstar,org=empire (ID:256)`, `reserved:world (world)`; without
        labels `default/xwing (ID:258)`, without a pod either `203.0.113.9 (world)`."""
        if self.pod_name:
            where = f"{self.namespace}/{self.pod_name}" if self.namespace else self.pod_name
        else:
            labels = ",".join(self.labels)
            where = " ".join(part for part in (self.namespace, labels, self.ip) if part)
        return f"{where} {render_identity(self.identity)}" if where else render_identity(
            self.identity
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "namespace": self.namespace,
            "pod_name": self.pod_name,
            "labels": list(self.labels),
            "ip": self.ip,
            "text": self.text,
        }


@dataclass(frozen=True, slots=True)
class DeniedGroup:
    """Denied decisions of one source, destination and request kind (`what`); the pod
    names seen on each side (at most `MAX_GROUP_PODS`, sorted)."""

    source: PeerKey
    destination: PeerKey
    protocol: str
    what: str
    count: int
    first_seen_ns: int | None
    last_seen_ns: int | None
    source_pods: tuple[str, ...] = ()
    destination_pods: tuple[str, ...] = ()
    verdict: str = "DROPPED"

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first_seen": _time_text(self.first_seen_ns),
            "last_seen": _time_text(self.last_seen_ns),
            "source": {**self.source.to_dict(), "pods": list(self.source_pods)},
            "destination": {**self.destination.to_dict(), "pods": list(self.destination_pods)},
            "protocol": self.protocol,
            "what": self.what,
            "verdict": self.verdict,
        }


MAX_GROUP_PODS = 5
"""Pod names kept per side of a denied group."""


@dataclass(frozen=True, slots=True)
class RateBucket:
    """Decisions from `start_ns` for `interval_s` seconds, by verdict."""

    start_ns: int
    interval_s: int
    verdicts: VerdictCounts

    @property
    def count(self) -> int:
        return self.verdicts.total

    @property
    def rate_per_s(self) -> float:
        return self.count / self.interval_s

    def to_dict(self) -> dict[str, Any]:
        counts = self.verdicts.to_dict()
        del counts["total"]
        return {
            "start": format_time(self.start_ns),
            "count": self.count,
            "rate_per_s": self.rate_per_s,
            **counts,
        }


@dataclass(frozen=True, slots=True)
class QuietSpan:
    """Two or more consecutive buckets without a decision, from `start_ns` to `end_ns`
    (exclusive): one row of a table instead of a run of empty ones."""

    start_ns: int
    end_ns: int
    buckets: int


@dataclass(frozen=True, slots=True)
class RateSeries:
    """`granularity_s`: what the builder kept (1 s unless the log was too long);
    `buckets`: consecutive, from the first decision's bucket to the last one's."""

    interval_s: int
    granularity_s: int
    buckets: tuple[RateBucket, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "granularity_s": self.granularity_s,
            "buckets": [b.to_dict() for b in self.buckets],
        }

    def rows(self) -> list[RateBucket | QuietSpan]:
        """The buckets for a table: a run of two or more empty buckets as one QuietSpan."""
        out: list[RateBucket | QuietSpan] = []
        run: list[RateBucket] = []
        for bucket in (*self.buckets, None):
            if bucket is not None and not bucket.count:
                run.append(bucket)
                continue
            if len(run) == 1:
                out.append(run[0])
            elif run:
                end = run[-1].start_ns + run[-1].interval_s * _NS
                out.append(QuietSpan(run[0].start_ns, end, len(run)))
            run = []
            if bucket is not None:
                out.append(bucket)
        return out


@dataclass(frozen=True, slots=True, order=True)
class RuleKey:
    """One section of a policy, as flow records name it: `{kind, namespace, name, rule}`
    (`rule` is `ingress[0]` or `specs[1].egress[2]`; `namespace` "" for cluster-wide)."""

    kind: str = ""
    namespace: str = ""
    name: str = ""
    rule: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuleKey:
        """From a flow record's policy object or `to_dict()`; missing or non-text parts
        read as ""."""
        return cls(*(_text(data.get(part)) for part in ("kind", "namespace", "name", "rule")))

    @classmethod
    def from_policy_ref(cls, ref: PolicyRef) -> RuleKey:
        return cls(ref.kind, ref.namespace, ref.name, ref.rule)

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name,
                "rule": self.rule}

    @property
    def text(self) -> str:
        """`CiliumNetworkPolicy default/rule1 ingress[0]`."""
        name = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return " ".join(part for part in (self.kind, name, self.rule) if part)

    def _sort_key(self) -> tuple[Any, ...]:
        # a policy's sections in the order it lists them: specs, then ingress, ingressDeny,
        # egress, egressDeny, then the index (`ingress[10]` after `ingress[2]`)
        m = _RULE.fullmatch(self.rule)
        if m is None:
            place: tuple[Any, ...] = (1, self.rule)
        else:
            spec, section, index = m.groups()
            place = (0, int(spec or 0), _SECTIONS.index(section), int(index))
        return (self.namespace, self.name, self.kind, place)


_RULE = re.compile(r"(?:specs\[(\d+)\]\.)?(ingress|ingressDeny|egress|egressDeny)\[(\d+)\]")
_SECTIONS = ("ingress", "ingressDeny", "egress", "egressDeny")


@dataclass(frozen=True, slots=True)
class RuleCount:
    """How often decisions named one rule section."""

    key: RuleKey
    allowed: int
    denied: int
    audited: int
    first_seen_ns: int | None
    last_seen_ns: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.key.to_dict(),
            "text": self.key.text,
            "allowed": self.allowed,
            "denied": self.denied,
            "audited": self.audited,
            "first_seen": _time_text(self.first_seen_ns),
            "last_seen": _time_text(self.last_seen_ns),
        }


@dataclass(frozen=True, slots=True)
class AccessLogSummary:
    """What `SummaryBuilder.result()` found (the module docstring defines each part).

    `top_denied` holds the largest `SummaryConfig.top` of `denied_groups` groups. `rules` are
    sorted by policy and section; `never_matched` is None when no policies were given.
    """

    records_read: int
    records_skipped: int
    first_time_ns: int | None
    last_time_ns: int | None
    record_verdicts: VerdictCounts
    decision_verdicts: VerdictCounts
    top_denied: tuple[DeniedGroup, ...]
    denied_groups: int
    rate: RateSeries
    rules: tuple[RuleCount, ...]
    never_matched: tuple[RuleKey, ...] | None
    retried_syns: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The `-o json` object (layout in the module docstring)."""
        return {
            "records_read": self.records_read,
            "records_skipped": self.records_skipped,
            "retried_syns": self.retried_syns,
            "first_time": _time_text(self.first_time_ns),
            "last_time": _time_text(self.last_time_ns),
            "verdicts": {
                "records": self.record_verdicts.to_dict(),
                "decisions": self.decision_verdicts.to_dict(),
            },
            "top_denied": {
                "total_groups": self.denied_groups,
                "groups": [g.to_dict() for g in self.top_denied],
            },
            "rate": self.rate.to_dict(),
            "rules": {
                "policies_given": self.never_matched is not None,
                "matched": [r.to_dict() for r in self.rules],
                "never_matched": [
                    {**k.to_dict(), "text": k.text} for k in self.never_matched or ()
                ],
            },
        }


# ---------------------------------------------------------------------------------------------
# Helpers


def rule_keys(policies: Iterable[Policy]) -> list[RuleKey]:
    """Every rule section of `policies` (ingress, ingressDeny, egress, egressDeny of every
    spec), named as flow records name them; the `known_rules` of a `SummaryBuilder`."""
    keys: list[RuleKey] = []
    for policy in policies:
        for rule in policy.rules:
            for sections in (rule.ingress, rule.ingress_deny, rule.egress, rule.egress_deny):
                for section in sections or ():
                    if section.ref is not None:
                        keys.append(RuleKey.from_policy_ref(PolicyRef.from_ref(section.ref)))
    return keys


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]{8,}")


def _segment_pattern(segment: str) -> str:
    if segment.isascii() and segment.isdigit():
        return "{n}"
    if len(segment) == 36 and _UUID.fullmatch(segment):
        return "{uuid}"
    if _HEX.fullmatch(segment) and any(c.isdigit() for c in segment):
        return "{hex}"
    return segment


def path_pattern(url: str) -> str:
    """The path of `url` (`scheme://host` stripped, no query or fragment), with variable
    segments replaced: digits `{n}`, a UUID `{uuid}`, 8+ hex characters with a digit `{hex}`."""
    if "://" in url:
        rest = url.split("://", 1)[1]
        slash = rest.find("/")
        url = rest[slash:] if slash >= 0 else "/"
    for stop in "?#":
        url = url.split(stop, 1)[0]
    return "/".join(_segment_pattern(s) for s in url.split("/"))


def short_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """`k8s:class=xwing` as `class=xwing`, without the namespace labels; sorted."""
    out = []
    for label in labels:
        if label.startswith("k8s:"):
            label = label[4:]
            if label.startswith((_NAMESPACE_LABEL, _NAMESPACE_LABELS)):
                continue
        out.append(label)
    return tuple(sorted(out))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def aggregated_flows(value: Any) -> int:
    """How many flows a record with Hubble's `aggregate` counters stands for (at least 1)."""
    if type(value) is not dict and not isinstance(value, Mapping):
        return 1
    total = sum(_int(value.get(k)) for k in
                ("ingress_flow_count", "egress_flow_count", "unknown_direction_flow_count"))
    return max(total, 1)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _obj(value: Any) -> Mapping[str, Any] | None:
    return value if type(value) is dict or isinstance(value, Mapping) else None


def _time_text(ns: int | None) -> str | None:
    return None if ns is None else format_time(ns)


def _choose_interval(first: int, last: int, granularity: int, max_buckets: int) -> int:
    """The smallest display interval (seconds) that fits [first, last] in max_buckets."""
    for interval in DISPLAY_INTERVALS:
        if interval < granularity or interval % granularity:
            continue
        if last // interval - first // interval + 1 <= max_buckets:
            return interval
    unit = max(_DAY, granularity)
    needed = -(-(last - first + 1) // max_buckets)  # ceil
    interval = -(-needed // unit) * unit
    while last // interval - first // interval + 1 > max_buckets:  # alignment adds one
        interval += unit
    return interval


# ---------------------------------------------------------------------------------------------
# The builder

_GroupKey = tuple[PeerKey, PeerKey, str, str]
_RuleTuple = tuple[Any, ...]  # kind, namespace, name, rule as read


def count_rules(rules: dict[_RuleTuple, list[Any]], refs: Any, what: int, when: Any,
                n: int = 1) -> None:
    """Count `n` decisions of kind `what` (a slot `_ALLOWED` .. `_DENIED_VERDICT`) for every
    rule reference in `refs` (a record's `*_allowed_by` / `*_denied_by`), keeping the first and
    last `when` (any comparable time, None when the record has none) in slots `_FIRST` and
    `_LAST`. Keys are the values as read, normalised when the result is made: this runs for
    most records. Shared by the summary and the service map."""
    if type(refs) is not list:
        return
    for ref in refs:
        if type(ref) is not dict and not isinstance(ref, Mapping):
            continue
        get = ref.get
        key: _RuleTuple = (get("kind"), get("namespace"), get("name"), get("rule"))
        try:
            stats = rules.get(key)
        except TypeError:  # an unhashable value: no text anyway
            key = tuple(_text(v) for v in key)
            stats = rules.get(key)
        if stats is None:
            stats = rules[key] = [0, 0, 0, 0, 0, when, when]
        stats[what] += n
        if when is not None:
            if stats[_FIRST] is None or when < stats[_FIRST]:
                stats[_FIRST] = when
            if stats[_LAST] is None or when > stats[_LAST]:
                stats[_LAST] = when


class RetriedSyns:
    """Tells a retransmitted denied SYN from a new connection attempt: the same TCP 5-tuple
    (addresses and ports) and event type as a SYN seen at most `window_s` before. Feed it
    the denied L3/L4 records in log order; memory is bounded by the SYNs of one window.
    A record without both addresses and ports is never a retry (it cannot be told apart)."""

    __slots__ = ("_last", "_window_ns")

    def __init__(self, window_s: float) -> None:
        self._window_ns = int(window_s * _NS)
        self._last: dict[tuple[Any, ...], int] = {}

    def is_retry(self, flow: Mapping[str, Any], event: int, ns: int) -> bool:
        """True for a copy of a SYN seen at most the window before; remembers this one."""
        if not self._window_ns:
            return False
        l4 = _obj(flow.get("l4"))
        tcp = _obj(l4.get("TCP")) if l4 is not None else None
        if tcp is None:
            return False
        flags = _obj(tcp.get("flags"))
        if flags is None or flags.get("SYN") is not True or flags.get("ACK") is True:
            return False
        source, destination = _address(flow, "source"), _address(flow, "destination")
        sport, dport = tcp.get("source_port"), tcp.get("destination_port")
        if not (source and destination and _int(sport) and _int(dport)):
            return False
        key = (event, source, sport, destination, dport)
        last = self._last.get(key)
        self._last[key] = ns if last is None else max(last, ns)
        if last is not None and abs(ns - last) <= self._window_ns:
            return True
        if len(self._last) > _MAX_SYNS:  # forget the ones no retransmission can follow
            newest = max(self._last.values())
            self._last = {k: t for k, t in self._last.items() if newest - t <= self._window_ns}
        return False


class SummaryBuilder:
    """Counts flow dicts as they are read; `result()` summarises what it has seen so far.

    `known_rules`: every rule section of the policies in force (`rule_keys(policies)`), to
    list those never matched; None when no policies were given.
    """

    def __init__(
        self,
        config: SummaryConfig = DEFAULT_SUMMARY,
        known_rules: Iterable[RuleKey] | None = None,
    ) -> None:
        self._config = config
        self._known = None if known_rules is None else tuple(dict.fromkeys(known_rules))
        self._read = 0
        self._skipped = 0
        self._records = [0] * 6  # the last slot stays 0
        self._decisions = [0] * 6
        self._saw_drop = False
        self._first_ns: int | None = None
        self._last_ns: int | None = None
        # time series: bucket start (s, a multiple of the granularity) -> verdict slots
        self._granularity = 1
        self._buckets: dict[int, list[int]] = {}
        # denied groups: key -> [count, first ns, last ns]; policy-verdict denials apart
        self._denied: dict[_GroupKey, list[Any]] = {}
        self._verdict_denied: dict[_GroupKey, list[Any]] = {}
        self._rules: dict[_RuleTuple, list[Any]] = {}
        # denied SYNs: (event type, addresses, ports) -> the last time one was seen (ns)
        self._syn_retries = RetriedSyns(config.syn_retry_window_s)
        self._retried_syns = 0
        # memos of pure functions, bounded: the second of a time prefix, URL patterns, peers
        self._second_text = ""
        self._second = 0
        self._seconds: dict[str, int] = {}
        self._patterns: dict[str, str] = {}
        self._peers: dict[tuple[Any, ...], PeerKey] = {}

    # -- hot path -----------------------------------------------------------------------------

    def add(self, flow: Mapping[str, Any]) -> None:
        """Count one flow dict (an access-log line, decoded)."""
        if type(flow) is not dict and not isinstance(flow, Mapping):
            self._skipped += 1
            return
        self._read += 1
        get = flow.get
        verdict = get("verdict")
        slot = _VERDICT_SLOT.get(verdict, _OTHER) if type(verdict) is str else _OTHER
        self._records[slot] += 1
        t = get("time")
        ns = second = None
        if type(t) is str:
            fraction = t[20:29]
            if (t[:19] == self._second_text and len(t) == 30 and t[19] == "." and t[29] == "Z"
                    and fraction.isdigit() and fraction.isascii()):
                second = self._second
                ns = second * _NS + int(fraction)
            else:
                ns = self._time_ns(t)
                second = None if ns is None else ns // _NS
            if ns is not None:
                if self._first_ns is None or ns < self._first_ns:
                    self._first_ns = ns
                if self._last_ns is None or ns > self._last_ns:
                    self._last_ns = ns

        kind = get("Type")
        if kind is None:  # as the codec reads a record without `Type`
            kind = "L7" if "l7" in flow else "L3_L4"
        event = 0
        if kind == "L7":
            if get("is_reply") is True:
                return
        elif kind == "L3_L4":
            event_type = get("event_type")
            if type(event_type) is dict or isinstance(event_type, Mapping):
                event = _int(event_type.get("type"))
            if event == 1:
                self._saw_drop = True
            elif event == 5:
                if slot == _DROPPED:
                    slot = _VERDICT_DENIED
            else:
                return
            if slot in _DENIED_SLOTS and ns is not None and self._syn_retries.is_retry(
                    flow, event, ns):
                self._retried_syns += 1
                return
        else:
            return

        # a record with Hubble's `aggregate` counters stands for that many identical flows
        n = 1 if get("aggregate") is None else aggregated_flows(get("aggregate"))
        self._decisions[slot] += n
        if second is not None:
            start = second - second % self._granularity
            bucket = self._buckets.get(start)
            if bucket is not None:
                bucket[slot] += n
            else:
                self._new_bucket(start, slot, n)
        if slot in _DENIED_SLOTS:
            self._count_denied(flow, kind, ns, slot == _VERDICT_DENIED, n=n)
        elif slot == _ERROR and get("drop_reason_desc") == "PARSE_ERROR":
            self._count_denied(flow, kind, ns, False, "ERROR", n=n)
        allowed, egress_allowed = get("ingress_allowed_by"), get("egress_allowed_by")
        if allowed:
            self._count_rules(allowed, _ALLOWED, ns, n)
        if egress_allowed:
            self._count_rules(egress_allowed, _ALLOWED, ns, n)
        denied, egress_denied = get("ingress_denied_by"), get("egress_denied_by")
        if denied or egress_denied:
            if slot == _AUDIT:
                what = _AUDITED
            elif event == 1:
                what = _DENIED_DROP
            elif event == 5:
                what = _DENIED_VERDICT
            else:
                what = _DENIED
            if denied:
                self._count_rules(denied, what, ns, n)
            if egress_denied:
                self._count_rules(egress_denied, what, ns, n)

    def _time_ns(self, text: str) -> int | None:
        """Nanoseconds of an RFC 3339 time, None if it is none. garrison writes
        `YYYY-MM-DDTHH:MM:SS.fffffffffZ`: `add()` reads the fraction of a time in the second
        seen last, and this parses each second once (records of neighbouring seconds
        interleave a little)."""
        if len(text) == 30 and text[19] == "." and text[29] == "Z":
            fraction = text[20:29]
            if fraction.isascii() and fraction.isdigit():
                prefix = text[:19]
                second = self._seconds.get(prefix)
                if second is None:
                    try:
                        second = parse_time(prefix + "Z") // _NS
                    except ValueError:
                        return None
                    if len(self._seconds) >= _MEMO_SIZE:
                        self._seconds.clear()
                    self._seconds[prefix] = second
                self._second_text, self._second = prefix, second
                return second * _NS + int(fraction)
        try:
            return parse_time(text)
        except ValueError:  # FlowDecodeError, or a date such as month 13
            return None

    def _new_bucket(self, start: int, slot: int, n: int = 1) -> None:
        bucket = self._buckets[start] = [0] * 6
        bucket[slot] += n
        if len(self._buckets) > MAX_KEPT_BUCKETS:
            self._coarsen()

    def _coarsen(self) -> None:
        while len(self._buckets) > MAX_KEPT_BUCKETS:
            g = self._granularity
            later = [x for x in _GRANULARITIES if x > g]
            g = later[0] if later else g * 10
            merged: dict[int, list[int]] = {}
            for start, counts in self._buckets.items():
                into = merged.setdefault(start - start % g, [0] * 6)
                for i, n in enumerate(counts):
                    into[i] += n
            self._granularity, self._buckets = g, merged

    def _count_denied(self, flow: Mapping[str, Any], kind: str, ns: int | None,
                      by_verdict: bool, verdict: str = "DROPPED", n: int = 1) -> None:
        src, dst = flow.get("source"), flow.get("destination")
        source, destination = self._peer(src), self._peer(dst)
        groups = self._verdict_denied if by_verdict else self._denied
        for protocol, what in self._whats(flow, kind):
            if verdict == "ERROR":
                what = f"{what} PARSE_ERROR" if what else "PARSE_ERROR"
            key = (source, destination, protocol, what)
            group = groups.get(key)
            if group is None:
                group = groups[key] = [0, ns, ns, set(), set(), verdict]
            group[0] += n
            if ns is not None:
                if group[1] is None or ns < group[1]:
                    group[1] = ns
                if group[2] is None or ns > group[2]:
                    group[2] = ns
            for pods, ep in ((group[3], src), (group[4], dst)):
                if len(pods) < MAX_GROUP_PODS:
                    pod = _text(ep.get("pod_name")) if isinstance(ep, Mapping) else ""
                    if pod:
                        pods.add(pod)

    def _peer(self, value: Any) -> PeerKey:
        ep = _obj(value)
        if ep is None:
            return PeerKey()
        get = ep.get
        labels = get("labels")
        try:
            key = (get("identity"), get("namespace"), get("pod_name"),
                   tuple(labels) if type(labels) is list else None)
            peer = self._peers.get(key)
        except TypeError:  # a part that is no JSON scalar: not worth remembering
            return _peer(ep)
        if peer is None:
            peer = _peer(ep)
            if peer.ip:  # keyed on the address: one entry per client is not worth keeping
                return peer
            if len(self._peers) >= _MEMO_SIZE:
                self._peers.clear()
            self._peers[key] = peer
        return peer

    def _whats(self, flow: Mapping[str, Any], kind: str) -> list[tuple[str, str]]:
        """(protocol, what was asked) of a denied decision; one per Kafka topic."""
        if kind == "L3_L4":
            return [_l4_what(flow)]
        l7 = _obj(flow.get("l7")) or {}
        grpc = _obj(l7.get("grpc"))
        if grpc is not None:
            return [("grpc", f"{_text(grpc.get('service'))}/{_text(grpc.get('method'))}")]
        http = _obj(l7.get("http"))
        if http is not None:
            url = _text(http.get("url"))
            pattern = self._patterns.get(url)
            if pattern is None:
                if len(self._patterns) >= _MEMO_SIZE:
                    self._patterns.clear()
                pattern = self._patterns[url] = path_pattern(url) if url else ""
            return [("http", f"{_text(http.get('method'))} {pattern}".strip())]
        kafka = _obj(l7.get("kafka"))
        if kafka is not None:
            api_key = kafka.get("api_key")
            api = _text(api_key) or (str(api_key) if _int(api_key) else "")
            topics = kafka.get("topics")
            if isinstance(topics, list):
                names = list(dict.fromkeys(t for t in topics if isinstance(t, str)))
            else:
                topic = _text(kafka.get("topic"))
                names = [topic] if topic else []
            if not names:
                return [("kafka", api)]
            return [("kafka", f"{api} topic {name}") for name in names]
        return [("l7", "")]

    def _count_rules(self, refs: Any, what: int, ns: int | None, n: int = 1) -> None:
        count_rules(self._rules, refs, what, ns, n)

    # -- the result ---------------------------------------------------------------------------

    def result(self, skipped: int = 0) -> AccessLogSummary:
        """The summary of every flow added so far. `skipped`: lines the caller could not
        decode; added to the values `add()` refused (not JSON objects)."""
        with_verdict_denials = not self._saw_drop
        groups = dict(self._denied)
        if with_verdict_denials:
            groups.update(self._verdict_denied)  # L3/L4 keys: never the same as an L7 one
        ranked = sorted(
            groups.items(),
            key=lambda item: (
                -item[1][0],
                item[1][1] is None,
                item[1][1] or 0,
                item[0][0].text,
                item[0][1].text,
                item[0][3],
            ),
        )
        top = tuple(
            DeniedGroup(src, dst, protocol, what, stats[0], stats[1], stats[2],
                        tuple(sorted(stats[3])), tuple(sorted(stats[4])), stats[5])
            for (src, dst, protocol, what), stats in ranked[: self._config.top]
        )
        merged = self._merged_rules()
        rules = tuple(
            RuleCount(
                key,
                allowed=stats[_ALLOWED],
                denied=stats[_DENIED] + max(stats[_DENIED_DROP], stats[_DENIED_VERDICT]),
                audited=stats[_AUDITED],
                first_seen_ns=stats[_FIRST],
                last_seen_ns=stats[_LAST],
            )
            for key, stats in sorted(merged.items(), key=lambda item: item[0]._sort_key())
        )
        never = None
        if self._known is not None:
            never = tuple(sorted((k for k in self._known if k not in merged),
                                 key=RuleKey._sort_key))
        return AccessLogSummary(
            records_read=self._read,
            records_skipped=self._skipped + skipped,
            first_time_ns=self._first_ns,
            last_time_ns=self._last_ns,
            record_verdicts=VerdictCounts._of(self._records, False),
            decision_verdicts=VerdictCounts._of(self._decisions, with_verdict_denials),
            top_denied=top,
            denied_groups=len(groups),
            rate=self._series(with_verdict_denials),
            rules=rules,
            never_matched=never,
            retried_syns=self._retried_syns,
        )

    def _merged_rules(self) -> dict[RuleKey, list[Any]]:
        """The rule statistics by `RuleKey`: `add()` keys them by the values as read, so a
        missing namespace and an empty one are two entries until here."""
        merged: dict[RuleKey, list[Any]] = {}
        for raw, stats in self._rules.items():
            key = RuleKey(*(_text(v) for v in raw))
            into = merged.get(key)
            if into is None:
                merged[key] = list(stats)
                continue
            for i in (_ALLOWED, _DENIED, _AUDITED, _DENIED_DROP, _DENIED_VERDICT):
                into[i] += stats[i]
            times = [t for t in (into[_FIRST], stats[_FIRST]) if t is not None]
            into[_FIRST] = min(times, default=None)
            times = [t for t in (into[_LAST], stats[_LAST]) if t is not None]
            into[_LAST] = max(times, default=None)
        return merged

    def _series(self, with_verdict_denials: bool) -> RateSeries:
        g = self._granularity
        buckets = self._buckets
        if not with_verdict_denials:  # buckets of nothing but policy-verdict denials drop out
            buckets = {s: c for s, c in buckets.items() if sum(c) - c[_VERDICT_DENIED]}
        if not buckets:
            return RateSeries(self._config.interval_s or g, g, ())
        first, last = min(buckets), max(buckets)
        wanted = self._config.interval_s
        if wanted is None:
            interval = _choose_interval(first, last, g, self._config.max_buckets)
        else:
            interval = -(-wanted // g) * g
            if last // interval - first // interval + 1 > MAX_KEPT_BUCKETS:
                interval = _choose_interval(first, last, g, MAX_KEPT_BUCKETS)
        merged: dict[int, list[int]] = {}
        for start, counts in buckets.items():
            into = merged.setdefault(start - start % interval, [0] * 6)
            for i, n in enumerate(counts):
                into[i] += n
        empty = [0] * 6
        out = tuple(
            RateBucket(
                start * _NS,
                interval,
                VerdictCounts._of(merged.get(start, empty), with_verdict_denials),
            )
            for start in range(first - first % interval, last + 1, interval)
        )
        return RateSeries(interval, g, out)


def _peer(ep: Mapping[str, Any] | None) -> PeerKey:
    """One side of a denied group, keyed the same way for source and destination."""
    if ep is None:
        return PeerKey()
    identity = _int(ep.get("identity"))
    namespace = _text(ep.get("namespace"))
    pod = _text(ep.get("pod_name"))
    raw = ep.get("labels")
    labels = short_labels(x for x in raw if isinstance(x, str)) if isinstance(raw, list) else ()
    if labels:
        return PeerKey(identity, namespace, "", labels)
    if pod:
        return PeerKey(identity, namespace, pod)
    return PeerKey(identity, namespace, ip=_text(ep.get("ip")))


def _address(flow: Mapping[str, Any], side: str) -> str:
    """An endpoint's address: its `ip`, else Hubble's `IP.source` / `IP.destination`."""
    ep = _obj(flow.get(side))
    ip = _text(ep.get("ip")) if ep is not None else ""
    if not ip:
        header = _obj(flow.get("IP"))
        ip = _text(header.get(side)) if header is not None else ""
    return ip


def _l4_what(flow: Mapping[str, Any]) -> tuple[str, str]:
    protocol, port = "", 0
    l4 = _obj(flow.get("l4"))
    if l4 is not None:
        for name in _L4_NAMES:
            inner = _obj(l4.get(name))
            if inner is not None:
                protocol = name
                port = _int(inner.get("type" if "type" in inner else "destination_port"))
                break
    if not port:
        destination = _obj(flow.get("destination"))
        port = _int(destination.get("port")) if destination is not None else 0
    where = f"{protocol}/{port}" if protocol and port else protocol
    reason = _text(flow.get("drop_reason_desc"))
    return protocol.lower(), " ".join(part for part in (where, reason) if part)


__all__ = [
    "DEFAULT_SUMMARY",
    "DISPLAY_INTERVALS",
    "MAX_KEPT_BUCKETS",
    "AccessLogSummary",
    "DeniedGroup",
    "PeerKey",
    "QuietSpan",
    "RateBucket",
    "RateSeries",
    "RetriedSyns",
    "RuleCount",
    "RuleKey",
    "SummaryBuilder",
    "SummaryConfig",
    "VerdictCounts",
    "path_pattern",
    "rule_keys",
    "short_labels",
]
