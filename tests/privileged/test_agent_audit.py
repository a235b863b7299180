"""`garrison agent --audit`: verdicts are computed and recorded as AUDIT, nothing is dropped or
denied — at L3/L4 and at L7 (garrison goes beyond Cilium there).

The Star Wars L7 policy is in force: the xwing, which L3/L4 policy would drop, lands; the
tiefighter's `PUT /v1/exhaust-port`, which the proxy would answer 403, gets the app's own
answer. The records of both say AUDIT.
"""

from __future__ import annotations

import time

import pytest

from garrison.flows.record import FlowType, Verdict

from .agent_harness import (  # noqa: F401 (fixtures)
    STARWARS,
    AgentProcess,
    fixture_agent,
    fixture_clean,
    http_request,
)

pytestmark = pytest.mark.privileged

AGENT_ARGS = ("--audit",)
L7 = STARWARS / "sw_l3_l4_l7_policy.yaml"


def test_audit_mode_records_what_it_would_deny_and_drops_nothing(
    agent: AgentProcess, clean: None
) -> None:
    ds = agent.add_endpoint("ads", "org=empire,class=deathstar", 41)
    tie = agent.add_endpoint("atie", "org=empire,class=tiefighter", 42)
    xwing = agent.add_endpoint("axwing", "org=alliance,class=xwing", 43)
    agent.deathstar(ds)
    agent.import_file(L7)
    listed = {e["name"]: e for e in agent.cli_json("endpoint", "list")["endpoints"]}
    assert listed[ds.name]["ingress_enforcement"]
    t0 = time.time_ns()

    # L3/L4: the policy admits org=empire only; the xwing lands all the same
    done = agent.exec_in(xwing, "curl", "-s", "-m", "3", "-X", "POST",
                         f"http://{ds.ip}/v1/request-landing")
    assert (done.returncode, done.stdout) == (0, b"Ship landed\n")
    audit = agent.wait_flow(lambda r: r.time >= t0 and r.source.ip == xwing.ip
                            and r.type is FlowType.L3_L4 and r.verdict is Verdict.AUDIT)
    assert (audit.source.identity, audit.destination.identity) == (xwing.identity, ds.identity)
    assert (audit.destination.ip, audit.destination.port) == (ds.ip, 80)

    # L7: the proxy would answer 403; in audit mode the app answers
    sock = tie.connect(ds.ip, 80)
    assert sock is not None
    with sock:
        status, body = http_request(sock, "PUT", "/v1/exhaust-port")
    assert (status, body) == (503, b"Panic: deathstar exploded\n")
    rec = agent.wait_access_record(
        lambda r: r.get("l7", {}).get("type") == "REQUEST"
        and r["l7"].get("http", {}).get("method") == "PUT" and r["source"].get("ip") == tie.ip
    )
    assert rec["verdict"] == "AUDIT" and rec["Type"] == "L7"
    assert rec["l7"]["http"]["url"] == "http://deathstar/v1/exhaust-port"  # the Host header
    assert (rec["source"]["identity"], rec["destination"]["identity"]) == (
        tie.identity, ds.identity)
    assert [p["name"] for p in rec["ingress_denied_by"]] == ["rule1"]

    records = [r for r in agent.flows() if r.time >= t0]
    assert not [r for r in records if r.verdict is Verdict.DROPPED], "audit mode dropped"
    assert agent.call("Status")["datapath"]["loaded"]
