"""Policy fields read as Kubernetes and Cilium read them, end to end through a running agent:
real connections and HTTP requests between endpoints, verdicts read back from the flow
records.

- A NetworkPolicy with `policyTypes: []` isolates its pods for ingress (the API server's
  default); it used to enforce nothing, and every connection passed.
- A `headerMatches` entry without a value asks for the header's presence (Cilium's
  HeaderMatch); it used to be read as "sent empty", and the proxy denied every request
  carrying the header with a value.
- A deny rule's named port that the endpoints of one identity map to different numbers (a
  rollout moving the port) denies every one of them; it used to deny none.
- HTTP rules that are each valid RE2 but together too large for one RE2 set are matched rule
  by rule; the proxy could not build its matcher for them.
"""

from __future__ import annotations

import time

import pytest

from garrison.flows.record import DropReasonDesc, FlowType, Verdict

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentEndpoint,
    AgentProcess,
    echo_servers,
    fixture_agent,
    fixture_clean,
    http_request,
    roundtrip,
)

pytestmark = pytest.mark.privileged

EMPTY_POLICY_TYPES = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ps-isolate}
spec:
  podSelector: {matchLabels: {app: psdb}}
  policyTypes: []
"""

PRESENCE = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ps-token}
spec:
  endpointSelector: {matchLabels: {class: psdeathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: psweb}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - path: /v1/request-landing
          headerMatches: [{name: X-Token}]
"""


def test_empty_policy_types_isolates_ingress(agent: AgentProcess, clean: None) -> None:
    web = agent.add_endpoint("psweb", "app=psweb", 141, cli=False)
    db = agent.add_endpoint("psdb", "app=psdb", 142, cli=False)
    with echo_servers(db, 7400):
        sock = web.connect(db.ip, 7400)
        assert sock is not None, "no policy yet: web reaches db"
        with sock:
            assert roundtrip(sock)
        agent.import_policy("ps-isolate", EMPTY_POLICY_TYPES)
        t0 = time.time_ns()
        late = web.connect(db.ip, 7400, timeout=0.5)
        if late is not None:
            late.close()
        assert late is None, "policyTypes: [] left db's ingress open"
    drop = agent.wait_flow(
        lambda r: r.time >= t0 and r.verdict is Verdict.DROPPED and r.type is FlowType.L3_L4
        and r.source.ip == web.ip and r.destination.ip == db.ip and r.destination.port == 7400
    )
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    listed = {e["name"]: e for e in agent.cli_json("endpoint", "list")["endpoints"]}
    assert listed[db.name]["ingress_enforcement"]


def request(src: AgentEndpoint, dst: AgentEndpoint, headers: str) -> int:
    """POST /v1/request-landing with `headers` (lines ending in CRLF); the answer's status."""
    sock = src.connect(dst.ip, 80)
    assert sock is not None, f"{src.name}: no connection to port 80"
    with sock:
        sock.settimeout(3)
        sock.sendall(
            ("POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n"
             f"{headers}Connection: close\r\n\r\n").encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    with_status = data.split(b" ", 2)
    assert len(with_status) > 1, data
    return int(with_status[1])


def test_header_match_without_value_asks_for_presence(
    agent: AgentProcess, clean: None
) -> None:
    ds = agent.add_endpoint("psds", "class=psdeathstar", 143, cli=False)
    web = agent.add_endpoint("psweb2", "app=psweb", 144, cli=False)
    agent.deathstar(ds)
    agent.import_policy("ps-token", PRESENCE)
    assert request(web, ds, "X-Token: tok-42\r\n") == 200  # the app's answer
    assert request(web, ds, "") == 403  # the proxy's
    for verdict in (Verdict.FORWARDED, Verdict.DROPPED):
        agent.wait_flow(
            lambda r, v=verdict: r.type is FlowType.L7 and r.verdict is v  # type: ignore[misc]
            and r.source.identity == web.identity and r.l7 is not None
            and r.l7.http is not None and r.l7.http.method == "POST"
        )


def big_rules() -> str:
    rules = "\n".join(
        f'        - {{method: POST, path: "/v1/r{i}-[a-z]{{{{1,1000}}}}[0-9]{{{{1,1000}}}}"}}'
        for i in range(40)
    )
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: ps-big}}
spec:
  endpointSelector: {{matchLabels: {{class: psdeathstar2}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: psweb3}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
{rules}
        - {{method: POST, path: /v1/request-landing}}
"""


def test_rules_too_large_for_one_re2_set_are_enforced(agent: AgentProcess, clean: None) -> None:
    ds = agent.add_endpoint("psds2", "class=psdeathstar2", 145, cli=False)
    web = agent.add_endpoint("psweb3", "app=psweb3", 146, cli=False)
    agent.deathstar(ds)
    agent.import_policy("ps-big", big_rules())
    assert request(web, ds, "") == 200  # POST /v1/request-landing: the app's answer
    sock = web.connect(ds.ip, 80)
    assert sock is not None
    with sock:
        status, _ = http_request(sock, "PUT", "/v1/exhaust-port")
    assert status == 403


NAMED_DENY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ps-admin}
spec:
  endpointSelector: {matchLabels: {app: psadmin}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: psclient}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: psclient}}]
    toPorts: [{ports: [{port: admin}]}]
"""


def test_deny_of_a_name_two_endpoints_map_differently(agent: AgentProcess, clean: None) -> None:
    old = agent.add_endpoint("psadm1", "app=psadmin", 147, cli=False, ports=["admin=8443/TCP"])
    new = agent.add_endpoint("psadm2", "app=psadmin", 148, cli=False, ports=["admin=9443/TCP"])
    client = agent.add_endpoint("pscli", "app=psclient", 149, cli=False)
    assert old.identity == new.identity
    agent.import_policy("ps-admin", NAMED_DENY)
    with echo_servers(old, 8443, 80), echo_servers(new, 9443):
        t0 = time.time_ns()
        for ep, port in ((old, 8443), (new, 9443)):
            sock = client.connect(ep.ip, port, timeout=0.5)
            if sock is not None:
                sock.close()
            assert sock is None, f"{ep.name}:{port} (admin) was reachable"
        sock = client.connect(old.ip, 80)
        assert sock is not None, "the allow of every other port was lost"
        with sock:
            assert roundtrip(sock)
    drop = agent.wait_flow(
        lambda r: r.time >= t0 and r.verdict is Verdict.DROPPED and r.type is FlowType.L3_L4
        and r.source.ip == client.ip and r.destination.port == 9443
    )
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENY
