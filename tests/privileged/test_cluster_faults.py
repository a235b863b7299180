"""Two nodes on one etcd, treated as a demanding operator and a hostile writer would.

    netns hk-ul-<pid>:  bridge, etcd on 198.19.0.249:2379
        │ 198.19.0.0/24 underlay
    netns hk-n1-<pid> (198.19.0.221): agent, pod CIDR 198.18.210.0/26
        endpoints hk-a (app=hk-a, 198.18.210.10), hk-c (app=hk-c, 198.18.210.11)
    netns hk-n2-<pid> (198.19.0.222): agent, pod CIDR 198.18.210.64/26
        endpoint  hk-b (app=hk-b, 198.18.210.70), an echo server on 7000

The policy lets app=hk-a reach app=hk-b on TCP 7000 (nothing else reaches hk-b). What is
checked is what an operator sees: connections, `garrison status`, the agent staying up.
Every namespace is this module's (names end in -<pid>) and is deleted by it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator

import pytest

from tests.privileged.agent_harness import AgentEndpoint, echo_servers, roundtrip
from tests.privileged.cluster_harness import CLUSTER_MARKS, PID, Node, running_cluster, wait_for
from tests.privileged.cluster_harness import add_endpoint as add_cluster_endpoint

pytestmark = [
    *CLUSTER_MARKS,
    pytest.mark.skipif(shutil.which("etcdctl") is None, reason="needs etcdctl (etcd-client)"),
]

ETCD_IP = "198.19.0.249"
LEASE_TTL_S = 3
ROOT = "garrison/"

POLICY = """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: hk-b-from-a
    spec:
      endpointSelector:
        matchLabels:
          app: hk-b
      ingress:
      - fromEndpoints:
        - matchLabels:
            app: hk-a
        toPorts:
        - ports:
          - port: "7000"
            protocol: TCP
"""


def ep(short: str) -> str:
    return f"{short}-{PID}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    with running_cluster(
        tmp_path_factory, "hk", 2, 220, ETCD_IP, LEASE_TTL_S,
        pod_cidrs=("198.18.210.0/26", "198.18.210.64/26"),
    ) as nodes:
        n1, n2 = nodes["hk-n1"], nodes["hk-n2"]
        add_cluster_endpoint(n1, ep("hk-a"), "app=hk-a", "198.18.210.10")
        add_cluster_endpoint(n1, ep("hk-c"), "app=hk-c", "198.18.210.11")
        add_cluster_endpoint(n2, ep("hk-b"), "app=hk-b", "198.18.210.70")
        policy = n1.agent.workdir / "hk-b-from-a.yaml"
        policy.write_text(textwrap.dedent(POLICY))
        done = n1.agent.cli("policy", "import", str(policy))
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: n2.api("Status")["policies"] == 1, 10.0, "the policy to reach node 2")
        yield nodes


A = AgentEndpoint(ep("hk-a"), "198.18.210.10", (), 0, "")
C = AgentEndpoint(ep("hk-c"), "198.18.210.11", (), 0, "")
B = AgentEndpoint(ep("hk-b"), "198.18.210.70", (), 0, "")


def etcdctl(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """etcdctl against the cluster's etcd, inside etcd's namespace."""
    etcd = node.etcd
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{etcd.netns}", "etcdctl", "--endpoints", etcd.url,
         "--command-timeout=5s", *args],
        capture_output=True, text=True, check=True, timeout=30,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
    )


def last_start_log(node: Node) -> list[str]:
    """The lines of the agent's latest start (`agent.log()` joins every start's, by name)."""
    path = node.agent.workdir / f"agent-{node.agent.starts}.log"
    return path.read_text(errors="replace").strip().splitlines()


def assert_enforced(tag: str) -> None:
    """a reaches b on 7000 (allowed by identity learnt through etcd), c does not."""
    with echo_servers(B, 7000):
        deadline = time.monotonic() + 10
        while (sock := A.connect(B.ip, 7000, timeout=1.5)) is None:
            assert time.monotonic() < deadline, f"{tag}: a never reached b"
        with sock:
            assert roundtrip(sock), tag
        assert C.connect(B.ip, 7000, timeout=1.5) is None, f"{tag}: c reached b (fail open)"


def test_hostile_records_under_the_prefix_are_refused_alone(cluster: dict[str, Node]) -> None:
    """Values of the wrong shape under garrison's prefix, as something else (or someone) may
    write them: each is refused alone and named in `garrison status`; the agent keeps
    enforcing, also after a restart that reads them at its start."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    hostile = {
        "state/nodes/v1/hk-bogus": "not json",
        "state/nodes/v1/hk-list": "[1, 2]",
        "state/policies/v1/junk": '{"path": "x", "text": "y"}',
        "state/policies/v1/CiliumNetworkPolicy/_/hk-bad": '{"text": 7}',
        "state/ip/v1/not-an-ip": '{"ip": "198.18.210.40", "identity": 300, "labels": "",'
                                 ' "node": "hk-evil"}',
        "state/ip/v1/198.18.210.41": '{"ip": "198.18.210.41", "identity": "x"}',
        # this node's host, or a CIDR's identity, claimed for an address of another node
        "state/ip/v1/198.18.210.42": '{"ip": "198.18.210.42", "identity": 1, "labels":'
                                     ' "reserved:host", "node": "hk-evil"}',
        "state/ip/v1/198.18.210.43": '{"ip": "198.18.210.43", "identity": 16777217, "labels":'
                                     ' "cidr:0.0.0.0/0;reserved:world", "node": "hk-evil"}',
        "state/heartbeat/v1/hk-bogus": "yesterday",
        # a node that never beats, its heartbeat forever fresh
        "state/nodes/v1/hk-ghost": '{"name": "hk-ghost", "ip": "198.19.0.240",'
                                   ' "pod_cidr": "198.18.210.192/26"}',
        "state/heartbeat/v1/hk-ghost": "inf",
        "state/namespaces/v1/Bad_NS": '{"labels": {"a": 1}}',
        # many (status names the first 20 by key and counts the rest)
        **{f"state/policies/v1/zz/bulk-{n:02}": "{}" for n in range(25)},
    }
    try:
        for key, value in hostile.items():
            etcdctl(n1, "put", ROOT + key, value)
        # a new endpoint on node 1 still reaches node 2 after the hostile records
        d = add_cluster_endpoint(n1, ep("hk-d"), "app=hk-d", "198.18.210.12")
        wait_for(lambda: n2.ipcache().get(f"{d.ip}/32") == d.identity, 10.0,
                 "node 2 to learn hk-d after the hostile records")
        n1.api("EndpointDelete", name=d.name)
        for node in (n1, n2):
            shown = node.agent.cli("status")
            assert shown.returncode == 1, shown.stdout + shown.stderr
            assert "Traceback" not in shown.stdout + shown.stderr
            for key in ("state/nodes/v1/hk-bogus", "state/policies/v1/junk",
                        "state/ip/v1/not-an-ip", "state/ip/v1/198.18.210.41",
                        "state/ip/v1/198.18.210.42", "state/ip/v1/198.18.210.43"):
                assert key in shown.stdout, (key, shown.stdout)
            assert not {"198.18.210.42/32", "198.18.210.43/32"} & set(node.ipcache())
            assert "PROBLEM: node hk-ghost: no heartbeat; its lease ends its endpoints" in (
                shown.stdout
            )
            assert "PROBLEM: 14 more etcd records refused (the agent's log names each)" in (
                shown.stdout
            )
            assert node.agent.proc is not None and node.agent.proc.poll() is None
        assert_enforced("with hostile records")

        # A restart reads them all at its start (prime): it starts, and enforces.
        assert n2.agent.stop(signal.SIGKILL) == -signal.SIGKILL
        n2.agent.start()
        wait_for(lambda: n2.api("Status")["cluster"]["connected"], 10.0, "node 2 to reconnect")
        assert n2.api("Status")["policies"] == 1, n2.agent.log()[-3000:]
        assert n2.ipcache().get(f"{A.ip}/32") is not None, n2.agent.log()[-3000:]
        shown = n2.agent.cli("status", "-o", "json")
        assert shown.returncode == 1 and json.loads(shown.stdout)["cluster"]["nodes"]
        assert_enforced("restarted with hostile records")
        log = n2.agent.log()
        for key in hostile:
            if not key.startswith("state/heartbeat/") and "hk-ghost" not in key:
                # once when it arrived, once when the restarted agent read it
                assert log.count(f"ERROR cluster: {key}:") == 2, (key, log[-3000:])
    finally:
        for key in hostile:
            etcdctl(n1, "del", ROOT + key)


def _start_as(node: Node, name: str) -> None:
    """Restart `node`'s agent with `--node-name name` (its other flags as they were)."""
    args = node.agent.extra
    at = args.index("--node-name") + 1
    node.agent.extra = [*args[:at], name, *args[at + 1:]]
    node.agent.start()


def test_a_second_node_with_a_live_nodes_name_is_refused(cluster: dict[str, Node]) -> None:
    """Node 2's agent restarted with node 1's name while node 1 runs: it would overwrite node
    1's record (its route flapping on every other node) and ignore node 1's endpoints as its
    own. It refuses to start, naming the node that has the name and the flag."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    original = list(n2.agent.extra)
    assert n2.agent.stop() == 0
    try:
        with pytest.raises(AssertionError) as failed:
            _start_as(n2, "hk-n1")
        assert n2.agent.proc is not None and n2.agent.proc.wait(10) == 1
        last = last_start_log(n2)[-1]
        assert last.startswith(
            "garrison agent: --node-name hk-n1 is taken: node hk-n1 at 198.19.0.221 (pod CIDR"
            " 198.18.210.0/26) beat "
        ), failed.value
        assert last.endswith(
            " s ago; give this node its own --node-name (or stop that node's agent)"
        ), last
        assert "Traceback" not in n2.agent.log()
        # node 1 was not disturbed: its record is its own, node 2's agent left nothing
        record = json.loads(etcdctl(n1, "get", "--print-value-only",
                                    ROOT + "state/nodes/v1/hk-n1").stdout)
        assert record["ip"] == n1.ip and record["pod_cidr"] == n1.pod_cidr
    finally:
        n2.agent.extra = original
        n2.agent.start()
    wait_for(lambda: n1.ipcache().get(f"{B.ip}/32") is not None, 10.0, "node 1 to know b")
    assert_enforced("after the refused start")


def test_an_agent_restarted_under_another_name_takes_its_endpoints_along(
    cluster: dict[str, Node],
) -> None:
    """Node 2 renamed (stopped, started with another --node-name): once the old name's lease
    ends, node 1 knows node 2 by its new name only, still routes its pod CIDR and still
    knows b; enforcement holds throughout."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    original = list(n2.agent.extra)
    assert n2.agent.stop() == 0
    try:
        _start_as(n2, "hk-n2b")
        assert_enforced("renamed")

        def only_new_name() -> bool:
            return set(n1.api("Status")["cluster"]["nodes"]) == {"hk-n1", "hk-n2b"}

        wait_for(only_new_name, LEASE_TTL_S + 8.0, "the old name to leave node 1's view")
        status = n1.api("Status")["cluster"]
        assert status["routes"] == {n2.pod_cidr: n2.ip}, status
        assert n1.ipcache().get(f"{B.ip}/32") is not None
        shown = n1.agent.cli("status")
        assert shown.returncode == 0, shown.stdout
        assert_enforced("renamed, old name gone")
    finally:
        n2.agent.stop()
        n2.agent.extra = original
        n2.agent.start()
    wait_for(lambda: set(n1.api("Status")["cluster"]["nodes"]) == {"hk-n1", "hk-n2"},
             LEASE_TTL_S + 8.0, "the new name to leave again")
    assert n1.api("Status")["cluster"]["routes"] == {n2.pod_cidr: n2.ip}
    assert_enforced("named back")


def test_etcd_wiped_keeps_the_cluster_policies_and_converges(cluster: dict[str, Node]) -> None:
    """etcd stopped, its data directory lost, started empty (a replaced or wiped member): no
    node stops enforcing a policy because etcd forgot it, and etcd gets the cluster back —
    nodes, endpoints, the policy — so a node restarted afterwards enforces it too."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    etcd = n1.etcd
    revision = n2.api("Status")["cluster"]["revision"]
    etcd.stop()
    shutil.rmtree(etcd.data_dir / "data")
    etcd.start()
    for node in (n1, n2):
        wait_for(
            lambda node=node: node.api("Status")["cluster"]["connected"]
            and node.api("Status")["cluster"]["revision"] < revision,
            20.0, f"{node.name} to reconnect to the new etcd",
        )
    time.sleep(2.0)  # the watches' re-lists, the sessions' new leases
    assert n2.api("Status")["policies"] == 1, n2.agent.log()[-3000:]
    assert_enforced("etcd wiped")
    wait_for(
        lambda: etcdctl(n1, "get", "--prefix", "--keys-only",
                        ROOT + "state/policies/v1/").stdout.strip() != "",
        10.0, "the policy to be written back to etcd",
    )
    for node in (n1, n2):
        shown = node.agent.cli("status")
        assert shown.returncode == 0, shown.stdout
    # a restart now reads everything from etcd (not the saved copy) and enforces
    assert n2.agent.stop(signal.SIGKILL) == -signal.SIGKILL
    (n2.agent.workdir / "state" / "cluster-cache.json").unlink()
    n2.agent.start()
    assert n2.api("Status")["policies"] == 1, n2.agent.log()[-3000:]
    wait_for(lambda: n2.ipcache().get(f"{A.ip}/32") is not None, 10.0, "node 2 to know a")
    assert_enforced("restarted after the wipe")


def test_without_node_ip_the_address_towards_etcd_is_the_node_ip(
    cluster: dict[str, Node],
) -> None:
    """--node-ip is optional (docs/cluster.md): the agent takes the address it sends from
    towards etcd."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    original = list(n2.agent.extra)
    at = original.index("--node-ip")
    assert n2.agent.stop() == 0
    try:
        n2.agent.extra = original[:at] + original[at + 2:]
        n2.agent.start()
        # (its own record reaches its watch a moment after the start)
        wait_for(lambda: "hk-n2" in n2.api("Status")["cluster"]["nodes"], 10.0, "hk-n2 listed")
        nodes = n2.api("Status")["cluster"]["nodes"]
        assert nodes["hk-n2"]["ip"] == n2.ip, nodes
        assert_enforced("without --node-ip")
    finally:
        n2.agent.stop()
        n2.agent.extra = original
        n2.agent.start()
    assert n1.api("Status")["cluster"]["routes"] == {n2.pod_cidr: n2.ip}


def _reimport(n1: Node, n2: Node) -> None:
    done = n1.agent.cli("policy", "import", str(n1.agent.workdir / "hk-b-from-a.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: n2.api("Status")["policies"] == 1, 10.0, "the policy to reach node 2")


def test_a_policy_deleted_on_another_node_stays_deleted_on_its_importer(
    cluster: dict[str, Node],
) -> None:
    """The policy imported on node 1, deleted on node 2: node 1 drops it, and a restart of
    node 1 does not bring it back (from the policies it saved as imported here) — neither
    when it was deleted while node 1 ran nor while node 1 was down."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    try:
        done = n2.run("policy", "delete", "hk-b-from-a")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: n1.api("Status")["policies"] == 0, 10.0, "node 1 to drop the policy")
        assert n1.agent.stop() == 0
        n1.agent.start()
        assert n1.api("Status")["policies"] == 0, n1.agent.log()[-2000:]
        wait_for(lambda: n1.api("Status")["cluster"]["connected"], 10.0, "node 1 to connect")
        time.sleep(1.0)  # the watches' first lists
        assert n1.api("Status")["policies"] == 0

        _reimport(n1, n2)
        assert n1.agent.stop(signal.SIGKILL) == -signal.SIGKILL
        done = n2.run("policy", "delete", "hk-b-from-a")
        assert done.returncode == 0, done.stdout + done.stderr
        n1.agent.start()
        assert n1.api("Status")["policies"] == 0, n1.agent.log()[-2000:]
        time.sleep(1.0)
        assert n1.api("Status")["policies"] == 0
    finally:
        if n1.agent.proc is None or n1.agent.proc.poll() is not None:
            n1.agent.start()
        if n1.api("Status")["policies"] != 1 or n2.api("Status")["policies"] != 1:
            _reimport(n1, n2)
    assert_enforced("imported again")


def test_changes_made_while_a_node_is_down_are_enforced_when_it_returns(
    cluster: dict[str, Node],
) -> None:
    """Node 2 killed; meanwhile node 1 changes the policy (7001 instead of 7000) and removes
    an endpoint. Node 2, back, enforces the new policy and has forgotten the endpoint (its
    pinned ipcache kept it while the agent was down)."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    d = add_cluster_endpoint(n1, ep("hk-d"), "app=hk-d", "198.18.210.12")
    wait_for(lambda: f"{d.ip}/32" in n2.ipcache(), 10.0, "node 2 to learn hk-d")
    changed = n1.agent.workdir / "hk-b-from-a-7001.yaml"
    changed.write_text(textwrap.dedent(POLICY).replace('"7000"', '"7001"'))
    assert n2.agent.stop(signal.SIGKILL) == -signal.SIGKILL
    try:
        done = n1.agent.cli("policy", "import", str(changed))
        assert done.returncode == 0, done.stdout + done.stderr
        n1.api("EndpointDelete", name=d.name)
    finally:
        n2.agent.start()
    try:
        assert f"{d.ip}/32" not in n2.ipcache()
        with echo_servers(B, 7000, 7001):
            sock = A.connect(B.ip, 7001, timeout=3.0)
            assert sock is not None, "a does not reach b on 7001, allowed now"
            sock.close()
            assert A.connect(B.ip, 7000, timeout=1.5) is None, "7000 no longer allowed"
    finally:
        _reimport(n1, n2)
    assert_enforced("the policy back on 7000")  # (a's connection retried until node 2 has it)


def test_an_etcd_that_stops_answering_is_said_in_status(cluster: dict[str, Node]) -> None:
    """etcd frozen (SIGSTOP: its connections stay open, nothing answers — a partition as a
    node sees it): `garrison status` says etcd is not connected within a few seconds and
    enforcement holds; thawed, the node says connected again and follows the cluster."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    etcd = n2.etcd
    assert etcd.proc is not None
    os.kill(etcd.proc.pid, signal.SIGSTOP)
    try:
        def said() -> bool:
            shown = n2.agent.cli("status")
            return shown.returncode == 1 and (
                f"PROBLEM: etcd at {ETCD_IP}:2379 is not connected: etcd has not renewed the"
                " lease for " in shown.stdout
            ) and "NOT CONNECTED" in shown.stdout

        wait_for(said, 3 * LEASE_TTL_S + 5.0, "status to say etcd does not answer")
        assert_enforced("etcd frozen")
    finally:
        os.kill(etcd.proc.pid, signal.SIGCONT)
    wait_for(lambda: n2.agent.cli("status").returncode == 0, 30.0, "status to be clean again")
    d = add_cluster_endpoint(n1, ep("hk-d"), "app=hk-d", "198.18.210.12")
    wait_for(lambda: f"{d.ip}/32" in n2.ipcache(), 15.0, "node 2 to follow again")
    n1.api("EndpointDelete", name=d.name)


def test_a_node_whose_pod_cidr_overlaps_a_running_nodes_is_refused(
    cluster: dict[str, Node],
) -> None:
    """Two nodes giving out addresses from one block would publish one address for two
    endpoints (each node's entry overwriting the other's: a third node would judge one
    endpoint's traffic by the other's identity) and route each other's block to themselves."""
    n2 = cluster["hk-n2"]
    original = list(n2.agent.extra)
    at = original.index("--pod-cidr") + 1
    assert n2.agent.stop() == 0
    try:
        n2.agent.extra = [*original[:at], "198.18.210.0/25", *original[at + 1:]]
        with pytest.raises(AssertionError):
            n2.agent.start()
        assert n2.agent.proc is not None and n2.agent.proc.wait(10) == 1
        last = last_start_log(n2)[-1]
        assert last.startswith(
            "garrison agent: --pod-cidr 198.18.210.0/25 overlaps node hk-n1's 198.18.210.0/26"
            " (at 198.19.0.221, beat "
        ), last
        assert last.endswith(" s ago); give each node a block of its own"), last
        assert "Traceback" not in n2.agent.log()
    finally:
        n2.agent.extra = original
        n2.agent.start()
    assert_enforced("after the refused start")


def test_with_etcd_down_changes_are_refused_in_one_line_and_work_once_it_is_back(
    cluster: dict[str, Node],
) -> None:
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    etcd = n1.etcd
    etcd.stop()
    try:
        for node in (n1, n2):
            wait_for(lambda node=node: not node.api("Status")["cluster"]["connected"], 10.0,
                     f"{node.name} to see etcd gone")
        started = time.monotonic()
        done = n1.agent.cli("policy", "import", str(n1.agent.workdir / "hk-b-from-a.yaml"))
        took = time.monotonic() - started
        out = done.stdout + done.stderr
        assert done.returncode != 0 and "Traceback" not in out
        assert len(out.strip().splitlines()) == 1, out
        assert "etcd" in out and "--kvstore-endpoints" in out, out
        assert took < 12.0, took
        n1.claim(ep("hk-e"))
        done = n1.agent.cli("endpoint", "add", ep("hk-e"), "--labels", "app=hk-new",
                            "--ip", "198.18.210.13")
        out = done.stdout + done.stderr
        assert done.returncode != 0 and "Traceback" not in out
        assert len(out.strip().splitlines()) == 1, out
        assert "etcd" in out, out
        done = n1.agent.cli("policy", "delete", "hk-b-from-a")
        out = done.stdout + done.stderr
        assert done.returncode != 0 and len(out.strip().splitlines()) == 1, out
        assert "etcd" in out and n1.api("Status")["policies"] == 1, out
        assert_enforced("etcd down")
        # an endpoint removed while etcd is away leaves the other nodes once it is back
        assert n1.agent.cli("endpoint", "delete", C.name).returncode == 0
    finally:
        etcd.start()
    wait_for(lambda: f"{C.ip}/32" not in n2.ipcache(), 20.0, "c to leave node 2")
    add_cluster_endpoint(n1, C.name, "app=hk-c", C.ip)
    wait_for(lambda: f"{C.ip}/32" in n2.ipcache(), 10.0, "c back on node 2")
    for node in (n1, n2):
        wait_for(lambda node=node: node.agent.cli("status").returncode == 0, 30.0,
                 f"{node.name}'s status to be clean")
    e = add_cluster_endpoint(n1, ep("hk-e"), "app=hk-new", "198.18.210.13")
    wait_for(lambda: n2.ipcache().get(f"{e.ip}/32") == e.identity, 10.0, "node 2 to learn e")
    n1.api("EndpointDelete", name=e.name)


def test_an_identity_record_naming_a_reserved_number_is_refused(
    cluster: dict[str, Node],
) -> None:
    """state/identities/v1/labels/<L> written by someone else with the number of a reserved
    identity (1: host, 2: world) or a CIDR identity: an endpoint of labels L must not get it
    (it would be let through wherever the host is), its add is refused in one line."""
    n1 = cluster["hk-n1"]
    key = (ROOT + "state/identities/v1/labels/"
           "k8s:app=hk-evil;k8s:io.kubernetes.pod.namespace=default")
    try:
        for number in (1, 2, 16777217, -3):
            etcdctl(n1, "put", key, json.dumps({"id": number}))
            n1.claim(ep("hk-evil"))
            done = n1.agent.cli("endpoint", "add", ep("hk-evil"), "--labels", "app=hk-evil",
                                "--ip", "198.18.210.14")
            out = done.stdout + done.stderr
            assert done.returncode != 0, (number, out)
            assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
            assert f"id {number} is not an endpoint identity (256-65535)" in out, out
            assert not [e for e in n1.api("EndpointList")["endpoints"]
                        if e["name"] == ep("hk-evil")]
    finally:
        etcdctl(n1, "del", key)


def test_a_node_cut_off_longer_than_its_lease_rejoins(cluster: dict[str, Node]) -> None:
    """Node 2's underlay link down for longer than the lease TTL (a partition; etcd runs on):
    node 1 forgets node 2's endpoints and route when the lease expires, node 2 says etcd is
    not connected. Link up: node 2 gets a new lease and writes itself back, node 1 learns b
    again with the same identity, the routes on both sides are back, and traffic flows."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    b_identity = n2.identity(B.name)
    leg = "hk-u2"
    ip_link = ["ip", "-n", n2.netns, "link", "set", leg]
    subprocess.run([*ip_link, "down"], check=True)
    try:
        wait_for(lambda: f"{B.ip}/32" not in n1.ipcache(), LEASE_TTL_S + 8.0,
                 "node 1 to forget b when node 2's lease ends")
        assert n1.api("Status")["cluster"]["routes"] == {}
        shown = n2.agent.cli("status")
        assert shown.returncode == 1 and "is not connected" in shown.stdout, shown.stdout
    finally:
        subprocess.run([*ip_link, "up"], check=True)
    wait_for(lambda: n1.ipcache().get(f"{B.ip}/32") == b_identity, 20.0,
             "node 1 to learn b again")
    wait_for(lambda: n2.agent.cli("status").returncode == 0, 20.0, "node 2's status clean")
    assert n1.api("Status")["cluster"]["routes"] == {n2.pod_cidr: n2.ip}


    def routed() -> bool:
        routes = subprocess.run(["ip", "-n", n2.netns, "route", "show", "proto", "0xa7"],
                                capture_output=True, text=True, check=True).stdout
        return f"{n1.pod_cidr} via {n1.ip}" in routes

    # the link's flap flushed node 2's route to node 1: added again at its next heartbeat
    wait_for(routed, 12.0, "node 2's route to node 1's pod CIDR to be back")
    assert_enforced("after the partition")


def test_etcd_down_and_the_saved_copy_unreadable_refuses_the_start_in_one_line(
    cluster: dict[str, Node],
) -> None:
    n2 = cluster["hk-n2"]
    cache = n2.agent.workdir / "state" / "cluster-cache.json"
    etcd = n2.etcd
    assert n2.agent.stop() == 0
    etcd.stop()
    saved = cache.read_bytes()
    try:
        cache.write_text('{"views": {"state/ip/v1/": 7')
        with pytest.raises(AssertionError):
            n2.agent.start()
        assert n2.agent.proc is not None and n2.agent.proc.wait(30) == 1
        log = last_start_log(n2)
        last = log[-1]
        assert "Traceback" not in "\n".join(log)
        assert last.startswith("garrison agent: "), last
        assert str(cache) in last and f"{ETCD_IP}:2379" in last, last
        assert "is unreadable (JSONDecodeError: " in last, last
    finally:
        cache.write_bytes(saved)
        etcd.start()
        n2.agent.start()
    assert_enforced("after the refused start")


def test_etcd_wiped_while_every_agent_is_down_keeps_the_policy(
    cluster: dict[str, Node],
) -> None:
    """Every agent down, etcd wiped, the agents started again (a whole cluster restarted on
    a fresh etcd): each finds etcd behind the revision it had seen, keeps the policy from its
    saved copy and writes it back — not a node without it, and not one whose start removes it
    as deleted while it was away."""
    n1, n2 = cluster["hk-n1"], cluster["hk-n2"]
    etcd = n1.etcd
    for node in (n1, n2):
        assert node.agent.stop(signal.SIGKILL) == -signal.SIGKILL
    etcd.stop()
    shutil.rmtree(etcd.data_dir / "data")
    etcd.start()
    for node in (n2, n1):  # node 2 (which did not import it) first
        node.agent.start()
        assert node.api("Status")["policies"] == 1, node.agent.log()[-3000:]
    wait_for(lambda: n1.ipcache().get(f"{B.ip}/32") is not None, 15.0, "node 1 to know b")
    wait_for(lambda: n2.ipcache().get(f"{A.ip}/32") is not None, 15.0, "node 2 to know a")
    assert_enforced("whole cluster restarted on a wiped etcd")
    keys = etcdctl(n1, "get", "--prefix", "--keys-only", ROOT + "state/policies/v1/").stdout
    assert "hk-b-from-a" in keys, keys
