"""`garrison endpoint config NAME audit=true` (Cilium's PolicyAuditMode, per endpoint): that
endpoint's verdicts are computed and recorded AUDIT, nothing it would drop or deny is —
at L3/L4 in the kernel and at L7 in the agent's proxy — while another endpoint under the same
policy stays enforced; `audit=false` enforces it again at once.
"""

from __future__ import annotations

import time

import pytest

from garrison.flows.record import FlowType, Verdict

from .agent_harness import (  # noqa: F401 (fixtures)
    STARWARS,
    AgentEndpoint,
    AgentProcess,
    fixture_agent,
    fixture_clean,
    http_request,
)

pytestmark = pytest.mark.privileged

L7 = STARWARS / "sw_l3_l4_l7_policy.yaml"


def land(agent: AgentProcess, ship: AgentEndpoint, ds: AgentEndpoint) -> tuple[int, bytes]:
    done = agent.exec_in(ship, "curl", "-s", "-m", "2", "-X", "POST",
                         f"http://{ds.ip}/v1/request-landing")
    return done.returncode, done.stdout


def put(tie: AgentEndpoint, ds: AgentEndpoint) -> int:
    sock = tie.connect(ds.ip, 80)
    assert sock is not None
    with sock:
        return http_request(sock, "PUT", "/v1/exhaust-port")[0]


def test_one_endpoint_in_audit_mode(agent: AgentProcess, clean: None) -> None:
    ds = agent.add_endpoint("gdds", "org=empire,class=deathstar", 124)
    other = agent.add_endpoint("gdds2", "org=empire,class=deathstar", 125)
    tie = agent.add_endpoint("gdtie", "org=empire,class=tiefighter", 126)
    xwing = agent.add_endpoint("gdxw", "org=alliance,class=xwing", 127)
    agent.deathstar(ds)
    agent.deathstar(other)
    agent.import_file(L7)
    shown = agent.cli("endpoint", "config", ds.name, "audit=true").stdout
    assert shown == f"endpoint {ds.name}: audit=true deny-response=drop\n"
    listed = {e["name"]: e for e in agent.cli_json("endpoint", "list")["endpoints"]}
    assert (listed[ds.name]["audit"], listed[other.name]["audit"]) == (True, False)
    t0 = time.time_ns()

    assert land(agent, xwing, ds) == (0, b"Ship landed\n")  # L3/L4 would drop: audited
    assert land(agent, xwing, other)[0] != 0  # the other deathstar is enforced
    assert put(tie, ds) == 503  # L7 would deny: the app answers
    assert put(tie, other) == 403
    audited = agent.wait_flow(lambda r: r.time >= t0 and r.source.ip == xwing.ip
                              and r.destination.ip == ds.ip and r.type is FlowType.L3_L4
                              and r.verdict is Verdict.AUDIT)
    assert audited.destination.identity == ds.identity
    rec = agent.wait_access_record(
        lambda r: r.get("l7", {}).get("type") == "REQUEST" and r.get("verdict") == "AUDIT"
        and r["destination"].get("ip") == ds.ip
    )
    assert [p["name"] for p in rec["ingress_denied_by"]] == ["rule1"]

    agent.cli("endpoint", "config", ds.name, "audit=false")
    assert land(agent, xwing, ds)[0] != 0
    assert put(tie, ds) == 403
    bad = agent.cli("endpoint", "config", ds.name, "audit=maybe", check=False)
    assert (bad.returncode, bad.stderr) == (
        1, "garrison: audit=maybe: expected audit=true or audit=false\n")
