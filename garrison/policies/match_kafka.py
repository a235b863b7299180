"""Kafka L7 rules: does one request (API key, version, client id, topics) match a rule set?

Pure and independent of the parser: the proxy passes plain values.

Semantics (docs: POLICY-SEMANTICS.md, Kafka rules):
- A rule applies to a request when the request's API key is in the rule's `api_keys` (role
  expanded; empty = any key), its version equals `apiVersion` and its client id equals
  `clientID` where those are set.
- Every topic the request names must be allowed by some applicable rule; a rule without
  `topic` allows any topic. Different topics may be allowed by different rules.
- A request naming no topic (ApiVersions, FindCoordinator, JoinGroup, ...) is allowed by any
  applicable rule, topic-bound or not: it matches by API key alone.
- All-topics Metadata (null topic list) is allowed when any rule applies to it; unless an
  applicable rule allows any topic, the verdict asks for the answer to be filtered to the
  topics the applicable rules name (`filter_response`, `allowed_topics`).
- `unknown_topics`: the request acts on topics the caller could not read or resolve (topic ids
  not learnt yet, a body the parser could not decode, a null "every topic" list outside
  Metadata). Only an applicable rule allowing any topic can allow it: nothing fails open.
- A rule set with `allow_all` allows everything.
- `deny_rules` (garrison extension) are checked first and win: a deny rule that applies to the
  request (API key, version, client id as above) denies it when it has no `topic` or the
  request names its topic. An all-topics Metadata request is not denied by topic-bound deny
  rules: the allow rules decide, and the answer must not list their topics
  (`hidden_topics`). A request with unknown topics is denied by any that applies (it might
  name the topic: fail closed). The verdict names the deny rule in `denied_by`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from garrison.policies.l7rules import (
    KAFKA_API_NAMES,
    KafkaRule,
    L7RuleSet,
    L7Verdict,
    audit_refs,
    audited,
)
from garrison.policies.refs import RuleRef


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    api_keys: frozenset[int]  # empty = any
    api_version: int | None
    client_id: str | None
    topic: str | None
    ref: RuleRef | None
    verdict: L7Verdict  # the allow verdict this rule gives, built once

    @property
    def constrained(self) -> bool:
        return self.api_version is not None or self.client_id is not None

    def applies(self, api_version: int, client_id: str | None) -> bool:
        return (self.api_version is None or self.api_version == api_version) and (
            self.client_id is None or self.client_id == client_id
        )


def describe_api(api_key: int) -> str:
    name = KAFKA_API_NAMES.get(api_key)
    return f"{name} ({api_key})" if name else f"api key {api_key}"


@dataclass(frozen=True, slots=True)
class _Applicable:
    """The rules that apply to one request shape, indexed for the topic checks."""

    rules: tuple[_CompiledRule, ...]  # policy order
    any_topic: _CompiledRule | None  # the first rule without a topic
    by_topic: dict[str, _CompiledRule]  # the first rule naming each topic

    @classmethod
    def of(cls, rules: tuple[_CompiledRule, ...]) -> _Applicable:
        by_topic: dict[str, _CompiledRule] = {}
        for rule in rules:
            if rule.topic is not None:
                by_topic.setdefault(rule.topic, rule)
        any_topic = next((r for r in rules if r.topic is None), None)
        return cls(rules, any_topic, by_topic)


# Rules per API key are computed on first use; keys come from the wire, so the memo is bounded.
_MAX_MEMO_KEYS = 512


class KafkaMatcher:
    """Compiled Kafka rules of one L7RuleSet; `match()` is called per request."""

    def __init__(self, ruleset: L7RuleSet) -> None:
        self.ruleset = ruleset
        self._audit: KafkaMatcher | None = None
        self._audit_refs: tuple[RuleRef, ...] = ()
        if ruleset.audit_layer is not None:
            self._audit = KafkaMatcher(ruleset.audit_layer)
            self._audit_refs = audit_refs(ruleset.audit_layer)
        self._rules = tuple(
            _CompiledRule(
                rule.api_keys,
                rule.api_version,
                rule.client_id,
                rule.topic,
                ref,
                L7Verdict(True, ref),
            )
            for rule, ref in ruleset.rules
            if isinstance(rule, KafkaRule)
        )
        self._allow_all = L7Verdict(True, ruleset.allow_all_ref, "allow-all (L4-only rule)")
        self._deny_rules = tuple(
            _CompiledRule(
                rule.api_keys,
                rule.api_version,
                rule.client_id,
                rule.topic,
                ref,
                L7Verdict(False, None, f"denied by {ref or 'a deny rule'}", denied_by=ref),
            )
            for rule, ref in ruleset.deny_rules
            if isinstance(rule, KafkaRule)
        )
        # api key -> (rules for the key, indexed when no rule constrains version or client id)
        self._by_key: dict[int, tuple[tuple[_CompiledRule, ...], _Applicable | None]] = {}

    def _applicable(self, api_key: int, api_version: int, client_id: str | None) -> _Applicable:
        found = self._by_key.get(api_key)
        if found is None:
            rules = tuple(r for r in self._rules if not r.api_keys or api_key in r.api_keys)
            constrained = any(r.constrained for r in rules)
            found = (rules, None if constrained else _Applicable.of(rules))
            if len(self._by_key) >= _MAX_MEMO_KEYS:
                self._by_key.clear()
            self._by_key[api_key] = found
        rules, indexed = found
        if indexed is not None:
            return indexed
        return _Applicable.of(tuple(r for r in rules if r.applies(api_version, client_id)))

    def match(
        self,
        api_key: int,
        api_version: int,
        client_id: str | None,
        topics: Sequence[str],
        all_topics: bool = False,
        *,
        unknown_topics: bool = False,
    ) -> L7Verdict:
        verdict = self._match(
            api_key, api_version, client_id, topics, all_topics, unknown_topics=unknown_topics
        )
        if self._audit is not None and verdict.allowed:
            would = self._audit.match(
                api_key, api_version, client_id, topics, all_topics,
                unknown_topics=unknown_topics,
            )
            if not would.allowed:
                return audited(verdict, would, self._audit_refs)
        return verdict

    def _match(
        self,
        api_key: int,
        api_version: int,
        client_id: str | None,
        topics: Sequence[str],
        all_topics: bool = False,
        *,
        unknown_topics: bool = False,
    ) -> L7Verdict:
        hidden: set[str] = set()
        for deny in self._deny_rules:
            applies = (not deny.api_keys or api_key in deny.api_keys) and deny.applies(
                api_version, client_id
            )
            if not applies:
                continue
            if all_topics and deny.topic is not None and not unknown_topics:
                hidden.add(deny.topic)
            elif deny.topic is None or all_topics or unknown_topics or deny.topic in topics:
                return deny.verdict
        verdict = self._match_allow(
            api_key, api_version, client_id, topics, all_topics, unknown_topics
        )
        if hidden and verdict.allowed:
            return L7Verdict(
                True, verdict.rule, verdict.reason, filter_response=True,
                allowed_topics=verdict.allowed_topics, hidden_topics=frozenset(hidden),
            )
        return verdict

    def _match_allow(
        self,
        api_key: int,
        api_version: int,
        client_id: str | None,
        topics: Sequence[str],
        all_topics: bool,
        unknown_topics: bool,
    ) -> L7Verdict:
        if self.ruleset.allow_all:
            return self._allow_all
        applicable = self._applicable(api_key, api_version, client_id)
        if not applicable.rules:
            return L7Verdict(False, None, self._no_rule_reason(api_key, api_version, client_id))
        any_topic = applicable.any_topic
        if unknown_topics:
            if any_topic is not None:
                return any_topic.verdict
            return L7Verdict(
                False,
                None,
                f"{describe_api(api_key)} names topics that could not be read or resolved; "
                "only a rule allowing any topic allows it",
            )
        if all_topics:
            if any_topic is not None:
                return any_topic.verdict
            allowed = frozenset(applicable.by_topic)
            return L7Verdict(
                True, applicable.rules[0].ref, filter_response=True, allowed_topics=allowed
            )
        if not topics:
            return applicable.rules[0].verdict
        if any_topic is not None:
            return any_topic.verdict
        by_topic = applicable.by_topic
        for topic in topics:
            if topic not in by_topic:
                return L7Verdict(
                    False, None, f"topic {topic!r} not allowed for {describe_api(api_key)}"
                )
        return by_topic[topics[0]].verdict

    def _no_rule_reason(self, api_key: int, api_version: int, client_id: str | None) -> str:
        by_key = [r for r in self._rules if not r.api_keys or api_key in r.api_keys]
        if not by_key:
            return f"no kafka rule allows {describe_api(api_key)}"
        by_version = [r for r in by_key if r.api_version is None or r.api_version == api_version]
        if not by_version:
            return f"no kafka rule allows {describe_api(api_key)} version {api_version}"
        return f"no kafka rule allows {describe_api(api_key)} for client id {client_id!r}"
