"""Routes to other nodes' pod CIDRs belong to the agent that added them.

Two agents in one network namespace (two instances of garrison on a host, or simulated nodes)
both mark their routes with garrison's protocol number (0xa7). An agent's restart must take
back only its own routes, and `garrison agent --cleanup` must remove only its own: before, both
took every 0xa7 route in the namespace, so one agent's clean-up cut the other's nodes off.

Layout: netns gq-rt-<pid> with a veth pair, one end at 198.19.0.190/24, and two 0xa7 routes
through it: one recorded in the test agent's state directory, one another agent's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.agent_harness import GARRISON

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, routes)")

NETNS = f"gq-rt-{os.getpid()}"
OURS = ("198.18.191.0/24", "198.19.0.192")
THEIRS = ("198.18.190.0/24", "198.19.0.191")


def _ip(*args: str) -> str:
    return subprocess.run(["ip", "-n", NETNS, *args], check=True, capture_output=True,
                          text=True).stdout


def _node_routes() -> str:
    return _ip("route", "show", "proto", "0xa7")


@pytest.fixture(name="netns")
def fixture_netns() -> Iterator[str]:
    assert NETNS not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                       text=True).stdout
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        _ip("link", "add", "gq-d0", "type", "veth", "peer", "name", "gq-d1")
        _ip("addr", "add", "198.19.0.190/24", "dev", "gq-d0")
        _ip("link", "set", "gq-d0", "up")
        _ip("link", "set", "gq-d1", "up")
        for cidr, via in (OURS, THEIRS):
            _ip("route", "add", cidr, "via", via, "proto", "0xa7")
        yield NETNS
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=True)


def _state(tmp_path: Path, record: object) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    (state / "node-routes.json").write_text(json.dumps(record))
    return state


def _cleanup(tmp_path: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{NETNS}", GARRISON, "agent", "--cleanup",
         "--state-dir", str(state), "--socket", str(tmp_path / "agent.sock"),
         "--bpffs-root", str(tmp_path / "no-pins")],
        capture_output=True, text=True, timeout=60,
    )


def test_cleanup_removes_only_the_routes_its_agent_added(netns: str, tmp_path: Path) -> None:
    state = _state(tmp_path, {"routes": {OURS[0]: OURS[1]}})
    done = _cleanup(tmp_path, state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"removed the route to another node's pod CIDR {OURS[0]} via {OURS[1]}" in done.stdout
    assert THEIRS[0] not in done.stdout
    routes = _node_routes()
    assert f"{THEIRS[0]} via {THEIRS[1]}" in routes
    assert OURS[0] not in routes
    assert not (state / "node-routes.json").exists()


def test_cleanup_without_a_record_removes_no_route(netns: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    done = _cleanup(tmp_path, state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pod CIDR" not in done.stdout
    routes = _node_routes()
    assert OURS[0] in routes and THEIRS[0] in routes


def test_a_corrupt_record_is_one_line_naming_the_file(netns: str, tmp_path: Path) -> None:
    state = _state(tmp_path, {"routes": ["198.18.191.0/24"]})
    done = _cleanup(tmp_path, state)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{state / 'node-routes.json'}: not a record of node routes" in lines[0]
    assert "Traceback" not in done.stderr
    assert OURS[0] in _node_routes()


def test_a_restart_takes_back_only_its_own_routes(netns: str, tmp_path: Path) -> None:
    """What a restarted agent holds: its recorded route still in the kernel, not the other
    agent's, not a recorded route the kernel lost (which leaves the record)."""
    gone = ("198.18.192.0/24", "198.19.0.193")
    state = _state(tmp_path, {"routes": {OURS[0]: OURS[1], gone[0]: gone[1]}})
    record = state / "node-routes.json"
    script = (
        "import sys; from pathlib import Path; from garrison.cluster.routes import NodeRoutes\n"
        "r = NodeRoutes(Path(sys.argv[1])); r.adopt_existing()\n"
        "print(sorted(f'{c} via {v}' for c, v in r.installed().items()))\n"
    )
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{NETNS}", sys.executable, "-c", script, str(record)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"['{OURS[0]} via {OURS[1]}']"
    assert json.loads(record.read_text()) == {"routes": {OURS[0]: OURS[1]}}
    routes = _node_routes()
    assert OURS[0] in routes and THEIRS[0] in routes
