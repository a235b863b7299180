"""Kafka end to end, hostile requests: hand-made frames through `garrison proxy --protocol
kafka` to a real broker (tansu), each checked by what the client gets back and what the
access log says. A topic the rules deny must never reach the broker, whatever API names it.

The rule under test is the broadest topic-bound one, `{topic: allowed}`: any API key, topic
`allowed` only. Topic `secret` exists on the broker.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from garrison.parsers.kafka import KafkaResponseParser, parse_request_frame
from garrison.parsers.kafka_apis import kafka_api
from tests.e2e.conftest import ProxyHandle, start_proxy, wait_until
from tests.kafka_broker import TansuBroker, running_tansu

pytestmark = pytest.mark.e2e

ALLOWED, SECRET = "allowed", "secret"
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-hunt}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {topic: allowed}
"""
TOPIC_AUTHORIZATION_FAILED = 29
CLUSTER_AUTHORIZATION_FAILED = 31


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    from kafka.admin import KafkaAdminClient, NewTopic

    with running_tansu() as running:
        admin = KafkaAdminClient(bootstrap_servers=running.bootstrap)
        admin.create_topics([NewTopic(ALLOWED, 1, 1), NewTopic(SECRET, 1, 1)])
        admin.close()
        yield running


@pytest.fixture(scope="module")
def proxy(broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    log_dir = tmp_path_factory.mktemp("kafka-hunt")
    policy = log_dir / "policy.yaml"
    policy.write_text(POLICY)
    handle = start_proxy(
        log_dir,
        protocol="kafka",
        policy_files=[policy],
        dst_labels="app=kafka",
        upstream=broker.address,
        peers=["0.0.0.0/0=app=client"],
        dport=9092,
        verbose=False,
        name="hunt",
    )
    try:
        yield handle
    finally:
        handle.stop()


def access_log(proxy: ProxyHandle) -> list[dict[str, Any]]:
    path: Path = proxy.access_log
    if not path.exists():
        return []
    # only whole lines: the proxy may be writing the last one while the test reads
    whole = path.read_text().rpartition("\n")[0]
    return [json.loads(line) for line in whole.splitlines() if line.strip()]


def records_of(
    proxy: ProxyHandle, correlation_id: int, count: int = 2
) -> list[dict[str, Any]]:
    """The access-log lines of one request (its request and answer records)."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        nonlocal found
        found = [
            line
            for line in access_log(proxy)
            if line.get("l7", {}).get("kafka", {}).get("correlation_id") == correlation_id
        ]
        return len(found) >= count

    wait_until(check, f"{count} access-log line(s) of request {correlation_id}", 5.0)
    return found


def request(api_key: int, version: int, correlation_id: int, **fields: Any) -> bytes:
    api = kafka_api(api_key)
    assert api is not None
    message = api.request_class[version](**fields)
    message.with_header(correlation_id=correlation_id, client_id="hunt")
    return bytes(message.encode(header=True, framed=True))


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def exchange(proxy: ProxyHandle, frame: bytes) -> Any:
    """Send one request frame on a new connection; the decoded answer."""
    return exchange_at(proxy.address, frame)


def exchange_at(address: tuple[str, int], frame: bytes) -> Any:
    sent = parse_request_frame(frame)
    with socket.create_connection(address, timeout=5.0) as sock:
        sock.sendall(frame)
        size = _read_exactly(sock, 4)
        answer = size + _read_exactly(sock, int.from_bytes(size, "big"))
    parser = KafkaResponseParser()
    parser.expect(sent)
    parser.receive_data(answer)
    event = parser.next_event()
    assert event is not None
    return event.decoded


def only(lines: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [line for line in lines if line.get("l7", {}).get("type") == kind]
    assert len(matching) == 1, lines
    return matching[0]


# ---- ACL APIs name topics as resources -------------------------------------------------------

ACL_TOPIC, ACL_GROUP, ACL_ANY = 2, 3, 1
LITERAL, PREFIXED = 3, 4


def create_acls(correlation_id: int, *creations: tuple[int, str, int]) -> bytes:
    api = kafka_api(30)
    assert api is not None
    creation = api.request_class.fields["creations"].data_class
    return request(
        30,
        3,
        correlation_id,
        creations=[
            creation(
                resource_type=resource_type,
                resource_name=name,
                resource_pattern_type=pattern,
                principal="User:intruder",
                host="*",
                operation=3,  # READ
                permission_type=3,  # ALLOW
            )
            for resource_type, name, pattern in creations
        ],
    )


@pytest.mark.parametrize(
    ("correlation_id", "creations"),
    [
        (3001, [(ACL_TOPIC, SECRET, LITERAL)]),
        (3002, [(ACL_TOPIC, ALLOWED, LITERAL), (ACL_TOPIC, SECRET, LITERAL)]),
        (3003, [(ACL_TOPIC, "sec", PREFIXED)]),  # every topic starting with "sec"
        (3004, [(ACL_TOPIC, "*", LITERAL)]),  # every topic
    ],
    ids=["secret", "allowed-and-secret", "prefixed", "wildcard"],
)
def test_create_acls_on_a_denied_topic_is_answered_29_and_never_reaches_the_broker(
    proxy: ProxyHandle, correlation_id: int, creations: list[tuple[int, str, int]]
) -> None:
    answer = exchange(proxy, create_acls(correlation_id, *creations))

    assert [r.error_code for r in answer.results] == [TOPIC_AUTHORIZATION_FAILED] * len(creations)
    lines = records_of(proxy, correlation_id)
    assert [line["verdict"] for line in lines] == ["DROPPED", "DROPPED"]
    assert only(lines, "RESPONSE")["l7"]["kafka"]["error_code"] == TOPIC_AUTHORIZATION_FAILED


def test_describe_and_delete_acls_of_a_denied_or_any_topic_are_answered_29(
    proxy: ProxyHandle,
) -> None:
    describe = request(
        29, 3, 3101, resource_type_filter=ACL_TOPIC, resource_name_filter=SECRET,
        pattern_type_filter=LITERAL, principal_filter=None, host_filter=None, operation=1,
        permission_type=1,
    )
    assert exchange(proxy, describe).error_code == TOPIC_AUTHORIZATION_FAILED
    every = request(
        29, 3, 3102, resource_type_filter=ACL_ANY, resource_name_filter=None,
        pattern_type_filter=1, principal_filter=None, host_filter=None, operation=1,
        permission_type=1,
    )
    assert exchange(proxy, every).error_code == TOPIC_AUTHORIZATION_FAILED
    api = kafka_api(31)
    assert api is not None
    acl_filter = api.request_class.fields["filters"].data_class
    delete = request(
        31, 3, 3103,
        filters=[
            acl_filter(
                resource_type_filter=ACL_TOPIC, resource_name_filter=SECRET,
                pattern_type_filter=LITERAL, principal_filter=None, host_filter=None,
                operation=1, permission_type=1,
            )
        ],
    )
    answer = exchange(proxy, delete)
    assert [r.error_code for r in answer.filter_results] == [TOPIC_AUTHORIZATION_FAILED]
    for correlation_id in (3101, 3102, 3103):
        lines = records_of(proxy, correlation_id)
        assert [line["verdict"] for line in lines] == ["DROPPED", "DROPPED"]


# ---- every topic API a client may name a denied topic with ------------------------------------

# API keys whose denial is answered (garrison.proxy.deny), with the array naming the topics
# and the versions that name them by name in it.
TOPIC_APIS = {
    0: ("topic_data", 12), 1: ("topics", 12), 2: ("topics", None), 8: ("topics", 9),
    9: ("topics", 7), 19: ("topics", None), 21: ("topics", None), 23: ("topics", None),
    24: ("v3_and_below_topics", 3), 28: ("topics", None), 37: ("topics", None),
    61: ("topics", None), 75: ("topics", None),
}
_NAMES = ("name", "topic", "topic_name")


def _entry(field: Any, version: int, topic: str) -> Any:
    """One entry of a topic array: the topic's name, partition 0 where the schema has one."""
    values: dict[str, Any] = {}
    for name, sub in field.fields.items():
        if not sub.for_version_q(version):
            continue
        if name in _NAMES:
            values[name] = topic
        elif name in ("partitions", "partition_indexes", "partition_data"):
            if sub.is_struct_array():
                values[name] = [sub.data_class()]  # kafka-python's defaults: partition 0
            else:
                values[name] = [0]
        elif sub.is_struct_array():
            values[name] = []
    return field.data_class(**values)


def naming(api_key: int, version: int, correlation_id: int, topic: str) -> bytes:
    api = kafka_api(api_key)
    assert api is not None
    cls = api.request_class
    array, _ = TOPIC_APIS[api_key]
    fields: dict[str, Any] = {array: [_entry(cls.fields[array], version, topic)]}
    if api_key == 0:
        fields["acks"] = -1
    for name, field in cls.fields.items():
        if name not in fields and field.for_version_q(version) and field.is_struct_array():
            fields[name] = []
    return request(api_key, version, correlation_id, **fields)


def error_codes(node: Any) -> list[int]:
    """Every error code of a decoded answer (`error_code`, `partition_error_code`, ...)."""
    found = []
    for name in node.fields:
        value = getattr(node, name)
        if name.endswith("error_code") and isinstance(value, int):
            found.append(value)
        elif isinstance(value, list):
            for element in value:
                if hasattr(element, "fields"):
                    found += error_codes(element)
    return found


def _versions() -> list[tuple[int, int]]:
    found = []
    for api_key, (_, top) in TOPIC_APIS.items():
        api = kafka_api(api_key)
        assert api is not None
        found += [(api_key, v) for v in range((top if top is not None else api.max_version) + 1)]
    return found


@pytest.mark.parametrize(("api_key", "version"), _versions(), ids=lambda v: str(v))
def test_every_topic_api_naming_a_denied_topic_is_answered_29(
    proxy: ProxyHandle, api_key: int, version: int
) -> None:
    correlation_id = 10_000 + api_key * 100 + version
    frame = naming(api_key, version, correlation_id, SECRET)
    assert parse_request_frame(frame).topics == (SECRET,)

    answer = exchange(proxy, frame)

    assert set(error_codes(answer)) - {0} == {TOPIC_AUTHORIZATION_FAILED}
    lines = records_of(proxy, correlation_id)
    assert [line["verdict"] for line in lines] == ["DROPPED", "DROPPED"]
    assert only(lines, "REQUEST")["l7"]["kafka"]["topic"] == SECRET


def test_librdkafka_admin_describing_a_denied_topics_configs_gets_topic_authorization_failed(
    proxy: ProxyHandle,
) -> None:
    """It used to see the connection closed, and retried until its timeout."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": f"{proxy.address[0]}:{proxy.address[1]}"})

    def describe(topic: str) -> Any:
        futures = admin.describe_configs([ConfigResource("topic", topic)], request_timeout=10)
        [future] = futures.values()
        return future.result(timeout=10)

    assert isinstance(describe(ALLOWED), dict)
    with pytest.raises(KafkaException) as denied:
        describe(SECRET)
    assert denied.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


# ---- what one request may cost ----------------------------------------------------------------


def test_a_request_of_a_million_tiny_entries_closes_its_connection_and_stalls_no_one(
    proxy: ProxyHandle,
) -> None:
    """A 3.8 MiB Produce naming a topic a million times (4 bytes an entry) kept the proxy's
    event loop busy for seconds (a 100 MiB one for minutes): every other client of that
    worker waited. It is now refused, from its element count, before it is decoded."""
    from tests.unit.parsers.test_kafka_hostile import tiny_topics_produce

    with socket.create_connection(proxy.address, timeout=10.0) as sock:
        sock.sendall(tiny_topics_produce(1_000_000, correlation_id=5001))
        assert sock.recv(4) == b""  # closed, nothing answered

    def refused() -> bool:
        return any(
            line["verdict"] == "ERROR" and "more than 250000 array elements" in line["error"]
            and line["drop_reason_desc"] == "PARSE_ERROR"
            for line in access_log(proxy)
        )

    wait_until(refused, "an ERROR record naming the element limit", 5.0)
    # the proxy is as it was
    versions = request(18, 3, 5002, client_software_name="hunt", client_software_version="1")
    assert exchange(proxy, versions).error_code == 0


# ---- the broker address clients are told -----------------------------------------------------


def test_a_proxy_listening_on_every_address_advertises_the_one_each_client_reached(
    broker: TansuBroker, tmp_path: Path
) -> None:
    """`--listen 0.0.0.0:PORT` used to answer Metadata with broker 0.0.0.0:PORT: a client on
    another host, told to connect there, connected to its own host and never produced."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    handle = start_proxy(
        tmp_path, protocol="kafka", policy_files=[policy], dst_labels="app=kafka",
        upstream=broker.address, peers=["0.0.0.0/0=app=client"], dport=9092,
        listen_host="0.0.0.0", verbose=False, name="wildcard",
    )
    try:
        port = handle.address[1]
        api = kafka_api(3)
        assert api is not None
        topic = api.request_class.fields["topics"].data_class
        for host in ("127.0.0.1", "127.0.0.2"):
            metadata = request(
                3, 12, 4001, topics=[topic(name=ALLOWED)], allow_auto_topic_creation=False,
                include_topic_authorized_operations=False,
            )
            answer = exchange_at((host, port), metadata)
            assert [(b.host, b.port) for b in answer.brokers] == [(host, port)]
    finally:
        handle.stop()
