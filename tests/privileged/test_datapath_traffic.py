"""Real TCP and UDP between endpoint namespaces, through the attached programs.

Sockets are opened inside the endpoints' namespaces (and curl runs in one), so every packet
crosses the host-side veths and both programs.
"""

from __future__ import annotations

import socket
import subprocess
import time
from ipaddress import IPv4Address

import pytest

from garrison.bpf import abi
from garrison.bpf.abi import CTFlags, DropReason, EventType, ObservationPoint, TrafficDirection
from garrison.bpf.loader import Datapath
from garrison.bpf.maps import CTTimeouts, CTTuple, DatapathEvent, EndpointConfig
from garrison.policies.resolve import ResolverConfig

from .test_datapath_harness import (  # noqa: F401 (fixtures)
    Endpoints,
    NetnsEndpoint,
    connect,
    echo_server,
    enforce,
    fixture_bpffs,
    fixture_datapath,
    fixture_dp,
    fixture_endpoints,
    fixture_no_leftovers,
    roundtrip,
    wait_events,
)

pytestmark = pytest.mark.privileged

CLIENT, SERVER, OTHER = 500, 501, 502
SERVER_ONLY_FROM_CLIENT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-ingress}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "5353", protocol: UDP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-lockdown}
spec:
  endpointSelector: {matchLabels: {app: client}}
  ingress: [{}]
"""


def three(endpoints: Endpoints) -> tuple[NetnsEndpoint, NetnsEndpoint, NetnsEndpoint]:
    return (
        endpoints.add("client", "198.18.2.1", "app=client", CLIENT),
        endpoints.add("server", "198.18.2.2", "app=server", SERVER),
        endpoints.add("other", "198.18.2.3", "app=other", OTHER),
    )


def drops(events: list[DatapathEvent]) -> list[DatapathEvent]:
    return [e for e in events if e.type is EventType.DROP]


def test_allowed_connection_and_its_replies_pass_the_reverse_is_dropped(
    dp: Datapath, endpoints: Endpoints
) -> None:
    client, server, other = three(endpoints)
    enforce(dp, SERVER_ONLY_FROM_CLIENT, [client, server, other])
    with echo_server(server, 8080), echo_server(client, 9000):
        sock = connect(client, server.ip, 8080)
        assert sock is not None, "the allowed connection did not come up"
        with sock:
            assert roundtrip(sock, b"x" * 100_000), "replies of the allowed connection"
            conn = CTTuple(client.ip, server.ip, sock.getsockname()[1], 8080, 6)
            entry = dp.maps.conntrack.get(conn)
            assert entry is not None
            assert CTFlags.ESTABLISHED in entry.flags and CTFlags.INGRESS_DONE in entry.flags
            assert (entry.src_identity, entry.dst_identity) == (CLIENT, SERVER)
            assert entry.packets_reply > 0

        dp.maps.events.drain()
        assert connect(server, client.ip, 9000, timeout=0.4) is None, "reverse direction"
        assert connect(other, server.ip, 8080, timeout=0.4) is None, "unselected peer"

    events = wait_events(dp, lambda e: e.src_identity == OTHER and e.type is EventType.DROP)
    [reverse, *_] = [e for e in drops(events) if e.src_identity == SERVER]
    assert reverse.reason is DropReason.POLICY_DENIED
    assert reverse.direction is TrafficDirection.INGRESS
    assert reverse.observation_point is ObservationPoint.FROM_CONTAINER
    assert reverse.ifindex == client.ifindex  # the client's ingress policy decided
    assert (reverse.src_identity, reverse.dst_identity) == (SERVER, CLIENT)
    assert (reverse.saddr, reverse.daddr, reverse.dport) == (server.ip, client.ip, 9000)
    assert reverse.tcp_flags == 0x02 and reverse.protocol == 6
    [denied, *_] = [e for e in drops(events) if e.src_identity == OTHER]
    assert denied.reason is DropReason.POLICY_DENIED and denied.dst_identity == SERVER
    egress, ingress = (
        next(e for e in events if e.type is EventType.POLICY_VERDICT
             and e.src_identity == OTHER and e.direction is d)
        for d in (TrafficDirection.EGRESS, TrafficDirection.INGRESS)
    )
    assert egress.allowed and egress.ifindex == other.ifindex  # other's egress: open
    assert not ingress.allowed and ingress.match_type is abi.MatchType.NONE
    assert ingress.ifindex == server.ifindex


def test_udp_replies_pass_and_curl_works(dp: Datapath, endpoints: Endpoints) -> None:
    client, server, other = three(endpoints)
    enforce(dp, SERVER_ONLY_FROM_CLIENT, [client, server, other])
    srv = server.socket(socket.SOCK_DGRAM)
    cli = client.socket(socket.SOCK_DGRAM)
    with srv, cli:
        srv.bind((str(server.ip), 5353))
        srv.settimeout(1)
        cli.settimeout(1)
        cli.sendto(b"query", (str(server.ip), 5353))
        data, peer = srv.recvfrom(100)
        assert data == b"query"
        srv.sendto(b"answer", peer)
        assert cli.recvfrom(100)[0] == b"answer"
        # a new flow from the server's side to the client is not a reply
        srv.sendto(b"unsolicited", (str(client.ip), 5454))
    http = subprocess.Popen(
        ["ip", "netns", "exec", server.name, "python3", "-m", "http.server", "--bind",
         str(server.ip), "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        code = ""
        for _ in range(30):
            out = subprocess.run(
                ["ip", "netns", "exec", client.name, "curl", "-s", "-m", "2", "-o",
                 "/dev/null", "-w", "%{http_code}", f"http://{server.ip}:8080/"],
                capture_output=True, text=True,
            )
            code = out.stdout
            if code == "200":
                break
            time.sleep(0.1)
        assert code == "200"
        out = subprocess.run(
            ["ip", "netns", "exec", other.name, "curl", "-s", "-m", "1", "-o", "/dev/null",
             "-w", "%{http_code}", f"http://{server.ip}:8080/"],
            capture_output=True, text=True,
        )
        assert out.stdout == "000" and out.returncode == 28  # timed out: SYN dropped
    finally:
        http.terminate()
        http.wait()
    events = wait_events(dp, lambda e: e.protocol == 17 and e.type is EventType.DROP)
    [udp_drop, *_] = [e for e in drops(events) if e.protocol == 17]
    assert udp_drop.reason is DropReason.POLICY_DENIED and udp_drop.dport == 5454


def test_deny_beats_allow(dp: Datapath, endpoints: Endpoints) -> None:
    client, server, other = three(endpoints)
    enforce(dp, """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fence}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8081", protocol: TCP}]}]
""", [client, server, other])
    with echo_server(server, 8080), echo_server(server, 8081):
        ok = connect(client, server.ip, 8080)
        assert ok is not None
        ok.close()
        assert connect(client, server.ip, 8081, timeout=0.4) is None
    events = wait_events(dp, lambda e: e.type is EventType.DROP and e.dport == 8081)
    [drop, *_] = [e for e in drops(events) if e.dport == 8081]
    assert drop.reason is DropReason.POLICY_DENY
    assert drop.match_type is abi.MatchType.L3_L4
    assert drop.ifindex == server.ifindex and drop.direction is TrafficDirection.INGRESS


def test_audit_passes_everything_and_logs_audit_verdicts(
    dp: Datapath, endpoints: Endpoints
) -> None:
    client, server, other = three(endpoints)
    enforce(dp, SERVER_ONLY_FROM_CLIENT, [client, server, other], ResolverConfig(audit=True))
    audited = dp.maps.counters.get(ObservationPoint.FROM_CONTAINER, abi.CounterCode.AUDITED)
    with echo_server(server, 8080), echo_server(client, 9000):
        for src, dst, port in ((other, server, 8080), (server, client, 9000)):
            sock = connect(src, dst.ip, port)
            assert sock is not None, f"audit mode dropped {src.name} -> {dst.name}:{port}"
            with sock:
                assert roundtrip(sock)
    events = wait_events(dp, lambda e: e.src_identity == SERVER and e.dst_identity == CLIENT)
    assert not [e for e in drops(events) if not e.audit]
    verdict = next(e for e in events if e.type is EventType.POLICY_VERDICT
                   and e.src_identity == OTHER and e.direction is TrafficDirection.INGRESS)
    assert verdict.audit and not verdict.allowed
    assert verdict.reason is DropReason.POLICY_DENIED
    after = dp.maps.counters.get(ObservationPoint.FROM_CONTAINER, abi.CounterCode.AUDITED)
    assert after.packets >= audited.packets + 2


def test_relabel_changes_verdicts_with_map_writes_only(
    dp: Datapath, endpoints: Endpoints
) -> None:
    client, server, other = three(endpoints)
    enforce(dp, SERVER_ONLY_FROM_CLIENT, [client, server, other])
    programs = dp.programs
    with echo_server(server, 8080):
        assert connect(other, server.ip, 8080, timeout=0.4) is None
        # `other` is relabelled app=client: it now has the client's identity
        flags = dp.maps.endpoints.get(client.ifindex).flags  # type: ignore[union-attr]
        dp.maps.write_endpoint(other.ifindex, EndpointConfig(CLIENT, other.ip, flags))
        sock = connect(other, server.ip, 8080)
        assert sock is not None, "relabelled endpoint still denied"
        sock.close()
        # and the client gets `other`'s old identity
        dp.maps.write_endpoint(client.ifindex, EndpointConfig(OTHER, client.ip, flags))
        assert connect(client, server.ip, 8080, timeout=0.4) is None
    assert dp.programs == programs


def test_spoofed_source_address_is_dropped(dp: Datapath, endpoints: Endpoints) -> None:
    client, server, other = three(endpoints)
    enforce(dp, "", [client, server, other])
    subprocess.run(["ip", "-n", client.name, "addr", "add", "198.18.2.99/32", "dev", "eth0"],
                   check=True)
    with echo_server(server, 8080):
        assert connect(client, server.ip, 8080) is not None
        sock = client.socket()
        sock.bind(("198.18.2.99", 0))
        sock.settimeout(0.4)
        with sock, pytest.raises(OSError):
            sock.connect((str(server.ip), 8080))
    events = wait_events(dp, lambda e: e.reason is DropReason.INVALID_SOURCE_IP)
    assert any(e.saddr == IPv4Address("198.18.2.99") for e in events
               if e.reason is DropReason.INVALID_SOURCE_IP)


def test_conntrack_entries_expire_and_are_collected(dp: Datapath, endpoints: Endpoints) -> None:
    client, server, other = three(endpoints)
    enforce(dp, SERVER_ONLY_FROM_CLIENT, [client, server, other])
    dp.maps.settings.write(CTTimeouts(close_s=1))
    try:
        with echo_server(server, 8080):
            sock = connect(client, server.ip, 8080)
            assert sock is not None
            conn = CTTuple(client.ip, server.ip, sock.getsockname()[1], 8080, 6)
            assert roundtrip(sock)
            sock.close()
            time.sleep(0.2)
            entry = dp.maps.conntrack.get(conn)
            assert entry is not None and CTFlags.FIN_ORIG in entry.flags
            assert CTFlags.FIN_REPLY in entry.flags
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            assert entry.expires_ns - now <= 1_000_000_000
            dp.maps.conntrack.gc(now)
            assert dp.maps.conntrack.get(conn) is not None, "collected before it expired"
            time.sleep(1.1)
            assert dp.maps.conntrack.gc() >= 1
            assert dp.maps.conntrack.get(conn) is None
    finally:
        dp.maps.settings.write(CTTimeouts())
    assert dp.maps.settings.read() == CTTimeouts()
