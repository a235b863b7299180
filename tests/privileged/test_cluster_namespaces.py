"""Namespace labels are the cluster's (etcd mode): labelled on any node, the same on every
node, so the same pod labels are one identity everywhere and a namespaceSelector selects
alike on every node.

    netns gn-ul-<pid>:  bridge, etcd on 198.19.0.242:2379
        │ 198.19.0.0/24 underlay
    netns gn-n1-<pid> (198.19.0.231): garrison agent, pod CIDR 198.18.231.0/24
        endpoints gn-db (app=gn-db, namespace gnprod, 198.18.231.10, echo on 5432),
                  gn-w1 (app=gn-web, namespace gnshop, 198.18.231.11)
    netns gn-n2-<pid> (198.19.0.232): garrison agent, pod CIDR 198.18.232.0/24
        endpoint  gn-w2 (app=gn-web, namespace gnshop, 198.18.232.10)

The policy (a NetworkPolicy imported on node 1 only) lets namespaces labelled team=blue reach
gn-db on 5432. Node 1 decides by gn-w2's identity, which node 2 makes of the namespace labels
it learnt from etcd: labelling gnshop on either node opens the way, relabelling it closes it.

Every namespace here is made by this module and deleted by it, also on failure; each
endpoint's name (its network namespace's, which is host-wide) ends in -<pid>, so two runs at
once never meet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.etcd_server import EtcdServer
from tests.privileged.agent_harness import AgentEndpoint, echo_servers, roundtrip
from tests.privileged.cluster_harness import (
    CLUSTER_MARKS,
    PID,
    Node,
    add_endpoint,
    running_cluster,
    wait_for,
)

pytestmark = CLUSTER_MARKS

UNDERLAY = f"gn-ul-{PID}"
ETCD_IP = "198.19.0.242"
LEASE_TTL_S = 3
NAME_LABEL = "kubernetes.io/metadata.name"
SHOP = "gnshop"
PROD = "gnprod"


def ep(short: str) -> str:
    return f"{short}-{PID}"


POLICY = f"""\
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {{name: gn-db-from-blue, namespace: {PROD}}}
    spec:
      podSelector: {{matchLabels: {{app: gn-db}}}}
      ingress:
      - from: [{{namespaceSelector: {{matchLabels: {{team: blue}}}}}}]
        ports: [{{port: 5432}}]
"""


@dataclass
class Cluster:
    n1: Node
    n2: Node
    etcd: EtcdServer
    db: AgentEndpoint
    w1: AgentEndpoint
    w2: AgentEndpoint


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory, "gn", 2, 230, ETCD_IP, LEASE_TTL_S) as nodes:
        n1, n2 = nodes["gn-n1"], nodes["gn-n2"]
        db = add_endpoint(n1, ep("gn-db"), "app=gn-db", "198.18.231.10", "--namespace", PROD)
        w1 = add_endpoint(n1, ep("gn-w1"), "app=gn-web", "198.18.231.11", "--namespace", SHOP)
        w2 = add_endpoint(n2, ep("gn-w2"), "app=gn-web", "198.18.232.10", "--namespace", SHOP)
        policy = n1.agent.workdir / "gn-db-from-blue.yaml"
        policy.write_text(textwrap.dedent(POLICY))
        done = n1.agent.cli("policy", "import", str(policy))
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: n1.ipcache().get(f"{w2.ip}/32") == w2.identity, 10.0,
                 "node 1 to learn gn-w2")
        yield Cluster(n1, n2, n1.etcd, db, w1, w2)


def reaches(client: AgentEndpoint, server: AgentEndpoint, port: int) -> bool:
    sock = client.connect(server.ip, port, timeout=1.5)
    if sock is None:
        return False
    with sock:
        return roundtrip(sock)


def ns_label(key: str, value: str) -> str:
    """How a namespace label is part of an identity's labels."""
    return f"k8s:io.cilium.k8s.namespace.labels.{key}={value}"


def same_identity_everywhere(c: Cluster, has: tuple[str, ...], lacks: tuple[str, ...]) -> int:
    """Waits until node 2's gn-w2 has node 1's gn-w1's identity, whose labels (on both nodes)
    hold `has` and none of `lacks`, and each node's ipcache holds the other's endpoint with
    it; returns it. (Numbers are reused once collected: labels say which identity it is.)"""
    def settled() -> bool:
        one, two = c.n1.identity(c.w1.name), c.n2.identity(c.w2.name)
        if one != two:
            return False
        for node in (c.n1, c.n2):
            labels = identity_labels(node, one)
            if not set(has) <= set(labels) or set(lacks) & set(labels):
                return False
        return (
            c.n1.ipcache().get(f"{c.w2.ip}/32") == one
            and c.n2.ipcache().get(f"{c.w1.ip}/32") == one
        )

    wait_for(settled, 15.0, f"gn-w1 (node 1) and gn-w2 (node 2) to share an identity with "
             f"{has}, without {lacks}")
    return c.n1.identity(c.w1.name)


def identity_labels(node: Node, identity: int) -> list[str]:
    return list(node.cli_json("identity", "get", str(identity))["labels"])


def test_a_namespace_labelled_on_one_node_is_labelled_on_every_node(cluster: Cluster) -> None:
    c = cluster
    unlabelled = c.n1.identity(c.w1.name)
    assert c.n2.identity(c.w2.name) == unlabelled
    with echo_servers(c.db, 5432):
        assert not reaches(c.w2, c.db, 5432)
        assert not reaches(c.w1, c.db, 5432)

        out = c.n1.cli_json("namespace", "label", SHOP, "team=blue")
        assert out["labels"] == [f"{NAME_LABEL}={SHOP}", "team=blue"]
        assert [m["name"] for m in out["relabelled"]] == [c.w1.name]
        blue = same_identity_everywhere(c, (ns_label("team", "blue"),), ())
        assert out["relabelled"][0]["identity"] == blue
        # node 2 shows the labels it never was given
        assert c.n2.namespace_labels(SHOP) == [f"{NAME_LABEL}={SHOP}", "team=blue"]
        listed = {n["name"]: n for n in c.n2.cli_json("namespace", "list")["namespaces"]}
        assert listed[SHOP]["labels"] == [f"{NAME_LABEL}={SHOP}", "team=blue"]
        assert listed[SHOP]["endpoints"] == [c.w2.name]
        # the policy, imported on node 1, admits node 2's endpoint by its namespace's labels
        assert reaches(c.w2, c.db, 5432), c.n1.agent.log()[-3000:]
        assert reaches(c.w1, c.db, 5432)

        # relabelled on node 2: both nodes' endpoints move, the verdicts follow
        out = c.n2.cli_json("namespace", "label", SHOP, "team=red")
        assert out["labels"] == [f"{NAME_LABEL}={SHOP}", "team=red"]
        assert [m["name"] for m in out["relabelled"]] == [c.w2.name]
        red = same_identity_everywhere(c, (ns_label("team", "red"),), ())
        assert red != blue  # allocated while node 1's gn-w1 still had blue
        assert c.n1.namespace_labels(SHOP) == [f"{NAME_LABEL}={SHOP}", "team=red"]
        assert not reaches(c.w2, c.db, 5432)
        assert not reaches(c.w1, c.db, 5432)

        # the label removed (the key leaves etcd): both nodes drop it
        c.n1.cli_json("namespace", "label", SHOP, "team-")
        same_identity_everywhere(c, (), (ns_label("team", "red"),))
        assert c.n2.namespace_labels(SHOP) == [f"{NAME_LABEL}={SHOP}"]
        assert not reaches(c.w2, c.db, 5432)


def test_changes_made_on_two_nodes_at_once_are_both_kept(cluster: Cluster) -> None:
    """Each change is made over the labels etcd holds (compare-and-swap): two nodes labelling
    one namespace at the same moment never lose one another's label."""
    c = cluster
    ns = "gnboth"
    errors: list[BaseException] = []
    for round_ in range(5):
        barrier = threading.Barrier(2)

        def label(node: Node, change: str, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                node.api("NamespaceLabel", name=ns, labels=[change])
            except BaseException as e:  # shown by the assertion below
                errors.append(e)

        threads = [
            threading.Thread(target=label, args=(c.n1, f"one=r{round_}")),
            threading.Thread(target=label, args=(c.n2, f"two=r{round_}")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        want = [f"{NAME_LABEL}={ns}", f"one=r{round_}", f"two=r{round_}"]

        def agreed(want: list[str] = want) -> bool:
            return c.n1.namespace_labels(ns) == want == c.n2.namespace_labels(ns)

        wait_for(agreed, 10.0, f"both nodes to show {want}")
    c.n1.api("NamespaceLabel", name=ns, labels=["one-", "two-"])
    wait_for(lambda: c.n2.namespace_labels(ns) == [f"{NAME_LABEL}={ns}"], 10.0, "no labels")


def test_a_restarted_node_starts_with_the_labels_set_while_it_was_down(
    cluster: Cluster,
) -> None:
    """Read before the first reconcile: the first answer of the restarted agent already has
    its endpoint in the identity node 1 gives the same labels."""
    c = cluster
    key = f"garrison/state/ip/v1/{c.w2.ip}"
    since = int(json.loads(etcdctl(c, "get", key, "-w", "json"))["header"]["revision"])
    c.n2.agent.stop(signal.SIGKILL)
    try:
        out = c.n1.cli_json("namespace", "label", SHOP, "tier=gn-late")
        assert [m["name"] for m in out["relabelled"]] == [c.w1.name]
    finally:
        c.n2.agent.start()
    late = c.n1.identity(c.w1.name)
    assert ns_label("tier", "gn-late") in identity_labels(c.n1, late)
    assert c.n2.identity(c.w2.name) == late  # at once, not after the watch
    same_identity_everywhere(c, (ns_label("tier", "gn-late"),), ())
    # the restarted node never published gn-w2 with its old labels' identity (which every
    # other node would have enforced for a moment): etcd's history of its ipcache key
    history = etcdctl(c, "watch", f"--rev={since + 1}", key, timeout_s=3.0)
    published = [json.loads(line)["identity"] for line in history.splitlines()
                 if line.startswith("{")]
    assert published and set(published) == {late}, history
    assert c.n2.namespace_labels(SHOP) == [f"{NAME_LABEL}={SHOP}", "tier=gn-late"]
    c.n2.cli_json("namespace", "label", SHOP, "tier-")
    same_identity_everywhere(c, (), (ns_label("tier", "gn-late"),))


def test_a_record_written_by_something_else_is_refused_alone(cluster: Cluster) -> None:
    """Hostile etcd content never reaches a selector and never stops the watch: a bad record
    is named in status, the namespace keeps its labels, the next `namespace label`
    replaces it."""
    c = cluster
    c.n1.cli_json("namespace", "label", SHOP, "team=blue")
    blue = same_identity_everywhere(c, (ns_label("team", "blue"),), ())
    key = f"garrison/state/namespaces/v1/{SHOP}"
    etcdctl(c, "put", key, '{"labels": {"team": "blue green", "x": "1"}}')
    etcdctl(c, "put", "garrison/state/namespaces/v1/Not_A/namespace", '{"labels": {}}')
    try:
        for node in (c.n1, c.n2):

            def named(node: Node = node) -> bool:
                errors = " ".join(node.api("Status")["cluster"]["errors"])
                return "bad namespace record" in errors and "not a namespace key" in errors

            wait_for(named, 10.0, f"{node.name} to name both bad records")
            assert node.namespace_labels(SHOP) == [f"{NAME_LABEL}={SHOP}", "team=blue"]
        assert c.n2.identity(c.w2.name) == blue == c.n1.identity(c.w1.name)
        # the watch goes on: a good change after the bad ones arrives
        out = c.n2.cli_json("namespace", "label", SHOP, "team=red")
        assert out["labels"] == [f"{NAME_LABEL}={SHOP}", "team=red"]  # the bad record replaced
        same_identity_everywhere(c, (ns_label("team", "red"),), (ns_label("x", "1"),))
    finally:
        etcdctl(c, "del", "garrison/state/namespaces/v1/Not_A/namespace")
    c.n1.cli_json("namespace", "label", SHOP, "team-")
    same_identity_everywhere(c, (), (ns_label("team", "red"),))


def test_with_etcd_away_a_label_is_refused_and_a_restart_keeps_the_saved_labels(
    cluster: Cluster,
) -> None:
    c = cluster
    c.n1.cli_json("namespace", "label", SHOP, "team=blue")
    blue = same_identity_everywhere(c, (ns_label("team", "blue"),), ())
    c.etcd.stop()
    try:
        done = c.n1.agent.cli("namespace", "label", SHOP, "team=green")
        assert done.returncode == 1, done.stdout + done.stderr
        message = done.stderr.strip()
        assert message.startswith(f"garrison: namespace {SHOP} not labelled on any node"), message
        assert f"no etcd answers at {ETCD_IP}:2379" in message
        assert "start etcd or fix --kvstore-endpoints" in message
        assert "\n" not in message
        # refused whole: nothing changed on the node that was asked
        assert c.n1.namespace_labels(SHOP) == [f"{NAME_LABEL}={SHOP}", "team=blue"]
        assert c.n1.identity(c.w1.name) == blue
        # a node restarted meanwhile keeps the cluster's labels (its saved copy), and its
        # endpoint its identity
        c.n2.agent.stop(signal.SIGKILL)
        c.n2.agent.start()
        assert c.n2.api("Status")["cluster"]["started_from_cache"] is True
        assert c.n2.namespace_labels(SHOP) == [f"{NAME_LABEL}={SHOP}", "team=blue"]
        assert c.n2.identity(c.w2.name) == blue
        with echo_servers(c.db, 5432):
            assert reaches(c.w2, c.db, 5432)
    finally:
        c.etcd.start()
    wait_for(lambda: c.n1.api("Status")["cluster"]["connected"]
             and c.n2.api("Status")["cluster"]["connected"], 30.0, "both nodes to reconnect")
    c.n2.cli_json("namespace", "label", SHOP, "team-")
    same_identity_everywhere(c, (), (ns_label("team", "blue"),))
    assert c.n1.namespace_labels(SHOP) == [f"{NAME_LABEL}={SHOP}"]


def etcdctl(c: Cluster, *args: str, timeout_s: float | None = None) -> str:
    """`etcdctl ARGS` against the test's etcd (in its namespace); with `timeout_s`, a command
    that does not end by itself (a watch) is stopped then, and what it printed returned."""
    stop = ["timeout", str(timeout_s)] if timeout_s is not None else []
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{UNDERLAY}", *stop, "etcdctl", "--endpoints",
         c.etcd.url, *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"},
        check=False,
    )
    assert done.returncode == 0 or (stop and done.returncode == 124), done.stderr
    return done.stdout
