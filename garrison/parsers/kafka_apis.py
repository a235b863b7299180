"""kafka-python's protocol classes by API key, and where each request names its topics.

kafka-python 3.x generates one request and one response class per Kafka API from Kafka's JSON
message schemas, every version from 0 to the newest it knows, flexible versions included. This
module is the only place that looks the classes up and calls their compiled decoders, so a
change in kafka-python touches one file.

The topic table (`TOPIC_FIELDS`) says, per API key, which arrays of a decoded request hold the
topics the request acts on. Arrays that only *remove* topics from a fetch session
(`ForgottenTopicsData`) are not listed: forgetting a topic reads nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kafka.protocol.admin
import kafka.protocol.consumer
import kafka.protocol.metadata
import kafka.protocol.producer
import kafka.protocol.sasl
from kafka.protocol.api_message import ApiMessage

from garrison.parsers.kafka_lengths import FieldPlan, LengthError, check_message, message_plan

# Keys of the APIs garrison inspects by name.
PRODUCE = 0
FETCH = 1
LIST_OFFSETS = 2
METADATA = 3
OFFSET_COMMIT = 8
OFFSET_FETCH = 9
FIND_COORDINATOR = 10
API_VERSIONS = 18
CREATE_TOPICS = 19
DESCRIBE_ACLS = 29
CREATE_ACLS = 30
DELETE_ACLS = 31
DESCRIBE_CONFIGS = 32
ALTER_CONFIGS = 33
INCREMENTAL_ALTER_CONFIGS = 44
DESCRIBE_CLUSTER = 60
GET_TELEMETRY_SUBSCRIPTIONS = 71
PUSH_TELEMETRY = 72
DESCRIBE_TOPIC_PARTITIONS = 75

# ApiVersions: flexible (request header v2) from v3 on, in every Kafka release. Needed to read
# the header of an ApiVersions request newer than kafka-python knows (clients send their
# newest version first and fall back when the broker answers UNSUPPORTED_VERSION).
API_VERSIONS_FIRST_FLEXIBLE = 3

# API keys kafka-python has no class for but that are known to name no topic: a request of
# these keys decided on its header alone hides no topic from the rules. Client telemetry
# (KIP-714, sent by librdkafka when the broker advertises it) and delegation tokens. Any other
# key without a class may name topics garrison cannot read: its topics count as unknown.
TOPICLESS_WITHOUT_CLASS: frozenset[int] = frozenset({38, 39, 40, 41, 71, 72})

# ConfigResource.resourceType for topics (DescribeConfigs, AlterConfigs, IncrementalAlter...).
CONFIG_RESOURCE_TOPIC = 2


@dataclass(frozen=True, slots=True)
class KafkaApi:
    """One Kafka API as kafka-python implements it."""

    key: int
    name: str
    request_class: Any  # kafka.protocol.api_message.ApiMessage subclass
    response_class: Any
    max_version: int

    def supports(self, version: int) -> bool:
        return 0 <= version <= self.max_version


def _message_classes(base: Any) -> list[Any]:
    found = []
    for sub in base.__subclasses__():
        found.append(sub)
        found.extend(_message_classes(sub))
    return found


@functools.cache
def _apis() -> dict[int, KafkaApi]:
    # The imports at the top register every class as a subclass of ApiMessage.
    assert kafka.protocol.admin and kafka.protocol.consumer and kafka.protocol.metadata
    assert kafka.protocol.producer and kafka.protocol.sasl
    requests: dict[int, Any] = {}
    responses: dict[int, Any] = {}
    for cls in _message_classes(ApiMessage):
        if getattr(cls, "_class_version", None) is not None:
            continue  # a per-version alias (`FetchRequest[13]`), not the primary class
        target = requests if cls.is_request() else responses
        target[cls.API_KEY] = cls
    return {
        key: KafkaApi(
            key=key,
            name=request.name,
            request_class=request,
            response_class=responses[key],
            max_version=min(request.max_version, responses[key].max_version),
        )
        for key, request in requests.items()
        if key in responses
    }


def kafka_api(api_key: int) -> KafkaApi | None:
    """The kafka-python classes for an API key; None where kafka-python has none."""
    return _apis().get(api_key)


def known_api_keys() -> frozenset[int]:
    return frozenset(_apis())


Decoder = Callable[[memoryview, int], tuple[Any, int]]


@dataclass(frozen=True, slots=True)
class MessageCodec:
    """The compiled kafka-python decoder of one API version's request or response body."""

    api: KafkaApi
    flexible: bool  # compact encodings and tagged fields; header v2 (request) / v1 (response)
    decode_from: Decoder
    plan: FieldPlan  # every length and count, checked before kafka-python reads them

    def decode(self, data: memoryview, max_elements: int | None = None) -> Any:
        """Decode a whole body (no header).

        Raises `LengthError` (a `ValueError`) for a length or count the protocol cannot carry
        (`garrison.parsers.kafka_lengths`): kafka-python's compiled decoders trust them, and
        would read an array count of -2**31 as an empty array. Bytes left after the schema's
        last field are ignored, as Kafka's brokers ignore them (librdkafka 2.x sends three
        stray bytes in its all-topics Metadata v12 request). Any other exception from
        kafka-python means the bytes do not fit the schema. `max_elements`: see
        `check_message`.
        """
        checked = check_message(self.plan, data, max_elements)
        decoded, end = self.decode_from(data, 0)
        if end != checked:
            raise LengthError(f"kafka-python read {end} bytes of the body, the schema {checked}")
        return decoded


def request_codec(api_key: int, version: int) -> MessageCodec | None:
    """The request decoder of an API version; None where kafka-python has none."""
    return _codec(api_key, version, True) if _supported(api_key, version) else None


def response_codec(api_key: int, version: int) -> MessageCodec | None:
    """The response decoder of an API version; None where kafka-python has none."""
    return _codec(api_key, version, False) if _supported(api_key, version) else None


def _supported(api_key: int, version: int) -> bool:
    api = _apis().get(api_key)
    return api is not None and 0 <= version <= api.max_version


@functools.cache  # bounded: only (key, version) pairs kafka-python supports get here
def _codec(api_key: int, version: int, request: bool) -> MessageCodec:
    api = _apis()[api_key]
    message_class = api.request_class if request else api.response_class
    flexible = bool(message_class.flexible_version_q(version))
    decoder = message_class._struct.compiled_decode_from(
        version, compact=flexible, tagged=flexible, data_class=message_class
    )
    plan = message_plan(message_class, version, flexible, request)
    return MessageCodec(api, flexible, decoder, plan)


# ---- where requests name topics ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicField:
    """An array of topic entries inside a decoded request.

    `path`: attribute names from the request down to the array (nested arrays are walked).
    `name`: the entry's attribute with the topic name; None = the entries are the names.
    `topic_id`: the entry's attribute with the topic id (UUID), if the API has one.
    A null array means "every topic" (Metadata: `all_topics`; elsewhere: topics unknown).
    """

    path: tuple[str, ...]
    name: str | None = "name"
    topic_id: str | None = None


TOPIC_FIELDS: dict[int, tuple[TopicField, ...]] = {
    0: (TopicField(("topic_data",), "name", "topic_id"),),  # Produce
    1: (TopicField(("topics",), "topic", "topic_id"),),  # Fetch (not forgotten_topics_data)
    2: (TopicField(("topics",)),),  # ListOffsets
    3: (TopicField(("topics",), "name", "topic_id"),),  # Metadata
    8: (TopicField(("topics",), "name", "topic_id"),),  # OffsetCommit
    9: (  # OffsetFetch: v0-7 one group, v8+ many groups
        TopicField(("topics",)),
        TopicField(("groups", "topics"), "name", "topic_id"),
    ),
    19: (TopicField(("topics",)),),  # CreateTopics
    20: (TopicField(("topic_names",), None), TopicField(("topics",), "name", "topic_id")),
    21: (TopicField(("topics",)),),  # DeleteRecords
    23: (TopicField(("topics",), "topic"),),  # OffsetForLeaderEpoch
    24: (  # AddPartitionsToTxn: v0-3 one transaction, v4+ many
        TopicField(("v3_and_below_topics",)),
        TopicField(("transactions", "topics")),
    ),
    27: (TopicField(("markers", "topics")),),  # WriteTxnMarkers
    28: (TopicField(("topics",)),),  # TxnOffsetCommit
    34: (TopicField(("dirs", "topics")),),  # AlterReplicaLogDirs
    35: (TopicField(("topics",), "topic"),),  # DescribeLogDirs
    37: (TopicField(("topics",)),),  # CreatePartitions
    43: (TopicField(("topic_partitions",), "topic"),),  # ElectLeaders
    45: (TopicField(("topics",)),),  # AlterPartitionReassignments
    46: (TopicField(("topics",)),),  # ListPartitionReassignments
    47: (TopicField(("topics",)),),  # OffsetDelete
    55: (TopicField(("topics",), "topic_name"),),  # DescribeQuorum
    61: (TopicField(("topics",)),),  # DescribeProducers
    75: (TopicField(("topics",)),),  # DescribeTopicPartitions (+ cursor, see below)
}

# Config APIs name topics as resources of type TOPIC.
CONFIG_RESOURCE_APIS = frozenset({DESCRIBE_CONFIGS, ALTER_CONFIGS, INCREMENTAL_ALTER_CONFIGS})

# ACL APIs name topics as ACL resources: `ResourceType` TOPIC (2), or ANY (1) in a filter,
# which matches topics too. A topic is named exactly only by a LITERAL (3) pattern (v0 has no
# pattern type: literal) with a name other than the wildcard "*"; a PREFIXED (4) pattern, the
# wildcard, a MATCH (2) or ANY (1) filter or a null name filter reach topics garrison cannot
# list. Resource types other than TOPIC and ANY name no topic.
ACL_APIS = frozenset({DESCRIBE_ACLS, CREATE_ACLS, DELETE_ACLS})
ACL_RESOURCE_ANY = 1
ACL_RESOURCE_TOPIC = 2
ACL_PATTERN_LITERAL = 3
ACL_WILDCARD = "*"
