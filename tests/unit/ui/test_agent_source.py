"""The page's live source: the agent's API (real gRPC on a unix socket) over a real flow ring.

The handlers are the agent's `Flows`, `FlowsSince` and `PolicyGet` as `garrison.agent.handlers`
answers them, over `garrison.flows.store.FlowStore` holding the demo's records; only the
agent's datapath is absent.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from garrison.agent.api import AgentAPIServer
from garrison.flows.query import FlowQuery
from garrison.flows.record import FlowRecord
from garrison.flows.store import FlowStore as Ring
from garrison.ui.app import Listen, ReviewApp, agent_source

DEMO = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"
RECORDS = [FlowRecord.from_json(line) for line in DEMO.read_bytes().splitlines() if line]
UNUSED = {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "rule1",
          "rule": "egress[0]"}


@pytest.fixture
def agent() -> Iterator[tuple[Path, Ring]]:
    ring = Ring()
    ring.extend(RECORDS[:40])

    def flows(req: dict[str, Any]) -> dict[str, Any]:
        query = FlowQuery.from_dict(req.get("query") or {}).compile()
        batch = ring.tail(int(req.get("limit", 100)), query)
        return {"flows": [r.to_json() for r in batch.records], "cursor": batch.cursor}

    def flows_since(req: dict[str, Any]) -> dict[str, Any]:
        query = FlowQuery.from_dict(req.get("query") or {}).compile()
        batch = ring.since(int(req.get("cursor", 0)), query)
        return {"flows": [r.to_json() for r in batch.records], "cursor": batch.cursor,
                "missed": batch.missed}

    def policy_get(req: dict[str, Any]) -> dict[str, Any]:
        refs = [{"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "rule1",
                 "rule": "ingress[0]"}, UNUSED]
        return {"policies": [{"name": "rule1", "rule_refs": refs}]}

    with tempfile.TemporaryDirectory(prefix="gu-agent-") as d:
        socket = Path(d) / "agent.sock"
        server = AgentAPIServer(socket, {"Flows": flows, "FlowsSince": flows_since,
                                         "PolicyGet": policy_get})
        server.start()
        try:
            yield socket, ring
        finally:
            server.stop(grace=0)


def test_the_page_reads_the_ring_then_follows_it(agent: tuple[Path, Ring]) -> None:
    socket, ring = agent
    app = ReviewApp(agent_source(socket), Listen("127.0.0.1", 0))
    app.start()
    try:
        assert len(app.store) == 40
        result = app.server.service_map() if app.server else {}
        assert {"tiefighter", "xwing", "deathstar"} <= {n["name"] for n in result["nodes"]}
        assert [r["rule"] for r in result["never_matched"]] == ["egress[0]"]
        assert app.policies_from == "the agent's policies"
        ring.extend(RECORDS[40:])
        deadline = time.monotonic() + 5
        while len(app.store) < len(RECORDS):
            assert time.monotonic() < deadline, f"followed {len(app.store)} records"
            time.sleep(0.05)
        assert app.store.lines(40, 41) == [RECORDS[40].to_json().encode()]
        assert app.store.builder.records == len(RECORDS)
    finally:
        app.stop()
