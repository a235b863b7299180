"""The agent dies (SIGKILL: no cleanup of any kind) and comes back, while traffic flows.

Enforcement lives in the kernel (attached programs, pinned maps), not in the agent: an
established allowed connection keeps exchanging data through the kill and the restart, and
a connection policy denies gets no answer at any moment. The transparent proxy, though, dies
with the agent: a connection to a port with L7 rules fails closed (no proxy socket, so the
datapath drops its SYN and queues a PROXY_NOT_LISTENING drop event, which the restarted
agent reads from the pinned ring buffer), while a port without L7 rules keeps working. The
restarted agent finds its endpoints and identities again.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

from garrison.flows.record import DropReasonDesc, FlowType, Verdict

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentEndpoint,
    AgentProcess,
    app_requests,
    echo_servers,
    fixture_agent,
    fixture_clean,
    http_request,
    roundtrip,
    wait_for,
)

pytestmark = pytest.mark.privileged

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-ingress}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "7000", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
"""


@dataclass(frozen=True)
class Trio:
    client: AgentEndpoint
    server: AgentEndpoint
    other: AgentEndpoint


@pytest.fixture(scope="module")
def trio(agent: AgentProcess) -> Trio:
    return Trio(
        agent.add_endpoint("rclient", "app=client", 21, cli=False),
        agent.add_endpoint("rserver", "app=server", 22, cli=False),
        agent.add_endpoint("rother", "app=other", 23, cli=False),
    )


class Stream(threading.Thread):
    """A client exchanging a message with an echo server every 50 ms over one connection;
    remembers the longest pause between answers and the first error."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.stop = threading.Event()
        self.exchanges = 0
        self.longest_gap = 0.0
        self.error: str | None = None

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.05):
            if not roundtrip(self.sock, b"exchange %d" % self.exchanges, timeout=3.0):
                self.error = f"exchange {self.exchanges} failed"
                return
            self.exchanges += 1
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now


class Prober(threading.Thread):
    """Opens connections that policy denies, again and again; counts any that come up."""

    def __init__(self, src: AgentEndpoint, dst: AgentEndpoint, port: int) -> None:
        super().__init__(daemon=True)
        self.src, self.dst, self.port = src, dst, port
        self.stop = threading.Event()
        self.attempts = 0
        self.successes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.attempts += 1
            sock = self.src.connect(self.dst.ip, self.port, timeout=0.2)
            if sock is not None:
                self.successes += 1
                sock.close()


def endpoint_table(agent: AgentProcess) -> list[tuple[object, ...]]:
    """`garrison endpoint list -o json`: what must survive a restart."""
    return [
        (e["id"], e["name"], e["namespace"], e["identity"], tuple(e["labels"]), e["ipv4"],
         e["ingress_enforcement"], e["egress_enforcement"])
        for e in agent.cli_json("endpoint", "list")["endpoints"]
    ]


def test_sigkill_and_restart_under_traffic(agent: AgentProcess, trio: Trio, clean: None) -> None:
    client, server, other = trio.client, trio.server, trio.other
    agent.import_policy("server-ingress", POLICY)
    table = endpoint_table(agent)
    identities = agent.call("IdentityList")["identities"]
    with echo_servers(server, 7000):
        sock = client.connect(server.ip, 7000)
        assert sock is not None
        stream, prober = Stream(sock), Prober(other, server, 7000)
        try:
            stream.start()
            prober.start()
            wait_for(lambda: stream.exchanges >= 5, "exchanges before the kill")
            agent.kill()
            at_kill = stream.exchanges
            # the agent is gone: the kernel still enforces, both ways
            assert other.connect(server.ip, 7000, timeout=1.0) is None, (
                "a denied connection was answered while the agent was dead")
            wait_for(lambda: stream.exchanges >= at_kill + 10,
                     "the established connection while the agent is dead")
            assert not agent.alive
            agent.start()
            at_restart = stream.exchanges
            wait_for(lambda: stream.exchanges >= at_restart + 10,
                     "the established connection after the restart")
        finally:
            stream.stop.set()
            prober.stop.set()
            stream.join()
            prober.join()
            sock.close()
        assert stream.error is None, stream.error
        # a drop would show as a retransmission pause (or an error); 1.5 s leaves room for a
        # busy machine while the restarted agent compiles its programs
        assert stream.longest_gap < 1.5, f"the connection stalled {stream.longest_gap:.2f}s"
        assert prober.attempts >= 10 and prober.successes == 0, (
            f"{prober.successes} of {prober.attempts} denied connections came up")
        # the restarted agent admits and refuses as before
        fresh = client.connect(server.ip, 7000)
        assert fresh is not None
        with fresh:
            assert roundtrip(fresh)
        assert other.connect(server.ip, 7000, timeout=0.5) is None
    assert endpoint_table(agent) == table
    assert agent.call("IdentityList")["identities"] == identities
    # the imported policy came back from the state dir (without it the restarted agent would
    # have reconciled the maps to "no policy" and opened the server)
    assert [p["name"] for p in agent.call("PolicyGet")["policies"]] == ["server-ingress"]


def test_without_the_proxy_redirected_ports_fail_closed(
    agent: AgentProcess, trio: Trio, clean: None
) -> None:
    client, server = trio.client, trio.server
    agent.import_policy("server-ingress", POLICY)
    agent.deathstar(server)
    with echo_servers(server, 7000):
        sock = client.connect(server.ip, 80)
        assert sock is not None
        with sock:
            assert http_request(sock, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
        sock = client.connect(server.ip, 80)
        assert sock is not None
        with sock:  # through the proxy: L7 rules apply
            assert http_request(sock, "PUT", "/v1/exhaust-port")[0] == 403

        agent.kill()  # the proxy's listeners die with it
        t0 = time.time_ns()
        before = app_requests(server)
        for _ in range(3):
            assert client.connect(server.ip, 80, timeout=0.5) is None, (
                "a redirected port answered without a proxy")
        assert app_requests(server) == before + 1, "bytes reached the app around the proxy"
        plain = client.connect(server.ip, 7000)
        assert plain is not None, "a port without L7 rules stopped working with the proxy"
        with plain:
            assert roundtrip(plain, b"no proxy needed")

        agent.start()
        # the drop events queued while no agent read them come out of the pinned ring buffer
        drop = agent.wait_flow(
            lambda r: r.time >= t0 and r.verdict is Verdict.DROPPED
            and r.source.ip == client.ip and r.destination.port == 80
        )
        assert drop.drop_reason_desc is DropReasonDesc.PROXY_NOT_LISTENING
        assert drop.type is FlowType.L3_L4
        assert (drop.source.identity, drop.destination.identity) == (
            client.identity, server.identity)
        sock = client.connect(server.ip, 80)  # the new proxy serves the port again
        assert sock is not None
        with sock:
            assert http_request(sock, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
