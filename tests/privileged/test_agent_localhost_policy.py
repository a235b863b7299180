"""`garrison agent --allow-localhost policy`: the node reaches an endpoint only where policy
allows, as every other peer (the default, `always`, is in test_agent_localhost.py)."""

from __future__ import annotations

import pytest

from garrison.flows.record import DropReasonDesc, FlowType, TrafficDirection, Verdict

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentProcess,
    echo_servers,
    fixture_agent,
    fixture_clean,
)
from .test_agent_localhost import POLICY, from_host

pytestmark = pytest.mark.privileged

AGENT_ARGS = ("--allow-localhost", "policy")


def test_host_is_denied_like_any_peer(agent: AgentProcess, clean: None) -> None:
    web = agent.add_endpoint("gpweb2", "app=gpweb", 63, cli=False)
    agent.import_policy("gp-web", POLICY)
    with echo_servers(web, 7001):
        assert not from_host(web, 7001, timeout=0.5)
    drop = agent.wait_flow(
        lambda r: r.type is FlowType.L3_L4 and r.destination.port == 7001
        and r.traffic_direction is TrafficDirection.INGRESS and r.source.identity == 1
    )
    assert drop.verdict is Verdict.DROPPED
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
