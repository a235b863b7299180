"""The metrics endpoint against clients that connect and never ask: a real server on
loopback, real sockets. The endpoint usually listens on the node's network for Prometheus,
in the agent's own process, beside the proxy: every descriptor it holds is one the proxy
cannot accept with."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

from garrison.proxy.metrics import MAX_SCRAPE_CONNECTIONS, SCRAPE_TIMEOUT_S, ProxyMetrics


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        body: bytes = answer.read()
        return body


def scraped_within(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return b"garrison_policy_l7_total" in scrape(port)
        except OSError:
            time.sleep(0.2)
    return False


def test_idle_connections_hold_a_bounded_number_of_descriptors_for_a_while() -> None:
    """Each connection held a thread and a descriptor until the client closed it, without
    bound: 20,000 idle connections took every descriptor of the agent's process."""
    server = ProxyMetrics().serve("127.0.0.1", 0)
    held: list[socket.socket] = []
    try:
        assert scraped_within(server.port, 5)
        before = descriptors()
        for _ in range(MAX_SCRAPE_CONNECTIONS + 50):
            held.append(socket.create_connection(("127.0.0.1", server.port)))
        time.sleep(1.0)
        # the client's own descriptors, and at most the cap on the server's side
        assert descriptors() - before <= len(held) + MAX_SCRAPE_CONNECTIONS
        # the server lets an idle connection go after its timeout
        probe = held[0]
        probe.settimeout(SCRAPE_TIMEOUT_S + 5)
        started = time.monotonic()
        assert probe.recv(1) == b""
        assert time.monotonic() - started <= SCRAPE_TIMEOUT_S + 2
    finally:
        for s in held:
            s.close()
    try:
        assert scraped_within(server.port, 5), "no scrape answered once the idle clients left"
    finally:
        server.close()
