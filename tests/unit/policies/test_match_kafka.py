"""KafkaMatcher decision tables: roles, API keys, versions, client ids, topics."""

from __future__ import annotations

import pytest

from garrison.policies.l7rules import (
    KAFKA_ROLE_API_KEYS,
    HTTPRule,
    KafkaRole,
    KafkaRule,
    L7Protocol,
    L7RuleSet,
    kafka_api_key,
)
from garrison.policies.match_kafka import KafkaMatcher
from garrison.policies.refs import PolicyKind, RuleRef

PRODUCE, FETCH, LIST_OFFSETS, METADATA = 0, 1, 2, 3
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP = 8, 9, 10, 11
API_VERSIONS, CREATE_TOPICS, INIT_PRODUCER_ID = 18, 19, 22


def ref(index: int) -> RuleRef:
    return RuleRef(PolicyKind.CNP, "default", "kafka", "ingress", rule_index=index)


def matcher(*rules: KafkaRule, allow_all: bool = False) -> KafkaMatcher:
    return KafkaMatcher(
        L7RuleSet(
            L7Protocol.KAFKA,
            tuple((rule, ref(i)) for i, rule in enumerate(rules)),
            allow_all=allow_all,
            allow_all_ref=ref(99) if allow_all else None,
        )
    )


def allowed(m: KafkaMatcher, key: int, topics: tuple[str, ...] = ()) -> bool:
    return m.match(key, 9, "app", topics).allowed


# ---- roles ----------------------------------------------------------------------------------

ROLE_CASES = [
    # role, api key, allowed
    (KafkaRole.PRODUCE, PRODUCE, True),
    (KafkaRole.PRODUCE, METADATA, True),
    (KafkaRole.PRODUCE, API_VERSIONS, True),
    (KafkaRole.PRODUCE, INIT_PRODUCER_ID, True),
    (KafkaRole.PRODUCE, FETCH, False),
    (KafkaRole.PRODUCE, JOIN_GROUP, False),
    (KafkaRole.PRODUCE, CREATE_TOPICS, False),
    (KafkaRole.CONSUME, FETCH, True),
    (KafkaRole.CONSUME, LIST_OFFSETS, True),
    (KafkaRole.CONSUME, OFFSET_COMMIT, True),
    (KafkaRole.CONSUME, OFFSET_FETCH, True),
    (KafkaRole.CONSUME, FIND_COORDINATOR, True),
    (KafkaRole.CONSUME, JOIN_GROUP, True),
    (KafkaRole.CONSUME, 12, True),
    (KafkaRole.CONSUME, 13, True),
    (KafkaRole.CONSUME, 14, True),
    (KafkaRole.CONSUME, METADATA, True),
    (KafkaRole.CONSUME, API_VERSIONS, True),
    (KafkaRole.CONSUME, PRODUCE, False),
    (KafkaRole.CONSUME, INIT_PRODUCER_ID, False),
    (KafkaRole.CONSUME, 71, False),
]


@pytest.mark.parametrize(("role", "key", "expected"), ROLE_CASES)
def test_roles_expand_to_their_api_keys(role: KafkaRole, key: int, expected: bool) -> None:
    m = matcher(KafkaRule(role=role, topic="orders"))
    assert allowed(m, key, ("orders",)) is expected
    assert (key in KAFKA_ROLE_API_KEYS[role]) is expected


# ---- api keys by name or number, versions, client ids ---------------------------------------


@pytest.mark.parametrize(
    ("name", "key"), [("produce", 0), ("fetch", 1), ("offsets", 2), ("metadata", 3), ("19", 19)]
)
def test_api_keys_by_name_or_number(name: str, key: int) -> None:
    number = kafka_api_key(name)
    assert number == key
    m = matcher(KafkaRule(api_key=number))
    assert allowed(m, key, ("t",))
    assert not allowed(m, key + 1, ("t",))


VERSION_CLIENT_CASES = [
    # rule api_version, rule client_id, request version, request client id, allowed
    (None, None, 9, "app", True),
    (9, None, 9, "app", True),
    (9, None, 8, "app", False),
    (None, "app", 9, "app", True),
    (None, "app", 9, "other", False),
    (None, "app", 9, None, False),
    (9, "app", 9, "app", True),
    (9, "app", 8, "app", False),
]


@pytest.mark.parametrize(
    ("rule_version", "rule_client", "version", "client_id", "expected"), VERSION_CLIENT_CASES
)
def test_api_version_and_client_id_must_equal_when_set(
    rule_version: int | None,
    rule_client: str | None,
    version: int,
    client_id: str | None,
    expected: bool,
) -> None:
    m = matcher(KafkaRule(api_key=PRODUCE, api_version=rule_version, client_id=rule_client))
    verdict = m.match(PRODUCE, version, client_id, ["orders"])
    assert verdict.allowed is expected
    assert (verdict.rule == ref(0)) is expected


def test_a_rule_without_api_key_or_role_applies_to_every_key() -> None:
    m = matcher(KafkaRule(topic="orders"))
    for key in (PRODUCE, FETCH, CREATE_TOPICS, 71):
        assert allowed(m, key, ("orders",))
    assert not allowed(m, PRODUCE, ("payments",))


# ---- topics ---------------------------------------------------------------------------------


def test_every_topic_must_be_allowed_by_some_applicable_rule() -> None:
    m = matcher(
        KafkaRule(role=KafkaRole.PRODUCE, topic="orders"),
        KafkaRule(role=KafkaRole.PRODUCE, topic="audit"),
        KafkaRule(role=KafkaRole.CONSUME, topic="payments"),
    )
    assert allowed(m, PRODUCE, ("orders",))
    assert allowed(m, PRODUCE, ("orders", "audit"))  # two rules, one topic each
    verdict = m.match(PRODUCE, 9, "app", ["orders", "payments"])
    assert not verdict.allowed
    assert "payments" in verdict.reason and "produce" in verdict.reason
    assert allowed(m, FETCH, ("payments",))
    assert not allowed(m, FETCH, ("orders",))


def test_a_rule_without_topic_allows_every_topic() -> None:
    m = matcher(KafkaRule(role=KafkaRole.PRODUCE, topic="orders"), KafkaRule(api_key=PRODUCE))
    verdict = m.match(PRODUCE, 9, "app", ["anything", "else"])
    assert verdict.allowed and verdict.rule == ref(1)


def test_the_first_topics_rule_is_reported() -> None:
    m = matcher(KafkaRule(api_key=PRODUCE, topic="a"), KafkaRule(api_key=PRODUCE, topic="b"))
    assert m.match(PRODUCE, 9, "app", ["b", "a"]).rule == ref(1)


@pytest.mark.parametrize("key", [API_VERSIONS, FIND_COORDINATOR, JOIN_GROUP, INIT_PRODUCER_ID])
def test_requests_naming_no_topic_match_a_topic_bound_rule_by_api_key(key: int) -> None:
    m = matcher(
        KafkaRule(role=KafkaRole.CONSUME, topic="orders"),
        KafkaRule(role=KafkaRole.PRODUCE, topic="orders"),
    )
    assert allowed(m, key)


def test_topic_names_match_exactly() -> None:
    m = matcher(KafkaRule(api_key=PRODUCE, topic="orders"))
    for topic in ("Orders", "orders ", "orders.v2", "order"):
        assert not allowed(m, PRODUCE, (topic,))


# ---- all-topics Metadata --------------------------------------------------------------------


def test_all_topics_metadata_is_allowed_and_filtered_to_the_named_topics() -> None:
    m = matcher(
        KafkaRule(role=KafkaRole.PRODUCE, topic="orders"),
        KafkaRule(role=KafkaRole.CONSUME, topic="payments"),
        KafkaRule(api_key=FETCH, topic="not-metadata"),
    )
    verdict = m.match(METADATA, 12, "app", [], all_topics=True)
    assert verdict.allowed and verdict.filter_response
    assert verdict.allowed_topics == frozenset({"orders", "payments"})


def test_all_topics_metadata_is_not_filtered_when_a_rule_allows_any_topic() -> None:
    m = matcher(KafkaRule(role=KafkaRole.PRODUCE, topic="orders"), KafkaRule(api_key=METADATA))
    verdict = m.match(METADATA, 12, "app", [], all_topics=True)
    assert verdict.allowed and not verdict.filter_response and verdict.allowed_topics is None
    assert verdict.rule == ref(1)


def test_all_topics_metadata_without_a_metadata_rule_is_denied() -> None:
    m = matcher(KafkaRule(api_key=PRODUCE, topic="orders"))
    verdict = m.match(METADATA, 12, "app", [], all_topics=True)
    assert not verdict.allowed and "metadata (3)" in verdict.reason


def test_all_topics_metadata_respects_version_and_client_id() -> None:
    m = matcher(KafkaRule(api_key=METADATA, client_id="admin", topic="orders"))
    assert not m.match(METADATA, 12, "app", [], all_topics=True).allowed
    assert m.match(METADATA, 12, "admin", [], all_topics=True).filter_response


# ---- unknown topics fail closed -------------------------------------------------------------


def test_unknown_topics_need_a_rule_that_allows_any_topic() -> None:
    bound = matcher(KafkaRule(role=KafkaRole.CONSUME, topic="orders"))
    verdict = bound.match(FETCH, 16, "rdkafka", [], unknown_topics=True)
    assert not verdict.allowed and "could not be read" in verdict.reason
    assert not bound.match(FETCH, 16, "rdkafka", ["orders"], unknown_topics=True).allowed
    anything = matcher(KafkaRule(role=KafkaRole.CONSUME))
    assert anything.match(FETCH, 16, "rdkafka", [], unknown_topics=True).allowed


# ---- rule sets ------------------------------------------------------------------------------


def test_allow_all_allows_everything_with_its_ref() -> None:
    m = matcher(allow_all=True)
    verdict = m.match(CREATE_TOPICS, 7, None, ["x"], unknown_topics=True)
    assert verdict.allowed and verdict.rule == ref(99)


def test_an_empty_rule_set_denies_and_names_the_api_key() -> None:
    verdict = matcher().match(PRODUCE, 9, "app", ["orders"])
    assert not verdict.allowed and verdict.reason == "no kafka rule allows produce (0)"


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (KafkaRule(api_key=PRODUCE, api_version=3), "no kafka rule allows produce (0) version 9"),
        (
            KafkaRule(api_key=PRODUCE, client_id="x"),
            "no kafka rule allows produce (0) for client id 'app'",
        ),
        (KafkaRule(api_key=FETCH), "no kafka rule allows produce (0)"),
    ],
)
def test_denial_reasons_say_what_did_not_match(rule: KafkaRule, reason: str) -> None:
    assert matcher(rule).match(PRODUCE, 9, "app", ["orders"]).reason == reason


def test_unnamed_api_keys_are_described_by_number() -> None:
    assert "api key 9999" in matcher().match(9999, 0, None, []).reason


def test_non_kafka_rules_in_the_set_are_ignored() -> None:
    ruleset = L7RuleSet(L7Protocol.KAFKA, ((HTTPRule(method="GET"), ref(0)),))
    assert not KafkaMatcher(ruleset).match(PRODUCE, 9, "app", []).allowed
