"""`garrison observe --follow` over the local API: a real process, a real API socket."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from garrison.agent.api import AgentAPIServer
from garrison.flows.record import FlowRecord
from garrison.flows.store import FlowStore, StoreConfig

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "tests" / "data" / "flows" / "starwars-demo.log"
RECORDS = [FlowRecord.from_json(line) for line in DEMO.read_bytes().splitlines() if line]


def garrison(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "garrison.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True).stdout


def test_a_follower_that_fell_behind_is_told_a_fix_that_exists() -> None:
    """The warning advised "a larger --flow-ring-size on the agent", a flag `garrison agent`
    does not have (it refuses it as an unrecognised argument)."""
    ring = FlowStore(StoreConfig(capacity=3))
    following = threading.Event()

    def flows(req: dict[str, Any]) -> dict[str, Any]:
        batch = ring.tail(int(req.get("limit", 100)))
        return {"flows": [r.to_json() for r in batch.records], "cursor": batch.cursor}

    def flows_since(req: dict[str, Any]) -> dict[str, Any]:
        if not following.is_set():  # the follower holds cursor 0: 7 of 10 leave the ring
            ring.extend(RECORDS[:10])
            following.set()
        batch = ring.since(int(req.get("cursor", 0)))
        return {"flows": [r.to_json() for r in batch.records], "cursor": batch.cursor,
                "missed": batch.missed}

    with tempfile.TemporaryDirectory(prefix="gu-observe-") as d:
        socket = Path(d) / "agent.sock"
        server = AgentAPIServer(socket, {"Flows": flows, "FlowsSince": flows_since})
        server.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "garrison.cli.main", "observe", "--follow", "--socket",
             str(socket)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        try:
            assert following.wait(30), "observe --follow did not poll"
            time.sleep(1)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
            server.stop(grace=0)
    warning = next(line for line in err.splitlines() if "left the agent's ring" in line)
    assert warning.startswith("garrison: 7 records left the agent's ring before they were read")
    known = set(re.findall(r"--[a-z][a-z-]+", garrison("agent", "--help") +
                           garrison("observe", "--help")))
    named = set(re.findall(r"--[a-z][a-z-]+", warning))
    assert named <= known, f"{warning!r} names {sorted(named - known)}, which no command has"
