"""Policies in audit mode (`garrison.io/audit`, try before enforce) in the agent's datapath.

A policy marked for audit decides nothing: the other policies do, in the kernel as before.
What it would deny of what they allow passes and is recorded AUDIT naming its rule — the
kernel looks the connection up a second time in `gar_policy_audit` (the what-if state of the
identities the audited policy selects). Without the annotation the same policy drops; taking
the annotation away enforces it at once (an incremental change, the agent keeps running); an
audited allow never opens what the enforced policies deny; a restart keeps all of it; an
endpoint relabelled into its selection is audited too. At L7 the agent's proxy audits the
requests an audited policy's HTTP, gRPC or Kafka rules would deny (a real broker, tansu, and
kafka-python for Kafka), also where only that policy redirects.

Own names and addresses (ga-*, 198.18.66.0/24) and proxy ports, so that this module can run
beside other agent tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest

from garrison.flows.record import DropReasonDesc, FlowType, Verdict

from . import agent_harness as harness
from .agent_harness import (  # noqa: F401 (fixtures)
    AgentEndpoint,
    AgentProcess,
    echo_servers,
    fixture_clean,
    roundtrip,
)

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module", name="agent")
def fixture_agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "PREFIX", "ga-")
        mp.setattr(harness, "ADDRESS_BLOCK", IPv4Network("198.18.66.0/24"))
        mp.setattr(harness, "PROXY_PORTS", {"http": 15661, "grpc": 15662, "kafka": 15663})
        yield from harness.module_agent(request, tmp_path_factory.mktemp("agent"))


ENFORCED = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: in-force}
spec:
  endpointSelector: {matchLabels: {app: gasrv}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: gacli}}]
    toPorts: [{ports: [{port: "7000", protocol: TCP}]}]
"""

CANDIDATE = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: candidate
  {annotations}
spec:
  endpointSelector: {{matchLabels: {{app: gasrv}}}}
  ingressDeny:
  - fromEndpoints: [{{matchLabels: {{app: gacli}}}}]
    toPorts: [{{ports: [{{port: "7000", protocol: TCP}}]}}]
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: gabad}}}}]
"""
AUDITED = CANDIDATE.format(annotations='annotations: {garrison.io/audit: "true"}')
NOT_AUDITED = CANDIDATE.format(annotations="")

# selects an endpoint no other policy selects: its ingress would become default-deny
NEW_DEFAULT_DENY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: lockdown
  annotations: {garrison.io/audit: "true"}
spec:
  endpointSelector: {matchLabels: {app: gaopen}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: gabad}}]
"""


def passes(src: AgentEndpoint, dst: AgentEndpoint, port: int = 7000) -> bool:
    sock = src.connect(dst.ip, port, timeout=1.0)
    if sock is None:
        return False
    with sock:
        return roundtrip(sock)


def test_an_audited_deny_passes_recorded_audit_then_is_enforced(
    agent: AgentProcess, clean: None
) -> None:
    srv = agent.add_endpoint("srv", "app=gasrv", 10)
    cli = agent.add_endpoint("cli", "app=gacli", 11)
    bad = agent.add_endpoint("bad", "app=gabad", 12)
    agent.import_policy("in-force", ENFORCED)
    with echo_servers(srv, 7000):
        assert passes(cli, srv)
        assert not passes(bad, srv)  # enforced: only app=gacli

        agent.import_policy("candidate", AUDITED)
        got = agent.cli_json("endpoint", "get", srv.name)
        assert got["audit_policies"] == ["default/candidate"] and not got["audit"]
        status = agent.cli_json("status")
        assert status["audit_policies"] == 1
        assert status["endpoints_with_audit_policies"] == [srv.name]
        assert (f"Audit policies:  1 (garrison.io/audit: what they would deny is recorded "
                f"AUDIT; endpoints: {srv.name})") in agent.cli("status").stdout.splitlines()
        assert ("Audit policies: default/candidate (what they would deny is recorded AUDIT, "
                "not enforced; not in the table below)") in agent.cli(
                    "endpoint", "get", srv.name).stdout.splitlines()
        t0 = time.time_ns()
        assert passes(cli, srv)  # the audited ingressDeny would drop it: it passes
        rec = agent.wait_flow(lambda r: r.time >= t0 and r.source.ip == cli.ip
                              and r.type is FlowType.L3_L4 and r.verdict is Verdict.AUDIT)
        assert [(p.name, p.namespace) for p in rec.ingress_denied_by] == [
            ("candidate", "default")]
        assert rec.drop_reason_desc is DropReasonDesc.POLICY_DENY
        assert (rec.destination.ip, rec.destination.port) == (srv.ip, 7000)
        # an audited allow opens nothing: app=gabad stays dropped by the enforced policy
        assert not passes(bad, srv)
        dropped = agent.wait_flow(lambda r: r.time >= t0 and r.source.ip == bad.ip
                                  and r.type is FlowType.L3_L4)
        assert dropped.verdict is Verdict.DROPPED

        # a restart over the same pins and state: still audited, still passing
        assert agent.stop() == 0
        agent.start()
        t1 = time.time_ns()
        assert passes(cli, srv)
        agent.wait_flow(lambda r: r.time >= t1 and r.source.ip == cli.ip
                        and r.type is FlowType.L3_L4 and r.verdict is Verdict.AUDIT)
        assert not passes(bad, srv)

        # the annotation taken away: the same policy is enforced, the agent keeps running
        pid = agent.pid
        agent.import_policy("candidate", NOT_AUDITED)
        assert agent.pid == pid
        t2 = time.time_ns()
        assert not passes(cli, srv)
        rec = agent.wait_flow(lambda r: r.time >= t2 and r.source.ip == cli.ip
                              and r.type is FlowType.L3_L4)
        assert rec.verdict is Verdict.DROPPED
        assert agent.cli_json("endpoint", "get", srv.name)["audit_policies"] == []
        assert agent.cli_json("status")["endpoints_with_audit_policies"] == []
        assert "Audit policies" not in agent.cli("status").stdout

        # and audited again: passes again
        agent.import_policy("candidate", AUDITED)
        assert passes(cli, srv)


def test_the_same_policy_without_audit_drops(agent: AgentProcess, clean: None) -> None:
    srv = agent.add_endpoint("srv2", "app=gasrv", 20)
    cli = agent.add_endpoint("cli2", "app=gacli", 21)
    agent.import_policy("in-force", ENFORCED)
    agent.import_policy("candidate", NOT_AUDITED)
    with echo_servers(srv, 7000):
        t0 = time.time_ns()
        assert not passes(cli, srv)
        rec = agent.wait_flow(lambda r: r.time >= t0 and r.source.ip == cli.ip
                              and r.type is FlowType.L3_L4)
        assert rec.verdict is Verdict.DROPPED
        assert rec.drop_reason_desc is DropReasonDesc.POLICY_DENY


def test_an_audited_policy_that_would_switch_on_default_deny(
    agent: AgentProcess, clean: None
) -> None:
    """No enforced policy selects the endpoint (all traffic allowed); the audited one would
    make its ingress default-deny: connections pass, recorded AUDIT naming that policy; the
    endpoint's own audit mode is not involved. Deleting the policy stops the records."""
    srv = agent.add_endpoint("open", "app=gaopen", 30)
    cli = agent.add_endpoint("cli3", "app=gacli", 31)
    bad = agent.add_endpoint("bad3", "app=gabad", 32)
    agent.import_policy("lockdown", NEW_DEFAULT_DENY)
    with echo_servers(srv, 7000):
        t0 = time.time_ns()
        assert passes(cli, srv)
        rec = agent.wait_flow(lambda r: r.time >= t0 and r.source.ip == cli.ip
                              and r.type is FlowType.L3_L4 and r.verdict is Verdict.AUDIT)
        assert [p.name for p in rec.ingress_denied_by] == ["lockdown"]
        assert rec.drop_reason_desc is DropReasonDesc.POLICY_DENIED
        assert passes(bad, srv)  # the audited rule allows it: no AUDIT record for it
        time.sleep(0.5)
        assert not [r for r in agent.flows() if r.time >= t0 and r.source.ip == bad.ip
                    and r.verdict is Verdict.AUDIT]

        # an endpoint relabelled into the audited policy's selection gets its what-if state
        late = agent.add_endpoint("late", "app=gaother", 33)
        with echo_servers(late, 7000):
            t1 = time.time_ns()
            assert passes(cli, late)
            agent.cli_json("endpoint", "labels", late.name, "--labels", "app=gaopen")
            assert agent.cli_json("endpoint", "get", late.name)["audit_policies"] == [
                "default/lockdown"]
            assert passes(cli, late)
            rec = agent.wait_flow(lambda r: r.time >= t1 and r.destination.ip == late.ip
                                  and r.type is FlowType.L3_L4 and r.verdict is Verdict.AUDIT)
            assert [p.name for p in rec.ingress_denied_by] == ["lockdown"]

        agent.delete_policies()
        t1 = time.time_ns()
        assert passes(cli, srv)
        time.sleep(0.5)
        assert not [r for r in agent.flows() if r.time >= t1 and r.source.ip == cli.ip
                    and r.verdict is Verdict.AUDIT]
        dp = agent.cli_json("status")
        assert dp["audit_policies"] == 0


def test_an_audited_l7_policy_is_audited_by_the_agents_proxy(
    agent: AgentProcess, clean: None
) -> None:
    """The enforced policy allows empire ships on port 80 at L4 only (no proxy); the audited
    `deathstar-guard` would deny the tiefighter's PUT /v1/exhaust-port at L7. The kernel
    steers the connection to the proxy for the audited policy alone; the proxy forwards every
    request (the app answers) and records the PUT AUDIT naming the deny rule. Enforced (the
    annotation taken away), the proxy answers 403."""
    ds = agent.add_endpoint("ds", "org=empire,class=deathstar", 40)
    tie = agent.add_endpoint("tie", "org=empire,class=tiefighter", 41)
    xwing = agent.add_endpoint("xw", "org=alliance,class=xwing", 42)
    agent.deathstar(ds)
    agent.import_file(harness.STARWARS / "sw_l3_l4_policy.yaml")
    guard = (harness.REPO / "examples" / "extensions" / "deathstar-guard-audit.yaml").read_text()
    agent.import_policy("deathstar-guard", guard)

    def put() -> int:
        sock = tie.connect(ds.ip, 80)
        assert sock is not None
        with sock:
            return harness.http_request(sock, "PUT", "/v1/exhaust-port")[0]

    assert put() == 503  # the app's own answer: forwarded
    rec = agent.wait_access_record(
        lambda r: r.get("l7", {}).get("type") == "REQUEST" and r.get("verdict") == "AUDIT"
        and r["destination"].get("ip") == ds.ip)
    assert rec["l7"]["http"]["method"] == "PUT"
    assert [p["name"] for p in rec["ingress_denied_by"]] == ["deathstar-guard"]
    done = agent.exec_in(tie, "curl", "-s", "-m", "3", "-X", "POST",
                         f"http://{ds.ip}/v1/request-landing")
    assert (done.returncode, done.stdout) == (0, b"Ship landed\n")
    assert agent.exec_in(xwing, "curl", "-s", "-m", "2", "-X", "POST",
                         f"http://{ds.ip}/v1/request-landing").returncode != 0

    agent.import_policy("deathstar-guard", guard.replace('garrison.io/audit: "true"',
                                                         'garrison.io/audit: "false"'))
    assert put() == 403


NO_LANDING = """
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata:
  name: no-landing
  annotations: {garrison.io/audit: "true"}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
"""


def test_an_audited_l7_deny_over_enforced_l7_rules(agent: AgentProcess, clean: None) -> None:
    """The enforced Star Wars L7 policy redirects; the audited policy's L7 deny rides on it
    as the audit layer: the landing the enforced rules allow is forwarded and recorded AUDIT
    naming `no-landing`; the PUT the enforced rules deny stays 403."""
    ds = agent.add_endpoint("ds5", "org=empire,class=deathstar", 50)
    tie = agent.add_endpoint("tie5", "org=empire,class=tiefighter", 51)
    agent.deathstar(ds)
    agent.import_file(harness.STARWARS / "sw_l3_l4_l7_policy.yaml")
    agent.import_policy("no-landing", NO_LANDING)
    done = agent.exec_in(tie, "curl", "-s", "-m", "3", "-X", "POST",
                         f"http://{ds.ip}/v1/request-landing")
    assert (done.returncode, done.stdout) == (0, b"Ship landed\n")
    rec = agent.wait_access_record(
        lambda r: r.get("l7", {}).get("type") == "REQUEST" and r.get("verdict") == "AUDIT"
        and r["destination"].get("ip") == ds.ip)
    assert [p["name"] for p in rec["ingress_denied_by"]] == ["no-landing"]
    sock = tie.connect(ds.ip, 80)
    assert sock is not None
    with sock:
        assert harness.http_request(sock, "PUT", "/v1/exhaust-port")[0] == 403


KAFKA_ENFORCED = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-in-force}
spec:
  endpointSelector: {matchLabels: {app: gakafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: gaproducer}}]
    toPorts: [{ports: [{port: "9092", protocol: TCP}]}]
"""
KAFKA_CANDIDATE = """
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata:
  name: kafka-candidate
  annotations: {garrison.io/audit: "true"}
spec:
  endpointSelector: {matchLabels: {app: gakafka}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: gaproducer}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: produce, topic: secret}]}
"""
PRODUCE = """
import subprocess
import sys
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
broker = sys.argv[1]
admin = KafkaAdminClient(bootstrap_servers=broker, request_timeout_ms=10000)
admin.create_topics([NewTopic("public", 1, 1), NewTopic("secret", 1, 1)])
admin.close()
producer = KafkaProducer(bootstrap_servers=broker, request_timeout_ms=10000)
for topic in ("public", "secret"):
    producer.send(topic, b"message").get(timeout=10)
producer.close()
print("produced")
"""


def test_an_audited_kafka_deny_rule_is_audited_by_the_agents_proxy(
    agent: AgentProcess, clean: None
) -> None:
    """Kafka through the agent's proxy, a real broker (tansu) and kafka-python: the enforced
    policy allows the producer at L4; the audited policy's Kafka deny rule (produce to
    `secret`) is applied by the proxy as the audit layer. Both topics get their message; the
    produce to `secret` is recorded AUDIT naming `kafka-candidate`, the one to `public` not."""
    tansu = pytest.importorskip("tests.kafka_broker").tansu_binary()
    kb = agent.add_endpoint("kb", "app=gakafka", 60)
    kc = agent.add_endpoint("kc", "app=gaproducer", 61)
    listen = f"tcp://{kb.ip}:9092"
    agent.spawn_in(kb, str(tansu), "broker", "--listener-url", listen,
                   "--advertised-listener-url", listen, "--storage-engine", "memory://tansu/")
    harness.wait_for(lambda: _accepts(kb, 9092), "tansu listening", timeout=15)
    agent.import_policy("kafka-in-force", KAFKA_ENFORCED)
    agent.import_policy("kafka-candidate", KAFKA_CANDIDATE)

    done = agent.exec_in(kc, sys.executable, "-c", PRODUCE, f"{kb.ip}:9092",
                         timeout=60)
    assert (done.returncode, done.stdout) == (0, b"produced\n"), done.stderr.decode()[-2000:]

    def produce_of(topic: str) -> dict[str, Any] | None:
        found = [r for r in agent.access_records()
                 if r.get("l7", {}).get("type") == "REQUEST"
                 and r["l7"].get("kafka", {}).get("topic") == topic
                 and r["l7"]["kafka"].get("api_key") == "produce"]
        return found[-1] if found else None

    harness.wait_for(lambda: produce_of("secret") is not None, "the produce record")
    secret, public = produce_of("secret"), produce_of("public")
    assert secret is not None and public is not None
    assert (secret["verdict"], public["verdict"]) == ("AUDIT", "FORWARDED")
    assert [p["name"] for p in secret["ingress_denied_by"]] == ["kafka-candidate"]


def _accepts(ep: AgentEndpoint, port: int) -> bool:
    sock = harness.ns_socket(ep.name)
    try:
        sock.settimeout(0.5)
        sock.connect((ep.ip, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


GRPC_ENFORCED = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: doors-in-force}
spec:
  endpointSelector: {matchLabels: {app: door-manager}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: guard}}]
    toPorts: [{ports: [{port: "50051", protocol: TCP}]}]
"""
GRPC_CANDIDATE = """
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata:
  name: doors-candidate
  annotations: {garrison.io/audit: "true"}
spec:
  endpointSelector: {matchLabels: {app: door-manager}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: guard}}]
    toPorts:
    - ports: [{port: "50051", protocol: TCP}]
      rules: {grpc: [{service: doors.DoorManager, method: SetAccessCode}]}
"""


def test_an_audited_grpc_deny_rule_is_audited_by_the_agents_proxy(
    agent: AgentProcess, clean: None
) -> None:
    """gRPC through the agent's proxy (grpcio client and server of examples/grpc): the guard
    may call the door manager at L4; the audited policy would deny SetAccessCode. The call
    succeeds and is recorded AUDIT naming `doors-candidate`; GetName is not audited."""
    grpc_dir = harness.REPO / "examples" / "grpc"
    dm = agent.add_endpoint("dm", "app=door-manager", 70)
    guard = agent.add_endpoint("gd", "app=guard", 71)
    agent.spawn_in(dm, sys.executable, str(grpc_dir / "doors_server.py"), "--listen",
                   "0.0.0.0:50051")
    harness.wait_for(lambda: _accepts(dm, 50051), "the door manager listening", timeout=15)
    agent.import_policy("doors-in-force", GRPC_ENFORCED)
    agent.import_policy("doors-candidate", GRPC_CANDIDATE)

    def call(method: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        return agent.exec_in(guard, sys.executable, str(grpc_dir / "doors_client.py"),
                             "--target", f"{dm.ip}:50051", method, *args)

    assert call("SetAccessCode", "--code", "1234").returncode == 0
    assert call("GetName", "--door", "front").returncode == 0

    def record_of(method: str) -> dict[str, Any] | None:
        found = [r for r in agent.access_records()
                 if r.get("l7", {}).get("grpc", {}).get("method") == method]
        return found[-1] if found else None

    harness.wait_for(lambda: record_of("GetName") is not None, "the gRPC records")
    audited, name = record_of("SetAccessCode"), record_of("GetName")
    assert audited is not None and name is not None
    assert (audited["verdict"], name["verdict"]) == ("AUDIT", "FORWARDED")
    assert [p["name"] for p in audited["ingress_denied_by"]] == ["doors-candidate"]
