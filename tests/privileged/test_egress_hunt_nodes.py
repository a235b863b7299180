"""Other nodes' addresses are `remote-node`, not `world` (Cilium's meaning), in a real cluster:

    netns hg-ul-<pid>:  bridge, etcd on 198.18.236.241:2379
        │ 198.18.236.0/24 underlay
    netns hg-n1-<pid> (198.18.236.221): agent, pod CIDR 198.18.235.0/25, endpoint hg-rn-a
    netns hg-n2-<pid> (198.18.236.222): agent, pod CIDR 198.18.235.128/25; a server of the
        node itself (its host) on its underlay address

Node 2's address used to be `world` on node 1: `toEntities: [world]` let an endpoint reach
another node's host, and an `egressDeny` of `remote-node` denied nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from garrison.flows.record import FlowRecord, Verdict
from tests.privileged.agent_harness import AgentEndpoint, EchoServer, roundtrip
from tests.privileged.cluster_harness import (
    CLUSTER_MARKS,
    Node,
    add_endpoint,
    running_cluster,
    wait_for,
)

pytestmark = CLUSTER_MARKS

PORT = 9200
NODE_IPS = ("198.18.236.221", "198.18.236.222")
REMOTE_NODE = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    with running_cluster(tmp_path_factory, "hg", 2, 0, "198.18.236.241", lease_ttl_s=10,
                         pod_cidrs=("198.18.235.0/25", "198.18.235.128/25"),
                         node_ips=NODE_IPS) as nodes:
        yield nodes


def import_policy(node: Node, name: str, text: str) -> None:
    path = node.agent.workdir / f"{name}.yaml"
    path.write_text(text)
    done = node.agent.cli("policy", "import", str(path))
    assert done.returncode == 0, done.stderr


def flows(node: Node) -> list[FlowRecord]:
    return [FlowRecord.from_json(f) for f in node.api("Flows", filter={}, limit=2000)["flows"]]


def reaches(ep: AgentEndpoint, dst: str) -> bool:
    sock = ep.connect(dst, PORT, timeout=1.0)
    if sock is None:
        return False
    with sock:
        return roundtrip(sock)


def test_another_nodes_address_is_remote_node(cluster: dict[str, Node]) -> None:
    n1, n2 = cluster["hg-n1"], cluster["hg-n2"]
    wait_for(lambda: n1.ipcache().get(f"{n2.ip}/32") == REMOTE_NODE, 20,
             "node 2's address as remote-node on node 1")
    assert n1.ipcache()[f"{n1.ip}/32"] == 1  # its own address is the host
    a = add_endpoint(n1, "hg-rn-a", "app=hg-rn-a", "198.18.235.20")
    server = EchoServer(AgentEndpoint(n2.netns, n2.ip, (), 0, ""), PORT)
    try:
        assert reaches(a, n2.ip)  # no policy
        import_policy(n1, "world", """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hg-world}
spec:
  endpointSelector: {matchLabels: {app: hg-rn-a}}
  egress:
  - toEntities: [world]
""")
        t0 = time.time_ns()
        assert not reaches(a, n2.ip)
        rec = next(r for r in reversed(flows(n1)) if r.time >= t0
                   and r.verdict is Verdict.DROPPED and r.destination.ip == n2.ip)
        assert rec.destination.identity == REMOTE_NODE
        import_policy(n1, "nodes", """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hg-nodes}
spec:
  endpointSelector: {matchLabels: {app: hg-rn-a}}
  egress:
  - toEntities: [all]
  egressDeny:
  - toEntities: [remote-node]
""")
        assert not reaches(a, n2.ip)
        import_policy(n1, "nodes", """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hg-nodes}
spec:
  endpointSelector: {matchLabels: {app: hg-rn-a}}
  egress:
  - toEntities: [remote-node]
""")
        assert reaches(a, n2.ip)
    finally:
        server.close()
