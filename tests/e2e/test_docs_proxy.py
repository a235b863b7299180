"""docs/proxy.md's session runs as written and prints what the page shows (issue 18, item 16).

Each `$ COMMAND` of the page's first `sh` block is run with bash from the repository's root:
a command ending in `&` is started in the background (and stopped by PID at the end), any
other must print exactly the lines below it — retried for a few seconds, since the background
servers take a moment to listen. All of it runs in a network namespace of the test's own
(`gm-proxydoc-<pid>`, loopback only), so the page's fixed ports collide with nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace")]

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "proxy.md"
ACCESS_LOG_DIR = Path("/tmp/garrison-proxy")  # the page's --access-log directory


def session() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of the page's first sh block."""
    lines = PAGE.read_text().splitlines()
    start = lines.index("```sh") + 1
    steps: list[tuple[str, list[str]]] = []
    i = start
    while not lines[i].startswith("```"):
        line = lines[i]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            steps.append((command, []))
        else:
            steps[-1][1].append(line)
        i += 1
    return steps


@pytest.fixture(name="netns")
def fixture_netns() -> Iterator[str]:
    if shutil.which("nsenter") is None or shutil.which("curl") is None:
        pytest.skip("needs nsenter and curl")
    if ACCESS_LOG_DIR.exists():
        pytest.skip(f"{ACCESS_LOG_DIR} exists: not ours to write into")
    name = f"gm-proxydoc-{os.getpid()}"
    assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)  # ours: made above
        shutil.rmtree(ACCESS_LOG_DIR, ignore_errors=True)  # made by the page's proxy


def test_the_proxy_page_session_prints_what_it_shows(netns: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    prefix = ["nsenter", f"--net=/run/netns/{netns}", "bash", "-c"]
    background: list[subprocess.Popen[bytes]] = []
    try:
        for command, expected in session():
            if command.endswith("&"):
                background.append(subprocess.Popen(
                    [*prefix, "exec " + command[:-1].strip()], cwd=REPO, env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE))
                continue
            deadline = time.monotonic() + 20
            while True:
                done = subprocess.run([*prefix, command], cwd=REPO, env=env,
                                      capture_output=True, text=True, timeout=30)
                got = done.stdout.rstrip("\n").splitlines()
                if got == expected:
                    break
                for proc in background:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, (command, got, expected, done.stderr)
                time.sleep(0.3)
    finally:
        for proc in background:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
    assert (ACCESS_LOG_DIR / "access.log").stat().st_size > 0
