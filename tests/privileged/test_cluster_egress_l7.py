"""Egress L7 rules toward another node's endpoint: the source node's proxy decides, the
destination node still judges the client's own identity.

    netns gw-ul-<pid>:  bridge, etcd on 198.19.0.241:2379
        │ 198.19.0.0/24 underlay
    netns gw-n1-<pid> (198.19.0.221): garrison agent, pod CIDR 198.18.221.0/24
        endpoints gw-tie (tiefighter, 198.18.221.20), gw-xw (xwing, 198.18.221.21)
    netns gw-n2-<pid> (198.19.0.222): garrison agent, pod CIDR 198.18.222.0/24
        endpoint  gw-ds (deathstar, 198.18.222.20) running the Star Wars app

The ships' egress policy (HTTP rules toward the deathstar) sends their connections into node
1's proxy; its upstream connection leaves from the ship's own address (transparent), so node 2,
whose deathstar admits only the tiefighter's identity, tells the two ships apart. Node 1's
underlay program hands the deathstar's replies back to that upstream socket.

Every namespace and pin here is made by this module and removed by it, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from garrison.proxy.sockets import IP_TRANSPARENT, PROXY_UPSTREAM_MARK, SO_MARK
from garrison.proxy.upstream import UpstreamPool
from tests.privileged.agent_harness import (
    STARWARS,
    AgentEndpoint,
    app_requests,
    http_request,
    ns_socket,
)
from tests.privileged.cluster_harness import (
    CLUSTER_MARKS,
    Node,
    add_endpoint,
    running_cluster,
    wait_for,
)

pytestmark = CLUSTER_MARKS

ETCD_IP = "198.19.0.241"
SHIPS_EGRESS = """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: gw-ships-egress
    spec:
      endpointSelector:
        matchExpressions:
        - key: class
          operator: In
          values: [tiefighter, xwing]
      egress:
      - toEndpoints:
        - matchLabels:
            class: deathstar
        toPorts:
        - ports:
          - port: "80"
            protocol: TCP
          rules:
            http:
            - method: POST
              path: /v1/request-landing
"""
DEATHSTAR_INGRESS = """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: gw-deathstar-ingress
    spec:
      endpointSelector:
        matchLabels:
          class: deathstar
      ingress:
      - fromEndpoints:
        - matchLabels:
            class: tiefighter
        toPorts:
        - ports:
          - port: "80"
            protocol: TCP
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    with running_cluster(tmp_path_factory, "gw", 2, 220, ETCD_IP, 3) as nodes:
        yield nodes


@dataclass
class Scene:
    n1: Node
    n2: Node
    tie: AgentEndpoint
    xwing: AgentEndpoint
    ds: AgentEndpoint


@pytest.fixture(scope="module")
def scene(cluster: dict[str, Node]) -> Iterator[Scene]:
    n1, n2 = cluster["gw-n1"], cluster["gw-n2"]
    tie = add_endpoint(n1, "gw-tie", "org=empire,class=tiefighter", "198.18.221.20")
    xwing = add_endpoint(n1, "gw-xw", "org=alliance,class=xwing", "198.18.221.21")
    ds = add_endpoint(n2, "gw-ds", "org=empire,class=deathstar", "198.18.222.20")
    app = subprocess.Popen(
        ["ip", "netns", "exec", ds.name, sys.executable, str(STARWARS / "deathstar.py"),
         "--listen", "0.0.0.0:80"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: n2.ipcache().get(f"{tie.ip}/32") == tie.identity
            and n2.ipcache().get(f"{xwing.ip}/32") == xwing.identity
            and n1.ipcache().get(f"{ds.ip}/32") == ds.identity,
            10.0, "both nodes to know each other's endpoints",
        )
        wait_for(lambda: _app_up(ds), 15.0, "the deathstar app")
        yield Scene(n1, n2, tie, xwing, ds)
    finally:
        app.terminate()
        app.wait(10)


def _app_up(ds: AgentEndpoint) -> bool:
    try:
        app_requests(ds)
    except OSError:
        return False
    return True


def _written(scene: Scene, name: str, text: str) -> Path:
    path = scene.n1.agent.workdir / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _import(scene: Scene, name: str, path: Path) -> None:
    """Imported on node 1, in force on node 2 (through etcd)."""
    done = scene.n1.agent.cli("policy", "import", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(
        lambda: any(p["source"] == str(path) for p in scene.n2.api("PolicyGet")["policies"]),
        10.0, f"{name} to reach node 2",
    )


def _delete(scene: Scene, name: str) -> None:
    with contextlib.suppress(Exception):
        scene.n1.api("PolicyDelete", name=name)
    wait_for(
        lambda: all(p["name"] != name for p in scene.n2.api("PolicyGet")["policies"]),
        10.0, f"{name} to leave node 2",
    )


def _request(ship: AgentEndpoint, ds: AgentEndpoint, method: str, path: str,
             timeout: float = 5.0) -> tuple[int, bytes]:
    sock = ship.connect(ds.ip, 80, timeout=3.0)
    assert sock is not None, f"{ship.name} could not connect to {ds.ip}:80"
    with sock:
        return http_request(sock, method, path, timeout=timeout)


def test_egress_l7_toward_another_node_keeps_the_clients_identity(scene: Scene) -> None:
    n1, n2, tie, xwing, ds = scene.n1, scene.n2, scene.tie, scene.xwing, scene.ds
    _import(scene, "gw-ships-egress", _written(scene, "gw-ships-egress", SHIPS_EGRESS))
    _import(
        scene, "gw-deathstar-ingress",
        _written(scene, "gw-deathstar-ingress", DEATHSTAR_INGRESS),
    )
    try:
        # Allowed by node 1's proxy, admitted by node 2 for the tiefighter's identity.
        assert _request(tie, ds, "POST", "/v1/request-landing") == (200, b"Ship landed\n"), (
            n1.agent.log()[-3000:]
        )
        # Denied by node 1's proxy: the app never sees it.
        before = app_requests(ds)
        assert _request(tie, ds, "PUT", "/v1/exhaust-port") == (403, b"Access denied\r\n")
        assert app_requests(ds) == before + 1, "the denied request reached the deathstar"

        # Node 1's proxy records both, by the tiefighter's identity.
        l7 = [r for r in n1.flows('"L7"', tie.ip) if r["l7"].get("type") == "REQUEST"]
        landed = [r for r in l7 if "request-landing" in json.dumps(r)]
        denied = [r for r in l7 if "exhaust-port" in json.dumps(r)]
        assert landed and landed[-1]["verdict"] == "FORWARDED", l7
        assert denied and denied[-1]["verdict"] == "DROPPED", l7
        for record in (landed[-1], denied[-1]):
            assert record["source"]["identity"] == tie.identity
            assert record["destination"]["identity"] == ds.identity
            # the tiefighter's egress rules judged it: the records say so
            assert record["traffic_direction"] == "EGRESS", record
        # Node 2 judged the upstream connection by the tiefighter's identity.
        seen = [r for r in n2.flows(tie.ip, ds.ip) if r["verdict"] == "FORWARDED"]
        assert any(r["source"]["identity"] == tie.identity for r in seen), seen
        assert not n2.flows(n1.ip), "node 2 saw node 1's own address"

        # The xwing's request passes node 1's proxy (same egress rules) but node 2's
        # deathstar admits only the tiefighter: dropped there, by the xwing's identity.
        before = app_requests(ds)
        status, _ = _request(xwing, ds, "POST", "/v1/request-landing", timeout=15.0)
        assert status != 200
        assert app_requests(ds) == before + 1, "the xwing's request reached the deathstar"
        drops = [r for r in n2.flows(xwing.ip, '"DROPPED"')]
        assert drops and drops[-1]["source"]["identity"] == xwing.identity, drops

        # Still allowed afterwards, on a fresh connection (the pool never lends the xwing's
        # address to the tiefighter, or the other way round).
        assert _request(tie, ds, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
    finally:
        _delete(scene, "gw-ships-egress")
        _delete(scene, "gw-deathstar-ingress")


def test_ingress_l7_across_nodes_still_in_the_destinations_proxy(scene: Scene) -> None:
    n2, tie, xwing, ds = scene.n2, scene.tie, scene.xwing, scene.ds
    _import(scene, "rule1", STARWARS / "sw_l3_l4_l7_policy.yaml")
    try:
        assert _request(tie, ds, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
        before = app_requests(ds)
        assert _request(tie, ds, "PUT", "/v1/exhaust-port") == (403, b"Access denied\r\n")
        assert app_requests(ds) == before + 1, "the denied request reached the deathstar"
        denied = [
            r for r in n2.flows('"L7"', "exhaust-port") if r["l7"].get("type") == "REQUEST"
        ]
        assert denied and denied[-1]["verdict"] == "DROPPED"
        assert denied[-1]["source"]["identity"] == tie.identity
        assert denied[-1]["traffic_direction"] == "INGRESS"
        assert xwing.connect(ds.ip, 80, timeout=1.5) is None
    finally:
        _delete(scene, "rule1")


def test_egress_and_ingress_l7_across_nodes_both_proxies_decide(scene: Scene) -> None:
    """Both nodes' proxies in a row: node 1's for the ships' egress rules, node 2's for the
    deathstar's ingress rules — each records the request, by the tiefighter's identity."""
    n1, n2, tie, ds = scene.n1, scene.n2, scene.tie, scene.ds
    _import(scene, "gw-ships-egress", _written(scene, "gw-ships-egress", SHIPS_EGRESS))
    _import(scene, "rule1", STARWARS / "sw_l3_l4_l7_policy.yaml")
    try:
        assert _request(tie, ds, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
        for node in (n1, n2):
            landed = [
                r for r in node.flows('"L7"', "request-landing", tie.ip)
                if r["l7"].get("type") == "REQUEST" and r["verdict"] == "FORWARDED"
            ]
            assert landed, f"{node.name}'s proxy records the request"
            assert landed[-1]["source"]["identity"] == tie.identity
        before = app_requests(ds)
        assert _request(tie, ds, "PUT", "/v1/exhaust-port") == (403, b"Access denied\r\n")
        assert app_requests(ds) == before + 1
    finally:
        _delete(scene, "gw-ships-egress")
        _delete(scene, "rule1")


def _from_client_address(scene: Scene, mark: int | None) -> bool:
    """Whether a socket in node 1's own namespace, leaving from the tiefighter's address as
    the proxy's upstream does, gets its connection to the deathstar established."""
    sock = ns_socket(scene.n1.netns)
    with sock:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.bind((scene.tie.ip, 0))
        sock.settimeout(2.5)
        try:
            sock.connect((scene.ds.ip, 80))
        except OSError:
            return False
        return True


def test_replies_go_only_to_sockets_carrying_the_proxys_mark(scene: Scene) -> None:
    """from_netdev hands a reply to a host socket only when that socket carries the proxy's
    upstream mark; any other one's replies go on to the endpoint (which knows no such
    connection and resets it), as every packet did before."""
    assert _from_client_address(scene, PROXY_UPSTREAM_MARK)
    assert not _from_client_address(scene, None)
    assert not _from_client_address(scene, 0x100)


def test_the_pool_lends_a_client_addresss_connection_only_to_that_address() -> None:
    """Upstream connections that leave from a client's address (transparent) are kept per
    address: another client (or the node's own address) never gets one, so a destination
    never sees one client's requests under another's identity. On loopback, in the host
    namespace."""

    async def scenario() -> None:
        peers: list[str] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername")[0])
            await reader.read()
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        pool = UpstreamPool(asyncio.get_running_loop())
        try:
            conn = await pool.connect(address, source="127.0.0.5")
            await asyncio.sleep(0.1)
            assert peers == ["127.0.0.5"]
            pool.release(conn)
            assert pool.take_idle(address) is None
            assert pool.take_idle(address, source="127.0.0.6") is None
            assert pool.take_idle(address, source="127.0.0.5") is conn
            plain = await pool.connect(address)
            await asyncio.sleep(0.1)
            assert peers[-1] == "127.0.0.1"
            pool.release(plain)
            assert pool.take_idle(address, source="127.0.0.5") is None
            assert pool.take_idle(address) is plain
            pool.discard(conn)
            pool.discard(plain)
        finally:
            pool.close()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
