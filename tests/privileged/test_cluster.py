"""Three nodes on one etcd: cross-node enforcement by identity learnt through etcd, faults.

    netns ge-ul-<pid>:  bridge, etcd on 198.19.0.250:2379
        │ 198.19.0.0/24 underlay
    netns ge-n1-<pid> (198.19.0.201): garrison agent, pod CIDR 198.18.201.0/24
        endpoints ge-a (app=a, 198.18.201.10), ge-c (app=c, 198.18.201.11)
    netns ge-n2-<pid> (198.19.0.202): garrison agent, pod CIDR 198.18.202.0/24
        endpoint  ge-b (app=b, 198.18.202.10), echo servers on 7000 and 7001
    netns ge-n3-<pid> (198.19.0.203): garrison agent, pod CIDR 198.18.203.0/24

The policy (imported on node 1 only) lets app=a reach app=b on TCP 7000. Node 2 decides by
the source's identity, which it only knows from etcd: a reaches 7000, not 7001; c (same node,
same kind of address as a) reaches nothing. The Star Wars test puts the deathstar's replicas on
nodes 1 and 2 and the ships on node 3.

Every namespace here is made by this module and deleted by it, also on failure; each
endpoint's name (its namespace's, which is host-wide) ends in -<pid>, so two runs at once
never meet.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.agent_harness import (
    STARWARS,
    AgentEndpoint,
    app_requests,
    echo_servers,
    http_request,
    ip,
    roundtrip,
)
from tests.privileged.cluster_harness import CLUSTER_MARKS, PID, Node, running_cluster, wait_for
from tests.privileged.cluster_harness import add_endpoint as add_cluster_endpoint

pytestmark = CLUSTER_MARKS

ETCD_IP = "198.19.0.250"
LEASE_TTL_S = 3


def ep(short: str) -> str:
    """An endpoint's name (and its network namespace's, which is host-wide): ge-a-<pid>, so
    two runs of this module at once never touch each other's."""
    return f"{short}-{PID}"


POLICY = """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: ge-b-from-a
    spec:
      endpointSelector:
        matchLabels:
          app: ge-b
      ingress:
      - fromEndpoints:
        - matchLabels:
            app: ge-a
        toPorts:
        - ports:
          - port: "7000"
            protocol: TCP
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    with running_cluster(tmp_path_factory, "ge", 3, 200, ETCD_IP, LEASE_TTL_S) as nodes:
        yield nodes


def add_endpoint(node: Node, short: str, labels: str, ip_: str) -> AgentEndpoint:
    """`garrison endpoint add` on `node` of endpoint `ep(short)`."""
    return add_cluster_endpoint(node, ep(short), labels, ip_)


def test_cross_node_l3_l4_by_identity_learnt_through_etcd(cluster: dict[str, Node]) -> None:
    n1, n2, n3 = cluster["ge-n1"], cluster["ge-n2"], cluster["ge-n3"]
    a = add_endpoint(n1, "ge-a", "app=ge-a", "198.18.201.10")
    c = add_endpoint(n1, "ge-c", "app=ge-c", "198.18.201.11")
    b = add_endpoint(n2, "ge-b", "app=ge-b", "198.18.202.10")
    assert len({a.identity, b.identity, c.identity}) == 3

    policy = n1.agent.workdir / "ge-b-from-a.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    done = n1.agent.cli("policy", "import", str(policy))
    assert done.returncode == 0, done.stdout + done.stderr

    # Node 2 learns a's and c's identities (and the policy) from etcd alone.
    wait_for(
        lambda: n2.ipcache().get(f"{a.ip}/32") == a.identity
        and n2.ipcache().get(f"{c.ip}/32") == c.identity,
        10.0,
        "node 2's ipcache to hold node 1's endpoints",
    )
    wait_for(lambda: n2.api("Status")["policies"] >= 1, 10.0, "the policy to reach node 2")
    shown = n2.agent.cli("policy", "get")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "(the cluster's policies: etcd revision " in shown.stdout
    assert n2.api("PolicyGet")["cluster_revision"] == n1.api("PolicyGet")["cluster_revision"] > 0
    assert n1.ipcache().get(f"{b.ip}/32") == b.identity
    status = n2.api("Status")["cluster"]
    assert status["connected"] is True
    assert set(status["nodes"]) == {"ge-n1", "ge-n2", "ge-n3"}
    assert status["routes"] == {n1.pod_cidr: n1.ip, n3.pod_cidr: n3.ip}, json.dumps(status)
    shown = n2.agent.cli("status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"Kvstore:         etcd {ETCD_IP}:2379, connected" in shown.stdout
    assert f"  ge-n1          {n1.ip}    {n1.pod_cidr}    healthy, routed via {n1.ip}" in (
        shown.stdout
    )

    with echo_servers(b, 7000, 7001):
        allowed = a.connect(b.ip, 7000)
        assert allowed is not None, n2.agent.log()[-3000:]
        with allowed:
            assert roundtrip(allowed)
        assert a.connect(b.ip, 7001, timeout=1.5) is None  # port not allowed
        assert c.connect(b.ip, 7000, timeout=1.5) is None  # identity not allowed
    drops = [
        f for f in n2.api("Flows", filter={}, limit=1000)["flows"]
        if '"DROPPED"' in f and c.ip in f
    ]
    assert drops, "node 2 records its drop of c's connection"


def test_same_new_labels_on_three_nodes_at_once_get_one_identity(
    cluster: dict[str, Node],
) -> None:
    """Three agents allocate an identity for the same labels, new to the cluster, at the same
    moment: etcd's transactions let one win, the other two join it — one number."""
    import threading

    nodes = [cluster[f"ge-n{n}"] for n in (1, 2, 3)]
    twins = {ep(f"ge-t{n}"): f"198.18.20{n}.30" for n in (1, 2, 3)}
    got: dict[str, int] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(nodes))

    def add(node: Node, name: str, ip_: str) -> None:
        node.claim(name)
        barrier.wait()
        try:
            got[name] = int(
                node.api("EndpointAdd", name=name, labels=["app=ge-twin"], ip=ip_)["identity"]
            )
        except BaseException as e:  # shown by the assertion below
            errors.append(e)

    threads = [
        threading.Thread(target=add, args=(node, name, ip_))
        for node, (name, ip_) in zip(nodes, twins.items(), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        assert len(got) == 3 and len(set(got.values())) == 1, got
        identity = got[ep("ge-t1")]
        assert identity >= 256
        # every node has the one identity, for its own twin and the two others'
        wait_for(
            lambda: all(
                node.ipcache().get(f"{ip_}/32") == identity
                for node in nodes for ip_ in twins.values()
            ),
            10.0,
            "each node to know the other nodes' twins",
        )
        ids = {
            node.name: [i["id"] for i in node.cli_json("identity", "list")["identities"]
                        if any(lab.endswith("app=ge-twin") for lab in i["labels"])]
            for node in nodes
        }
        assert all(v == [identity] for v in ids.values()), ids
    finally:
        for node, name in zip(nodes, twins, strict=True):
            with contextlib.suppress(Exception):
                node.api("EndpointDelete", name=name)


def test_endpoint_removed_on_one_node_leaves_the_others_ipcache(
    cluster: dict[str, Node],
) -> None:
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    d = add_endpoint(n1, "ge-d", "app=ge-d", "198.18.201.12")
    wait_for(lambda: f"{d.ip}/32" in n2.ipcache(), 10.0, "d to reach node 2's ipcache")
    n1.api("EndpointDelete", name=d.name)
    wait_for(lambda: f"{d.ip}/32" not in n2.ipcache(), 10.0, "d to leave node 2's ipcache")


def test_star_wars_across_nodes(cluster: dict[str, Node]) -> None:
    """The deathstar's replicas on nodes 1 and 2, both ships on node 3, the example policies
    imported on node 1 only.

    - L3/L4 (sw_l3_l4_policy.yaml), decided on each deathstar's node by identities it learnt
      from etcd: the tiefighter lands on both, the xwing is dropped and the node records the
      drop with the xwing's identity.
    - L7 (sw_l3_l4_l7_policy.yaml) in each deathstar node's proxy, where the connection from
      node 3 is steered at tc ingress of the node's underlay device: landing 200, the exhaust
      port 403 (the app never sees it), the proxy's record naming the tiefighter's identity.
    """
    n1, n2, n3 = cluster["ge-n1"], cluster["ge-n2"], cluster["ge-n3"]
    replicas = [
        (n1, add_endpoint(n1, "ge-ds1", "org=empire,class=deathstar", "198.18.201.20")),
        (n2, add_endpoint(n2, "ge-ds2", "org=empire,class=deathstar", "198.18.202.20")),
    ]
    tie = add_endpoint(n3, "ge-tie", "org=empire,class=tiefighter", "198.18.203.20")
    xwing = add_endpoint(n3, "ge-xw", "org=alliance,class=xwing", "198.18.203.21")
    apps = [
        subprocess.Popen(
            ["ip", "netns", "exec", ds.name, sys.executable, str(STARWARS / "deathstar.py"),
             "--listen", "0.0.0.0:80"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        for _, ds in replicas
    ]

    def import_on_n1(path: Path, rules: int) -> None:
        done = n1.agent.cli("policy", "import", str(path))
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(
            lambda: all(
                any(
                    p["name"] == "rule1" and p["source"] == str(path) and p["rules"] == rules
                    for p in node.api("PolicyGet")["policies"]
                )
                for node in (n2, n3)
            ),
            10.0,
            f"{path.name} to reach nodes 2 and 3",
        )

    def request(ds: AgentEndpoint, method: str, path: str) -> tuple[int, bytes]:
        deadline = time.monotonic() + 10
        while True:
            sock = tie.connect(ds.ip, 80, timeout=2.0)
            if sock is not None:
                with sock:
                    return http_request(sock, method, path)
            assert time.monotonic() < deadline, f"{ds.name} never answered"

    try:
        wait_for(
            lambda: all(
                node.ipcache().get(f"{ship.ip}/32") == ship.identity
                for node, _ in replicas for ship in (tie, xwing)
            ),
            10.0,
            "nodes 1 and 2 to know the ships",
        )
        import_on_n1(STARWARS / "sw_l3_l4_policy.yaml", 1)
        for node, ds in replicas:
            assert request(ds, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
            assert xwing.connect(ds.ip, 80, timeout=1.5) is None
            drops = node.flows(xwing.ip, '"DROPPED"', limit=1000)
            assert drops and drops[-1]["source"]["identity"] == xwing.identity, node.name

        # L7: each node's from_netdev steers the tiefighter's connection to its proxy.
        import_on_n1(STARWARS / "sw_l3_l4_l7_policy.yaml", 1)
        for node, ds in replicas:
            assert request(ds, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
            before = app_requests(ds)
            assert request(ds, "PUT", "/v1/exhaust-port") == (403, b"Access denied\r\n")
            assert app_requests(ds) == before + 1, f"the denied request reached {ds.name}"
            denied = [
                r for r in node.flows('"L7"', "exhaust-port", limit=1000)
                if r["l7"].get("type") == "REQUEST"
            ]
            assert denied, f"{node.name}'s proxy records the denied request"
            record = denied[-1]
            assert record["verdict"] == "DROPPED"
            assert record["source"]["identity"] == tie.identity  # learnt through etcd
        assert xwing.connect(replicas[1][1].ip, 80, timeout=1.5) is None
    finally:
        for app in apps:
            app.terminate()
            app.wait(10)
        for node, endpoint in ((n3, xwing), (n3, tie), *replicas):
            with contextlib.suppress(Exception):
                node.api("EndpointDelete", name=endpoint.name)
        with contextlib.suppress(Exception):
            n1.api("PolicyDelete", name="rule1")


def test_an_agent_restarted_while_etcd_is_down_enforces_from_its_saved_copy(
    cluster: dict[str, Node],
) -> None:
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    a = AgentEndpoint(ep("ge-a"), "198.18.201.10", (), 0, "")
    b = AgentEndpoint(ep("ge-b"), "198.18.202.10", (), 0, "")
    c = AgentEndpoint(ep("ge-c"), "198.18.201.11", (), 0, "")
    b_identity = n2.cli_json("endpoint", "get", b.name)["identity"]
    etcd = n2.etcd
    etcd.stop()
    try:
        n2.agent.stop(signal.SIGKILL)
        n2.agent.start()
        status = n2.api("Status")
        assert status["cluster"]["started_from_cache"] is True
        assert status["cluster"]["connected"] is False
        assert status["policies"] >= 1  # ge-b-from-a, imported on node 1, from the copy
        shown = n2.agent.cli("status")
        assert shown.returncode == 1
        assert f"PROBLEM: etcd at {ETCD_IP}:2379 is not connected" in shown.stdout
        # The endpoint keeps its identity, and the verdicts are the cluster's.
        assert n2.cli_json("endpoint", "get", b.name)["identity"] == b_identity
        with echo_servers(b, 7000):
            sock = a.connect(b.ip, 7000)
            assert sock is not None
            with sock:
                assert roundtrip(sock)
            assert c.connect(b.ip, 7000, timeout=1.5) is None
    finally:
        etcd.start()
    wait_for(lambda: n2.api("Status")["cluster"]["connected"], 20.0, "node 2 to reconnect")
    e = add_endpoint(n1, "ge-e", "app=ge-e", "198.18.201.13")
    wait_for(lambda: f"{e.ip}/32" in n2.ipcache(), 15.0, "node 2 to follow again")
    n1.api("EndpointDelete", name=e.name)
    assert n2.api("Status")["cluster"].get("started_from_cache") is True


def test_a_stopped_agent_keeps_enforcing_and_catches_up(cluster: dict[str, Node]) -> None:
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    a = AgentEndpoint(ep("ge-a"), "198.18.201.10", (), 0, "")
    b = AgentEndpoint(ep("ge-b"), "198.18.202.10", (), 0, "")
    c = AgentEndpoint(ep("ge-c"), "198.18.201.11", (), 0, "")
    n2.agent.stop(signal.SIGKILL)
    try:
        with echo_servers(b, 7000):
            sock = a.connect(b.ip, 7000)
            assert sock is not None
            sock.close()
            assert c.connect(b.ip, 7000, timeout=1.5) is None
    finally:
        n2.agent.start()
    # Restarted, it follows the cluster again: a new endpoint on node 1 reaches it.
    e = add_endpoint(n1, "ge-e", "app=ge-e", "198.18.201.13")
    wait_for(lambda: f"{e.ip}/32" in n2.ipcache(), 15.0, "node 2 to catch up")
    n1.api("EndpointDelete", name=e.name)


def test_a_dead_node_leaves_every_ipcache_within_the_lease_ttl(cluster: dict[str, Node]) -> None:
    n1, n2, n3 = cluster["ge-n1"], cluster["ge-n2"], cluster["ge-n3"]
    mine = {"198.18.201.10/32", "198.18.201.11/32"}  # ge-a, ge-c
    assert mine <= set(n2.ipcache()) and mine <= set(n3.ipcache())
    n1.agent.stop(signal.SIGKILL)
    killed = time.monotonic()
    try:
        wait_for(
            lambda: not mine & (set(n2.ipcache()) | set(n3.ipcache())),
            LEASE_TTL_S + 8.0,
            "n1's endpoints to leave nodes 2 and 3",
        )
        gone_after = time.monotonic() - killed
        # etcd expires leases on its own clock tick, then the watch and the map write: a few
        # seconds' slack on this busy 2-core machine
        assert gone_after < LEASE_TTL_S + 4.0, gone_after
        status = n2.api("Status")["cluster"]
        assert set(status["nodes"]) == {"ge-n2", "ge-n3"}
        assert status["routes"] == {n3.pod_cidr: n3.ip}
    finally:
        n1.agent.start()
    # Back: it republishes its endpoints (same identities) and the route returns.
    wait_for(
        lambda: mine <= set(n2.ipcache()) and mine <= set(n3.ipcache()),
        15.0,
        "n1's endpoints to come back",
    )
    assert n2.api("Status")["cluster"]["routes"] == {n1.pod_cidr: n1.ip, n3.pod_cidr: n3.ip}


def test_a_stopped_agent_removes_its_underlay_program_and_cleanup_its_routes(
    cluster: dict[str, Node],
) -> None:
    n2 = cluster["ge-n2"]

    def underlay_filters() -> str:
        return subprocess.run(
            ["ip", "netns", "exec", n2.netns, "tc", "filter", "show", "dev", "ge-u2", "ingress"],
            capture_output=True, text=True, check=False,
        ).stdout

    def node_routes() -> str:
        return ip(n2.netns, "route", "show", "proto", "0xa7")

    assert "from_netdev" in underlay_filters()
    assert "198.18.201.0/24 via 198.19.0.201" in node_routes()
    assert "198.18.203.0/24 via 198.19.0.203" in node_routes()
    assert n2.agent.stop() == 0
    assert "from_netdev" not in underlay_filters()
    # The route stays, like the maps: traffic between nodes flows while the agent restarts.
    assert "198.18.201.0/24 via 198.19.0.201" in node_routes()
    done = n2.agent.cleanup()
    assert done.returncode == 0, done.stdout + done.stderr
    for cidr, via in (("198.18.201.0/24", "198.19.0.201"), ("198.18.203.0/24", "198.19.0.203")):
        assert f"removed the route to another node's pod CIDR {cidr} via {via}" in done.stdout
    assert node_routes() == ""


def test_a_killed_agents_underlay_clsact_goes_at_the_next_stop_and_with_cleanup(
    cluster: dict[str, Node],
) -> None:
    """The agent made the clsact on its underlay device; killed, it leaves the program and the
    clsact. The next agent finds the clsact already there, yet its stop removes it (the state
    directory's record says it is garrison's); killed again, `--cleanup` removes both."""
    n3 = cluster["ge-n3"]

    def tc(*what: str) -> str:
        return subprocess.run(["ip", "netns", "exec", n3.netns, "tc", *what],
                              capture_output=True, text=True, check=False).stdout

    def underlay() -> tuple[bool, bool]:
        """(from_netdev attached, a clsact qdisc present) on n3's underlay leg."""
        return ("from_netdev" in tc("filter", "show", "dev", "ge-u3", "ingress"),
                "clsact" in tc("qdisc", "show", "dev", "ge-u3"))

    assert underlay() == (True, True)
    assert n3.agent.stop(signal.SIGKILL) == -signal.SIGKILL
    assert underlay() == (True, True)
    try:
        n3.agent.start()
        assert underlay() == (True, True)
        assert n3.agent.stop() == 0
        assert underlay() == (False, False)

        n3.agent.start()
        assert n3.agent.stop(signal.SIGKILL) == -signal.SIGKILL
        done = n3.agent.cleanup()
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("removed from_netdev and the clsact garrison added from the underlay device"
                " ge-u3 (ifindex ") in done.stdout
        assert underlay() == (False, False)
    finally:
        if n3.agent.proc is None or n3.agent.proc.poll() is not None:
            n3.agent.start()  # as the module's fixture expects to find it


def test_a_dead_nodes_identity_leaves_etcd_after_the_grace(cluster: dict[str, Node]) -> None:
    """Node 1 dies holding the only reference to an identity: after its lease TTL and node 3's
    `--identity-gc-grace`, node 3 deletes the identity from etcd (its number is free again).
    Node 1 back writes its reference again and the identity returns with its number."""
    n1, n3 = cluster["ge-n1"], cluster["ge-n3"]
    plain = list(n3.agent.extra)
    n3.agent.stop()
    n3.agent.extra = [*plain, "--identity-gc-grace", "2"]
    n3.agent.start()
    try:
        ep = add_endpoint(n1, "ge-gc", "app=ge-gc", "198.18.201.14")

        def in_etcd() -> set[int]:
            return {int(i["id"]) for i in n3.api("IdentityList")["identities"]}

        assert ep.identity in in_etcd()
        n1.agent.stop(signal.SIGKILL)
        try:
            # the lease TTL, then sweeps 2 s apart on node 3's 5 s heartbeats
            wait_for(lambda: ep.identity not in in_etcd(), LEASE_TTL_S + 25.0,
                     "node 3 to delete the dead node's identity")
        finally:
            n1.agent.start()
        wait_for(lambda: ep.identity in in_etcd(), 15.0,
                 "node 1 to write its identity back with its number")
        n1.api("EndpointDelete", name=ep.name)
    finally:
        n3.agent.stop()
        n3.agent.extra = plain
        n3.agent.start()
