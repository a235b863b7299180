"""`make demo-cluster` end to end: scripts/demo-cluster.sh shows what a user should see, and
leaves nothing behind — after a full run, after Ctrl-C, after a fault that makes it fail, and
when it refuses to start.

What the user sees is read from the script's output as printed: each `curl` it shows and the
line under it (status and body, or "no answer"), `garrison status` of node 3 naming the three
nodes, and the flow records of the deathstars' nodes. What it leaves is looked for on the host:
gd-* namespaces, the agents' pin directories, its work directory, its processes (agents, etcd,
the deathstar apps), and IPv4 rules and routes of its addresses, devices or garrison's tables.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from garrison.redirect.bpffs import BPFFS_MOUNT
from tests.etcd_server import etcd_skip_reason
from tests.privileged.agent_harness import other_agents

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo-cluster.sh"
NAMESPACES = ("gd-ul", "gd-n1", "gd-n2", "gd-n3",
              "gd-deathstar-1", "gd-deathstar-2", "gd-tiefighter", "gd-xwing")
DS1, DS2 = "198.18.11.10", "198.18.12.10"
# A route or rule the demo could only have added on the host by mistake: its addresses, its
# devices, the cluster routes' protocol, the proxy steering's table.
OURS = re.compile(r"198\.18\.1[123]\.|198\.19\.0\.|\bgd-|proto 0xa7|\b2004\b")

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
    pytest.mark.skipif(shutil.which("nsenter") is None, reason="needs nsenter (util-linux)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
]


@dataclass(frozen=True)
class Host:
    """What of the demo's could be on the host."""

    netns: frozenset[str]
    pins: frozenset[str]
    workdirs: frozenset[str]
    rules: frozenset[str]
    routes: frozenset[str]
    pids: frozenset[int]


def _lines(*args: str) -> frozenset[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
    return frozenset(line.strip() for line in out.splitlines() if line.strip())


def snapshot() -> Host:
    return Host(
        netns=frozenset(p.name for p in Path("/run/netns").glob("gd-*")),
        pins=frozenset(p.name for p in BPFFS_MOUNT.glob("garrison-demo-cluster-*")),
        workdirs=frozenset(str(p) for p in Path("/tmp").glob("garrison-demo-cluster.*")),
        rules=_lines("-4", "rule"),
        routes=_lines("-4", "route", "show", "table", "all"),
        pids=frozenset(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()),
    )


def _named_netns_inodes() -> set[int]:
    out = set()
    for path in Path("/run/netns").iterdir():
        try:
            out.add(path.stat().st_ino)
        except OSError:
            continue
    return out


def demo_processes(before: Host) -> list[str]:
    """Processes started since `before` that are the demo's: its agents and etcd (their
    arguments name its work directory or pins), a deathstar app in a namespace no longer
    named (the demo deletes its own; other tests' deathstars run in named ones)."""
    named = _named_netns_inodes()
    host_net = os.stat("/proc/self/ns/net").st_ino
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in before.pids:
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            net = os.stat(proc / "ns" / "net").st_ino
        except OSError:
            continue
        if "garrison-demo-cluster" in cmd or (
            "deathstar.py" in cmd and net != host_net and net not in named
        ):
            left.append(f"{proc.name}: {cmd}")
    return left


def leftovers(before: Host, expect_netns: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    after = snapshot()
    # Another agent on the host (another test run) may add the proxy steering's rule and route
    # (table 2004) meanwhile: then only the demo's addresses and devices say it was the demo.
    steering_ok = bool(other_agents(set()))

    def ours(new: frozenset[str]) -> list[str]:
        return sorted(
            line for line in new if OURS.search(line) and not (steering_ok and "2004" in line)
        )

    found = {
        "netns": sorted(after.netns - expect_netns),
        "pins": sorted(after.pins - before.pins),
        "workdirs": sorted(after.workdirs - before.workdirs),
        "rules": ours(after.rules - before.rules),
        "routes": ours(after.routes - before.routes),
        "processes": demo_processes(before),
    }
    return {k: v for k, v in found.items() if v}


@pytest.fixture
def host() -> Host:
    clash = [ns for ns in NAMESPACES if Path(f"/run/netns/{ns}").exists()]
    assert not clash, f"namespaces {clash} exist (another demo running?): not ours, left alone"
    return snapshot()


def run_demo(timeout_s: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEMO)], capture_output=True, text=True, timeout=timeout_s,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )


@dataclass(frozen=True)
class Request:
    stage: str
    ship: str
    method: str
    path: str
    deathstar: str
    answer: str


CURL = re.compile(
    r"^\$ garrison endpoint exec gd-(\w+) -- curl -s -m 2 -X (\w+) http://([\d.]+)(\S+)"
)


def requests_shown(out: str) -> list[Request]:
    """Every curl the demo shows, with the line it printed under it."""
    lines = out.splitlines()
    stage = ""
    shown = []
    for i, line in enumerate(lines):
        if line.startswith("\x1b[1m=== "):
            stage = line.removeprefix("\x1b[1m=== ").split(":")[0]
        elif m := CURL.match(line):
            ds = {DS1: "ds1", DS2: "ds2"}[m[3]]
            shown.append(Request(stage, m[1], m[2], m[4], ds, lines[i + 1].strip()))
    return shown


def section(out: str, title: str) -> str:
    """The output under the banner that starts with `title`, up to the next banner."""
    start = out.index(f"=== {title}")
    end = out.find("\x1b[1m=== ", start)
    return out[start:] if end < 0 else out[start:end]


def test_demo_cluster_shows_the_verdicts_across_nodes_and_leaves_nothing(host: Host) -> None:
    started = time.monotonic()
    done = run_demo()
    took = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    landed, dropped, denied = (
        "200 Ship landed", "(no answer: the connection was dropped)", "403 Access denied"
    )
    assert requests_shown(out) == [
        # no policy: both ships land, on either node's deathstar
        Request("Stage 0", "tiefighter", "POST", "/v1/request-landing", "ds1", landed),
        Request("Stage 0", "xwing", "POST", "/v1/request-landing", "ds2", landed),
        # L3/L4 imported on node 1: nodes 1 and 2 know the ships' identities through etcd
        Request("Stage 1", "tiefighter", "POST", "/v1/request-landing", "ds1", landed),
        Request("Stage 1", "tiefighter", "POST", "/v1/request-landing", "ds2", landed),
        Request("Stage 1", "xwing", "POST", "/v1/request-landing", "ds1", dropped),
        # L7: each deathstar node's proxy
        Request("Stage 2", "tiefighter", "POST", "/v1/request-landing", "ds2", landed),
        Request("Stage 2", "tiefighter", "PUT", "/v1/exhaust-port", "ds1", denied),
        Request("Stage 2", "tiefighter", "PUT", "/v1/exhaust-port", "ds2", denied),
        Request("Stage 2", "xwing", "POST", "/v1/request-landing", "ds2", dropped),
    ], out

    status = section(out, "The cluster as node 3 sees it")
    assert "Kvstore:         etcd 198.19.0.10:2379, connected" in status, status
    assert "Cluster:         node gd-n3, 2 remote endpoints" in status, status
    for n in (1, 2):
        assert re.search(
            rf"^  gd-n{n} +198\.19\.0\.1{n} +198\.18\.1{n}\.0/24 +healthy, routed via "
            rf"198\.19\.0\.1{n}$", status, re.M,
        ), status
    assert re.search(r"^  gd-n3 +198\.19\.0\.13 +198\.18\.13\.0/24 +healthy$", status, re.M)
    # node 2 applies the policy node 1 imported
    assert re.search(r"CiliumNetworkPolicy +default +rule1 +1 +\S+sw_l3_l4_l7_policy\.yaml",
                     status), status

    flows = section(out, "Flow records of")
    # both deathstar nodes' records in the view: each one's L7 deny, with its node's name
    for n, ip in ((1, DS1), (2, DS2)):
        assert re.search(
            rf"\[gd-n{n}\]: 198\.18\.13\.10:\d+ \(ID:\d+\) -> default/gd-deathstar-{n}:80 "
            rf"\(ID:\d+\) http-request DROPPED \(HTTP/1\.1 PUT http://{ip}/v1/exhaust-port\)",
            flows,
        ), flows
    assert re.search(r"\[gd-n[12]\]: 198\.18\.13\.11:\d+ .* Policy denied DROPPED", flows), flows

    assert leftovers(host) == {}
    print(f"demo-cluster took {took:.1f} s")


def test_demo_cluster_interrupted_removes_what_it_made(host: Host) -> None:
    """Ctrl-C in the middle (SIGINT to its whole process group, as a terminal sends it)."""
    proc = subprocess.Popen(
        [str(DEMO)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    assert proc.stdout is not None
    out = b""
    try:
        deadline = time.monotonic() + 120
        while b"=== Stage 1" not in out:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk and time.monotonic() < deadline, out.decode(errors="replace")
            out += chunk
        assert all(Path(f"/run/netns/{ns}").exists() for ns in NAMESPACES), "all made by now"
        os.killpg(proc.pid, signal.SIGINT)
        out += proc.stdout.read()
        assert proc.wait(60) == 130, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode(errors="replace")
    assert "demo-cluster: removing what it made" in text, text
    assert leftovers(host) == {}, text


def _agent_pid(node: str) -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in argv and b"--node-name" in argv and node.encode() in argv and any(
            b"garrison-demo-cluster" in a for a in argv
        ):
            return int(proc.name)
    raise AssertionError(f"no agent of the demo's {node} runs")


def test_demo_cluster_that_fails_removes_what_it_made(host: Host) -> None:
    """A real fault in the middle: node 3's agent killed (SIGKILL: its pins, maps and routes
    stay) before the ships are added there. The demo fails, shows the agents' logs, and
    removes everything all the same."""
    proc = subprocess.Popen(
        [str(DEMO)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    assert proc.stdout is not None
    out = b""
    try:
        deadline = time.monotonic() + 120
        while b"$ garrison endpoint add gd-deathstar-1 " not in out:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk and time.monotonic() < deadline, out.decode(errors="replace")
            out += chunk
        os.kill(_agent_pid("gd-n3"), signal.SIGKILL)
        out += proc.stdout.read()
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode(errors="replace")
    assert rc not in (0, 130), text
    assert "$ garrison endpoint add gd-tiefighter" in text and "Stage 0" not in text, text
    assert "demo-cluster: removing what it made" in text, text
    assert "--- last lines of " in text and "n3/agent.log" in text, text
    assert leftovers(host) == {}, text


def test_demo_cluster_refuses_a_namespace_it_did_not_make(host: Host) -> None:
    subprocess.run(["ip", "netns", "add", "gd-n2"], check=True)
    try:
        done = run_demo(60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert (
            "demo-cluster: a network namespace named 'gd-n2' exists already and is not this"
            " run's; it is left alone" in done.stderr
        ), done.stderr
        assert Path("/run/netns/gd-n2").exists()
        assert leftovers(host, expect_netns=frozenset({"gd-n2"})) == {}
    finally:
        subprocess.run(["ip", "netns", "delete", "gd-n2"], check=True)  # ours: made above
