"""L7 deny rules (garrison extension) through a running agent: the empire is allowed on port 80
at L4 only, an L7 deny rule forbids tiefighters to PUT the exhaust port. The kernel redirects
the tiefighter's connection to the agent's transparent proxy (the deny rule makes the port
L7 for it), the proxy answers the denied PUT 403 and names the deny rule, and lets every other
request through; the shuttle, not named by the deny rule, is not redirected at all."""

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
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata: {name: gd-guard}
spec:
  endpointSelector: {matchLabels: {class: gddeathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: gdempire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: gdtie}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: PUT, path: /v1/exhaust-port}]}
"""


def ask(ship: AgentEndpoint, ds: AgentEndpoint, method: str, path: str) -> int:
    sock = ship.connect(ds.ip, 80)
    assert sock is not None, f"{ship.name}: no connection to port 80"
    with sock:
        return http_request(sock, method, path)[0]


def test_l7_deny_rule_is_enforced_by_the_agents_proxy(agent: AgentProcess, clean: None) -> None:
    ds = agent.add_endpoint("gdds", "class=gddeathstar", 121, cli=False)
    tie = agent.add_endpoint("gdtie", "class=gdtie,org=gdempire", 122, cli=False)
    shuttle = agent.add_endpoint("gdsh", "class=gdshuttle,org=gdempire", 123, cli=False)
    agent.deathstar(ds)
    agent.import_policy("gd-guard", POLICY)
    assert ask(tie, ds, "PUT", "/v1/exhaust-port") == 403  # the proxy's answer
    assert ask(tie, ds, "POST", "/v1/request-landing") == 200
    assert ask(shuttle, ds, "PUT", "/v1/exhaust-port") == 503  # the app's answer
    denied = agent.wait_flow(
        lambda r: r.type is FlowType.L7 and r.source.identity == tie.identity
        and r.l7 is not None and r.l7.http is not None and r.l7.http.method == "PUT"
    )
    assert denied.verdict is Verdict.DROPPED
    assert [p.name for p in denied.ingress_denied_by] == ["gd-guard"]
    # the shuttle's connection was never redirected: no L7 record of it
    assert not [
        r for r in agent.flows()
        if r.type is FlowType.L7 and r.source.identity == shuttle.identity
    ]
