"""L7 deny rules and header value regex (garrison extensions) through the real standalone
proxy: HTTP (the deathstar app, raw clients bound to the ships' addresses), gRPC (the door
manager, grpcio) and Kafka (a tansu broker, librdkafka). Each denial is what the client sees
(403, PERMISSION_DENIED, TOPIC_AUTHORIZATION_FAILED) and an access-log record naming the deny
rule in `ingress_denied_by`; what the deny rules do not match passes.

The same deny rules in an audited policy (`garrison.io/audit: "true"`) are tried, not
enforced: the request passes and its record says AUDIT, naming the rule that would have denied
it (here too, so the broker and the door manager are started once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from garrison.flows.record import FlowRecord, L7FlowType, Verdict
from tests.e2e.conftest import (
    DEATHSTAR_LABELS,
    REPO,
    TIEFIGHTER,
    TIEFIGHTER_PEER,
    XWING,
    XWING_PEER,
    Address,
    ProxyHandle,
    ProxyRunner,
    exchange,
    request,
    start_proxy,
)
from tests.e2e.test_proxy_grpc import channel, door_manager, doors, unary
from tests.e2e.test_proxy_kafka import (
    ANNOUNCE,
    PLANS,
    AccessLog,
    broker,
    is_kafka,
    kafka,
    rdkafka_produce,
)
from tests.kafka_broker import TansuBroker

pytestmark = pytest.mark.e2e

__all__ = ["broker", "door_manager"]  # module fixtures shared with the other e2e modules

HTTP_POLICY = REPO / "examples" / "extensions" / "deathstar-l7-deny.yaml"

GRPC_POLICY = """
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata: {name: doors-no-codes}
spec:
  endpointSelector: {matchLabels: {app: door-manager}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: admin}}]
    toPorts: [{ports: [{port: "50051", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: admin}}]
    toPorts:
    - ports: [{port: "50051", protocol: TCP}]
      rules:
        grpc: [{service: doors.DoorManager, method: SetAccessCode}]
"""

KAFKA_POLICY = f"""
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata: {{name: no-plans}}
spec:
  endpointSelector: {{matchLabels: {{app: kafka}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: empire-hq}}}}]
    toPorts: [{{ports: [{{port: "9092", protocol: TCP}}]}}]
  ingressDeny:
  - fromEndpoints: [{{matchLabels: {{app: empire-hq}}}}]
    toPorts:
    - ports: [{{port: "9092", protocol: TCP}}]
      rules:
        kafka: [{{role: produce, topic: {PLANS}}}]
"""


def _http_record(ship: str, method: str, path: str) -> Callable[[FlowRecord], bool]:
    def check(r: FlowRecord) -> bool:
        return (
            r.source.ip == ship
            and r.l7 is not None
            and r.l7.type is L7FlowType.REQUEST
            and r.l7.http is not None
            and r.l7.http.method == method
            and r.l7.http.url.endswith(path)
        )
    return check


def audited(text: str) -> str:
    """The same policy, audited."""
    head, _, rest = text.partition("metadata: {name: ")
    name, _, tail = rest.partition("}")
    return f'{head}metadata: {{name: {name}, annotations: {{garrison.io/audit: "true"}}}}{tail}'


HTTP_IN_FORCE = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: in-force}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
HTTP_CANDIDATE = """
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata: {name: candidate}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: alliance}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: PUT, path: /v1/exhaust-port}]}
"""


def test_http_audited_policy_lets_its_denials_through_as_audit(
    proxy_runner: ProxyRunner, deathstar: Address, tmp_path: Path
) -> None:
    policy = tmp_path / "audit.yaml"
    policy.write_text(HTTP_IN_FORCE + "---" + audited(HTTP_CANDIDATE))
    proxy = proxy_runner(
        protocol="http", policy_files=[policy], dst_labels=DEATHSTAR_LABELS,
        peers=[TIEFIGHTER_PEER, XWING_PEER], upstream=deathstar, dport=80,
    )
    tie = exchange(proxy.address, TIEFIGHTER, request("PUT", "/v1/exhaust-port"), ["PUT"])
    assert [(a.status, a.body) for a in tie] == [(503, b"Panic: deathstar exploded\n")]
    # the audited policy's allow of the alliance allows nothing
    assert exchange(proxy.address, XWING, request("GET", "/v1/"), ["GET"]) == []
    record = proxy.wait_record(_http_record(TIEFIGHTER, "PUT", "/v1/exhaust-port"))
    assert record.verdict is Verdict.AUDIT
    assert [p.name for p in record.ingress_denied_by] == ["candidate"]

    # alone, the audited policy would switch the deathstar to default-deny: the connection
    # is admitted and its L3/L4 decision recorded AUDIT
    alone = tmp_path / "alone.yaml"
    alone.write_text(audited(HTTP_CANDIDATE))
    proxy = proxy_runner(
        protocol="http", policy_files=[alone], dst_labels=DEATHSTAR_LABELS,
        peers=[TIEFIGHTER_PEER], upstream=deathstar, dport=80,
    )
    got = exchange(proxy.address, TIEFIGHTER, request("GET", "/v1/"), ["GET"])
    assert [a.status for a in got] == [200]
    l3 = proxy.wait_record(lambda r: r.l7 is None and r.source.ip == TIEFIGHTER)
    assert l3.verdict is Verdict.AUDIT


def test_http_deny_rule_wins_and_header_regex_decides(
    proxy_runner: ProxyRunner, deathstar: Address
) -> None:
    proxy = proxy_runner(
        protocol="http",
        policy_files=[HTTP_POLICY],
        dst_labels=DEATHSTAR_LABELS,
        peers=[TIEFIGHTER_PEER, XWING_PEER, "127.0.0.5/32=org=empire,class=shuttle"],
        upstream=deathstar,
        dport=80,
    )
    tie = exchange(
        proxy.address, TIEFIGHTER,
        request("PUT", "/v1/exhaust-port")
        + request("GET", "/v1/", headers={"X-Token": "tok-42"})
        + request("GET", "/v1/", headers={"X-Token": "tok-42x"}),
        ["PUT", "GET", "GET"],
    )
    assert [a.status for a in tie] == [403, 200, 403]
    assert tie[0].body == b"Access denied\r\n"
    # the same PUT from a shuttle: the deny rule names tiefighters only, the allow rule passes
    shuttle = exchange(proxy.address, "127.0.0.5", request("PUT", "/v1/exhaust-port"), ["PUT"])
    assert [a.status for a in shuttle] == [503]
    assert shuttle[0].body == b"Panic: deathstar exploded\n"
    xwing = exchange(proxy.address, XWING, request("GET", "/v1/"), ["GET"])
    assert xwing == []  # not an empire ship: refused at L3/L4

    denied = proxy.wait_record(_http_record(TIEFIGHTER, "PUT", "/v1/exhaust-port"))
    assert denied.verdict is Verdict.DROPPED
    assert [(p.kind, p.name) for p in denied.ingress_denied_by] == [
        ("CiliumNetworkPolicy", "deathstar-guard")
    ]
    forwarded = proxy.wait_record(_http_record("127.0.0.5", "PUT", "/v1/exhaust-port"))
    assert forwarded.verdict is Verdict.FORWARDED and forwarded.ingress_denied_by == ()


@pytest.fixture(scope="module")
def grpc_proxy(
    door_manager: Address, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyHandle]:
    log_dir = tmp_path_factory.mktemp("gd-grpc-deny")
    policy = log_dir / "doors-deny.yaml"
    policy.write_text(GRPC_POLICY)
    proxy = start_proxy(
        log_dir, protocol="grpc", policy_files=[policy], dst_labels="app=door-manager",
        upstream=door_manager, peers=["127.0.0.1/32=app=admin"], dport=50051,
    )
    try:
        yield proxy
    finally:
        proxy.stop()


def test_grpc_audited_deny_rule_is_recorded_audit(
    door_manager: Address, tmp_path: Path
) -> None:
    policy = tmp_path / "doors-audit.yaml"
    policy.write_text(audited_split(GRPC_POLICY, "doors-no-codes"))
    proxy = start_proxy(
        tmp_path, protocol="grpc", policy_files=[policy], dst_labels="app=door-manager",
        upstream=door_manager, peers=["127.0.0.1/32=app=admin"], dport=50051, name="gd-audit",
    )
    try:
        with channel(proxy) as ch:
            reply = unary(ch, "SetAccessCode", doors.message((1, "front"), (2, "1234")))
        assert reply is not None

        def set_code(r: FlowRecord) -> bool:
            return (
                r.l7 is not None and r.l7.type is L7FlowType.REQUEST and r.l7.grpc is not None
                and r.l7.grpc.method == "SetAccessCode"
            )

        record = proxy.wait_record(set_code)
        assert record.verdict is Verdict.AUDIT
        assert [p.name for p in record.ingress_denied_by] == ["doors-no-codes-audited"]
    finally:
        proxy.stop()


def audited_split(text: str, name: str) -> str:
    """`text`'s allow sections in force, its deny sections in an audited copy."""
    allow, _, deny = text.partition("  ingressDeny:")
    audit = allow.split("  ingress:")[0].replace(
        f"metadata: {{name: {name}}}", f"metadata: {{name: {name}-audited}}"
    ) + "  ingressDeny:" + deny
    return allow + "---" + audited(audit)


def test_grpc_deny_rule_wins_over_an_l4_allow(grpc_proxy: ProxyHandle) -> None:
    with channel(grpc_proxy) as ch:
        assert doors.decode(unary(ch, "GetName", doors.message((1, "front")))) == {
            1: b"door front"
        }
        with pytest.raises(grpc.RpcError) as caught:
            unary(ch, "SetAccessCode", doors.message((1, "front"), (2, "1234")))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED

    def set_code(r: FlowRecord) -> bool:
        return (
            r.l7 is not None and r.l7.type is L7FlowType.REQUEST and r.l7.grpc is not None
            and r.l7.grpc.method == "SetAccessCode"
        )

    denied = grpc_proxy.wait_record(set_code)
    assert denied.verdict is Verdict.DROPPED
    assert [p.name for p in denied.ingress_denied_by] == ["doors-no-codes"]


@pytest.fixture(scope="module")
def kafka_proxy(
    broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyHandle]:
    log_dir = tmp_path_factory.mktemp("gd-kafka-deny")
    policy = log_dir / "no-plans.yaml"
    policy.write_text(KAFKA_POLICY)
    proxy = start_proxy(
        log_dir, protocol="kafka", policy_files=[policy], dst_labels="app=kafka",
        upstream=broker.address, peers=["0.0.0.0/0=app=empire-hq"], dport=9092, verbose=False,
    )
    try:
        yield proxy
    finally:
        proxy.stop()


def test_kafka_audited_deny_rule_is_recorded_audit(broker: TansuBroker, tmp_path: Path) -> None:
    policy = tmp_path / "no-plans-audit.yaml"
    policy.write_text(audited_split(KAFKA_POLICY, "no-plans"))
    proxy = start_proxy(
        tmp_path, protocol="kafka", policy_files=[policy], dst_labels="app=kafka",
        upstream=broker.address, peers=["0.0.0.0/0=app=empire-hq"], dport=9092,
        verbose=False, name="gd-kafka-audit",
    )
    try:
        log = AccessLog(proxy)
        delivery, _ = rdkafka_produce(proxy, PLANS, [b"tried"])
        assert (delivery.errors, delivery.delivered) == ([], 1)
        (record, *_) = log.wait(is_kafka("REQUEST", "produce", "AUDIT", PLANS))
        assert [p["name"] for p in record["ingress_denied_by"]] == ["no-plans-audited"]
    finally:
        proxy.stop()


def test_kafka_deny_rule_wins_over_an_l4_allow(kafka_proxy: ProxyHandle) -> None:
    log = AccessLog(kafka_proxy)
    delivery, _ = rdkafka_produce(kafka_proxy, ANNOUNCE, [b"allowed"])
    assert (delivery.errors, delivery.delivered) == ([], 1)
    delivery, _ = rdkafka_produce(kafka_proxy, PLANS, [b"stolen"])
    assert (delivery.errors, delivery.delivered) == (["TOPIC_AUTHORIZATION_FAILED"], 0)
    (denied, *_) = log.wait(is_kafka("REQUEST", "metadata", "DROPPED", PLANS))
    assert [p["name"] for p in denied["ingress_denied_by"]] == ["no-plans"]
    produced = log.wait(is_kafka("REQUEST", "produce", "FORWARDED", ANNOUNCE))
    assert "ingress_denied_by" not in produced[0]



def test_kafka_python_keeps_producing_to_its_allowed_topic(kafka_proxy: ProxyHandle) -> None:
    """kafka-python asks Metadata for every topic it knows (or all of them): a topic-bound
    deny rule must not stop it producing to the topics it may use."""
    from tests.e2e.test_proxy_kafka import _kp_produce, bootstrap, in_child

    log = AccessLog(kafka_proxy)
    result = in_child(_kp_produce, "127.0.0.1", bootstrap(kafka_proxy), PLANS, [b"x"],
                      [b"y", b"z"])
    assert result["sent"] == 0 and result["error"] is not None
    assert (result["then_sent"], result.get("then_error")) == (2, None), result
    # whatever was denied (a Metadata request split per topic, the Produce), names the rule
    dropped = [line for line in log.lines()
               if line["verdict"] == "DROPPED" and kafka(line).get("topic") == PLANS]
    assert dropped
    for line in dropped:
        assert [p["name"] for p in line.get("ingress_denied_by", [])] == ["no-plans"], line


def test_an_all_topics_metadata_answer_hides_the_denied_topic(kafka_proxy: ProxyHandle) -> None:
    """A topic-bound deny rule does not deny an all-topics Metadata request (clients and admin
    tools list topics): the broker's answer is passed on without the denied topic."""
    from confluent_kafka.admin import AdminClient

    from tests.e2e.test_proxy_kafka import bootstrap

    admin = AdminClient({"bootstrap.servers": bootstrap(kafka_proxy)})
    listed = set(admin.list_topics(timeout=10).topics)
    assert ANNOUNCE in listed and PLANS not in listed, listed
