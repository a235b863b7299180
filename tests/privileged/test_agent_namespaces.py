"""Namespace labels through a running agent (issue 20 §1): `garrison namespace label` gives
the namespace's endpoints new identities, written to the kernel incrementally, so a
namespaceSelector policy starts (and stops) allowing traffic with nothing restarted."""

from __future__ import annotations

import pytest

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentEndpoint,
    AgentProcess,
    echo_servers,
    fixture_agent,
    fixture_clean,
    roundtrip,
)

pytestmark = pytest.mark.privileged

KNP = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: gn-from-blue, namespace: gnprod}
spec:
  podSelector: {matchLabels: {app: gndb}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
    ports: [{port: 5432}]
"""

CNP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: gn-from-blue, namespace: gnprod}
spec:
  endpointSelector: {matchLabels: {app: gndb}}
  ingress:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.namespace.labels.team: blue}
      matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""


def reaches(client: AgentEndpoint, server: AgentEndpoint, port: int) -> bool:
    sock = client.connect(server.ip, port, timeout=1.0)
    if sock is None:
        return False
    with sock:
        return roundtrip(sock)


def ipcache_identity(agent: AgentProcess, ip: str) -> int:
    entries = agent.cli_json("bpf", "ipcache", "list")["entries"]
    (entry,) = [e for e in entries if str(e["prefix"]).split("/")[0] == ip]
    return int(entry["identity"])


@pytest.mark.parametrize(("policy", "ns"), [(KNP, "gnshop"), (CNP, "gnshop2")],
                         ids=["knp-namespaceSelector", "cnp-namespace-labels"])
def test_relabelling_a_namespace_opens_and_closes_a_namespace_selector(
    agent: AgentProcess, clean: None, policy: str, ns: str
) -> None:
    db = agent.add_endpoint("gndb", "app=gndb", 211, namespace="gnprod")
    web = agent.add_endpoint("gnweb", "app=gnweb", 212, namespace=ns)
    pid = agent.pid
    agent.import_policy("gn-from-blue", policy)
    with echo_servers(db, 5432):
        assert not reaches(web, db, 5432)
        out = agent.cli_json("namespace", "label", ns, "team=blue")
        assert out["labels"] == ["kubernetes.io/metadata.name=" + ns, "team=blue"]
        assert out["endpoints"] == [web.name]
        (moved,) = out["relabelled"]
        blue = agent.refresh(web)
        assert moved == {"name": web.name, "identity": blue.identity}
        assert blue.identity != web.identity
        assert "k8s:io.cilium.k8s.namespace.labels.team=blue" in agent.cli_json(
            "identity", "get", str(blue.identity))["labels"]
        assert ipcache_identity(agent, web.ip) == blue.identity
        assert reaches(blue, db, 5432)
        agent.cli("namespace", "label", ns, "team=red")
        red = agent.refresh(web)
        assert red.identity != blue.identity  # (numbers are reused once released)
        assert "k8s:io.cilium.k8s.namespace.labels.team=red" in agent.cli_json(
            "identity", "get", str(red.identity))["labels"]
        assert ipcache_identity(agent, web.ip) == red.identity
        assert not reaches(red, db, 5432)
        agent.cli("namespace", "label", ns, "team-")
        plain = agent.refresh(web)
        assert sorted(agent.cli_json("identity", "get", str(plain.identity))["labels"]) == [
            "k8s:app=gnweb", f"k8s:io.kubernetes.pod.namespace={ns}"]
        assert not reaches(plain, db, 5432)
    assert agent.pid == pid  # nothing restarted
    got = agent.cli_json("namespace", "get", ns)
    assert got == {"name": ns, "labels": [f"kubernetes.io/metadata.name={ns}"],
                   "endpoints": [web.name]}


def test_namespace_label_refuses_the_name_label(agent: AgentProcess, clean: None) -> None:
    out = agent.cli("namespace", "label", "gnother", "kubernetes.io/metadata.name=x",
                    check=False)
    assert out.returncode != 0
    assert "kubernetes.io/metadata.name is always the namespace's own name and cannot be " \
        "set or removed" in out.stderr
    assert "Traceback" not in out.stderr


def test_namespace_labels_survive_an_agent_restart(agent: AgentProcess, clean: None) -> None:
    db = agent.add_endpoint("gndb2", "app=gndb", 213, namespace="gnprod")
    agent.cli("namespace", "label", "gnshop3", "team=blue")
    web = agent.add_endpoint("gnweb3", "app=gnweb", 214, namespace="gnshop3")  # after: too
    agent.import_policy("gn-from-blue", KNP)
    with echo_servers(db, 5432):
        assert reaches(web, db, 5432)
        agent.stop()
        agent.start()
        assert agent.cli_json("namespace", "get", "gnshop3")["labels"] == [
            "kubernetes.io/metadata.name=gnshop3", "team=blue"]
        assert agent.refresh(web).identity == web.identity
        assert reaches(web, db, 5432)
