"""Ports with L7 rules go to the proxy: a tiny transparent proxy in the test stands in for it.

The proxy listens on 127.0.0.1:PROXY_PORT with IP_TRANSPARENT, answers every connection
with the connection's `getsockname()` (the original destination), and in relay mode opens
an upstream connection to that destination (with the upstream SO_MARK) and relays bytes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator

import pytest

from garrison.bpf import abi
from garrison.bpf.abi import CTFlags, DropReason, EventType, ObservationPoint
from garrison.bpf.loader import Datapath
from garrison.bpf.maps import CTTuple
from garrison.policies.resolve import ResolverConfig
from garrison.redirect import DEFAULT_GATEWAY, set_transparent, set_upstream_mark

from .test_datapath_harness import (  # noqa: F401 (fixtures)
    PROXY_PORT,
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
    fixture_steering,
    wait_events,
)

pytestmark = pytest.mark.privileged

CLIENT, SERVER = 600, 601
SERVER_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-http}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET}]}
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "9090", protocol: TCP}]}]
"""
CLIENT_EGRESS_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-http}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET}]}
"""


class TransparentProxy:
    def __init__(self, relay: bool, mark: bool = True) -> None:
        self.relay, self.mark = relay, mark
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_transparent(self.sock)
        self.sock.bind(("127.0.0.1", PROXY_PORT))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.upstream_errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._main = threading.Thread(target=self._serve, daemon=True)
        self._main.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            ip, port = conn.getsockname()
            conn.sendall(f"{ip}:{port}\n".encode())
            if not self.relay:
                return
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if self.mark:
                set_upstream_mark(upstream)
            upstream.settimeout(0.5)
            with upstream:
                try:
                    upstream.connect((ip, port))
                except OSError as exc:
                    self.upstream_errors.append(str(exc))
                    return
                self._pump(conn, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self._stop.is_set():
            ready, _, _ = select.select([a, b], [], [], 0.1)
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                peers[s].sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._main.join()
        for t in self._threads:
            t.join()
        self.sock.close()


@contextlib.contextmanager
def proxy(relay: bool = False, mark: bool = True) -> Iterator[TransparentProxy]:
    p = TransparentProxy(relay, mark)
    try:
        yield p
    finally:
        p.close()


def pair(endpoints: Endpoints) -> tuple[NetnsEndpoint, NetnsEndpoint]:
    return (
        endpoints.add("pclient", "198.18.3.1", "app=client", CLIENT),
        endpoints.add("pserver", "198.18.3.2", "app=server", SERVER),
    )


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def test_redirect_reaches_the_proxy_with_the_original_destination(
    dp: Datapath, endpoints: Endpoints, steering: None
) -> None:
    client, server = pair(endpoints)
    enforce(dp, SERVER_L7, [client, server])
    redirected = dp.maps.counters.get(ObservationPoint.FROM_CONTAINER,
                                      abi.CounterCode.REDIRECTED)
    with proxy(), echo_server(server, 8080), echo_server(server, 9090):
        sock = connect(client, server.ip, 8080)
        assert sock is not None
        with sock:
            assert read_line(sock) == f"{server.ip}:8080"
            sport = sock.getsockname()[1]
        plain = connect(client, server.ip, 9090)  # no L7 rules: not redirected
        assert plain is not None
        with plain:
            plain.sendall(b"direct")
            assert plain.recv(100) == b"direct"
    entry = dp.maps.conntrack.get(CTTuple(client.ip, server.ip, sport, 8080, 6))
    assert entry is not None and CTFlags.REDIRECT in entry.flags
    assert entry.proxy_port == PROXY_PORT
    events = wait_events(dp, lambda e: e.dport == 9090)
    verdict = next(e for e in events if e.type is EventType.POLICY_VERDICT and e.dport == 8080
                   and e.direction is abi.TrafficDirection.INGRESS)
    assert verdict.allowed and verdict.redirect and verdict.proxy_port == PROXY_PORT
    assert verdict.match_type is abi.MatchType.L3_L4
    after = dp.maps.counters.get(ObservationPoint.FROM_CONTAINER, abi.CounterCode.REDIRECTED)
    assert after.packets >= redirected.packets + 3  # SYN, ACK, data/FIN ...


def test_proxy_upstream_is_admitted_by_its_mark_only(
    dp: Datapath, endpoints: Endpoints, steering: None
) -> None:
    client, server = pair(endpoints)
    # allow-localhost off: the proxy's upstream comes from the host identity, which the
    # default would let in whatever its mark; here only the mark may admit it
    enforce(dp, SERVER_L7, [client, server], ResolverConfig(allow_localhost=False))
    with echo_server(server, 8080):
        with proxy(relay=True) as p:
            sock = connect(client, server.ip, 8080)
            assert sock is not None
            with sock:
                assert read_line(sock) == f"{server.ip}:8080"
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert sock.recv(100) == b"GET / HTTP/1.0\r\n\r\n"
            assert not p.upstream_errors
        upstream = [e for e in dp.maps.conntrack.entries()
                    if CTFlags.PROXY_UPSTREAM in e.flags]
        assert upstream and upstream[0].tuple.daddr == server.ip
        assert upstream[0].tuple.saddr == DEFAULT_GATEWAY
        assert upstream[0].packets_reply > 0

        dp.maps.events.drain()
        with proxy(relay=True, mark=False) as p:  # the same upstream without the mark
            sock = connect(client, server.ip, 8080)
            assert sock is not None
            with sock:
                assert read_line(sock) == f"{server.ip}:8080"
                assert sock.recv(100) == b""  # the proxy gave up upstream and closed
            assert p.upstream_errors
    events = wait_events(dp, lambda e: e.type is EventType.DROP)
    drop = next(e for e in events if e.type is EventType.DROP)
    assert drop.observation_point is ObservationPoint.TO_CONTAINER
    assert drop.src_identity == abi.IDENTITY_HOST and drop.dst_identity == SERVER
    assert drop.reason is DropReason.POLICY_DENIED


def test_without_a_listening_proxy_redirected_connections_fail_closed(
    dp: Datapath, endpoints: Endpoints, steering: None
) -> None:
    client, server = pair(endpoints)
    enforce(dp, SERVER_L7, [client, server])
    with echo_server(server, 8080):  # the server listens; only the proxy is missing
        assert connect(client, server.ip, 8080, timeout=0.4) is None
    events = wait_events(dp, lambda e: e.reason is DropReason.PROXY_NOT_LISTENING)
    drop = next(e for e in events if e.reason is DropReason.PROXY_NOT_LISTENING)
    assert drop.type is EventType.DROP and drop.redirect
    assert (drop.src_identity, drop.dst_identity) == (CLIENT, SERVER)
    assert (drop.saddr, drop.daddr, drop.dport) == (client.ip, server.ip, 8080)
    assert drop.proxy_port == PROXY_PORT and drop.tcp_flags == 0x02
    assert drop.reason.description.startswith("redirect to proxy: no proxy socket")


def test_egress_l7_redirects_at_the_source(
    dp: Datapath, endpoints: Endpoints, steering: None
) -> None:
    client, server = pair(endpoints)
    enforce(dp, CLIENT_EGRESS_L7, [client, server])
    with proxy(), echo_server(server, 8080):
        sock = connect(client, server.ip, 8080)
        assert sock is not None
        with sock:
            assert read_line(sock) == f"{server.ip}:8080"
        assert connect(client, server.ip, 9090, timeout=0.3) is None  # egress enforced
    events = wait_events(dp, lambda e: e.dport == 9090)
    verdict = next(e for e in events if e.type is EventType.POLICY_VERDICT and e.dport == 8080
                   and e.direction is abi.TrafficDirection.EGRESS)
    assert verdict.redirect and verdict.ifindex == client.ifindex
