"""The union of rules through a running agent (issue 20): tiefighter is allowed at L3 only, an
any-peer rule puts HTTP rules on port 80. The kernel redirects tiefighter's connection to the
agent's transparent proxy (the derived entry for exactly tiefighter, TCP/80) and the proxy lets
every request of it through; the x-wing gets the HTTP rules."""

from __future__ import annotations

import pytest

from garrison.flows.record import FlowType, Verdict

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentEndpoint,
    AgentProcess,
    fixture_agent,
    fixture_clean,
    http_request,
)

pytestmark = pytest.mark.privileged

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: gp-union}
spec:
  endpointSelector: {matchLabels: {class: gpdeathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: gptie}}]
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
"""


def ask(ship: AgentEndpoint, ds: AgentEndpoint, method: str, path: str) -> int:
    sock = ship.connect(ds.ip, 80)
    assert sock is not None, f"{ship.name}: no connection to port 80"
    with sock:
        return http_request(sock, method, path)[0]


def test_l3_only_peer_is_proxied_and_allowed_every_request(
    agent: AgentProcess, clean: None
) -> None:
    ds = agent.add_endpoint("gpds", "class=gpdeathstar", 64, cli=False)
    tie = agent.add_endpoint("gptie", "class=gptie", 65, cli=False)
    xwing = agent.add_endpoint("gpxw", "class=gpxwing", 66, cli=False)
    agent.deathstar(ds)
    agent.import_policy("gp-union", POLICY)
    assert ask(tie, ds, "PUT", "/v1/exhaust-port") == 503  # the app's answer: forwarded
    assert ask(tie, ds, "POST", "/v1/request-landing") == 200
    assert ask(xwing, ds, "PUT", "/v1/exhaust-port") == 403  # the proxy's answer
    assert ask(xwing, ds, "POST", "/v1/request-landing") == 200
    put = agent.wait_flow(
        lambda r: r.type is FlowType.L7 and r.source.identity == tie.identity
        and r.l7 is not None and r.l7.http is not None and r.l7.http.method == "PUT"
    )
    assert put.verdict is Verdict.FORWARDED
    assert "gp-union" in [p.name for p in put.ingress_allowed_by]
