"""Answers for denied connections (`garrison endpoint config NAME deny-response=...`, a
garrison extension; docs/policy.md "Answers for denied connections").

Two parts:
- the programs themselves, run by the kernel on crafted frames (BPF_PROG_TEST_RUN): the
  answer's every byte and checksum, IP options quoted, what is never answered, the rate
  limit;
- a real agent (its own, in a network namespace of its own: `gx-node-<pid>`) with real
  endpoints: a client whose connection is denied gets ECONNREFUSED at once with tcp-reset,
  EHOSTUNREACH with icmp (the ICMP message itself read with a raw socket), a timeout by
  default; allowed traffic is untouched; the flow record names the answer; audit mode wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from garrison.bpf import abi
from garrison.bpf.abi import EndpointFlags, EventFlags, EventType
from garrison.bpf.loader import Datapath
from garrison.bpf.maps import EndpointConfig
from garrison.bpf.syscall import TC_ACT_SHOT, SkbContext
from garrison.flows.record import FlowRecord, FlowType, Verdict
from garrison.redirect.bpffs import BPFFS_MOUNT

from .agent_harness import NsAgent, ip, ns_socket
from .test_datapath_harness import (  # noqa: F401 (fixtures)
    fixture_bpffs,
    fixture_datapath,
    fixture_dp,
    fixture_no_leftovers,
)

pytestmark = pytest.mark.privileged

TC_ACT_REDIRECT = 7
LO = 1
ME, PEER = "198.18.77.1", "198.18.77.2"
ME_ID = 700
MAC_ME, MAC_HOST = bytes.fromhex("020000007701"), bytes.fromhex("020000007700")


# ---- checksums and frames ------------------------------------------------------------------


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_header(src: str, dst: str, proto: int, payload: int, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + payload, 7, 0x4000, 64, proto,
                       0, socket.inet_aton(src), socket.inet_aton(dst)) + options
    return head[:10] + struct.pack("!H", csum(head)) + head[12:]


def tcp_frame(src: str, dst: str, flags: int = 0x02, seq: int = 1000, ack: int = 0,
              payload: bytes = b"", options: bytes = b"", eth_dst: bytes = MAC_HOST,
              eth_src: bytes = MAC_ME) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 8080, seq, ack, 5 << 4, flags, 65535, 0, 0)
    return (eth_dst + eth_src + b"\x08\x00"
            + ip_header(src, dst, socket.IPPROTO_TCP, len(tcp) + len(payload), options)
            + tcp + payload)


def udp_frame(src: str, dst: str, eth_dst: bytes = MAC_HOST) -> bytes:
    udp = struct.pack("!HHHH", 40000, 5353, 8 + 4, 0) + b"abcd"
    return eth_dst + MAC_ME + b"\x08\x00" + ip_header(src, dst, socket.IPPROTO_UDP, 12) + udp


def icmp_frame(src: str, dst: str, icmp_type: int) -> bytes:
    icmp = struct.pack("!BBHHH", icmp_type, 0, 0, 9, 1) + b"pingdata"
    head = ip_header(src, dst, socket.IPPROTO_ICMP, len(icmp))
    return MAC_HOST + MAC_ME + b"\x08\x00" + head + icmp


@dataclass(frozen=True)
class Answer:
    eth_dst: bytes
    eth_src: bytes
    src: str
    dst: str
    ttl: int
    proto: int
    l4: bytes


def parse_answer(data: bytes) -> Answer:
    """The answer frame, its IP header and L4 checksums verified."""
    assert data[12:14] == b"\x08\x00"
    iph = data[14:34]
    assert iph[0] == 0x45
    total = struct.unpack("!H", iph[2:4])[0]
    assert len(data) == 14 + total, "the frame is exactly the answer"
    assert csum(iph) == 0, "IP header checksum"
    l4 = data[34:]
    src, dst = socket.inet_ntoa(iph[12:16]), socket.inet_ntoa(iph[16:20])
    if iph[9] == socket.IPPROTO_TCP:
        pseudo = iph[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(l4))
        assert csum(pseudo + l4) == 0, "TCP checksum"
    else:
        assert csum(l4) == 0, "ICMP checksum"
    return Answer(data[0:6], data[6:12], src, dst, iph[8], iph[9], l4)


# ---- the programs, on crafted frames ---------------------------------------------------------


def configure(dp: Datapath, flags: EndpointFlags) -> None:
    dp.maps.endpoints.upsert(LO, EndpointConfig(ME_ID, IPv4Address(ME), flags))


def run(dp: Datapath, program: str, frame: bytes) -> tuple[int, bytes, list[Any]]:
    dp.maps.events.drain()
    result = dp.test_run(program, frame, SkbContext(ifindex=LO))
    return result.retval, result.data, dp.maps.events.drain()


def drop_of(events: list[Any]) -> Any:
    [drop] = [e for e in events if e.type is EventType.DROP]
    return drop


ENFORCED = EndpointFlags.INGRESS_ENFORCED | EndpointFlags.EGRESS_ENFORCED


def test_tcp_reset_answers_a_denied_syn_in_both_directions(dp: Datapath) -> None:
    configure(dp, ENFORCED | EndpointFlags.DENY_RESPONSE_TCP_RESET)
    # egress: the endpoint's own SYN, answered from the address it tried to reach
    rc, data, events = run(dp, "from_container", tcp_frame(ME, PEER, seq=0xFFFFFFFF))
    assert rc == TC_ACT_REDIRECT
    a = parse_answer(data)
    assert (a.eth_dst, a.eth_src, a.src, a.dst, a.proto) == (
        MAC_ME, MAC_HOST, PEER, ME, socket.IPPROTO_TCP)
    sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", a.l4[:14])
    assert (sport, dport, seq, ack, off >> 4, flags) == (8080, 40000, 0, 0, 5, 0x14)  # wraps
    drop = drop_of(events)
    assert drop.reason is abi.DropReason.POLICY_DENIED
    assert drop.flags & EventFlags.DENY_RESPONSE_TCP_RESET
    assert drop.direction is abi.TrafficDirection.EGRESS

    # ingress, at to_container: a SYN with data (TCP Fast Open) is acknowledged in full
    rc, data, events = run(dp, "to_container",
                           tcp_frame(PEER, ME, seq=5000, payload=b"hello", eth_dst=MAC_ME,
                                     eth_src=MAC_HOST))
    assert rc == TC_ACT_REDIRECT
    a = parse_answer(data)
    assert (a.src, a.dst, a.eth_dst) == (ME, PEER, MAC_HOST)
    assert struct.unpack("!IIxB", a.l4[4:14]) == (0, 5000 + 1 + 5, 0x14)
    assert drop_of(events).direction is abi.TrafficDirection.INGRESS

    # a segment with ACK (no connection known) gets a RST at its ack number, no ACK flag
    rc, data, _ = run(dp, "from_container", tcp_frame(ME, PEER, flags=0x10, seq=7, ack=4242))
    assert rc == TC_ACT_REDIRECT
    assert struct.unpack("!IIxB", parse_answer(data).l4[4:14]) == (4242, 0, 0x04)


def test_icmp_quotes_the_ip_header_with_its_options_and_8_bytes(dp: Datapath) -> None:
    configure(dp, ENFORCED | EndpointFlags.DENY_RESPONSE_ICMP)
    options = b"\x94\x04\x00\x00" + b"\x01\x01\x01\x00"  # router alert, NOPs, end
    frame = tcp_frame(ME, PEER, options=options, payload=b"x" * 100)
    rc, data, events = run(dp, "from_container", frame)
    assert rc == TC_ACT_REDIRECT
    a = parse_answer(data)
    assert (a.src, a.dst, a.proto, a.ttl) == (PEER, ME, socket.IPPROTO_ICMP, 64)
    assert a.l4[:2] == b"\x03\x0d"  # destination unreachable, administratively prohibited
    quoted = frame[14:14 + 28 + 8]  # the header with its 8 bytes of options, 8 bytes of TCP
    assert a.l4[8:] == quoted
    assert drop_of(events).flags & EventFlags.DENY_RESPONSE_ICMP

    # UDP, and tcp-reset's fallback for what is not TCP
    configure(dp, ENFORCED | EndpointFlags.DENY_RESPONSE_TCP_RESET)
    frame = udp_frame(PEER, ME, eth_dst=MAC_ME)
    rc, data, events = run(dp, "to_container", frame)
    assert rc == TC_ACT_REDIRECT
    a = parse_answer(data)
    assert (a.src, a.dst, a.l4[:2], a.l4[8:]) == (ME, PEER, b"\x03\x0d", frame[14:14 + 28])
    assert drop_of(events).flags & EventFlags.DENY_RESPONSE_ICMP

    # a ping is answered too
    rc, data, _ = run(dp, "from_container", icmp_frame(ME, PEER, 8))
    assert rc == TC_ACT_REDIRECT and parse_answer(data).l4[:2] == b"\x03\x0d"


@pytest.mark.parametrize(("what", "frame"), [
    ("ICMP error", icmp_frame(ME, PEER, 3)),
    ("ICMP echo reply", icmp_frame(ME, PEER, 0)),
    ("TCP RST", tcp_frame(ME, PEER, flags=0x04)),
    ("TCP RST|ACK", tcp_frame(ME, PEER, flags=0x14)),
    ("multicast", udp_frame(ME, "224.0.0.251", eth_dst=bytes.fromhex("01005e0000fb"))),
    ("broadcast", udp_frame(ME, "255.255.255.255", eth_dst=b"\xff" * 6)),
    ("multicast address, unicast frame", udp_frame(ME, "239.1.2.3")),
])
def test_never_answered(dp: Datapath, what: str, frame: bytes) -> None:
    configure(dp, ENFORCED | EndpointFlags.DENY_RESPONSE_TCP_RESET)
    rc, _, events = run(dp, "from_container", frame)
    assert rc == TC_ACT_SHOT, what
    drop = drop_of(events)
    assert drop.reason is abi.DropReason.POLICY_DENIED
    assert not drop.flags & (EventFlags.DENY_RESPONSE_ICMP | EventFlags.DENY_RESPONSE_TCP_RESET)


def test_default_and_audit_send_nothing(dp: Datapath) -> None:
    configure(dp, ENFORCED)
    rc, _, events = run(dp, "from_container", tcp_frame(ME, PEER))
    assert rc == TC_ACT_SHOT and not drop_of(events).flags
    # audit wins: nothing is denied, nothing answered
    configure(dp, ENFORCED | EndpointFlags.AUDIT | EndpointFlags.DENY_RESPONSE_TCP_RESET)
    rc, data, events = run(dp, "from_container", tcp_frame(ME, PEER))
    assert rc == 0 and data[26:30] == socket.inet_aton(ME)  # passed, unchanged
    assert not [e for e in events if e.type is EventType.DROP]


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    """This thread on one CPU (the bucket is per CPU)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def test_answers_are_rate_limited_per_cpu(dp: Datapath) -> None:
    """A burst of denied SYNs on one CPU: the first BURST are answered, then one per
    interval as time refills the bucket; the rest are dropped silently and counted."""
    configure(dp, ENFORCED | EndpointFlags.DENY_RESPONSE_TCP_RESET)
    obs = abi.ObservationPoint.FROM_CONTAINER
    limited0 = dp.maps.counters.get(obs, abi.CounterCode.DENY_RESPONSE_LIMITED).packets
    sent0 = dp.maps.counters.get(obs, abi.CounterCode.DENY_RESPONSE_SENT).packets
    frame = tcp_frame(ME, PEER)
    with one_cpu():
        time.sleep(abi.DENY_RESPONSE_BURST * abi.DENY_RESPONSE_INTERVAL_NS / 1e9)  # full
        start = time.monotonic_ns()
        codes = [dp.test_run("from_container", frame, SkbContext(ifindex=LO)).retval
                 for _ in range(3 * abi.DENY_RESPONSE_BURST)]
        took = time.monotonic_ns() - start
    answered = codes.count(TC_ACT_REDIRECT)
    refilled = took // abi.DENY_RESPONSE_INTERVAL_NS + 1
    assert abi.DENY_RESPONSE_BURST <= answered <= abi.DENY_RESPONSE_BURST + refilled, codes
    assert codes[:abi.DENY_RESPONSE_BURST] == [TC_ACT_REDIRECT] * abi.DENY_RESPONSE_BURST
    assert codes.count(TC_ACT_SHOT) == len(codes) - answered
    limited = dp.maps.counters.get(obs, abi.CounterCode.DENY_RESPONSE_LIMITED).packets
    sent = dp.maps.counters.get(obs, abi.CounterCode.DENY_RESPONSE_SENT).packets
    assert (sent - sent0, limited - limited0) == (answered, len(codes) - answered)
    dp.maps.events.drain()
    time.sleep(0.01)  # ten intervals: answered again
    assert dp.test_run("from_container", frame, SkbContext(ifindex=LO)).retval == (
        TC_ACT_REDIRECT)


# ---- a real agent, real endpoints -------------------------------------------------------------

PID = os.getpid()
NODE = f"gx-node-{PID}"
CLI, SRV = "gx-cli", "gx-srv"
CLI_IP, SRV_IP = "198.18.77.10", "198.18.77.20"
ALLOWED, EGRESS_DENIED, INGRESS_DENIED = 7000, 7001, 7002
POLICY = """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: gx-srv-in}
    spec:
      endpointSelector: {matchLabels: {app: gx-srv}}
      ingress:
      - fromEndpoints: [{matchLabels: {app: gx-cli}}]
        toPorts: [{ports: [{port: "7000", protocol: TCP}, {port: "7001", protocol: TCP}]}]
      ingressDeny:
      - fromEntities: [host]
    ---
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: gx-cli-out}
    spec:
      endpointSelector: {matchLabels: {app: gx-cli}}
      egress:
      - toEndpoints: [{matchLabels: {app: gx-srv}}]
        toPorts: [{ports: [{port: "7000", protocol: TCP}, {port: "7002", protocol: TCP}]}]
"""
METRICS_PORT = 19477  # the agent's --metrics, inside its own namespace
QUICK = 1.0  # an answered connection fails well within this; a dropped SYN takes all of it

_libc = ctypes.CDLL(None, use_errno=True)


def raw_icmp_socket(netns_name: str) -> socket.socket:
    """A raw ICMP socket in `netns_name` (the calling thread returns home)."""
    with open(f"/run/netns/{netns_name}") as target, open("/proc/thread-self/ns/net") as home:
        assert _libc.setns(target.fileno(), 0x40000000) == 0
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        finally:
            assert _libc.setns(home.fileno(), 0x40000000) == 0


def attempt(netns_name: str, dst: str, port: int, timeout: float = 3.0) -> tuple[int, float]:
    """connect() from `netns_name`: (0 or the errno it failed with, seconds it took);
    a timeout is errno.ETIMEDOUT."""
    sock = ns_socket(netns_name)
    sock.settimeout(timeout)
    start = time.monotonic()
    try:
        sock.connect((dst, port))
        code = 0
    except TimeoutError:
        code = errno.ETIMEDOUT
    except OSError as exc:
        code = exc.errno or -1
    finally:
        sock.close()
    return code, time.monotonic() - start


class Listener:
    """Accepts (and closes) connections on `port` of the endpoint in `netns_name`."""

    def __init__(self, netns_name: str, ip_: str, port: int) -> None:
        self.sock = ns_socket(netns_name)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip_, port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = self.sock.accept()
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@contextlib.contextmanager
def listening(netns_name: str, ip_: str, *ports: int) -> Iterator[None]:
    servers = [Listener(netns_name, ip_, port) for port in ports]
    try:
        yield
    finally:
        for server in servers:
            server.close()


@dataclass
class Node:
    agent: NsAgent

    def cli(self, *args: str) -> str:
        done = self.agent.cli(*args)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}\n{self.agent.log()}"
        return done.stdout

    def configure(self, name: str, *settings: str) -> str:
        return self.cli("endpoint", "config", name, *settings)

    def flows(self) -> list[FlowRecord]:
        out = self.cli("observe", "--last", "1000", "-o", "json")
        return [FlowRecord.from_json(line) for line in out.splitlines() if line.strip()]

    def wait_flow(self, predicate: Any, timeout: float = 10.0) -> FlowRecord:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.flows() if predicate(r)]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, "no such flow record:\n" + "\n".join(
                r.to_json() for r in self.flows()[-20:])
            time.sleep(0.1)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """An agent of its own in `gx-node-<pid>` (its proxy ports, steering rule and host veths
    are its own), the host subject to policy (`--allow-localhost policy`), two endpoints and
    the policy; everything removed afterwards."""
    if shutil.which("nsenter") is None:
        pytest.skip("needs nsenter (util-linux)")
    for name in (NODE, CLI, SRV):
        assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", NODE], check=True)
    pin_root = BPFFS_MOUNT / f"gx-deny-response-{PID}"
    agent = NsAgent(NODE, tmp_path_factory.mktemp("gx-agent"), pin_root)
    agent.extra = ["--allow-localhost", "policy", "--metrics", f"127.0.0.1:{METRICS_PORT}"]
    made: list[str] = []
    try:
        ip(NODE, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", NODE, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True)
        agent.start()
        n = Node(agent)
        for name, ip_, app in ((CLI, CLI_IP, "gx-cli"), (SRV, SRV_IP, "gx-srv")):
            made.append(name)
            n.cli("endpoint", "add", name, "--labels", f"app={app}", "--ip", ip_)
        policy = agent.workdir / "gx-policy.yaml"
        policy.write_text(textwrap.dedent(POLICY))
        assert "imported" in n.cli("policy", "import", str(policy))
        yield n
    finally:
        agent.remove(made, (CLI, SRV, NODE))  # the namespaces: ours, checked absent above


def answered(record: FlowRecord, src: str, dst: str, port: int) -> bool:
    return (record.type is FlowType.L3_L4 and record.verdict is Verdict.DROPPED
            and record.source.ip == src and record.destination.ip == dst
            and record.l4 is not None and record.destination.port == port)


def test_tcp_reset_refuses_at_once_and_the_record_says_so(node: Node) -> None:
    assert node.configure(SRV, "deny-response=tcp-reset") == (
        f"endpoint {SRV}: audit=false deny-response=tcp-reset\n")
    shown = {e["name"]: e for e in json.loads(node.cli("endpoint", "list", "-o", "json"))[
        "endpoints"]}
    assert (shown[SRV]["deny_response"], shown[CLI]["deny_response"]) == ("tcp-reset", "drop")
    with listening(SRV, SRV_IP, ALLOWED, EGRESS_DENIED, INGRESS_DENIED):
        assert attempt(CLI, SRV_IP, ALLOWED)[0] == 0  # allowed traffic: untouched
        t0 = time.time_ns()
        code, took = attempt(CLI, SRV_IP, INGRESS_DENIED)
        assert (code, took < QUICK) == (errno.ECONNREFUSED, True), (code, took)
        # the client's own egress denial follows the client's setting: a silent drop
        assert attempt(CLI, SRV_IP, EGRESS_DENIED, timeout=QUICK)[0] == errno.ETIMEDOUT
    rec = node.wait_flow(lambda r: r.time >= t0 and answered(r, CLI_IP, SRV_IP, INGRESS_DENIED))
    assert rec.deny_response == "tcp-reset"
    assert rec.drop_reason_desc is not None and rec.drop_reason_desc.value == "POLICY_DENIED"
    line = node.cli("observe", "--last", "200", "--to-port", str(INGRESS_DENIED))
    assert "Policy denied DROPPED (TCP Flags: SYN) (answered with tcp-reset)" in line, line
    silent = node.wait_flow(lambda r: r.time >= t0 and answered(r, CLI_IP, SRV_IP,
                                                                EGRESS_DENIED))
    assert silent.deny_response == ""
    # the operator's counter: the answer sent
    metrics = subprocess.run(
        ["nsenter", f"--net=/run/netns/{NODE}", "curl", "-sf",
         f"http://127.0.0.1:{METRICS_PORT}/metrics"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    sent = [line for line in metrics.splitlines()
            if line.startswith("garrison_deny_response_total{")]
    assert any('{outcome="sent"}' in line and float(line.rsplit(" ", 1)[1]) >= 1
               for line in sent), metrics[-3000:]


def test_icmp_unreachable_for_egress_and_ingress_denials(node: Node) -> None:
    node.configure(SRV, "deny-response=icmp")
    node.configure(CLI, "deny-response=icmp")
    raw = raw_icmp_socket(CLI)
    raw.settimeout(QUICK)
    try:
        with listening(SRV, SRV_IP, ALLOWED, EGRESS_DENIED, INGRESS_DENIED):
            assert attempt(CLI, SRV_IP, ALLOWED)[0] == 0
            for port in (INGRESS_DENIED, EGRESS_DENIED):
                t0 = time.time_ns()
                code, took = attempt(CLI, SRV_IP, port)
                assert (code, took < QUICK) == (errno.EHOSTUNREACH, True), (port, code, took)
                # the message itself: from the address the client tried to reach, quoting
                # the client's SYN
                while True:
                    packet = raw.recv(2048)
                    icmp = packet[(packet[0] & 0xF) * 4:]
                    quoted_port = struct.unpack("!H", icmp[8 + 20 + 2:8 + 20 + 4])[0]
                    if quoted_port == port:
                        break
                assert socket.inet_ntoa(packet[12:16]) == SRV_IP
                assert (icmp[0], icmp[1], csum(icmp)) == (3, 13, 0)
                # the SYN's IP header and 8 bytes of TCP; 20 as the client's kernel sent it
                # with checksum offload (see lib/deny_response.h)
                assert len(icmp) - 8 in (20 + 8, 20 + 20)
                assert icmp[8 + 12:8 + 20] == socket.inet_aton(CLI_IP) + socket.inet_aton(SRV_IP)
                rec = node.wait_flow(lambda r, p=port, t=t0: r.time >= t
                                     and answered(r, CLI_IP, SRV_IP, p))
                assert rec.deny_response == "icmp"
                expected = "EGRESS" if port == EGRESS_DENIED else "INGRESS"
                assert rec.traffic_direction.value == expected
    finally:
        raw.close()
        node.configure(CLI, "deny-response=drop")


def test_the_host_is_answered_through_the_endpoints_ingress(node: Node) -> None:
    """A connection from the host (here the agent's namespace), judged at to_container: the
    RST goes back up the endpoint's host veth and reaches the host's socket."""
    node.configure(SRV, "deny-response=tcp-reset")
    with listening(SRV, SRV_IP, ALLOWED):
        code, took = attempt(NODE, SRV_IP, ALLOWED)
    assert (code, took < QUICK) == (errno.ECONNREFUSED, True), (code, took)
    rec = node.wait_flow(lambda r: r.verdict is Verdict.DROPPED and r.destination.ip == SRV_IP
                         and r.destination.port == ALLOWED and r.source.ip != CLI_IP)
    assert rec.deny_response == "tcp-reset"
    assert rec.traffic_direction.value == "INGRESS"
    # an explicit deny is answered as the default deny is
    assert rec.drop_reason_desc is not None and rec.drop_reason_desc.value == "POLICY_DENY"


def test_default_drop_still_times_out(node: Node) -> None:
    assert node.configure(SRV, "deny-response=drop").endswith("deny-response=drop\n")
    code, took = attempt(CLI, SRV_IP, INGRESS_DENIED, timeout=QUICK)
    assert code == errno.ETIMEDOUT and took >= QUICK
    bad = node.agent.cli("endpoint", "config", SRV, "deny-response=reject")
    assert (bad.returncode, bad.stderr) == (1, (
        "garrison: deny-response=reject: expected one of deny-response=drop, "
        "deny-response=icmp, deny-response=tcp-reset\n"))


def test_audit_wins_nothing_denied_nothing_answered(node: Node) -> None:
    node.configure(SRV, "audit=true", "deny-response=tcp-reset")
    try:
        t0 = time.time_ns()
        with listening(SRV, SRV_IP, INGRESS_DENIED):
            assert attempt(CLI, SRV_IP, INGRESS_DENIED)[0] == 0  # connected: not denied
        node.wait_flow(lambda r: r.time >= t0 and r.verdict is Verdict.AUDIT
                       and r.destination.ip == SRV_IP and r.destination.port == INGRESS_DENIED)
        assert not [r for r in node.flows() if r.time >= t0 and r.verdict is Verdict.DROPPED
                    and r.destination.ip == SRV_IP]
    finally:
        node.configure(SRV, "audit=false", "deny-response=drop")


def test_other_protocols_get_icmp_and_the_setting_survives_a_restart(node: Node) -> None:
    """tcp-reset answers what is not TCP with ICMP: a connected UDP socket reads
    EHOSTUNREACH. The setting is the endpoint's, kept across an agent restart."""
    node.configure(CLI, "deny-response=tcp-reset")
    try:
        assert node.agent.stop() == 0
        node.agent.start()
        shown = json.loads(node.cli("endpoint", "get", CLI, "-o", "json"))
        assert shown["deny_response"] == "tcp-reset"
        t0 = time.time_ns()
        udp = ns_socket(CLI, socket.SOCK_DGRAM)
        try:
            udp.settimeout(QUICK)
            udp.connect((SRV_IP, 5353))
            udp.send(b"are you there")
            with pytest.raises(OSError) as err:
                udp.recv(100)
            assert err.value.errno == errno.EHOSTUNREACH, err.value
        finally:
            udp.close()
        rec = node.wait_flow(lambda r: r.time >= t0 and r.verdict is Verdict.DROPPED
                             and r.destination.port == 5353)
        assert (rec.deny_response, rec.traffic_direction.value) == ("icmp", "EGRESS")
        # and TCP gets its RST, after the restart as before
        code, took = attempt(CLI, SRV_IP, EGRESS_DENIED)
        assert (code, took < QUICK) == (errno.ECONNREFUSED, True), (code, took)
    finally:
        node.configure(CLI, "deny-response=drop")
