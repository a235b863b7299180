"""allow-localhost through a running agent: the node reaches its endpoints under default deny
(Cilium's allow-localhost, so health checks keep working), other endpoints do not; the flow
record says who came in. `--allow-localhost policy` is in test_agent_localhost_policy.py."""

from __future__ import annotations

import socket

import pytest

from garrison.flows.record import FlowType, TrafficDirection, Verdict

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentEndpoint,
    AgentProcess,
    echo_servers,
    fixture_agent,
    fixture_clean,
    roundtrip,
)

pytestmark = pytest.mark.privileged

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: gp-web}
spec:
  endpointSelector: {matchLabels: {app: gpweb}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: gpcli}}]
    toPorts: [{ports: [{port: "7000", protocol: TCP}]}]
"""


def from_host(dst: AgentEndpoint, port: int, timeout: float) -> bool:
    """A connection from the host's own namespace comes up and echoes."""
    try:
        sock = socket.create_connection((dst.ip, port), timeout=timeout)
    except OSError:
        return False
    with sock:
        return roundtrip(sock)


def test_host_reaches_an_endpoint_under_default_deny(agent: AgentProcess, clean: None) -> None:
    web = agent.add_endpoint("gpweb", "app=gpweb", 61, cli=False)
    other = agent.add_endpoint("gpother", "app=gpother", 62, cli=False)
    agent.import_policy("gp-web", POLICY)
    with echo_servers(web, 7001):
        assert from_host(web, 7001, timeout=3.0)
        assert other.connect(web.ip, 7001, timeout=0.5) is None  # default deny holds
    host = agent.wait_flow(
        lambda r: r.type is FlowType.L3_L4 and r.destination.port == 7001
        and r.traffic_direction is TrafficDirection.INGRESS and r.source.identity == 1
    )
    assert host.verdict is Verdict.FORWARDED
    assert host.ingress_allowed_by == ()  # no policy rule: the agent's allow-localhost
    dropped = agent.wait_flow(
        lambda r: r.type is FlowType.L3_L4 and r.destination.port == 7001
        and r.source.identity == other.identity
    )
    assert dropped.verdict is Verdict.DROPPED
