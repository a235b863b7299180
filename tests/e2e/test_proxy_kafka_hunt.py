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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_of(
    proxy: ProxyHandle, correlation_id: int, count: int = 2
) -> list[dict[str, Any]]:
    """The access-log lines of one request (request and answer, or an ERROR line)."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        nonlocal found
        found = [
            line
            for line in access_log(proxy)
            if line.get("l7", {}).get("kafka", {}).get("correlation_id") == correlation_id
            or line["verdict"] == "ERROR"
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
    sent = parse_request_frame(frame)
    with socket.create_connection(proxy.address, timeout=5.0) as sock:
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


