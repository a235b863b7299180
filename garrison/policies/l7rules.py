"""The L7 rule types a `toPorts[].rules` section holds: http, grpc and kafka.

These are the validated, typed form; the matchers (`garrison.policies.match_*`) compile them.
Every optional field documents what absent means: absent = no constraint.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from garrison.policies.refs import RuleRef


class L7Protocol(StrEnum):
    """The parser a redirected port uses."""

    HTTP = "http"
    GRPC = "grpc"
    KAFKA = "kafka"


class MismatchAction(StrEnum):
    """`headerMatches[].mismatch`: what to do when the header's value differs."""

    LOG = "LOG"
    ADD = "ADD"
    DELETE = "DELETE"
    REPLACE = "REPLACE"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """`value`: the exact value; `regex` (garrison extension, `garrison.io/v1` files only): an
    RE2 pattern the whole value must match instead (`value` is then ""; no `mismatch`)."""

    name: str
    value: str
    mismatch: MismatchAction | None = None  # None: a mismatch makes the rule fail
    regex: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRule:
    """All present fields must match. `method`, `path`, `host` are RE2 full-match patterns.

    `headers` entries are `"Name"` (present) or `"Name: value"` (exact value); names are
    case-insensitive. An HTTPRule with no field set (`{}`) matches every request.
    """

    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: tuple[str, ...] = ()
    header_matches: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class GRPCRule:
    """`service` is the fully qualified `pkg.Service`; `method` None = every method."""

    service: str
    method: str | None = None


class KafkaRole(StrEnum):
    PRODUCE = "produce"
    CONSUME = "consume"


# Cilium's names for Kafka API keys (pkg/policy/api/kafka), extended to the keys current
# brokers define. Lower-case, as policies write them.
KAFKA_API_KEYS: dict[str, int] = {
    "produce": 0,
    "fetch": 1,
    "offsets": 2,
    "metadata": 3,
    "leaderandisr": 4,
    "stopreplica": 5,
    "updatemetadata": 6,
    "controlledshutdown": 7,
    "offsetcommit": 8,
    "offsetfetch": 9,
    "findcoordinator": 10,
    "joingroup": 11,
    "heartbeat": 12,
    "leavegroup": 13,
    "syncgroup": 14,
    "describegroups": 15,
    "listgroups": 16,
    "saslhandshake": 17,
    "apiversions": 18,
    "createtopics": 19,
    "deletetopics": 20,
    "deleterecords": 21,
    "initproducerid": 22,
    "offsetforleaderepoch": 23,
    "addpartitionstotxn": 24,
    "addoffsetstotxn": 25,
    "endtxn": 26,
    "writetxnmarkers": 27,
    "txnoffsetcommit": 28,
    "describeacls": 29,
    "createacls": 30,
    "deleteacls": 31,
    "describeconfigs": 32,
    "alterconfigs": 33,
    "alterreplicalogdirs": 34,
    "describelogdirs": 35,
    "saslauthenticate": 36,
    "createpartitions": 37,
    "createdelegationtoken": 38,
    "renewdelegationtoken": 39,
    "expiredelegationtoken": 40,
    "describedelegationtoken": 41,
    "deletegroups": 42,
    "electleaders": 43,
    "incrementalalterconfigs": 44,
    "alterpartitionreassignments": 45,
    "listpartitionreassignments": 46,
    "offsetdelete": 47,
    "describeclientquotas": 48,
    "alterclientquotas": 49,
    "describeuserscramcredentials": 50,
    "alteruserscramcredentials": 51,
    "describecluster": 60,
    "describeproducers": 61,
    "describetransactions": 65,
    "listtransactions": 66,
    "consumergroupheartbeat": 68,
    "consumergroupdescribe": 69,
    "gettelemetrysubscriptions": 71,
    "pushtelemetry": 72,
}
KAFKA_API_NAMES: dict[int, str] = {v: k for k, v in KAFKA_API_KEYS.items()}

KAFKA_ROLE_API_KEYS: dict[KafkaRole, frozenset[int]] = {
    # InitProducerId: what a modern idempotent producer sends before its first Produce.
    KafkaRole.PRODUCE: frozenset({0, 3, 18, 22}),
    KafkaRole.CONSUME: frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}),
}

KAFKA_TOPIC_MAX_LEN = 255
KAFKA_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def kafka_api_key(name_or_number: str | int) -> int | None:
    """The API key number for a name (`produce`) or number (`0`, `"0"`); None if unknown."""
    if isinstance(name_or_number, int):
        return name_or_number if 0 <= name_or_number <= 32767 else None
    text = name_or_number.strip().lower()
    if text.isdigit():
        return int(text) if int(text) <= 32767 else None
    return KAFKA_API_KEYS.get(text)


def valid_kafka_topic(topic: str) -> bool:
    return 0 < len(topic) <= KAFKA_TOPIC_MAX_LEN and all(c in KAFKA_TOPIC_CHARS for c in topic)


@dataclass(frozen=True, slots=True)
class KafkaRule:
    """All present fields must match. `role` and `api_key` are exclusive (validation).

    `api_keys` is the expanded set (role or single key); empty = any API key.
    `topic` None = any topic; request types that name no topic match by API key alone.
    """

    role: KafkaRole | None = None
    api_key: int | None = None
    api_version: int | None = None
    client_id: str | None = None
    topic: str | None = None

    @property
    def api_keys(self) -> frozenset[int]:
        if self.role is not None:
            return KAFKA_ROLE_API_KEYS[self.role]
        if self.api_key is not None:
            return frozenset({self.api_key})
        return frozenset()


L7Rule = HTTPRule | GRPCRule | KafkaRule


@dataclass(frozen=True, slots=True)
class L7Rules:
    """`toPorts[].rules`: exactly one of the three lists is set (validation enforces it)."""

    http: tuple[HTTPRule, ...] | None = None
    grpc: tuple[GRPCRule, ...] | None = None
    kafka: tuple[KafkaRule, ...] | None = None

    @property
    def protocol(self) -> L7Protocol | None:
        if self.http is not None:
            return L7Protocol.HTTP
        if self.grpc is not None:
            return L7Protocol.GRPC
        if self.kafka is not None:
            return L7Protocol.KAFKA
        return None

    @property
    def rules(self) -> tuple[L7Rule, ...]:
        return self.http or self.grpc or self.kafka or ()


@dataclass(frozen=True, slots=True)
class L7RuleSet:
    """The L7 rules that apply to one (endpoint, port, remote identity, direction).

    A request is allowed when it matches any rule. `allow_all` is set when another rule allows
    the same peer on the same port at L4 only (Cilium's merge rule): every request passes,
    still parsed and logged. `rules` keeps the ref of the policy rule each L7 rule came from.

    `deny_rules` (garrison extension: L7 rules in `ingressDeny`/`egressDeny`): a request that
    matches any of them is denied whatever `rules` and `allow_all` say (deny always wins),
    and the verdict names the deny rule.
    """

    protocol: L7Protocol
    rules: tuple[tuple[L7Rule, RuleRef | None], ...] = ()
    allow_all: bool = False
    allow_all_ref: RuleRef | None = None
    deny_rules: tuple[tuple[L7Rule, RuleRef | None], ...] = ()
    # Audited policies (the garrison.io/audit annotation): the rule set with them, where it
    # differs. This rule set (without them) decides; a request it allows that `audit_layer`
    # would deny is allowed with `audited` set, naming what would have denied it.
    audit_layer: L7RuleSet | None = None


def audit_refs(ruleset: L7RuleSet) -> tuple[RuleRef, ...]:
    """The rules a request the rule set denies failed to match (its allow rules' refs)."""
    return tuple(dict.fromkeys(ref for _, ref in ruleset.rules if ref is not None))


def audited(verdict: L7Verdict, would: L7Verdict, refs: tuple[RuleRef, ...]) -> L7Verdict:
    """`verdict` (allowed) marked audited because `would` (the audit layer's) denies."""
    return L7Verdict(
        True,
        verdict.rule,
        f"audit: {would.reason}",
        verdict.header_edits,
        verdict.logged_mismatches,
        verdict.filter_response,
        verdict.allowed_topics,
        None,
        True,
        (would.denied_by,) if would.denied_by is not None else refs,
        verdict.hidden_topics,
    )


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """An edit of the forwarded request from `headerMatches[].mismatch` ADD/DELETE/REPLACE."""

    action: MismatchAction
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class L7Verdict:
    """The result of matching one request against an L7RuleSet.

    `rule` names the policy rule that allowed; `reason` says why nothing matched.
    `denied_by`: the L7 deny rule (garrison extension) the request matched, when one did.
    `allowed_topics` (Kafka, all-topics Metadata): the response must be filtered to these
    topics; None = no filtering needed (any topic allowed).
    """

    allowed: bool
    rule: RuleRef | None = None
    reason: str = ""
    header_edits: tuple[HeaderEdit, ...] = ()
    logged_mismatches: tuple[str, ...] = ()
    filter_response: bool = False
    allowed_topics: frozenset[str] | None = None
    denied_by: RuleRef | None = None
    # allowed, but the audited policies would deny it: recorded AUDIT, naming these rules
    audited: bool = False
    audit_denied_by: tuple[RuleRef, ...] = ()
    # Kafka all-topics Metadata under topic-bound L7 deny rules: topics the answer must not
    # list (the proxy removes them), whatever `allowed_topics` says
    hidden_topics: frozenset[str] = frozenset()
