"""The review server's API against requests other sites' pages make a browser send."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from garrison.ui.app import Listen, ReviewApp, file_source
from garrison.ui.server import IDLE_TIMEOUT_S, MAX_CONNECTIONS

DEMO = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[ReviewApp]:
    log = tmp_path / "access.log"
    shutil.copy(DEMO, log)
    review = ReviewApp(file_source([str(log)], cache=False), Listen("127.0.0.1", 0))
    review.start()
    assert review.wait_loaded(10)
    yield review
    review.stop()


def get(app: ReviewApp, path: str, site: str | None) -> tuple[int, bytes]:
    url = urlsplit(app.listen.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    conn.request("GET", path, headers={"Sec-Fetch-Site": site} if site else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


@pytest.mark.parametrize(("site", "status"), [
    ("cross-site", 403), ("same-site", 403), ("same-origin", 200), ("none", 200), (None, 200),
])
def test_the_api_answers_its_own_page_and_scripts_only(
        app: ReviewApp, site: str | None, status: int) -> None:
    for path in ("/api/flows?q=--verdict+DROPPED", "/api/map?q=--verdict+DROPPED",
                 "/api/info", "/api/policy"):
        got, body = get(app, path, site)
        assert got == status, (path, body)
        if status == 403:
            assert f"another site's page made (Sec-Fetch-Site: {site})".encode() in body
    # the page itself opens from a link anywhere
    assert get(app, "/?view=flows", site)[0] == 200


def test_idle_connections_hold_a_bounded_number_of_descriptors_for_a_while(
        app: ReviewApp) -> None:
    """Each connection held a thread and a descriptor until the client closed it, without
    bound: any local user could take every descriptor of `garrison agent --ui`'s process (the
    page listens on loopback, in the agent's process, beside the proxy)."""
    port = app.listen.port
    before = len(os.listdir("/proc/self/fd"))
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + 50):
            held.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(1.0)
        # the client's own descriptors, and at most the cap on the server's side
        assert len(os.listdir("/proc/self/fd")) - before <= len(held) + MAX_CONNECTIONS
        probe = held[0]
        probe.settimeout(IDLE_TIMEOUT_S + 5)
        started = time.monotonic()
        assert probe.recv(1) == b""  # let go after its timeout
        assert time.monotonic() - started <= IDLE_TIMEOUT_S + 2
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while get(app, "/api/info", None)[0] != 200:
        assert time.monotonic() < deadline, "the page did not answer once the idle clients left"
        time.sleep(0.2)


@pytest.mark.parametrize("path", ["/api/flows?before=%C2%B2", "/api/flows?limit=%C2%B9",
                                  "/api/stream?after=%C2%B3"])
def test_a_number_that_is_no_ascii_number_is_a_400(app: ReviewApp, path: str) -> None:
    """`²` passed the digit check and failed int(): the connection was dropped with no
    answer, and a traceback went to the log (the agent's, with `agent --ui`)."""
    status, body = get(app, path, None)
    assert status == 400
    assert b"expected a number" in body
