"""Named ports through a running agent (issue 20 §1): two servers declare the port name
`http` for different numbers (`garrison endpoint add --port http=PORT/TCP`); a policy on
`port: http` lets the client reach each server on its own number only, in the kernel."""

from __future__ import annotations

import pytest

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentEndpoint,
    AgentProcess,
    echo_servers,
    fixture_agent,
    fixture_clean,
    roundtrip,
)

pytestmark = pytest.mark.privileged

INGRESS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: gn-named-ingress}
spec:
  endpointSelector: {matchLabels: {role: gnserver}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: gnclient}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
"""

EGRESS = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: gn-named-egress}
spec:
  podSelector: {matchLabels: {role: gnclient}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {role: gnserver}}}]
    ports: [{port: http}]
"""


def reaches(client: AgentEndpoint, server: AgentEndpoint, port: int) -> bool:
    sock = client.connect(server.ip, port, timeout=1.0)
    if sock is None:
        return False
    with sock:
        return roundtrip(sock)


@pytest.mark.parametrize("policy", [INGRESS, EGRESS], ids=["cnp-ingress", "knp-egress"])
def test_a_port_name_means_each_servers_own_number(
    agent: AgentProcess, clean: None, policy: str
) -> None:
    a = agent.add_endpoint("gna", "role=gnserver,name=gna", 201, ports=["http=8080/TCP"])
    b = agent.add_endpoint("gnb", "role=gnserver,name=gnb", 202,
                           ports=["http=9090/TCP", "metrics=8080/TCP"])
    client = agent.add_endpoint("gnc", "role=gnclient", 203)
    assert agent.call("EndpointGet", name=b.name)["ports"] == [
        "http=9090/TCP", "metrics=8080/TCP"]
    with echo_servers(a, 8080, 9090), echo_servers(b, 8080, 9090):
        assert reaches(client, a, 9090) and reaches(client, b, 8080)  # no policy yet
        agent.import_policy("gn-named", policy)
        assert reaches(client, a, 8080)
        assert reaches(client, b, 9090)
        assert not reaches(client, a, 9090)
        assert not reaches(client, b, 8080)  # 8080 is b's "metrics", not its "http"


def test_a_server_without_the_name_is_reached_on_no_port(
    agent: AgentProcess, clean: None
) -> None:
    bare = agent.add_endpoint("gnd", "role=gnserver,name=gnd", 204, cli=False)
    client = agent.add_endpoint("gne", "role=gnclient", 205, cli=False)
    with echo_servers(bare, 80, 8080):
        agent.import_policy("gn-named", INGRESS)
        assert not reaches(client, bare, 80)
        assert not reaches(client, bare, 8080)


def test_a_bad_port_name_is_refused_with_the_rule(agent: AgentProcess, clean: None) -> None:
    out = agent.cli("endpoint", "add", "ta-gnf", "--labels", "role=gnserver", "--ip",
                    "198.19.100.206", "--port", "HTTP=80/TCP", check=False)
    assert out.returncode != 0
    assert "invalid port name 'HTTP' (a port name has only lower-case letters, digits and " \
        "'-')" in out.stderr
    assert "ta-gnf" not in [e["name"] for e in agent.call("EndpointList")["endpoints"]]


def test_port_names_survive_an_agent_restart(agent: AgentProcess, clean: None) -> None:
    """The registry keeps each endpoint's port names: a restarted agent resolves the policy
    to the same numbers (never to "any port", never to nothing)."""
    a = agent.add_endpoint("gng", "role=gnserver,name=gng", 207, ports=["http=8080/TCP"])
    client = agent.add_endpoint("gnh", "role=gnclient", 208)
    agent.import_policy("gn-named", INGRESS)
    with echo_servers(a, 8080, 9090):
        assert reaches(client, a, 8080) and not reaches(client, a, 9090)
        agent.stop()
        agent.start()
        assert agent.call("EndpointGet", name=a.name)["ports"] == ["http=8080/TCP"]
        assert reaches(client, a, 8080) and not reaches(client, a, 9090)
