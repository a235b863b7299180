"""The flow API (`garrison.cluster.flowapi`) against hostile readers: a real server on
loopback, a real gRPC client. Its readers are other nodes, unauthenticated without TLS; the
server runs in the agent's process, beside the proxy, so no request may hold that process."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path

from garrison.cluster.flowapi import MAX_CONNECTIONS, FlowAPIClient, FlowAPIServer
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


def test_connections_that_never_speak_hold_a_bounded_number_of_descriptors() -> None:
    """Every TCP connection to the flow API held a descriptor of the agent's process for
    gRPC's two-minute handshake timeout, without bound: a host that can reach the port (any,
    without TLS client certificates) could take the descriptors the proxy accepts with."""
    store = FlowStore()
    store.extend(RECORDS[:3])
    server = FlowAPIServer(store, "127.0.0.1", 0)
    server.start()
    held: list[socket.socket] = []
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(MAX_CONNECTIONS + 50):
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(1.0)
        assert len(os.listdir("/proc/self/fd")) - before <= len(held) + MAX_CONNECTIONS
    finally:
        for s in held:
            s.close()
    client = FlowAPIClient(server.address, timeout_s=10)
    try:
        assert len(client.call("Flows", query={}, limit=10)["flows"]) == 3
    finally:
        client.close()
        server.stop(0)
