"""The flow API (`garrison.cluster.flowapi`) against hostile readers: a real server on
loopback, a real gRPC client. Its readers are other nodes, unauthenticated without TLS; the
server runs in the agent's process, beside the proxy, so no request may hold that process."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from garrison.cluster.flowapi import FlowAPIClient, FlowAPIServer
from garrison.flows.query import FlowQuery
from garrison.flows.record import FlowRecord
from garrison.flows.store import FlowStore

DEMO = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"
RECORDS = [FlowRecord.from_json(line) for line in DEMO.read_bytes().splitlines() if line]


def test_a_node_name_pattern_of_many_stars_is_answered_at_once() -> None:
    """`--node-name` patterns were Python regular expressions, one `[-.0-9a-z]*` per `*`:
    36 stars against `default/worker-1` backtracked for 5 s of CPU per record while holding
    the GIL (the agent's proxy and API stood still), 80 for hours. A reader sent that in 45
    bytes."""
    store = FlowStore()
    store.extend(replace(r, node_name="worker-1") for r in RECORDS[:3])
    server = FlowAPIServer(store, "127.0.0.1", 0)
    server.start()
    client = FlowAPIClient(server.address, timeout_s=30)
    try:
        for pattern, found in (("*" * 36 + "x", 0), ("w*" + "*" * 36 + "1", 3)):
            query = FlowQuery.of([("node-name", pattern, False)]).to_dict()
            started = time.monotonic()
            answer = client.call("Flows", query=query, limit=100)
            assert time.monotonic() - started < 2.0
            assert len(answer["flows"]) == found
    finally:
        client.close()
        server.stop(0)
