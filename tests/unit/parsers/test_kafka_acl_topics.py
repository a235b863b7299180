"""ACL APIs (DescribeAcls 29, CreateAcls 30, DeleteAcls 31) name topics as ACL resources."""

from __future__ import annotations

from typing import Any

import pytest

from garrison.parsers.kafka import KafkaRequest, parse_request_frame
from garrison.parsers.kafka_apis import kafka_api

ANY, TOPIC, GROUP, CLUSTER = 1, 2, 3, 4
MATCH, LITERAL, PREFIXED = 2, 3, 4


def parsed(api_key: int, version: int, **fields: Any) -> KafkaRequest:
    api = kafka_api(api_key)
    assert api is not None
    message = api.request_class[version](**fields)
    message.with_header(correlation_id=1, client_id="acl-test")
    return parse_request_frame(bytes(message.encode(header=True, framed=True)))


def create(version: int, *resources: tuple[int, str, int]) -> KafkaRequest:
    api = kafka_api(30)
    assert api is not None
    creation = api.request_class.fields["creations"].data_class
    return parsed(
        30,
        version,
        creations=[
            creation(
                resource_type=kind, resource_name=name, resource_pattern_type=pattern,
                principal="User:x", host="*", operation=3, permission_type=3,
            )
            for kind, name, pattern in resources
        ],
    )


def describe(version: int, kind: int, name: str | None, pattern: int) -> KafkaRequest:
    return parsed(
        29, version, resource_type_filter=kind, resource_name_filter=name,
        pattern_type_filter=pattern, principal_filter=None, host_filter=None, operation=1,
        permission_type=1,
    )


def delete(version: int, kind: int, name: str | None, pattern: int) -> KafkaRequest:
    api = kafka_api(31)
    assert api is not None
    acl_filter = api.request_class.fields["filters"].data_class
    return parsed(
        31,
        version,
        filters=[
            acl_filter(
                resource_type_filter=kind, resource_name_filter=name,
                pattern_type_filter=pattern, principal_filter=None, host_filter=None,
                operation=1, permission_type=1,
            )
        ],
    )


@pytest.mark.parametrize("version", [0, 1, 3])
def test_a_literal_topic_acl_names_its_topic(version: int) -> None:
    request = create(version, (TOPIC, "orders", LITERAL), (GROUP, "g", LITERAL))
    assert request.topics == ("orders",) and request.topics_complete
    for build in (describe, delete):
        found = build(version, TOPIC, "orders", LITERAL)
        assert found.topics == ("orders",) and found.topics_complete


def test_acls_on_groups_or_the_cluster_name_no_topic() -> None:
    request = create(3, (GROUP, "g", PREFIXED), (CLUSTER, "kafka-cluster", LITERAL))
    assert request.topics == () and request.topics_complete


@pytest.mark.parametrize(
    ("kind", "name", "pattern"),
    [
        (TOPIC, "ord", PREFIXED),  # every topic starting with "ord"
        (TOPIC, "*", LITERAL),  # the wildcard: every topic
        (TOPIC, None, LITERAL),  # a null name filter: any name
        (TOPIC, "orders", MATCH),  # literal, wildcard and prefixed ACLs matching "orders"
        (ANY, "orders", LITERAL),  # any resource type, topics included
    ],
)
def test_acls_reaching_topics_that_cannot_be_listed_count_as_unknown(
    kind: int, name: str | None, pattern: int
) -> None:
    for build in (describe, delete):
        found = build(3, kind, name, pattern)
        assert found.topics_unknown and not found.topics_complete
    if name is not None and kind != ANY and pattern != MATCH:
        assert create(3, (kind, name, pattern)).topics_unknown
