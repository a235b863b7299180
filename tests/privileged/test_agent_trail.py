"""The agent's audit trail and the API's root-only socket (issue 18, items 5 and 8).

Every policy import/delete and endpoint add/delete is one JSON line on `garrison.audit`: the
method, the caller's uid/gid/pid as the kernel gives them (SO_PEERCRED), the request, the
outcome and the policy revision after it; the revision counts on across a restart. A user who
is not root gets one line saying root is needed and exit 3 from `status`, `endpoint list` and
`observe` — never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")

GARRISON = str(Path(sys.executable).with_name("garrison"))
L3_POLICY = Path(__file__).resolve().parents[2] / "examples/starwars/sw_l3_l4_policy.yaml"
NOBODY = 65534
ENDPOINT = "go-trail"


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        capture_output=True, text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def audit_lines(agent: NsAgent) -> list[dict[str, Any]]:
    out = []
    for line in agent.log().splitlines():
        _, sep, message = line.partition(" garrison.audit INFO ")
        if sep:
            out.append(json.loads(message))
    return out


def wait_audit(agent: NsAgent, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while len(lines := audit_lines(agent)) < count:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)
    return lines


@pytest.fixture(name="trail_agent")
def fixture_trail_agent(ns_agent: NsAgent) -> Iterator[NsAgent]:
    """The agent's socket in a directory everyone may enter (the socket itself stays 0600)."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    sock_dir = Path(f"/tmp/go-trail-{os.getpid()}")
    sock_dir.mkdir(mode=0o755)
    os.chmod(sock_dir, 0o755)
    ns_agent.socket = sock_dir / "agent.sock"
    assert not Path(f"/run/netns/{ENDPOINT}").exists(), f"{ENDPOINT} exists: not ours"
    try:
        yield ns_agent
    finally:
        if ns_agent.proc is not None and ns_agent.proc.poll() is None:
            ns_agent.cli("endpoint", "delete", ENDPOINT)
            ns_agent.stop()
        if Path(f"/run/netns/{ENDPOINT}").exists():  # the agent made it for this test
            subprocess.run(["ip", "netns", "delete", ENDPOINT], check=False)
        shutil.rmtree(sock_dir)


def test_audit_trail_and_revision_across_restart(trail_agent: NsAgent) -> None:
    agent = trail_agent
    agent.start()
    assert oct(agent.socket.stat().st_mode & 0o777) == "0o600"

    # who: the pid and uid of the very process that called
    imp = subprocess.Popen([GARRISON, "policy", "import", str(L3_POLICY), "--socket",
                            str(agent.socket)], stdout=subprocess.PIPE, text=True)
    out, _ = imp.communicate(timeout=60)
    assert imp.returncode == 0, out
    [line] = wait_audit(agent, 1)
    assert line == {
        "audit": "PolicyImport", "uid": 0, "gid": 0, "pid": imp.pid,
        "request": {"paths": [str(L3_POLICY)]}, "outcome": "ok", "policy_revision": 2,
    }
    done = agent.cli("endpoint", "add", ENDPOINT, "--labels", "org=empire,class=tiefighter",
                     "--ip", "198.18.250.10")
    assert done.returncode == 0, done.stderr
    done = agent.cli("endpoint", "delete", ENDPOINT)
    assert done.returncode == 0, done.stderr
    missing = agent.cli("policy", "delete", "no-such-policy")
    assert missing.returncode == 1
    done = agent.cli("policy", "delete", "--all")
    assert done.returncode == 0, done.stderr
    agent.cli("status")  # reads are not in the trail
    lines = wait_audit(agent, 5)
    assert [(entry["audit"], entry["outcome"].split(":")[0], entry["policy_revision"])
            for entry in lines] == [
        ("PolicyImport", "ok", 2),
        ("EndpointAdd", "ok", 2),
        ("EndpointDelete", "ok", 2),
        ("PolicyDelete", "refused", 2),
        ("PolicyDelete", "ok", 3),
    ]
    assert lines[1]["request"]["name"] == ENDPOINT and lines[2]["request"] == {"name": ENDPOINT}
    assert all(entry["uid"] == 0 and entry["pid"] for entry in lines)
    assert "no policy named 'no-such-policy'" in lines[3]["outcome"]

    # the revision counts on after a restart (never back to 1)
    assert agent.stop() == 0
    agent.start()
    revision = json.loads(agent.cli("policy", "get", "-o", "json").stdout)["revision"]
    assert revision > 3
    assert agent.stop() == 0
    assert "Traceback" not in agent.log()


def test_non_root_gets_one_line_and_exit_3(trail_agent: NsAgent) -> None:
    agent = trail_agent
    agent.start()
    for argv in (["status"], ["endpoint", "list"], ["observe", "--last", "5"]):
        done = as_nobody(GARRISON, *argv, "--socket", str(agent.socket))
        assert done.returncode == 3, (argv, done.stdout, done.stderr)
        errors = [line for line in done.stderr.splitlines() if "RuntimeWarning" not in line
                  and not line.startswith("  from ")]  # a stale-build warning is not ours
        assert errors == [
            f"garrison: permission denied on {agent.socket}: the agent API is root only; "
            "run the command as root (sudo garrison ...)"
        ], (argv, done.stderr)
    # a root-only directory on the way (the default /run/garrison is 0700): the same line
    private = agent.workdir / "agent.sock"
    done = as_nobody(GARRISON, "status", "--socket", str(private))
    assert done.returncode == 3 and "Traceback" not in done.stderr
    assert "the agent API is root only" in done.stderr
    # the kernel's word, not the client's: opened up, nobody's call is logged as uid 65534
    os.chmod(agent.socket, 0o666)
    done = as_nobody(GARRISON, "policy", "delete", "--all", "--socket", str(agent.socket))
    assert done.returncode == 0, done.stderr
    [line] = wait_audit(agent, 1)
    assert (line["audit"], line["uid"], line["gid"]) == ("PolicyDelete", NOBODY, NOBODY)
    assert agent.stop(signal.SIGTERM) == 0
