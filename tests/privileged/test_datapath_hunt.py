"""The L3/L4 datapath under a real agent, probed the way an endpoint's attacker would: crafted
packets from inside an endpoint (raw sockets: ICMP, spoofed and odd headers), read on the
other side with a packet socket, and the flow records the agent writes for them.

Names and addresses are this module's own, apart from every other agent test's: endpoints
`hd-*` with addresses from 198.18.232.0/24, the pin root `/sys/fs/bpf/garrison-hd-<pid>`, the
agent's state under /tmp/hd/, proxy ports 15871-15873. Teardown is `agent_harness`'s: the
endpoints deleted through the agent, the agent stopped by PID, its pins and (when no other
agent runs) its steering removed, and nothing of it left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from garrison.bpf.abi import DropReason as BPFDropReason
from garrison.bpf.abi import EventType
from garrison.bpf.loader import (
    PROGRAM_SOURCE,
    PROGRAMS,
    Datapath,
    DatapathConfig,
    flatten_source,
    import_bcc,
)
from garrison.bpf.syscall import TC_ACT_OK, TC_ACT_SHOT, SkbContext, bpf
from garrison.flows.record import DropReasonDesc, FlowRecord, L4Protocol, Verdict
from garrison.redirect import delete_endpoint, ensure_bpffs, remove_pin_dir
from garrison.redirect.bpffs import BPFFS_MOUNT

from .agent_harness import (
    GARRISON,
    AgentEndpoint,
    AgentProcess,
    _children,
    _setns,
    other_agents,
)

pytestmark = pytest.mark.privileged

PREFIX = "hd-"
ADDRESS_BLOCK = IPv4Network("198.18.232.0/24")
PROXY_PORTS = {"http": 15871, "grpc": 15872, "kafka": 15873}
WORK_ROOT = Path("/tmp/hd")


class HuntAgent(AgentProcess):
    """`AgentProcess` on this module's names, addresses and proxy ports."""

    def argv(self) -> list[str]:
        ports = ",".join(f"{k}={v}" for k, v in PROXY_PORTS.items())
        return [
            GARRISON, "agent", "--state-dir", str(self.workdir / "state"),
            "--socket", str(self.socket), "--bpffs-root", str(self.pin_root),
            "--proxy-ports", ports, "--access-log", str(self.access_log),
            "--node-name", "garrison-hd", *self.args,
        ]

    def add_endpoint(self, short: str, labels: str, host: int, cli: bool = False,
                     ports: Any = (), namespace: str | None = None) -> AgentEndpoint:
        name = f"{PREFIX}{short}"
        ip = str(ADDRESS_BLOCK.network_address + host)
        assert 0 < host < 255
        assert name in self.endpoints or name not in netns.listnetns(), (
            f"namespace {name} exists and is not this test's: left alone")
        self.created.add(name)
        data = self.call("EndpointAdd", name=name, labels=labels.split(","), ip=ip)
        ep = AgentEndpoint(name, ip, tuple(data["labels"]), int(data["identity"]),
                           str(data["host_veth"]))
        self.endpoints[name] = ep
        return ep


@pytest.fixture(scope="module", name="agent")
def fixture_agent() -> Iterator[HuntAgent]:
    ensure_bpffs()
    stale = sorted(n for n in netns.listnetns() if n.startswith(PREFIX))
    assert not stale, f"namespaces of an earlier run are left: {stale} (ip netns del NAME)"
    WORK_ROOT.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="agent-", dir=WORK_ROOT))
    pin_root = BPFFS_MOUNT / f"garrison-hd-{os.getpid()}"
    children_before = _children()
    agent = HuntAgent(workdir, pin_root)
    try:
        agent.start()
        yield agent
    finally:
        agent.stop_spawned(kept=True)
        if agent.alive:
            with contextlib.suppress(Exception):
                agent.delete_endpoints()
        status = agent.stop()
        for name in agent.created:
            delete_endpoint(name)
        others = other_agents({agent.pid} if agent.proc else set())
        if not others:  # else the steering stays: another agent may rely on it
            agent.cli("agent", "--cleanup", *agent.argv()[2:], check=False, socket_arg=False)
        if pin_root.exists():
            remove_pin_dir(pin_root)
        log = agent.log()
        shutil.rmtree(workdir, ignore_errors=True)
    assert status in (0, None), f"the agent did not stop cleanly ({status}):\n{log}"
    assert "Traceback" not in log, f"the agent logged a crash:\n{log}"
    assert not [n for n in netns.listnetns() if n.startswith(PREFIX)]
    assert not sorted(_children() - children_before)


@pytest.fixture(name="clean")
def fixture_clean(agent: HuntAgent) -> Iterator[None]:
    endpoints = set(agent.endpoints)
    yield
    agent.stop_spawned()
    if not agent.alive:
        agent.start()
    for name in set(agent.endpoints) - endpoints:
        agent.call("EndpointDelete", name=name)
        del agent.endpoints[name]
    agent.delete_policies()


@dataclass(frozen=True)
class Pair:
    a: AgentEndpoint
    b: AgentEndpoint


@pytest.fixture(scope="module")
def pair(agent: HuntAgent) -> Pair:
    return Pair(agent.add_endpoint("a", "app=a", 11), agent.add_endpoint("b", "app=b", 12))


# ---- packets ------------------------------------------------------------------------------


def ns_raw(name: str, family: int, kind: int, proto: int) -> socket.socket:
    with open(f"/run/netns/{name}") as target, open("/proc/thread-self/ns/net") as home:
        _setns(target.fileno())
        try:
            return socket.socket(family, kind, proto)
        finally:
            _setns(home.fileno())


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_message(icmp_type: int, code: int = 0, rest: bytes = b"\0" * 4,
                 payload: bytes = b"garrison-hd") -> bytes:
    head = struct.pack("!BBH", icmp_type, code, 0) + rest + payload
    return head[:2] + struct.pack("!H", checksum(head)) + head[4:]


class Capture:
    """Every IPv4 packet arriving at an endpoint's eth0 (a packet socket in its namespace)."""

    def __init__(self, ep: AgentEndpoint) -> None:
        self.sock = ns_raw(ep.name, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.05)

    def packets(self, wait: float = 0.5) -> list[bytes]:
        out: list[bytes] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                data, addr = self.sock.recvfrom(65535)
                if addr[2] != socket.PACKET_OUTGOING:
                    out.append(data)
        return out

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def capture(ep: AgentEndpoint) -> Iterator[Capture]:
    cap = Capture(ep)
    try:
        yield cap
    finally:
        cap.close()


def icmp_of(packet: bytes, src: str) -> tuple[int, int] | None:
    """(type, code) of an ICMP packet from `src`, else None."""
    ihl = (packet[0] & 0xF) * 4
    if packet[9] != socket.IPPROTO_ICMP or socket.inet_ntoa(packet[12:16]) != src:
        return None
    return packet[ihl], packet[ihl + 1]


def send_icmp(src: AgentEndpoint, dst: str, message: bytes) -> None:
    sock = ns_raw(src.name, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        sock.sendto(message, (dst, 0))


def policy(name: str, selected: str, body: str) -> str:
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}}}
spec:
  endpointSelector: {{matchLabels: {{app: {selected}}}}}
{body}"""


def drops_of(agent: HuntAgent, src: AgentEndpoint, dst: AgentEndpoint,
             since_ns: int) -> list[FlowRecord]:
    return [r for r in agent.flows() if r.verdict is Verdict.DROPPED
            and r.source.ip == src.ip and r.destination.ip == dst.ip and r.time >= since_ns]


def test_port_rule_of_protocol_any_lets_no_icmp_through(
    agent: HuntAgent, pair: Pair, clean: None
) -> None:
    """A rule allowing port 8 with protocol ANY (the default) allows TCP, UDP and SCTP port
    8, not ICMP type 8: an echo request from the peer is dropped POLICY_DENIED, and so is a
    timestamp request (13) a range 10-20 would hold. Before, the datapath looked ICMP's type
    up as a port and ANY matched it: a port rule let pings and ICMP of every type in it
    through, recorded as an L3-L4 allow."""
    a, b = pair.a, pair.b
    agent.import_policy("b-from-a-8", policy("b-from-a-8", "b", """\
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
    toPorts: [{ports: [{port: "8"}, {port: "10", endPort: 20}]}]
"""))
    t0 = time.time_ns()
    with capture(b) as cap_b:
        send_icmp(a, b.ip, icmp_message(8, rest=struct.pack("!HH", 0x4844, 1)))
        send_icmp(a, b.ip, icmp_message(13, rest=struct.pack("!HH", 0x4844, 2),
                                        payload=b"\0" * 12))
        arrived = [icmp_of(p, a.ip) for p in cap_b.packets()]
    assert (8, 0) not in arrived and (13, 0) not in arrived, (
        f"ICMP passed a port rule: {arrived}")
    deadline = time.monotonic() + 10
    while True:
        drops = drops_of(agent, a, b, t0)
        if {r.destination.port for r in drops} >= {8, 13} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {r.destination.port for r in drops} == {8, 13}, drops
    assert all(r.drop_reason_desc is DropReasonDesc.POLICY_DENIED for r in drops)
    assert all(r.l4 is not None and r.l4.protocol is L4Protocol.ICMPV4 for r in drops)
    # the port itself still passes: UDP to port 8 reaches b
    with capture(b) as cap_b:
        sock = ns_raw(a.name, socket.AF_INET, socket.SOCK_DGRAM, 0)
        with sock:
            sock.sendto(b"udp-8", (b.ip, 8))
        udp = [p for p in cap_b.packets() if p[9] == socket.IPPROTO_UDP]
    assert udp and udp[0].endswith(b"udp-8")


def test_an_echo_request_with_our_identifier_is_no_reply(
    agent: HuntAgent, pair: Pair, clean: None, guarded: AgentEndpoint
) -> None:
    """a pings b (b's icmps rule admits a) and gets its reply; a admits only c. b then sends
    a an echo request carrying a's own identifier: a's ingress denies it, so it must not
    arrive. Before, request and reply shared one conntrack tuple (identifier in both
    ports), so b's request read as the reply of a's ping and passed a's ingress policy for
    the conntrack entry's lifetime; and any other ICMP type from b passed the same way once
    a had sent one (both ports 0)."""
    a, b = pair.a, pair.b
    agent.import_policy("b-ping-from-a", policy("b-ping-from-a", "b", """\
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
    icmps: [{fields: [{type: 8}, {type: 13}]}]
"""))
    with capture(a) as cap_a:
        send_icmp(a, b.ip, icmp_message(8, rest=struct.pack("!HH", 0x7777, 1)))
        send_icmp(a, b.ip, icmp_message(13, rest=struct.pack("!HH", 0x7777, 2),
                                        payload=b"\0" * 12))
        replies = [icmp_of(p, b.ip) for p in cap_a.packets()]
        assert (0, 0) in replies and (14, 0) in replies, (
            f"the replies to a's echo and timestamp requests did not come back: {replies}")
        t0 = time.time_ns()
        send_icmp(b, a.ip, icmp_message(8, rest=struct.pack("!HH", 0x7777, 9)))
        send_icmp(b, a.ip, icmp_message(13, rest=struct.pack("!HH", 0x7777, 9),
                                        payload=b"\0" * 12))
        arrived = [icmp_of(p, b.ip) for p in cap_a.packets()]
    assert (8, 0) not in arrived and (13, 0) not in arrived, (
        f"b's requests passed a's ingress as replies: {arrived}")
    deadline = time.monotonic() + 10
    while True:
        drops = drops_of(agent, b, a, t0)
        if {r.destination.port for r in drops} >= {8, 13} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {r.destination.port for r in drops} == {8, 13}
    assert all(r.drop_reason_desc is DropReasonDesc.POLICY_DENIED for r in drops)


def test_an_address_handed_on_carries_no_conntrack_entries(
    agent: HuntAgent, pair: Pair, clean: None, guarded: AgentEndpoint
) -> None:
    """Endpoint c (admitted by b on 9000) sends b a UDP datagram, is deleted, and a new
    endpoint z, which b does not admit, gets c's address (the lowest free one is handed out
    again at once): z's datagram from the same source port must not arrive. Before, the
    conntrack entry of c's flow outlived c, and z's packets matching it passed as c's (for
    an established TCP connection's tuple, for 6 hours)."""
    b, c = pair.b, guarded
    with capture(b) as cap:
        send_udp_from(c, 45000, b.ip, 9000, b"from-c")
        assert [p for p in cap.packets() if p.endswith(b"from-c")], "c's datagram is lost"
    agent.call("EndpointDelete", name=c.name)
    del agent.endpoints[c.name]
    z = agent.add_endpoint("z", "app=z", 13)
    assert z.ip == c.ip
    t0 = time.time_ns()
    with capture(b) as cap:
        send_udp_from(z, 45000, b.ip, 9000, b"from-z")
        assert not [p for p in cap.packets() if p.endswith(b"from-z")], (
            "z's datagram passed on c's conntrack entry")
    drop = agent.wait_flow(lambda r: r.verdict is Verdict.DROPPED and r.time >= t0
                           and r.source.ip == z.ip and r.destination.port == 9000)
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert drop.source.identity == z.identity


def send_udp_from(ep: AgentEndpoint, sport: int, dst: str, dport: int, data: bytes) -> None:
    sock = ns_raw(ep.name, socket.AF_INET, socket.SOCK_DGRAM, 0)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ep.ip, sport))
        sock.sendto(data, (dst, dport))


def test_the_peers_port_unreachable_reaches_a_client_whose_ingress_is_enforced(
    agent: HuntAgent, pair: Pair, clean: None, guarded: AgentEndpoint
) -> None:
    """a (whose ingress admits only c) sends UDP to b on a port b admits it on and where
    nothing listens: b's port unreachable passes as related to a's flow, so a's connected
    socket fails at once with ECONNREFUSED, as without garrison. Before, a's ingress policy
    dropped it (an ICMP type-3 message from b) and the client waited for its timeout. A
    forged error from b quoting a's flow with c, or a flow that does not exist, is still
    judged by a's ingress policy and dropped."""
    a, b, c = pair.a, pair.b, guarded
    agent.import_policy("b-udp-from-a", policy("b-udp-from-a", "b", """\
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
    toPorts: [{ports: [{port: "9001", protocol: UDP}]}]
"""))
    sock = ns_raw(a.name, socket.AF_INET, socket.SOCK_DGRAM, 0)
    with sock:
        sock.settimeout(3.0)
        sock.connect((b.ip, 9001))
        sock.send(b"anyone there?")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)
    # a flow of a's with c, and errors b forges about it and about nothing at all
    with capture(a) as cap_a:
        send_udp_from(a, 45100, c.ip, 9000, b"to-c")
        quoted = ip_packet(a.ip, c.ip, socket.IPPROTO_UDP, udp_segment(45100, 9000, b"to-c"))
        nothing = ip_packet(a.ip, b.ip, socket.IPPROTO_UDP, udp_segment(45101, 9001, b"none"))
        t0 = time.time_ns()
        for inner in (quoted, nothing):
            send_icmp(b, a.ip, icmp_message(3, 3, payload=inner[:28]))
        arrived = [icmp_of(p, b.ip) for p in cap_a.packets()]
    assert (3, 3) not in arrived, f"a forged error passed a's ingress: {arrived}"
    deadline = time.monotonic() + 10
    while len(drops := drops_of(agent, b, a, t0)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {(r.destination.port, r.drop_reason_desc) for r in drops} == {
        (3, DropReasonDesc.POLICY_DENIED)}


def test_a_cidr_naming_an_endpoints_address_leaves_its_identity(
    agent: HuntAgent, pair: Pair, clean: None, guarded: AgentEndpoint
) -> None:
    """b may send anywhere but to app=a (an egressDeny over an allow-all; a's ingress admits
    b, so the deny alone keeps b out). A policy of c's
    naming a's address as a CIDR (`toCIDR: [A/32]`) must not change who a is: b's datagrams
    to a stay dropped by the deny while that policy exists and after it is deleted. Before,
    the CIDR identity overwrote a's ipcache entry and deleting the policy deleted the entry,
    so b's egress saw a as a CIDR, then as the world: the deny no longer matched and b
    reached a (a's ingress L7 rules could no longer redirect either)."""
    a, b = pair.a, pair.b
    assert guarded.ip != a.ip  # c, whose policy names a's address
    agent.import_policy("b-not-to-a", policy("b-not-to-a", "b", """\
  egressDeny:
  - toEndpoints: [{matchLabels: {app: a}}]
  egress:
  - toEntities: [all]
"""))
    agent.import_policy("a-from-b", policy("a-from-b", "a", """\
  ingress:
  - fromEndpoints: [{matchLabels: {app: b}}]
"""))

    ports = iter(range(45300, 45310))  # a flow of its own each time: no conntrack entry

    def b_reaches_a(tag: bytes) -> bool:
        with capture(a) as cap:
            send_udp_from(b, next(ports), a.ip, 9000, tag)
            return bool([p for p in cap.packets() if p.endswith(tag)])

    def a_entry() -> str:
        listing = agent.cli("bpf", "ipcache", "list").stdout
        return next((ln for ln in listing.splitlines() if ln.startswith(f"{a.ip}/32")), "")

    assert not b_reaches_a(b"before")
    agent.import_policy("c-to-a-cidr", policy("c-to-a-cidr", "c", f"""\
  egress:
  - toCIDR: [{a.ip}/32]
"""))
    assert not b_reaches_a(b"with-cidr"), "b reached a while a CIDR named a's address"
    assert a_entry().split()[1:] == [str(a.identity), str(agent_ifindex(a)), "True"]
    agent.cli("policy", "delete", "c-to-a-cidr")
    assert not b_reaches_a(b"after-cidr"), "b reached a once the CIDR policy was deleted"
    assert a_entry().split()[1:] == [str(a.identity), str(agent_ifindex(a)), "True"]


def agent_ifindex(ep: AgentEndpoint) -> int:
    return socket.if_nametoindex(ep.host_veth)


HOST_EXTRA = "198.19.0.230"  # a second address of the host, on a device of the test's


@contextlib.contextmanager
def host_address(address: str) -> Iterator[None]:
    """`address`/32 on a veth `hdhost0` (peer `hdhost1`, both in the host's namespace: this
    kernel has no dummy devices), removed after."""
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname="hdhost0"), "hdhost0 exists: not ours, left alone"
        ipr.link("add", ifname="hdhost0", kind="veth", peer="hdhost1")
        try:
            index = ipr.link_lookup(ifname="hdhost0")[0]
            ipr.addr("add", index=index, address=address, prefixlen=32)
            ipr.link("set", index=index, state="up")
            yield
        finally:
            ipr.link("del", ifname="hdhost0")


def test_the_hosts_other_addresses_are_the_host_not_the_world(
    agent: HuntAgent, pair: Pair, clean: None
) -> None:
    """a may reach the world, not the host. A service of the host listening on one of the
    host's addresses other than the gateway (its external address, say) is the host: a's
    connection to it is dropped, recorded with the host's identity, and passes once a may
    reach the host. Before, only the gateway address was the host in the ipcache; every
    other address of the node was the world, so `toEntities: [world]` (or a CIDR rule for
    the internet) let an endpoint reach the node's own services."""
    a = pair.a
    agent.import_policy("a-to-world", policy("a-to-world", "a", """\
  egress:
  - toEntities: [world]
"""))
    with host_address(HOST_EXTRA), socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((HOST_EXTRA, 15881))
        server.listen(128)  # never accepted: the handshake alone says who got through
        # the agent reads the host's addresses every 2 s: until then a new one is unknown
        t0 = time.time_ns()
        deadline = time.monotonic() + 10
        while (sock := a.connect(HOST_EXTRA, 15881, timeout=1.0)) is not None:
            sock.close()
            assert time.monotonic() < deadline, (
                "a reached a service of the host through its other address")
            time.sleep(0.3)
        drop = agent.wait_flow(lambda r: r.verdict is Verdict.DROPPED and r.time >= t0
                               and r.destination.ip == HOST_EXTRA)
        assert drop.destination.identity == 1 and drop.source.identity == a.identity
        agent.import_policy("a-to-host", policy("a-to-host", "a", """\
  egress:
  - toEntities: [host]
"""))
        sock = a.connect(HOST_EXTRA, 15881, timeout=3.0)
        assert sock is not None, "toEntities: [host] does not reach the host's other address"
        sock.close()
    deadline = time.monotonic() + 15
    while f"{HOST_EXTRA}/32" in agent.cli("bpf", "ipcache", "list").stdout:
        assert time.monotonic() < deadline, "a gone address of the host stays the host"
        time.sleep(0.2)


# ---- a cluster node's underlay (from_netdev), on crafted frames ------------------------------


@pytest.fixture
def datapath() -> Iterator[Datapath]:
    """The programs loaded over maps pinned under a root of this module's, unattached."""
    ensure_bpffs()
    pin_root = BPFFS_MOUNT / f"garrison-hd-dp-{os.getpid()}"
    dp = Datapath.load(DatapathConfig(pin_root=pin_root))
    try:
        yield dp
    finally:
        dp.close()
        remove_pin_dir(pin_root)


def test_a_local_endpoints_address_arriving_from_the_underlay_is_dropped(
    datapath: Datapath
) -> None:
    """A packet arriving on a cluster node's underlay device with the address of one of the
    node's own endpoints is forged (their packets leave through their veths): from_netdev
    drops it as INVALID_SOURCE_IP. Before, it passed on to the destination's to_container,
    which took it for that endpoint: its identity before policy, and its connections'
    conntrack entries — a datagram matching a local flow went straight in. A remote address
    still passes on."""
    local, other, remote = "198.18.232.21", "198.18.232.22", "198.18.232.99"
    for ip, identity, ifindex in ((local, 300, 11), (other, 301, 12)):
        datapath.maps.ipcache.upsert(IPv4Network(f"{ip}/32"), identity, ifindex=ifindex,
                                     local_endpoint=True)
    datapath.maps.events.drain()
    forged = datapath.test_run("from_netdev", ether(ip_packet(
        local, other, socket.IPPROTO_UDP, udp_segment(4000, 9000, b"forged"))), SkbContext())
    assert forged.retval == TC_ACT_SHOT
    [drop] = [e for e in datapath.maps.events.drain() if e.type is EventType.DROP]
    assert drop.reason is BPFDropReason.INVALID_SOURCE_IP
    assert (str(drop.saddr), str(drop.daddr)) == (local, other)
    passed = datapath.test_run("from_netdev", ether(ip_packet(
        remote, other, socket.IPPROTO_UDP, udp_segment(4000, 9000, b"remote"))), SkbContext())
    assert passed.retval == TC_ACT_OK


def ether(packet: bytes) -> bytes:
    return bytes.fromhex("020000007700020000007701") + b"\x08\x00" + packet


# ---- the verifier's budget ----------------------------------------------------------------

VERIFIER_LIMIT = 1_000_000  # instructions the kernel's verifier processes before it gives up
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_LOG_STATS = 4


def verifier_processed(pin_root: Path) -> dict[str, int]:
    """How many instructions the verifier processed for each program: the programs bcc
    compiled, loaded once more by hand with the log's statistics (bcc does not ask for
    them), over maps pinned under `pin_root`."""
    bcc = import_bcc()
    b = bcc.BPF(text=flatten_source(PROGRAM_SOURCE).encode(),
                cflags=DatapathConfig(pin_root=pin_root).cflags())
    out: dict[str, int] = {}
    try:
        for name in PROGRAMS:
            insns = b.dump_func(name.encode())
            code = ctypes.create_string_buffer(insns, len(insns))
            license_ = ctypes.create_string_buffer(b"GPL")
            log = ctypes.create_string_buffer(1 << 16)
            attr = ctypes.create_string_buffer(128)
            struct.pack_into("IIQQIIQ", attr, 0, BPF_PROG_TYPE_SCHED_CLS, len(insns) // 8,
                             ctypes.addressof(code), ctypes.addressof(license_),
                             BPF_LOG_STATS, len(log), ctypes.addressof(log))
            with contextlib.suppress(OSError):  # too large: the log still says how far
                os.close(bpf(BPF_PROG_LOAD, attr))
            found = re.search(r"processed (\d+) insns", log.value.decode(errors="replace"))
            assert found, log.value.decode(errors="replace")[-2000:]
            out[name] = int(found.group(1))
    finally:
        b.cleanup()
    return out


def test_programs_keep_a_third_of_the_verifier_budget() -> None:
    """Every program verifies with a third of the kernel's million-instruction budget to
    spare. from_container once took 946k: any addition to the policy lookup made the agent
    fail to start ("Argument list too long ... Program too large"), and a kernel whose
    verifier prunes a little worse would have refused it as it was."""
    ensure_bpffs()
    pin_root = BPFFS_MOUNT / f"garrison-hd-verifier-{os.getpid()}"
    pin_root.mkdir()
    try:
        processed = verifier_processed(pin_root)
    finally:
        remove_pin_dir(pin_root)
    assert set(processed) == set(PROGRAMS)
    over = {name: n for name, n in processed.items() if n > VERIFIER_LIMIT * 2 // 3}
    assert not over, f"verifier instructions processed (of {VERIFIER_LIMIT}): {processed}"


# ---- spoofed sources and fragments -------------------------------------------------------

def ip_packet(src: str, dst: str, proto: int, payload: bytes, ident: int = 0x4844,
              frag: int = 0, ttl: int = 64) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, ttl, proto,
                       0, socket.inet_aton(src), socket.inet_aton(dst))
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return head + payload


def udp_segment(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def send_ip(ep: AgentEndpoint, packet: bytes) -> None:
    sock = ns_raw(ep.name, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with sock:
        sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))


@pytest.fixture
def guarded(agent: HuntAgent, pair: Pair) -> Iterator[AgentEndpoint]:
    """A third endpoint c; b admits only c (UDP/TCP 9000), a admits only c."""
    c = agent.add_endpoint("c", "app=c", 13)
    agent.import_policy("b-from-c", policy("b-from-c", "b", """\
  ingress:
  - fromEndpoints: [{matchLabels: {app: c}}]
    toPorts: [{ports: [{port: "9000"}]}]
"""))
    agent.import_policy("a-from-c", policy("a-from-c", "a", """\
  ingress:
  - fromEndpoints: [{matchLabels: {app: c}}]
"""))
    yield c


def wait_drop(agent: HuntAgent, reason: DropReasonDesc, since_ns: int) -> FlowRecord:
    return agent.wait_flow(lambda r: r.verdict is Verdict.DROPPED
                           and r.drop_reason_desc is reason and r.time >= since_ns)


def test_a_spoofed_source_is_dropped_and_recorded_as_its_senders(
    agent: HuntAgent, pair: Pair, clean: None, guarded: AgentEndpoint
) -> None:
    """a sends UDP to b claiming c's address (which b admits): nothing arrives, and the drop
    record names a — the endpoint that sent it, with its identity — beside the address it
    claimed. Before, the record named c's pod (looked up by the claimed address) with
    identity 0: the log blamed the endpoint that was impersonated."""
    a, b, c = pair.a, pair.b, guarded
    t0 = time.time_ns()
    with capture(b) as cap:
        send_ip(a, ip_packet(c.ip, b.ip, socket.IPPROTO_UDP, udp_segment(4000, 9000, b"spoof")))
        assert not [p for p in cap.packets() if b"spoof" in p], "a spoofed packet arrived"
    drop = wait_drop(agent, DropReasonDesc.INVALID_SOURCE_IP, t0)
    assert (drop.source.pod_name, drop.source.identity) == (a.name, a.identity), drop.source
    assert drop.source.ip == c.ip and "k8s:app=a" in drop.source.labels
    assert (drop.destination.ip, drop.destination.port) == (b.ip, 9000)
    # the mark of to_container's deny answers (0x0c00) set by the endpoint itself passes
    # nothing: a mark does not cross into the host's namespace
    sock = a.new_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x0C00)
    sock.settimeout(1.0)
    with b.listen(9000), sock, pytest.raises(OSError):
        sock.connect((b.ip, 9000))


def test_fragments_are_dropped_and_recorded_with_their_addresses(
    agent: HuntAgent, pair: Pair, clean: None, guarded: AgentEndpoint
) -> None:
    """IPv4 fragments are dropped (the datapath reads no ports past the first one, so it
    fails closed): a first fragment to a port b admits, and a later fragment alone carrying
    what reads as a UDP header to that port. Each drop record names the packet's addresses,
    so an operator sees who sends fragments to whom; before, both were 0.0.0.0."""
    a, b, c = pair.a, pair.b, guarded
    t0 = time.time_ns()
    with capture(b) as cap:
        send_ip(c, ip_packet(c.ip, b.ip, socket.IPPROTO_UDP, udp_segment(4000, 9000, b"frag1"),
                             frag=0x2000))  # MF, offset 0
        send_ip(a, ip_packet(a.ip, b.ip, socket.IPPROTO_UDP, udp_segment(4000, 9000, b"frag2"),
                             frag=0x0003))  # offset 24, a header of its own
        assert not [p for p in cap.packets() if b"frag" in p], "a fragment arrived"
    deadline = time.monotonic() + 10
    while True:
        drops = [r for r in agent.flows() if r.time >= t0 and r.verdict is Verdict.DROPPED
                 and r.drop_reason_desc is DropReasonDesc.IP_FRAGMENTATION_NOT_SUPPORTED]
        if len(drops) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    got = sorted((r.source.ip, r.source.pod_name, r.source.identity, r.destination.ip)
                 for r in drops)
    assert got == sorted([(c.ip, c.name, c.identity, b.ip), (a.ip, a.name, a.identity, b.ip)])
    assert all(r.l4 is not None and r.l4.protocol is L4Protocol.UDP for r in drops)
