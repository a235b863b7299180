"""The local API's socket under clients that misbehave: a real `AgentAPIServer` on a unix
socket, real gRPC clients (`AgentClient`, what the CLI uses) and raw sockets."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from garrison.agent.api import MAX_CONNECTIONS, AgentAPIServer, AgentClient


@pytest.fixture
def api() -> Iterator[Path]:
    def status(_: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    with tempfile.TemporaryDirectory(prefix="gu-api-") as d:
        path = Path(d) / "agent.sock"
        server = AgentAPIServer(path, {"Status": status})
        server.start()
        try:
            yield path
        finally:
            server.stop(grace=0)


def answers(path: Path, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with AgentClient(path, timeout=2.0) as client, contextlib.suppress(Exception):
            return client.call("Status") == {"ok": True}
        time.sleep(0.2)
    return False


def relays() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "garrison-api-relay")


def test_the_api_answers_again_after_the_process_ran_out_of_descriptors(api: Path) -> None:
    """An agent whose descriptors ran out for a moment (a burst of proxied connections, a
    client leaking API connections) answered `garrison status` with "does not answer" for good:
    the accept loop took EMFILE for its listener being closed and ended."""
    assert answers(api)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[socket.socket] = []
    try:
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 24, hard))
        with contextlib.suppress(OSError):  # until the process has no descriptor left
            for _ in range(200):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(s)
                s.connect(str(api))
        time.sleep(0.5)  # the server's accept meets EMFILE
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert answers(api), "the API stopped answering after running out of descriptors"


def test_a_client_holding_connections_open_gets_a_bounded_share(api: Path) -> None:
    """Connections that are opened and never used each held two threads and three descriptors
    in the agent, without bound: enough of them took the descriptors the proxy accepts with."""
    before = relays()
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + 40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(api))
            held.append(s)
        time.sleep(1.0)
        assert relays() - before <= 2 * MAX_CONNECTIONS
    finally:
        for s in held:
            s.close()
    assert answers(api), "the API did not answer once the idle connections closed"
