"""Which topics a decoded Kafka request names, and the topic-id registry that resolves ids.

Newer clients name topics by id (UUID) instead of by name: librdkafka's Fetch v13+, Produce
v13+, OffsetCommit/OffsetFetch v10+. Only the broker knows the mapping; it tells clients in
Metadata responses (v10+), CreateTopics (v7+) and DescribeTopicPartitions answers. The
`TopicIdRegistry` learns the mapping from those answers and is shared by whoever should share
it (one per connection, or one per broker across connections: a plain object, no locking,
used from one event loop). An id the registry has not seen stays unresolved; the caller
decides with it unknown, failing closed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

from garrison.parsers.kafka_apis import (
    ACL_APIS,
    ACL_PATTERN_LITERAL,
    ACL_RESOURCE_ANY,
    ACL_RESOURCE_TOPIC,
    ACL_WILDCARD,
    CONFIG_RESOURCE_APIS,
    CONFIG_RESOURCE_TOPIC,
    CREATE_ACLS,
    CREATE_TOPICS,
    DESCRIBE_ACLS,
    DESCRIBE_TOPIC_PARTITIONS,
    METADATA,
    TOPIC_FIELDS,
    TopicField,
    kafka_api,
)


@dataclass(frozen=True, slots=True)
class KafkaBrokerAddress:
    """One broker as a Metadata response lists it."""

    node_id: int
    host: str
    port: int
    rack: str | None = None


@dataclass(frozen=True, slots=True)
class KafkaCluster:
    """What the latest Metadata response said about the cluster (brokers, ids).

    A denied Metadata request is answered with these brokers: clients such as kafka-python
    treat a Metadata answer without brokers as a failed update and retry until they time out,
    instead of reporting the topic authorization error.
    """

    brokers: tuple[KafkaBrokerAddress, ...]
    cluster_id: str | None = None
    controller_id: int = -1


class TopicIdRegistry:
    """Topic id → name, learnt from the broker's answers. Bounded: oldest entries go first."""

    def __init__(self, max_topics: int = 100_000) -> None:
        if max_topics < 1:
            raise ValueError("max_topics must be positive")
        self._max_topics = max_topics
        self._names: dict[UUID, str] = {}
        self.cluster: KafkaCluster | None = None

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, topic_id: object) -> bool:
        return topic_id in self._names

    def name_of(self, topic_id: UUID) -> str | None:
        return self._names.get(topic_id)

    def learn(self, topic_id: UUID, name: str) -> None:
        self._names.pop(topic_id, None)  # re-inserting keeps recent entries at the end
        self._names[topic_id] = name
        while len(self._names) > self._max_topics:
            del self._names[next(iter(self._names))]

    def learn_from_response(self, api_key: int, decoded: Any) -> None:
        """Learn from a decoded Metadata, CreateTopics or DescribeTopicPartitions response."""
        if api_key not in (METADATA, CREATE_TOPICS, DESCRIBE_TOPIC_PARTITIONS):
            return
        for topic in decoded.topics or ():
            topic_id, name = getattr(topic, "topic_id", None), topic.name
            if isinstance(topic_id, UUID) and name and topic.error_code == 0:
                self.learn(topic_id, name)
        if api_key == METADATA and decoded.brokers:
            self.cluster = KafkaCluster(
                brokers=tuple(
                    KafkaBrokerAddress(b.node_id, b.host, b.port, b.rack) for b in decoded.brokers
                ),
                cluster_id=decoded.cluster_id,
                controller_id=decoded.controller_id,
            )


# ---- topics named by a decoded request ---------------------------------------------------------


class RequestTopics(NamedTuple):
    """The topics one request names (a named tuple: built once per request, kept cheap).

    `names`: resolved names in order of first appearance, without duplicates.
    `unresolved_ids`: topic ids the registry does not know (yet).
    `all_topics`: Metadata with a null topic list (v0: an empty list).
    `unknown`: the request may act on topics that cannot be listed (a null "every topic" list
    outside Metadata, an empty DescribeTopicPartitions list).
    """

    names: tuple[str, ...] = ()
    unresolved_ids: tuple[UUID, ...] = ()
    all_topics: bool = False
    unknown: bool = False


NO_TOPICS = RequestTopics()


@dataclass(frozen=True, slots=True)
class _VersionedField:
    path: tuple[str, ...]
    name: str | None
    topic_id: str | None


@functools.cache  # bounded: called only for (key, version) pairs kafka-python decoded
def _fields_in_version(api_key: int, version: int) -> tuple[_VersionedField, ...]:
    """The TOPIC_FIELDS entries that exist in this version, with out-of-version leaves dropped."""
    api = kafka_api(api_key)
    if api is None:
        return ()
    present = []
    for spec in TOPIC_FIELDS.get(api_key, ()):
        fields = api.request_class.fields
        leaf = None
        for attribute in spec.path:
            leaf = fields.get(attribute)
            if leaf is None or not leaf.for_version_q(version):
                break
            fields = leaf.fields if leaf.is_struct_array() else {}
        else:
            present.append(_present(spec, fields, version))
    return tuple(present)


def _present(spec: TopicField, entry_fields: Any, version: int) -> _VersionedField:
    def in_version(attribute: str | None) -> str | None:
        if attribute is None or attribute not in entry_fields:
            return None
        return attribute if entry_fields[attribute].for_version_q(version) else None

    return _VersionedField(spec.path, in_version(spec.name), in_version(spec.topic_id))


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[Any]:
    """Every element of the array at `path`; yields None for a null array on the way."""
    value = getattr(node, path[0])
    if value is None:
        yield None
        return
    for element in value:
        if len(path) == 1:
            yield element
        else:
            yield from _walk(element, path[1:])


def request_topics(
    api_key: int, version: int, decoded: Any, registry: TopicIdRegistry | None
) -> RequestTopics:
    """The topics a decoded request names (kafka-python object of `api_key` at `version`)."""
    names: dict[str, None] = {}
    unresolved: dict[UUID, None] = {}
    all_topics = unknown = False
    for spec in _fields_in_version(api_key, version):
        # Arrays of the request itself (the common case) are read without the generator.
        entries = (
            getattr(decoded, spec.path[0]) if len(spec.path) == 1 else _walk(decoded, spec.path)
        )
        if entries is None:
            entries = (None,)
        name_attr, id_attr = spec.name, spec.topic_id
        for entry in entries:
            if entry is None:
                if api_key == METADATA:
                    all_topics = True
                else:
                    unknown = True
            elif name_attr is None and id_attr is None:
                names[entry] = None  # an array of names (DeleteTopics v0-5)
            else:
                # A request may carry both a name and an id for one topic (Metadata v10+).
                # Every topic it could refer to counts: a name cannot vouch for another id.
                name = getattr(entry, name_attr) if name_attr else None
                topic_id = getattr(entry, id_attr) if id_attr else None
                if name is None and topic_id is None:
                    # Neither a name nor an id (kafka-python reads the all-zero id as None):
                    # the entry names no topic garrison can check, never "no topic".
                    unknown = True
                    continue
                if name is not None and (name or topic_id is None):
                    names[name] = None
                if topic_id is not None:
                    resolved = registry.name_of(topic_id) if registry is not None else None
                    if resolved is None:
                        unresolved[topic_id] = None
                    else:
                        names[resolved] = None
    if api_key == METADATA and version == 0 and not decoded.topics:
        all_topics = True  # v0 had no null: an empty list asked for every topic
    elif api_key in CONFIG_RESOURCE_APIS:
        names.update(dict.fromkeys(_config_topics(decoded.resources)))
    elif api_key in ACL_APIS:
        for name in _acl_topics(api_key, version, decoded):
            if name is None:
                unknown = True
            else:
                names[name] = None
    elif api_key == DESCRIBE_TOPIC_PARTITIONS:
        if not decoded.topics:
            unknown = True  # an empty list describes every topic
        if decoded.cursor is not None:
            names[decoded.cursor.topic_name] = None
    if not (names or unresolved or all_topics or unknown):
        return NO_TOPICS
    return RequestTopics(tuple(names), tuple(unresolved), all_topics, unknown)


def _config_topics(resources: Iterable[Any] | None) -> Iterator[str]:
    for resource in resources or ():
        if resource.resource_type == CONFIG_RESOURCE_TOPIC:
            yield resource.resource_name


def _acl_topics(api_key: int, version: int, decoded: Any) -> Iterator[str | None]:
    """The topics the ACL resources (or filters) of a CreateAcls, DescribeAcls or DeleteAcls
    request name; None for one that reaches topics that cannot be listed (`ACL_APIS`)."""
    if api_key == CREATE_ACLS:
        entries = [
            (c.resource_type, c.resource_name, c.resource_pattern_type if version else None)
            for c in decoded.creations or ()
        ]
    else:
        filters = [decoded] if api_key == DESCRIBE_ACLS else list(decoded.filters or ())
        entries = [
            (
                f.resource_type_filter,
                f.resource_name_filter,
                f.pattern_type_filter if version else None,
            )
            for f in filters
        ]
    for resource_type, name, pattern in entries:
        if resource_type not in (ACL_RESOURCE_TOPIC, ACL_RESOURCE_ANY):
            continue
        literal = pattern is None or pattern == ACL_PATTERN_LITERAL
        if resource_type == ACL_RESOURCE_TOPIC and literal and name and name != ACL_WILDCARD:
            yield name
        else:
            yield None
