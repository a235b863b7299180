"""Clean-ups remove what they made and nothing else (issue 18, items 2 and 3).

The proxy steering (`ip rule fwmark 0x200/0xf00 lookup 2004`, a local route in table 2004) is
host-wide: another agent or an operator may have put either part there before. So each test
runs its agent inside a network namespace of its own (`nsenter --net`), where no other test
or agent can add or remove a rule meanwhile, pre-creates one of the two parts, and checks
after the agent's stop and clean-up that exactly that part is still there and the other gone
— also across an agent restart after SIGKILL (the record is in the state directory).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent, ip  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF, ip rules")

GARRISON = str(Path(sys.executable).with_name("garrison"))
REPO = Path(__file__).resolve().parents[2]
FOREIGN_PRIORITY = "100"
ENDPOINT = "go-clean"  # a rule someone else added, at a priority garrison does not use




def steering(netns: str) -> dict[str, object]:
    """The fwmark 0x200 rules (by priority) and whether table 2004 has the local route."""
    rules = [
        r["priority"] for r in json.loads(ip(netns, "-j", "rule", "show"))
        if r.get("fwmark") == "0x200" and r.get("table") == "2004"
    ]
    route = "local default dev lo" in ip(netns, "route", "show", "table", "2004")
    return {"rules": rules, "route": route}


def test_cleanup_keeps_a_rule_that_was_there_and_removes_the_route_it_added(
    ns_agent: NsAgent,
) -> None:
    ns = ns_agent.netns
    ip(ns, "rule", "add", "fwmark", "0x200/0xf00", "lookup", "2004",
       "priority", FOREIGN_PRIORITY)
    ns_agent.start()
    assert steering(ns) == {"rules": [int(FOREIGN_PRIORITY)], "route": True}
    # killed, then restarted: it finds both parts there, and still knows which it added
    ns_agent.stop(signal.SIGKILL)
    ns_agent.start()
    status = json.loads(subprocess.run(
        [GARRISON, "status", "-o", "json", "--socket", str(ns_agent.workdir / "agent.sock")],
        capture_output=True, text=True, check=True).stdout)
    assert status["datapath"]["proxy_steering_added"] == {"rule": False, "route": True}
    assert ns_agent.stop() == 0

    done = ns_agent.cleanup()
    assert done.returncode == 0, done.stderr
    assert "kept the ip rule fwmark 0x200/0xf00 lookup 2004" in done.stdout
    assert "removed the local route in table 2004" in done.stdout
    assert steering(ns) == {"rules": [int(FOREIGN_PRIORITY)], "route": False}
    assert not ns_agent.pin_root.exists()


def test_cleanup_keeps_a_route_that_was_there_and_removes_the_rule_it_added(
    ns_agent: NsAgent,
) -> None:
    ns = ns_agent.netns
    endpoint = Path(f"/run/netns/{ENDPOINT}")
    assert not endpoint.exists(), f"{ENDPOINT} exists: not ours, left alone"
    ip(ns, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "2004")
    try:
        ns_agent.start()
        assert steering(ns) == {"rules": [9], "route": True}
        done = ns_agent.cli("endpoint", "add", ENDPOINT, "--labels", "app=clean",
                            "--ip", "198.18.250.20")
        assert done.returncode == 0, done.stderr
        # refused while the agent runs: its maps and steering are in use
        done = ns_agent.cleanup()
        assert done.returncode == 1 and "is running" in done.stderr
        assert steering(ns) == {"rules": [9], "route": True}
        assert ns_agent.stop() == 0
        assert endpoint.exists()  # enforcement outlives the agent

        done = ns_agent.cleanup()
        assert done.returncode == 0, done.stderr
        assert f"removed endpoint {ENDPOINT}: its namespace and veth" in done.stdout
        assert "removed the ip rule" in done.stdout and "kept the local route" in done.stdout
        assert steering(ns) == {"rules": [], "route": True}
        assert not endpoint.exists()
        assert "Traceback" not in ns_agent.log()
    finally:
        if endpoint.exists():  # the agent made it for this test
            subprocess.run(["ip", "netns", "delete", ENDPOINT], check=False)


def test_demo_refuses_a_namespace_it_did_not_make() -> None:
    """The demo deletes its endpoints' namespaces at the end: with one of those names already
    taken it must refuse to start, and leave that namespace alone."""
    name = "outpost"  # one of the demo's endpoint names
    if Path(f"/run/netns/{name}").exists():
        pytest.skip(f"a namespace {name!r} exists (a demo running?): not ours to use")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        done = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True,
                              text=True, timeout=120, cwd=REPO, stdin=subprocess.DEVNULL)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"a network namespace named '{name}' exists already" in done.stderr
        assert "Start the agent" not in done.stdout
        assert Path(f"/run/netns/{name}").exists()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)  # made above
