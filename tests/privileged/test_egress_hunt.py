"""Egress and peers outside the endpoints, end to end: a real agent of its own (in network
namespace `hg-node-<pid>`), real endpoints, a simulated outside world (namespace
`hg-world-<pid>`, addresses in 198.18.236.0/24 behind a veth of the node), and the node's own
addresses. What a client sees, the flow record, the ipcache, `policy trace`.

- A CIDR rule naming exactly an endpoint's address (`toCIDR: [<endpoint>/32]`) replaced the
  endpoint's ipcache entry with the CIDR identity: the endpoint's traffic carried that
  identity (a CIDR rule allowed an endpoint, which only identity rules may), and deleting the
  policy deleted the endpoint's entry, so that it was seen as `world` afterwards.
- The node's addresses other than the endpoints' gateway were `world`: an endpoint reached
  the host through them past an `egressDeny` of `host`, and `world` or a CIDR holding them
  allowed the host.
- A deny of the `reserved:world` selector stopped matching a world address once any policy
  (even one for other endpoints) named a CIDR holding it.
- The proxy identified the node's addresses as world: an egress HTTP rule toward the host
  was decided with world's rules (a PUT the host's rules deny passed).
- A node address removed while the agent was down stayed the host after the restart.
- `policy trace` could not trace an address (now `--dst-ip`/`--src-ip`), and answered
  ALLOWED for a host connection to an ingress L7 port, which the datapath drops.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from garrison.agent.endpoints import GATEWAY
from garrison.flows.record import FlowRecord, Verdict
from garrison.redirect.bpffs import BPFFS_MOUNT

from .agent_harness import (
    GARRISON,
    AgentEndpoint,
    EchoServer,
    NsAgent,
    http_request,
    ip,
    ns_socket,
    roundtrip,
)

pytestmark = pytest.mark.privileged

PID = os.getpid()
NODE = f"hg-node-{PID}"
WORLD = f"hg-world-{PID}"
NODE_WORLD_IP = "198.18.236.50"  # the node's own address toward the world
WORLD_IPS = ("198.18.236.60", "198.18.236.61", "198.18.236.62", "198.18.236.200")
PORT = 9100
QUICK = 1.0  # a dropped SYN costs this much


@dataclass
class Lab:
    agent: NsAgent
    endpoints: dict[str, AgentEndpoint]
    world: AgentEndpoint  # bound to every world address
    policies: Path

    def cli(self, *args: str, check: bool = True) -> str:
        done = self.agent.cli(*args)
        if check:
            assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        return done.stdout + done.stderr

    def add_endpoint(self, short: str, labels: str, host: int) -> AgentEndpoint:
        name = f"hg-{short}-{PID}"
        assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours"
        address = f"198.18.235.{host}"
        out = self.cli("endpoint", "add", name, "--labels", labels, "--ip", address)
        self.endpoints[name] = AgentEndpoint(name, address, tuple(labels.split(",")), 0, "")
        assert name in out, out
        return self.endpoints[name]

    def delete_endpoint(self, ep: AgentEndpoint) -> None:
        self.cli("endpoint", "delete", ep.name)
        del self.endpoints[ep.name]

    def trace(self, *args: str) -> dict[str, Any]:
        """`garrison policy trace ARGS -o json` (offline: no agent socket)."""
        done = subprocess.run([GARRISON, "policy", "trace", *args, "-o", "json"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def import_policy(self, name: str, text: str) -> None:
        path = self.policies / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        assert "imported" in self.cli("policy", "import", str(path))

    def delete_policies(self) -> None:
        self.cli("policy", "delete", "--all")

    def ipcache(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.cli("bpf", "ipcache", "list", "-o", "json"))
        return {str(r["prefix"]): r for r in rows.get("entries", rows)}

    def flows(self) -> list[FlowRecord]:
        out = self.cli("observe", "--last", "1000", "-o", "json")
        return [FlowRecord.from_json(line) for line in out.splitlines() if line.strip()]

    def wait_flow(self, predicate: Callable[[FlowRecord], bool],
                  timeout: float = 10.0) -> FlowRecord:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.flows() if predicate(r)]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, "no such flow record:\n" + "\n".join(
                r.to_json() for r in self.flows()[-20:])
            time.sleep(0.1)


def reaches(ep: AgentEndpoint, dst: str, port: int = PORT) -> bool:
    sock = ep.connect(dst, port, timeout=QUICK)
    if sock is None:
        return False
    with sock:
        return roundtrip(sock)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which("nsenter") is None:
        pytest.skip("needs nsenter (util-linux)")
    for name in (NODE, WORLD):
        assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours, left alone"
    made: list[str] = []
    work = tmp_path_factory.mktemp("hg-egress")
    agent = NsAgent(NODE, work, BPFFS_MOUNT / f"garrison-hg-egress-{PID}")
    lab = Lab(agent, {}, AgentEndpoint(WORLD, "0.0.0.0", (), 2, ""), work)
    try:
        for name in (NODE, WORLD):
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            ip(name, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", NODE, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True)
        # the world: a veth from the node (both ends go with the namespaces)
        ip(NODE, "link", "add", "hg-w0", "type", "veth", "peer", "name", "eth0", "netns", WORLD)
        ip(NODE, "addr", "add", f"{NODE_WORLD_IP}/24", "dev", "hg-w0")
        ip(NODE, "link", "set", "hg-w0", "up")
        for address in WORLD_IPS:
            ip(WORLD, "addr", "add", f"{address}/24", "dev", "eth0")
        ip(WORLD, "link", "set", "eth0", "up")
        ip(WORLD, "route", "add", "198.18.235.0/24", "via", NODE_WORLD_IP)
        agent.start()
        yield lab
    finally:
        agent.remove(list(lab.endpoints), [*lab.endpoints, *made])


@pytest.fixture(name="clean")
def fixture_clean(lab: Lab) -> Iterator[None]:
    before = set(lab.endpoints)
    yield
    lab.delete_policies()
    for name in set(lab.endpoints) - before:
        lab.delete_endpoint(lab.endpoints[name])


@contextlib.contextmanager
def serving(*eps: AgentEndpoint, port: int = PORT) -> Iterator[None]:
    servers = []
    try:
        for ep in eps:
            servers.append(EchoServer(ep, port))
        yield
    finally:
        for server in servers:
            server.close()


class HTTPServer:
    """Answers every request 200 `ok`, on `port` of every address of a namespace."""

    def __init__(self, ep: AgentEndpoint, port: int) -> None:
        self.sock = ns_socket(ep.name)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ep.ip, port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@contextlib.contextmanager
def http_servers(*eps: AgentEndpoint, port: int) -> Iterator[None]:
    servers = []
    try:
        for ep in eps:
            servers.append(HTTPServer(ep, port))
        yield
    finally:
        for server in servers:
            server.close()


def dropped_to(rec: FlowRecord, src: AgentEndpoint, dst: str, t0: int) -> bool:
    return (rec.time >= t0 and rec.verdict is Verdict.DROPPED and rec.source.ip == src.ip
            and rec.destination.ip == dst and rec.destination.port == PORT)


# ---- a CIDR rule naming an endpoint's own address ---------------------------------------------


def test_a_cidr_naming_an_endpoint_address_neither_allows_it_nor_erases_it(
    lab: Lab, clean: None
) -> None:
    a = lab.add_endpoint("ca", "app=hg-ca", 20)
    b = lab.add_endpoint("cb", "app=hg-cb", 21)
    b_entry = lab.ipcache()[f"{b.ip}/32"]
    lab.import_policy("cidr-endpoint", f"""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: hg-cidr-endpoint}}
        spec:
          endpointSelector: {{matchLabels: {{app: hg-ca}}}}
          egress:
          - toCIDR: [{b.ip}/32, 198.18.235.0/24]
        """)
    # the endpoint keeps its own entry: it is matched by identity, not by the CIDR rule
    assert lab.ipcache()[f"{b.ip}/32"] == b_entry
    with serving(b):
        t0 = time.time_ns()
        assert not reaches(a, b.ip)
        rec = lab.wait_flow(lambda r: dropped_to(r, a, b.ip, t0))
        assert rec.destination.identity == b_entry["identity"]
        # the policy gone, b is still b: a policy allowing b by its labels lets it in
        lab.delete_policies()
        assert lab.ipcache()[f"{b.ip}/32"] == b_entry
        lab.import_policy("from-b", """\
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: hg-from-b}
            spec:
              endpointSelector: {matchLabels: {app: hg-ca}}
              ingress:
              - fromEndpoints: [{matchLabels: {app: hg-cb}}]
            """)
        with serving(a):
            assert reaches(b, a.ip)
    # an endpoint deleted, the CIDR identity a policy wants for its address comes back
    lab.import_policy("cidr-endpoint-2", f"""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: hg-cidr-endpoint}}
        spec:
          endpointSelector: {{matchLabels: {{app: hg-ca}}}}
          egress:
          - toCIDR: [{b.ip}/32]
        """)
    lab.delete_endpoint(b)
    entry = lab.ipcache()[f"{b.ip}/32"]
    assert entry["identity"] >= 1 << 24 and not entry["local_endpoint"], entry


# ---- the node's own addresses are the host ----------------------------------------------------


def test_the_nodes_own_addresses_are_the_host_not_world(lab: Lab, clean: None) -> None:
    a = lab.add_endpoint("ha", "app=hg-ha", 30)
    node = AgentEndpoint(NODE, NODE_WORLD_IP, (), 1, "")
    world = WORLD_IPS[0]
    # everything but the host: the node's address on its world side is the host too
    lab.import_policy("not-host", """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: hg-not-host}
        spec:
          endpointSelector: {matchLabels: {app: hg-ha}}
          egress:
          - toEntities: [all]
          egressDeny:
          - toEntities: [host]
        """)
    with serving(node, lab.world):
        assert reaches(a, world)
        t0 = time.time_ns()
        assert not reaches(a, NODE_WORLD_IP)
        rec = lab.wait_flow(lambda r: dropped_to(r, a, NODE_WORLD_IP, t0))
        assert rec.destination.identity == 1
        assert rec.drop_reason_desc is not None and rec.drop_reason_desc.value == "POLICY_DENY"
        assert lab.ipcache()[f"{NODE_WORLD_IP}/32"]["identity"] == 1
        # world and a CIDR holding the node's address do not cover the host
        lab.delete_policies()
        lab.import_policy("world", """\
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: hg-world}
            spec:
              endpointSelector: {matchLabels: {app: hg-ha}}
              egress:
              - toEntities: [world]
              - toCIDR: [198.18.236.0/24]
            """)
        assert reaches(a, world)
        assert not reaches(a, NODE_WORLD_IP)
        # and `host` does
        lab.import_policy("host", """\
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: hg-host}
            spec:
              endpointSelector: {matchLabels: {app: hg-ha}}
              egress:
              - toEntities: [host]
            """)
        assert reaches(a, NODE_WORLD_IP)
    # an address the node gets later is the host at once; removed, it is no more
    extra = "198.18.236.51"
    ip(NODE, "addr", "add", f"{extra}/24", "dev", "hg-w0")
    try:
        deadline = time.monotonic() + 5
        while lab.ipcache().get(f"{extra}/32", {}).get("identity") != 1:
            assert time.monotonic() < deadline, lab.ipcache()
            time.sleep(0.1)
    finally:
        ip(NODE, "addr", "del", f"{extra}/24", "dev", "hg-w0")
    deadline = time.monotonic() + 5
    while f"{extra}/32" in lab.ipcache():
        assert time.monotonic() < deadline, lab.ipcache()
        time.sleep(0.1)


# ---- `policy trace --dst-ip` agrees with the datapath -----------------------------------------

AGREEMENT = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hg-out}
spec:
  endpointSelector: {matchLabels: {app: hg-ta}}
  egress:
  - toCIDRSet: [{cidr: 198.18.236.0/24, except: [198.18.236.128/25, 198.18.236.61/32]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hg-out-deny}
spec:
  endpointSelector: {matchLabels: {app: hg-ta}}
  egressDeny:
  - toCIDR: [198.18.236.62/32]
"""


def test_trace_of_an_address_agrees_with_the_datapath(lab: Lab, clean: None) -> None:
    a = lab.add_endpoint("ta", "app=hg-ta", 40)
    lab.import_policy("agreement", AGREEMENT)
    path = lab.policies / "agreement.yaml"
    seen = {}
    with serving(lab.world):
        for address in WORLD_IPS:
            traced = lab.trace("-f", str(path), "--src-labels", "app=hg-ta", "--dst-ip",
                               address, "--dport", str(PORT))
            t0 = time.time_ns()
            passed = seen[address] = reaches(a, address)
            assert passed == (traced["verdict"] == "allowed"), (address, traced)
            if not passed:
                rec = lab.wait_flow(lambda r, d=address, t=t0: dropped_to(r, a, d, t))
                assert rec.drop_reason_desc is not None
                assert rec.drop_reason_desc.value == traced["steps"][0]["l3_l4"]["drop_reason"]
    # .61 and .200 are in an except (no allow: POLICY_DENIED), .62 is denied (POLICY_DENY)
    assert seen == {"198.18.236.60": True, "198.18.236.61": False, "198.18.236.62": False,
                    "198.18.236.200": False}


# ---- egress L7 toward the host gets the host's rules ------------------------------------------

HOST_L7 = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hg-host-l7}
spec:
  endpointSelector: {matchLabels: {app: hg-la}}
  egress:
  - toEntities: [host]
    toPorts:
    - ports: [{port: "9180", protocol: TCP}]
      rules:
        http: [{method: GET, path: /ok}]
  - toEntities: [world]
    toPorts:
    - ports: [{port: "9180", protocol: TCP}]
      rules:
        http: [{}]
"""


def http_status(ep: AgentEndpoint, dst: str, method: str, path: str) -> int:
    sock = ep.connect(dst, 9180, timeout=3.0)
    assert sock is not None, f"{ep.name} -> {dst}:9180: no connection"
    with sock:
        return http_request(sock, method, path)[0]


def test_egress_l7_toward_the_host_applies_the_hosts_rules(lab: Lab, clean: None) -> None:
    """The proxy used to identify a node address as world (it knew CIDR prefixes only): the
    world's allow-all HTTP rules let a PUT through to the host, whose rules allow GET /ok."""
    a = lab.add_endpoint("la", "app=hg-la", 50)
    lab.import_policy("host-l7", HOST_L7)
    node = AgentEndpoint(NODE, "0.0.0.0", (), 1, "")
    with http_servers(node, lab.world, port=9180):
        for host_address in (NODE_WORLD_IP, str(GATEWAY)):
            assert http_status(a, host_address, "GET", "/ok") == 200
            t0 = time.time_ns()
            assert http_status(a, host_address, "PUT", "/ok") == 403
            rec = lab.wait_flow(lambda r, d=host_address, t=t0: r.time >= t
                                and r.l7 is not None and r.destination.ip == d
                                and r.verdict is Verdict.DROPPED)
            assert rec.destination.identity == 1
        assert http_status(a, WORLD_IPS[0], "PUT", "/ok") == 200  # world: allow-all


def test_ingress_l7_from_the_host_is_dropped_and_traced_so(lab: Lab, clean: None) -> None:
    """A connection from the host to a port with ingress L7 rules is dropped (no redirect at
    to_container); `policy trace` says the same with the same drop reason."""
    b = lab.add_endpoint("lb", "app=hg-lb", 51)
    lab.import_policy("probe", """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: hg-probe}
        spec:
          endpointSelector: {matchLabels: {app: hg-lb}}
          ingress:
          - fromEntities: [host]
            toPorts:
            - ports: [{port: "9180", protocol: TCP}]
              rules:
                http: [{method: GET, path: /ok}]
        """)
    traced = lab.trace("-f", str(lab.policies / "probe.yaml"), "--src-labels", "reserved:host",
                       "--dst-labels", "app=hg-lb", "--dport", "9180", "--http-method", "GET",
                       "--http-path", "/ok")
    assert traced["verdict"] == "denied"
    node = AgentEndpoint(NODE, str(GATEWAY), (), 1, "")
    with http_servers(AgentEndpoint(b.name, b.ip, (), 0, ""), port=9180):
        t0 = time.time_ns()
        assert node.connect(b.ip, 9180, timeout=QUICK) is None
    rec = lab.wait_flow(lambda r: r.time >= t0 and r.verdict is Verdict.DROPPED
                        and r.destination.ip == b.ip and r.destination.port == 9180)
    assert rec.drop_reason_desc is not None
    assert rec.drop_reason_desc.value == traced["steps"][1]["drop_reason"]


def test_a_deny_of_the_world_selector_holds_when_another_policy_names_a_cidr(
    lab: Lab, clean: None
) -> None:
    a = lab.add_endpoint("wa", "app=hg-wa", 52)
    lab.import_policy("no-world", """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: hg-no-world}
        spec:
          endpointSelector: {matchLabels: {app: hg-wa}}
          egress:
          - toEntities: [all]
          egressDeny:
          - toEndpoints: [{matchLabels: {"reserved:world": ""}}]
        """)
    with serving(lab.world):
        assert not reaches(a, WORLD_IPS[0])
        # a policy for other endpoints names a prefix holding the address
        lab.import_policy("other", """\
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: hg-other}
            spec:
              endpointSelector: {matchLabels: {app: hg-nobody}}
              egress:
              - toCIDR: [198.18.236.0/24]
            """)
        t0 = time.time_ns()
        assert not reaches(a, WORLD_IPS[0])
        rec = lab.wait_flow(lambda r: dropped_to(r, a, WORLD_IPS[0], t0))
        assert rec.drop_reason_desc is not None and rec.drop_reason_desc.value == "POLICY_DENY"


def test_an_address_the_node_lost_while_the_agent_was_away_is_not_the_host(
    lab: Lab, clean: None
) -> None:
    extra = "198.18.236.52"
    ip(NODE, "addr", "add", f"{extra}/24", "dev", "hg-w0")
    try:
        deadline = time.monotonic() + 5
        while lab.ipcache().get(f"{extra}/32", {}).get("identity") != 1:
            assert time.monotonic() < deadline, lab.ipcache()
            time.sleep(0.1)
        assert lab.agent.stop() == 0
    finally:
        ip(NODE, "addr", "del", f"{extra}/24", "dev", "hg-w0")
    lab.agent.start()
    cache = lab.ipcache()
    assert f"{extra}/32" not in cache, cache
    assert cache[f"{NODE_WORLD_IP}/32"]["identity"] == 1
    assert cache[f"{GATEWAY}/32"]["identity"] == 1
