"""Kafka deny answers, read back by the clients' own decoders.

Every deniable API, every version kafka-python can encode: the request is built with
kafka-python, parsed by garrison, answered by `kafka_deny_response`, and the answer decoded
with kafka-python's response class. End to end, a kafka-python producer behind a relay that
denies Produce gets TopicAuthorizationFailedError at once, and librdkafka behind a relay that
denies its telemetry requests keeps producing.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from garrison.parsers.kafka import (
    KafkaBrokerAddress,
    KafkaCluster,
    KafkaRequest,
    KafkaRequestParser,
    KafkaResponseParser,
    TopicIdRegistry,
)
from garrison.parsers.kafka_apis import kafka_api
from garrison.proxy.deny import KafkaDenyUnencodableError, kafka_deny_encodable, kafka_deny_response
from tests.kafka_broker import LOOPBACK, TansuBroker, free_port, running_tansu

TOPICS = {"orders": uuid.UUID(int=1), "payments": uuid.UUID(int=2)}
PARTITIONS = {"orders": [0, 1], "payments": [2]}
GROUP = "billing"
CLUSTER = KafkaCluster((KafkaBrokerAddress(1, "127.0.0.1", 9092, None),), "cluster-1", 1)


def registry() -> TopicIdRegistry:
    known = TopicIdRegistry()
    for name, topic_id in TOPICS.items():
        known.learn(topic_id, name)
    return known


def entries(message_class: Any, *path: str) -> Any:
    fields = message_class.fields
    for name in path[:-1]:
        fields = fields[name].fields
    return fields[path[-1]].data_class


# ---- one sample request per API (kafka-python fills version-specific defaults) ---------------


def produce(cls: Any, v: int) -> dict[str, Any]:
    topic, partition = entries(cls, "topic_data"), entries(cls, "topic_data", "partition_data")
    data = [
        topic(name=name, topic_id=TOPICS[name], partition_data=[partition(index=p, records=b"")])
        for name in TOPICS
        for p in PARTITIONS[name][:1]
    ]
    return {"transactional_id": None, "acks": -1, "timeout_ms": 1000, "topic_data": data}


def fetch(cls: Any, v: int) -> dict[str, Any]:
    topic, partition = entries(cls, "topics"), entries(cls, "topics", "partitions")
    topics = [
        topic(
            topic=name,
            topic_id=TOPICS[name],
            partitions=[partition(partition=p, fetch_offset=0) for p in PARTITIONS[name]],
        )
        for name in TOPICS
    ]
    return {"max_wait_ms": 500, "min_bytes": 1, "topics": topics}


def list_offsets(cls: Any, v: int) -> dict[str, Any]:
    topic, partition = entries(cls, "topics"), entries(cls, "topics", "partitions")
    topics = [
        topic(name=n, partitions=[partition(partition_index=p) for p in PARTITIONS[n]])
        for n in TOPICS
    ]
    return {"replica_id": -1, "topics": topics}


def metadata(cls: Any, v: int) -> dict[str, Any]:
    topic = entries(cls, "topics")
    return {"topics": [topic(name=name) for name in TOPICS], "allow_auto_topic_creation": False}


def offset_commit(cls: Any, v: int) -> dict[str, Any]:
    topic, partition = entries(cls, "topics"), entries(cls, "topics", "partitions")
    topics = [
        topic(
            name=name,
            topic_id=TOPICS[name],
            partitions=[partition(partition_index=p, committed_offset=5) for p in PARTITIONS[name]],
        )
        for name in TOPICS
    ]
    return {"group_id": GROUP, "topics": topics}


def offset_fetch(cls: Any, v: int) -> dict[str, Any]:
    if v < 8:
        topic = entries(cls, "topics")
        return {
            "group_id": GROUP,
            "topics": [topic(name=n, partition_indexes=PARTITIONS[n]) for n in TOPICS],
        }
    group, topic = entries(cls, "groups"), entries(cls, "groups", "topics")
    topics = [topic(name=n, topic_id=TOPICS[n], partition_indexes=PARTITIONS[n]) for n in TOPICS]
    return {"groups": [group(group_id=GROUP, topics=topics)]}


def find_coordinator(cls: Any, v: int) -> dict[str, Any]:
    return {"key": GROUP, "key_type": 0, "coordinator_keys": [GROUP]}


def join_group(cls: Any, v: int) -> dict[str, Any]:
    protocol = entries(cls, "protocols")
    return {
        "group_id": GROUP,
        "session_timeout_ms": 6000,
        "protocol_type": "consumer",
        "protocols": [protocol(name="range", metadata=b"")],
    }


def group_only(cls: Any, v: int) -> dict[str, Any]:
    return {"group_id": GROUP, "member_id": "m-1"}


def describe_groups(cls: Any, v: int) -> dict[str, Any]:
    return {"groups": [GROUP, "other"]}


def nothing(cls: Any, v: int) -> dict[str, Any]:
    return {}


def create_topics(cls: Any, v: int) -> dict[str, Any]:
    topic = entries(cls, "topics")
    return {
        "topics": [topic(name=n, num_partitions=1, replication_factor=1) for n in TOPICS],
        "timeout_ms": 1000,
    }


def delete_topics(cls: Any, v: int) -> dict[str, Any]:
    topic = entries(cls, "topics")
    return {
        "topic_names": list(TOPICS),
        "topics": [topic(name=None, topic_id=TOPICS[n]) for n in TOPICS],
        "timeout_ms": 1000,
    }


def init_producer_id(cls: Any, v: int) -> dict[str, Any]:
    return {"transactional_id": None, "transaction_timeout_ms": 1000}


def init_transactional_producer_id(cls: Any, v: int) -> dict[str, Any]:
    return {"transactional_id": "tx-1", "transaction_timeout_ms": 1000}


def delete_records(cls: Any, v: int) -> dict[str, Any]:
    topic, partition = entries(cls, "topics"), entries(cls, "topics", "partitions")
    topics = [
        topic(name=n, partitions=[partition(partition_index=p, offset=1) for p in PARTITIONS[n]])
        for n in TOPICS
    ]
    return {"topics": topics, "timeout_ms": 1000}


def offset_for_leader_epoch(cls: Any, v: int) -> dict[str, Any]:
    topic, partition = entries(cls, "topics"), entries(cls, "topics", "partitions")
    topics = [
        topic(topic=n, partitions=[partition(partition=p, leader_epoch=3) for p in PARTITIONS[n]])
        for n in TOPICS
    ]
    return {"replica_id": -1, "topics": topics}


def add_partitions_to_txn(cls: Any, v: int) -> dict[str, Any]:
    if v < 4:
        topic = entries(cls, "v3_and_below_topics")
        return {
            "v3_and_below_transactional_id": "tx-1",
            "v3_and_below_topics": [topic(name=n, partitions=PARTITIONS[n]) for n in TOPICS],
        }
    transaction = entries(cls, "transactions")
    topic = entries(cls, "transactions", "topics")
    topics = [topic(name=n, partitions=PARTITIONS[n]) for n in TOPICS]
    return {"transactions": [transaction(transactional_id="tx-1", topics=topics)]}


def txn_offset_commit(cls: Any, v: int) -> dict[str, Any]:
    topic, partition = entries(cls, "topics"), entries(cls, "topics", "partitions")
    topics = [
        topic(
            name=n,
            partitions=[partition(partition_index=p, committed_offset=5) for p in PARTITIONS[n]],
        )
        for n in TOPICS
    ]
    return {"transactional_id": "tx-1", "group_id": GROUP, "topics": topics}


def create_partitions(cls: Any, v: int) -> dict[str, Any]:
    topic = entries(cls, "topics")
    return {"topics": [topic(name=n, count=4, assignments=None) for n in TOPICS]}


def describe_producers(cls: Any, v: int) -> dict[str, Any]:
    topic = entries(cls, "topics")
    return {"topics": [topic(name=n, partition_indexes=PARTITIONS[n]) for n in TOPICS]}


def describe_topic_partitions(cls: Any, v: int) -> dict[str, Any]:
    topic = entries(cls, "topics")
    return {"topics": [topic(name=n) for n in TOPICS], "response_partition_limit": 100}


def config_resources(resource_type: int) -> Callable[[Any, int], dict[str, Any]]:
    def build(cls: Any, v: int) -> dict[str, Any]:
        resource = entries(cls, "resources")
        names = list(TOPICS) if resource_type == 2 else ["1", "2"]
        resources = [resource(resource_type=resource_type, resource_name=n) for n in names]
        return {"resources": resources}

    return build


def create_acls(cls: Any, v: int) -> dict[str, Any]:
    creation = entries(cls, "creations")
    return {
        "creations": [
            creation(
                resource_type=2, resource_name=n, resource_pattern_type=3, principal="User:x",
                host="*", operation=3, permission_type=3,
            )
            for n in TOPICS
        ]
    }


def acl_filter(**fields: Any) -> dict[str, Any]:
    return {
        "resource_type_filter": 2, "resource_name_filter": "orders", "pattern_type_filter": 3,
        "principal_filter": None, "host_filter": None, "operation": 1, "permission_type": 1,
        **fields,
    }


def delete_acls(cls: Any, v: int) -> dict[str, Any]:
    entry = entries(cls, "filters")
    return {"filters": [entry(**acl_filter(resource_name_filter=n)) for n in TOPICS]}


@dataclass(frozen=True)
class DenyCase:
    api_key: int
    build: Callable[[Any, int], dict[str, Any]]
    expected: int  # the error code on every entry
    per_partition: bool = False  # one entry per (topic, partition) named
    per_topic: bool = False  # one entry per topic named
    per_group: int = 0  # one entry per group named


CASES = {
    "produce": DenyCase(0, produce, 29, per_partition=True),
    "fetch": DenyCase(1, fetch, 29, per_partition=True),
    "list-offsets": DenyCase(2, list_offsets, 29, per_partition=True),
    "metadata": DenyCase(3, metadata, 29, per_topic=True),
    "offset-commit": DenyCase(8, offset_commit, 29, per_partition=True),
    "offset-fetch": DenyCase(9, offset_fetch, 29, per_partition=True),
    "find-coordinator": DenyCase(10, find_coordinator, 30),
    "join-group": DenyCase(11, join_group, 30),
    "heartbeat": DenyCase(12, group_only, 30),
    "leave-group": DenyCase(13, group_only, 30),
    "sync-group": DenyCase(14, group_only, 30),
    "describe-groups": DenyCase(15, describe_groups, 30, per_group=2),
    "list-groups": DenyCase(16, nothing, 31),
    "api-versions": DenyCase(18, nothing, 31),
    "create-topics": DenyCase(19, create_topics, 29, per_topic=True),
    "delete-topics": DenyCase(20, delete_topics, 29, per_topic=True),
    "init-producer-id": DenyCase(22, init_producer_id, 31),
    "init-producer-id-transactional": DenyCase(22, init_transactional_producer_id, 53),
    "sasl-handshake": DenyCase(17, lambda c, v: {"mechanism": "PLAIN"}, 31),
    "end-txn": DenyCase(26, lambda c, v: {"transactional_id": "tx-1"}, 53),
    "describe-cluster": DenyCase(60, nothing, 31),
    "delete-records": DenyCase(21, delete_records, 29, per_partition=True),
    "offset-for-leader-epoch": DenyCase(23, offset_for_leader_epoch, 29, per_partition=True),
    "add-partitions-to-txn": DenyCase(24, add_partitions_to_txn, 29, per_partition=True),
    "txn-offset-commit": DenyCase(28, txn_offset_commit, 29, per_partition=True),
    "create-partitions": DenyCase(37, create_partitions, 29, per_topic=True),
    "describe-producers": DenyCase(61, describe_producers, 29, per_partition=True),
    "describe-topic-partitions": DenyCase(75, describe_topic_partitions, 29, per_topic=True),
    "describe-configs": DenyCase(32, config_resources(2), 29, per_topic=True),
    "describe-broker-configs": DenyCase(32, config_resources(4), 31),
    "alter-configs": DenyCase(33, config_resources(2), 29, per_topic=True),
    "incremental-alter-configs": DenyCase(44, config_resources(2), 29, per_topic=True),
    "describe-acls": DenyCase(29, lambda c, v: acl_filter(), 29),
    "create-acls": DenyCase(30, create_acls, 29, per_topic=True),
    "delete-acls": DenyCase(31, delete_acls, 29, per_topic=True),
}


def all_versions() -> Iterator[Any]:
    for name, case in CASES.items():
        api = kafka_api(case.api_key)
        assert api is not None
        for version in range(api.max_version + 1):
            yield pytest.param(case, version, id=f"{name}-v{version}")


def encode_request(case: DenyCase, version: int, correlation_id: int = 4242) -> bytes:
    api = kafka_api(case.api_key)
    assert api is not None
    message = api.request_class[version](**case.build(api.request_class, version))
    message.with_header(correlation_id=correlation_id, client_id="deny-test")
    return bytes(message.encode(header=True, framed=True))


def parsed(frame: bytes) -> KafkaRequest:
    parser = KafkaRequestParser(topic_ids=registry())
    parser.receive_data(frame)
    (request,) = parser.events()
    return request


def error_codes(node: Any, path: str = "") -> Iterator[tuple[str, int]]:
    """Every error code in a decoded response, with where it sits."""
    for name in node.fields:
        if node.version is not None and not node.fields[name].for_version_q(node.version):
            continue
        value = getattr(node, name)
        if name.endswith("error_code") and isinstance(value, int):
            yield f"{path}{name}", value
        elif isinstance(value, list) and value and hasattr(value[0], "fields"):
            for index, element in enumerate(value):
                element._version = node.version
                yield from error_codes(element, f"{path}{name}[{index}].")


def decode_answer(request: KafkaRequest, answer: bytes) -> Any:
    api = kafka_api(request.api_key)
    assert api is not None
    assert struct.unpack(">i", answer[:4])[0] == len(answer) - 4
    decoded = api.response_class.decode(
        answer, version=request.api_version, header=True, framed=True
    )
    assert decoded.header.correlation_id == request.correlation_id
    return decoded


@pytest.mark.parametrize(("case", "version"), list(all_versions()))
def test_deny_answers_decode_with_kafka_python_and_carry_the_error_everywhere(
    case: DenyCase, version: int
) -> None:
    request = parsed(encode_request(case, version))
    assert kafka_deny_encodable(request)
    answer = kafka_deny_response(request, CLUSTER)
    assert answer is not None
    decoded = decode_answer(request, answer)
    codes = [code for where, code in error_codes(decoded) if code]
    assert codes and set(codes) == {case.expected}, list(error_codes(decoded))
    if case.per_partition:
        named = sum(len(PARTITIONS[t]) for t in TOPICS) if case.api_key != 0 else len(TOPICS)
        assert len(codes) == named
    if case.per_topic:
        assert len(codes) == len(TOPICS)
    if case.per_group:
        assert len(codes) == case.per_group
    if case.api_key == 1:
        records = [p.records for t in decoded.responses for p in t.partitions]
        assert records and all(r == b"" for r in records)
    if case.api_key == 3:
        assert [b.port for b in decoded.brokers] == [9092]
        assert all(t.partitions == [] for t in decoded.topics)


@pytest.mark.parametrize("version", [3, 9, 13])
def test_topic_ids_are_echoed_where_the_version_names_topics_by_id(version: int) -> None:
    request = parsed(encode_request(CASES["produce"], version))
    decoded = decode_answer(request, kafka_deny_response(request) or b"")
    if version >= 13:
        assert {t.topic_id for t in decoded.responses} == set(TOPICS.values())
    else:
        assert {t.name for t in decoded.responses} == set(TOPICS)


def test_fetch_by_unresolved_topic_ids_is_denied_with_the_ids() -> None:
    frame = encode_request(CASES["fetch"], 16)
    parser = KafkaRequestParser(topic_ids=TopicIdRegistry())
    parser.receive_data(frame)
    (request,) = parser.events()
    assert request.unresolved_topic_ids and not request.topics
    decoded = decode_answer(request, kafka_deny_response(request) or b"")
    assert {t.topic_id for t in decoded.responses} == set(TOPICS.values())


def test_produce_with_acks_0_gets_no_answer() -> None:
    api = kafka_api(0)
    assert api is not None
    values = produce(api.request_class, 9) | {"acks": 0}
    message = api.request_class[9](**values)
    message.with_header(correlation_id=1, client_id="x")
    request = parsed(bytes(message.encode(header=True, framed=True)))
    assert kafka_deny_encodable(request)
    assert kafka_deny_response(request) is None


def test_a_denied_metadata_request_without_known_brokers_lists_none() -> None:
    request = parsed(encode_request(CASES["metadata"], 12))
    decoded = decode_answer(request, kafka_deny_response(request) or b"")
    assert decoded.brokers == [] and len(decoded.topics) == 2


def test_a_denied_all_topics_metadata_lists_no_topic() -> None:
    api = kafka_api(3)
    assert api is not None
    message = api.request_class[12](topics=None, allow_auto_topic_creation=False)
    message.with_header(correlation_id=3, client_id="x")
    request = parsed(bytes(message.encode(header=True, framed=True)))
    assert request.all_topics
    decoded = decode_answer(request, kafka_deny_response(request, CLUSTER) or b"")
    assert decoded.topics == [] and decoded.brokers


def test_offset_fetch_without_topics_is_a_group_error() -> None:
    api = kafka_api(9)
    assert api is not None
    message = api.request_class[6](group_id=GROUP, topics=None)
    message.with_header(correlation_id=3, client_id="x")
    request = parsed(bytes(message.encode(header=True, framed=True)))
    decoded = decode_answer(request, kafka_deny_response(request) or b"")
    assert decoded.error_code == 30 and decoded.topics == []


def test_find_coordinator_for_a_transaction_is_a_transactional_id_error() -> None:
    api = kafka_api(10)
    assert api is not None
    for version in (1, 4):
        message = api.request_class[version](key="tx", key_type=1, coordinator_keys=["tx"])
        message.with_header(correlation_id=3, client_id="x")
        request = parsed(bytes(message.encode(header=True, framed=True)))
        decoded = decode_answer(request, kafka_deny_response(request) or b"")
        codes = {code for _, code in error_codes(decoded) if code}
        assert codes == {53}


def test_an_api_versions_answer_is_v0_whatever_the_request_version() -> None:
    """Clients decode an ApiVersions error answer as v0 (as Kafka encodes it), header v0."""
    request = parsed(encode_request(CASES["api-versions"], 3))
    answer = kafka_deny_response(request) or b""
    assert answer[8:10] == b"\x00\x1f"  # right after the v0 header: error code 31
    assert len(answer) == 4 + 4 + 2 + 4  # v0 body: error code and an empty api key list


# ---- answers kafka-python cannot build ----------------------------------------------------


def header_only(api_key: int, version: int) -> KafkaRequest:
    payload = struct.pack(">hhih", api_key, version, 77, 7) + b"rdkafka" + b"\x00" + bytes(17)
    return parsed(struct.pack(">i", len(payload)) + payload)


def read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def read_get_telemetry_subscriptions_v0(frame: bytes) -> dict[str, Any]:
    """KIP-714's GetTelemetrySubscriptionsResponse v0, read independently of the encoder."""
    size, correlation_id = struct.unpack_from(">ii", frame)
    assert size == len(frame) - 4
    pos = 8
    assert frame[pos] == 0  # response header v1: no tagged fields
    pos += 1
    throttle, error = struct.unpack_from(">ih", frame, pos)
    pos += 6
    instance_id = uuid.UUID(bytes=frame[pos : pos + 16])
    pos += 16
    (subscription_id,) = struct.unpack_from(">i", frame, pos)
    count, pos = read_uvarint(frame, pos + 4)
    compression = list(frame[pos : pos + count - 1])
    pos += count - 1
    push_interval, max_bytes, delta = struct.unpack_from(">ii?", frame, pos)
    pos += 9
    count, pos = read_uvarint(frame, pos)
    metrics = []
    for _ in range(count - 1):
        length, pos = read_uvarint(frame, pos)
        metrics.append(frame[pos : pos + length - 1].decode())
        pos += length - 1
    tags, pos = read_uvarint(frame, pos)
    assert tags == 0 and pos == len(frame)
    return {
        "correlation_id": correlation_id,
        "error_code": error,
        "throttle": throttle,
        "client_instance_id": instance_id,
        "subscription_id": subscription_id,
        "compression": compression,
        "push_interval": push_interval,
        "max_bytes": max_bytes,
        "delta": delta,
        "metrics": metrics,
    }


def test_telemetry_answers_have_the_layout_tansu_uses() -> None:
    from tests.unit.parsers.kafka_fixtures import scenario_connections

    conn = next(c for c in scenario_connections("librdkafka-producer") if c.number == 1)
    index = next(i for i, f in enumerate(conn.requests) if f.api_key == 71)
    tansu = read_get_telemetry_subscriptions_v0(conn.response_frame(conn.responses[index]))
    assert tansu["error_code"] == 0
    request = header_only(71, 0)
    assert kafka_deny_encodable(request)
    ours = read_get_telemetry_subscriptions_v0(kafka_deny_response(request) or b"")
    assert ours["error_code"] == 31 and ours["correlation_id"] == 77
    push = kafka_deny_response(header_only(72, 0)) or b""
    assert push == struct.pack(">iibihb", 12, 77, 0, 0, 31, 0)[:4] + push[4:]
    assert struct.unpack_from(">ibih", push, 4) == (77, 0, 0, 31)


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(header_only(68, 0), id="no-class"),
        pytest.param(header_only(71, 1), id="telemetry-v1"),
        pytest.param(header_only(18, 9), id="api-versions-too-new"),
    ],
)
def test_requests_without_a_possible_answer_raise_the_documented_error(
    request_: KafkaRequest,
) -> None:
    assert not kafka_deny_encodable(request_)
    with pytest.raises(KafkaDenyUnencodableError):
        kafka_deny_response(request_)


def test_topic_bearing_apis_without_an_encoder_are_refused_not_half_answered() -> None:
    api = kafka_api(46)  # ListPartitionReassignments: names topics, no dedicated encoder
    assert api is not None
    topic = entries(api.request_class, "topics")
    message = api.request_class[0](
        topics=[topic(name="orders", partition_indexes=[0])], timeout_ms=1
    )
    message.with_header(correlation_id=3, client_id="x")
    request = parsed(bytes(message.encode(header=True, framed=True)))
    assert request.topics == ("orders",)
    assert not kafka_deny_encodable(request)
    with pytest.raises(KafkaDenyUnencodableError):
        kafka_deny_response(request)


# ---- end to end: real clients, tansu, and a relay that denies -------------------------------


@dataclass
class _Pending:
    request: KafkaRequest
    answer: bytes | None = None


@dataclass
class DenyingRelay:
    """127.0.0.1 relay to the broker that answers the requests `deny` picks with
    `kafka_deny_response`, keeping answers in request order (as the proxy engine must)."""

    broker: TansuBroker
    deny: Callable[[KafkaRequest], bool]
    port: int = 0
    registry: TopicIdRegistry = field(default_factory=TopicIdRegistry)
    denied: list[KafkaRequest] = field(default_factory=list)
    connections: int = 0
    _threads: list[threading.Thread] = field(default_factory=list)
    _sockets: list[socket.socket] = field(default_factory=list)

    def start(self) -> None:
        self._listener = socket.create_server((LOOPBACK, self.port))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._spawn(self._accept)

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.broker.address)
            self._sockets += [client, upstream]
            self.connections += 1
            lock = threading.Lock()
            queue: deque[_Pending] = deque()
            responses = KafkaResponseParser(topic_ids=self.registry)
            self._spawn(self._from_client, client, upstream, lock, queue, responses)
            self._spawn(self._from_broker, client, upstream, lock, queue, responses)

    @staticmethod
    def _flush(client: socket.socket, queue: deque[_Pending]) -> None:
        while queue and queue[0].answer is not None:
            client.sendall(queue.popleft().answer or b"")

    def _from_client(
        self,
        client: socket.socket,
        upstream: socket.socket,
        lock: threading.Lock,
        queue: deque[_Pending],
        responses: KafkaResponseParser,
    ) -> None:
        requests = KafkaRequestParser(topic_ids=self.registry)
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                requests.receive_data(data)
                for request in requests.events():
                    with lock:
                        if self.deny(request):
                            self.denied.append(request)
                            answer = kafka_deny_response(request, self.registry.cluster)
                            if answer is not None:
                                queue.append(_Pending(request, answer))
                                self._flush(client, queue)
                            continue
                        responses.expect(request)
                        if request.expects_response:
                            queue.append(_Pending(request))
                        upstream.sendall(request.raw)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _from_broker(
        self,
        client: socket.socket,
        upstream: socket.socket,
        lock: threading.Lock,
        queue: deque[_Pending],
        responses: KafkaResponseParser,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                with lock:
                    responses.receive_data(data)
                    for response in responses.events():
                        if response.unsolicited:
                            continue  # tansu answers acks=0; the client expects nothing
                        pending = next(p for p in queue if p.answer is None)
                        assert pending.request is response.request
                        pending.answer = response.raw
                    self._flush(client, queue)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def relay_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def broker(relay_port: int) -> Iterator[TansuBroker]:
    with running_tansu(advertised_port=relay_port) as running:
        yield running


@contextlib.contextmanager
def denying_relay(
    broker: TansuBroker, port: int, deny: Callable[[KafkaRequest], bool]
) -> Iterator[DenyingRelay]:
    relay = DenyingRelay(broker, deny, port)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


@pytest.mark.e2e
def test_tansu_helper_runs_a_broker_and_stops_it_by_pid() -> None:
    with running_tansu() as running:
        with socket.create_connection(running.address, timeout=2):
            pass
        pid = running.pid
    with pytest.raises(ProcessLookupError):
        _signal_zero(pid)


def _signal_zero(pid: int) -> None:
    import os

    os.kill(pid, 0)


@pytest.mark.e2e
def test_kafka_python_producer_sees_topic_authorization_failed_at_once(
    broker: TansuBroker, relay_port: int
) -> None:
    from kafka import KafkaProducer
    from kafka.errors import TopicAuthorizationFailedError

    with denying_relay(broker, relay_port, lambda r: r.api_key == 0) as relay:
        producer = KafkaProducer(
            bootstrap_servers=f"{LOOPBACK}:{relay_port}", retries=5, request_timeout_ms=10000
        )
        try:
            started = time.monotonic()
            with pytest.raises(TopicAuthorizationFailedError):
                producer.send("denied-topic", b"secret").get(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            producer.close(timeout=5)
    assert elapsed < 3
    produce = [r for r in relay.denied if r.api_key == 0]
    assert len(produce) == 1  # not retried: authorization errors are final
    assert produce[0].topics == ("denied-topic",)


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.e2e
def test_librdkafka_reads_the_denied_telemetry_answer_and_keeps_producing(
    broker: TansuBroker, relay_port: int
) -> None:
    from confluent_kafka import Producer

    captured = _Captured()
    logger = logging.getLogger("garrison.tests.librdkafka")
    logger.addHandler(captured)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    errors: list[str] = []
    try:
        with denying_relay(broker, relay_port, lambda r: r.api_key in (71, 72)) as relay:
            producer = Producer(
                {
                    "bootstrap.servers": f"{LOOPBACK}:{relay_port}",
                    "error_cb": lambda err: errors.append(str(err)),
                    "logger": logger,
                    "debug": "telemetry",
                }
            )
            delivered: list[Any] = []
            producer.produce("telemetry-topic", b"x", on_delivery=lambda e, m: delivered.append(e))
            assert producer.flush(15) == 0
            deadline = time.monotonic() + 5
            handled = "GetTelemetrySubscriptionsRequest failed: Broker: Cluster authorization"
            while time.monotonic() < deadline and not any(handled in m for m in captured.messages):
                producer.poll(0.05)
    finally:
        logger.removeHandler(captured)
    assert delivered == [None]
    assert any(r.api_key == 71 for r in relay.denied)
    # librdkafka decoded our error code and schedules its next attempt, no reconnect.
    assert any(handled in m for m in captured.messages), captured.messages
    assert errors == []
    assert relay.connections <= 2
