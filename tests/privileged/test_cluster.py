"""Two nodes on one etcd: cross-node L3/L4 enforcement by identity learnt through etcd.

    netns ge-ul-<pid>:  bridge, etcd on 198.19.0.250:2379
        │ 198.19.0.0/24 underlay
    netns ge-n1-<pid> (198.19.0.201): garrison agent, pod CIDR 198.18.201.0/24
        endpoints ge-a (app=a, 198.18.201.10), ge-c (app=c, 198.18.201.11)
    netns ge-n2-<pid> (198.19.0.202): garrison agent, pod CIDR 198.18.202.0/24
        endpoint  ge-b (app=b, 198.18.202.10), echo servers on 7000 and 7001

The policy (imported on node 1 only) lets app=a reach app=b on TCP 7000. Node 2 decides by
the source's identity, which it only knows from etcd: a reaches 7000, not 7001; c (same node,
same kind of address as a) reaches nothing.

Every namespace here is made by this module and deleted by it, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from garrison.redirect import remove_pin_dir
from garrison.redirect.bpffs import BPFFS_MOUNT
from tests.etcd_server import EtcdServer, etcd_skip_reason
from tests.privileged.agent_harness import (
    STARWARS,
    AgentEndpoint,
    NsAgent,
    app_requests,
    echo_servers,
    http_request,
    ip,
    roundtrip,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
    pytest.mark.skipif(shutil.which("nsenter") is None, reason="needs nsenter (util-linux)"),
]

PID = os.getpid()
UNDERLAY = f"ge-ul-{PID}"
ETCD_IP = "198.19.0.250"
LEASE_TTL_S = 3
# Every endpoint this module adds (each asserted absent before it is added): a failed test's
# leftovers are removed at the end.
ENDPOINT_NAMES = (
    "ge-a", "ge-b", "ge-c", "ge-d", "ge-e", "ge-ds", "ge-tie", "ge-xw", "ge-t1", "ge-t2",
)
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


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    agent: NsAgent
    etcd: EtcdServer

    def api(self, method: str, **params: Any) -> dict[str, Any]:
        from garrison.agent.api import AgentClient

        with AgentClient(self.agent.workdir / "agent.sock", timeout=30) as client:
            return client.call(method, **params)

    def cli_json(self, *args: str) -> Any:
        done = self.agent.cli(*args, "-o", "json")
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}\n{self.agent.log()}"
        return json.loads(done.stdout)

    def ipcache(self) -> dict[str, int]:
        entries = self.api("BpfIpcacheList")["entries"]
        return {e["prefix"]: int(e["identity"]) for e in entries}


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _netns_add(name: str, made: list[str]) -> None:
    assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", name], check=True)
    made.append(name)
    ip(name, "link", "set", "lo", "up")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    made: list[str] = []
    nodes: dict[str, Node] = {}
    etcd: EtcdServer | None = None
    pins: list[Path] = []
    try:
        _netns_add(UNDERLAY, made)
        ip(UNDERLAY, "link", "add", "ge-br", "type", "bridge")
        ip(UNDERLAY, "addr", "add", f"{ETCD_IP}/24", "dev", "ge-br")
        ip(UNDERLAY, "link", "set", "ge-br", "up")
        etcd = EtcdServer(name="ge-cluster", netns=UNDERLAY, host=ETCD_IP)
        etcd.start()
        for n in (1, 2):
            netns = f"ge-n{n}-{PID}"
            _netns_add(netns, made)
            node_ip = f"198.19.0.{200 + n}"
            # the node's leg on the underlay: ge-u<n> in the node, its peer on the bridge
            ip(netns, "link", "add", f"ge-u{n}", "type", "veth", "peer", "name", f"ge-p{n}",
               "netns", UNDERLAY)
            ip(netns, "addr", "add", f"{node_ip}/24", "dev", f"ge-u{n}")
            ip(netns, "link", "set", f"ge-u{n}", "up")
            ip(UNDERLAY, "link", "set", f"ge-p{n}", "master", "ge-br", "up")
            subprocess.run(
                ["ip", "netns", "exec", netns, "sysctl", "-qw",
                 "net.ipv4.ip_forward=1", f"net.ipv4.conf.ge-u{n}.forwarding=1"],
                check=True,
            )
            pin = BPFFS_MOUNT / f"ge-cluster-{n}-{PID}"
            pins.append(pin)
            workdir = tmp_path_factory.mktemp(f"ge-n{n}")
            agent = NsAgent(netns, workdir, pin)
            agent.extra = [
                "--kvstore", "etcd", "--kvstore-endpoints", etcd.url,
                "--node-name", f"ge-n{n}", "--pod-cidr", f"198.18.{200 + n}.0/24",
                "--node-ip", node_ip, "--kvstore-lease-ttl", str(LEASE_TTL_S),
            ]
            node = Node(f"ge-n{n}", netns, node_ip, f"198.18.{200 + n}.0/24", agent, etcd)
            nodes[node.name] = node
            agent.start()
        yield nodes
    finally:
        for node in nodes.values():
            if node.agent.proc is not None and node.agent.proc.poll() is None:
                with contextlib.suppress(Exception):
                    for ep in node.api("EndpointList")["endpoints"]:
                        node.api("EndpointDelete", name=ep["name"])
                node.agent.stop()
            node.agent.cleanup()
        for pin in pins:
            if pin.exists():
                remove_pin_dir(pin)
        if etcd is not None:
            etcd.close()
        for name in reversed(made):  # ours: made above
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["ip", "netns", "delete", name], check=True)
        for ep in ENDPOINT_NAMES:
            # endpoint namespaces the agents made and did not remove (a failed test)
            if Path(f"/run/netns/{ep}").exists():
                subprocess.run(["ip", "netns", "delete", ep], check=False)


def add_endpoint(node: Node, name: str, labels: str, ip_: str) -> AgentEndpoint:
    assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours"
    data = node.cli_json("endpoint", "add", name, "--labels", labels, "--ip", ip_)
    return AgentEndpoint(name, ip_, tuple(data["labels"]), int(data["identity"]),
                         str(data["host_veth"]))


def test_cross_node_l3_l4_by_identity_learnt_through_etcd(cluster: dict[str, Node]) -> None:
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
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
    assert set(status["nodes"]) == {"ge-n1", "ge-n2"}
    assert status["routes"] == {n1.pod_cidr: n1.ip}, json.dumps(status)
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


def test_same_new_labels_on_two_nodes_at_once_get_one_identity(cluster: dict[str, Node]) -> None:
    import threading

    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    got: dict[str, int] = {}
    barrier = threading.Barrier(2)

    def add(node: Node, name: str, ip_: str) -> None:
        assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours"
        barrier.wait()
        got[name] = int(
            node.api("EndpointAdd", name=name, labels=["app=ge-twin"], ip=ip_)["identity"]
        )

    threads = [
        threading.Thread(target=add, args=(n1, "ge-t1", "198.18.201.30")),
        threading.Thread(target=add, args=(n2, "ge-t2", "198.18.202.30")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(got) == 2 and got["ge-t1"] == got["ge-t2"] >= 256
        wait_for(
            lambda: n2.ipcache().get("198.18.201.30/32") == got["ge-t1"]
            and n1.ipcache().get("198.18.202.30/32") == got["ge-t2"],
            10.0,
            "each node to know the other's twin",
        )
    finally:
        for node, name in ((n1, "ge-t1"), (n2, "ge-t2")):
            with contextlib.suppress(Exception):
                node.api("EndpointDelete", name=name)


def test_endpoint_removed_on_one_node_leaves_the_others_ipcache(
    cluster: dict[str, Node],
) -> None:
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    d = add_endpoint(n1, "ge-d", "app=ge-d", "198.18.201.12")
    wait_for(lambda: f"{d.ip}/32" in n2.ipcache(), 10.0, "d to reach node 2's ipcache")
    n1.api("EndpointDelete", name="ge-d")
    wait_for(lambda: f"{d.ip}/32" not in n2.ipcache(), 10.0, "d to leave node 2's ipcache")


def test_star_wars_across_nodes(cluster: dict[str, Node]) -> None:
    """The deathstar on node 2, both ships on node 1, the example policies imported on node 1.

    - L3/L4 (sw_l3_l4_policy.yaml), decided on node 2 by identities it learnt from etcd: the
      tiefighter lands, the xwing is dropped and node 2 records the drop with its identity.
    - L7 (sw_l3_l4_l7_policy.yaml) in node 2's proxy, where the connection from node 1 is
      steered at tc ingress of node 2's underlay device: landing 200, the exhaust port 403
      (the app never sees it), the proxy's record naming the tiefighter's identity.
    """
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    ds = add_endpoint(n2, "ge-ds", "org=empire,class=deathstar", "198.18.202.20")
    tie = add_endpoint(n1, "ge-tie", "org=empire,class=tiefighter", "198.18.201.20")
    xwing = add_endpoint(n1, "ge-xw", "org=alliance,class=xwing", "198.18.201.21")
    app = subprocess.Popen(
        ["ip", "netns", "exec", ds.name, sys.executable, str(STARWARS / "deathstar.py"),
         "--listen", "0.0.0.0:80"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )

    def import_on_n1(path: Path, rules: int) -> None:
        done = n1.agent.cli("policy", "import", str(path))
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(
            lambda: any(
                p["name"] == "rule1" and p["source"] == str(path) and p["rules"] == rules
                for p in n2.api("PolicyGet")["policies"]
            ),
            10.0,
            f"{path.name} to reach node 2",
        )

    def request(ep: AgentEndpoint, method: str, path: str) -> tuple[int, bytes]:
        deadline = time.monotonic() + 10
        while True:
            sock = ep.connect(ds.ip, 80, timeout=2.0)
            if sock is not None:
                with sock:
                    return http_request(sock, method, path)
            assert time.monotonic() < deadline, "the deathstar never answered"

    try:
        wait_for(
            lambda: n2.ipcache().get(f"{tie.ip}/32") == tie.identity,
            10.0,
            "node 2 to know the tiefighter",
        )
        import_on_n1(STARWARS / "sw_l3_l4_policy.yaml", 1)
        assert request(tie, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
        assert xwing.connect(ds.ip, 80, timeout=1.5) is None
        xwing_drops = [
            json.loads(f) for f in n2.api("Flows", filter={}, limit=1000)["flows"]
            if xwing.ip in f and '"DROPPED"' in f
        ]
        assert xwing_drops and xwing_drops[-1]["source"]["identity"] == xwing.identity

        # L7: node 2's from_netdev steers the tiefighter's connection to node 2's proxy.
        import_on_n1(STARWARS / "sw_l3_l4_l7_policy.yaml", 1)
        assert request(tie, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
        before = app_requests(ds)
        assert request(tie, "PUT", "/v1/exhaust-port") == (403, b"Access denied\r\n")
        assert app_requests(ds) == before + 1, "the denied request reached the app"
        assert xwing.connect(ds.ip, 80, timeout=1.5) is None
        denied = [
            r for f in n2.api("Flows", filter={}, limit=1000)["flows"]
            if '"L7"' in f and "exhaust-port" in f
            and (r := json.loads(f))["l7"].get("type") == "REQUEST"
        ]
        assert denied, "node 2's proxy records the denied request"
        record = denied[-1]
        assert record["verdict"] == "DROPPED"
        assert record["source"]["identity"] == tie.identity  # learnt through etcd
    finally:
        app.terminate()
        app.wait(10)
        for name in ("ge-xw", "ge-tie"):
            n1.api("EndpointDelete", name=name)
        n2.api("EndpointDelete", name="ge-ds")
        with contextlib.suppress(Exception):
            n1.api("PolicyDelete", name="rule1")


def test_an_agent_restarted_while_etcd_is_down_enforces_from_its_saved_copy(
    cluster: dict[str, Node],
) -> None:
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    a = AgentEndpoint("ge-a", "198.18.201.10", (), 0, "")
    b = AgentEndpoint("ge-b", "198.18.202.10", (), 0, "")
    c = AgentEndpoint("ge-c", "198.18.201.11", (), 0, "")
    b_identity = n2.cli_json("endpoint", "get", "ge-b")["identity"]
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
        assert n2.cli_json("endpoint", "get", "ge-b")["identity"] == b_identity
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
    n1.api("EndpointDelete", name="ge-e")
    assert n2.api("Status")["cluster"].get("started_from_cache") is True


def test_a_stopped_agent_keeps_enforcing_and_catches_up(cluster: dict[str, Node]) -> None:
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    a = AgentEndpoint("ge-a", "198.18.201.10", (), 0, "")
    b = AgentEndpoint("ge-b", "198.18.202.10", (), 0, "")
    c = AgentEndpoint("ge-c", "198.18.201.11", (), 0, "")
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
    n1.api("EndpointDelete", name="ge-e")


def test_a_dead_node_leaves_every_ipcache_within_the_lease_ttl(cluster: dict[str, Node]) -> None:
    n1, n2 = cluster["ge-n1"], cluster["ge-n2"]
    mine = {"198.18.201.10/32", "198.18.201.11/32"}  # ge-a, ge-c
    assert mine <= set(n2.ipcache())
    n1.agent.stop(signal.SIGKILL)
    killed = time.monotonic()
    try:
        wait_for(lambda: not mine & set(n2.ipcache()), LEASE_TTL_S + 8.0, "n1's endpoints to go")
        gone_after = time.monotonic() - killed
        # etcd expires leases on its own clock tick, then the watch and the map write: a few
        # seconds' slack on this busy 2-core machine
        assert gone_after < LEASE_TTL_S + 4.0, gone_after
        status = n2.api("Status")["cluster"]
        assert set(status["nodes"]) == {"ge-n2"}
        assert status["routes"] == {}
    finally:
        n1.agent.start()
    # Back: it republishes its endpoints (same identities) and the route returns.
    wait_for(lambda: mine <= set(n2.ipcache()), 15.0, "n1's endpoints to come back")
    assert n2.api("Status")["cluster"]["routes"] == {n1.pod_cidr: n1.ip}


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
    assert n2.agent.stop() == 0
    assert "from_netdev" not in underlay_filters()
    # The route stays, like the maps: traffic between nodes flows while the agent restarts.
    assert "198.18.201.0/24 via 198.19.0.201" in node_routes()
    done = n2.agent.cleanup()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed the route to another node's pod CIDR 198.18.201.0/24 via 198.19.0.201" in (
        done.stdout
    )
    assert node_routes() == ""
