"""What README.md and operating.md show of a running agent.

`garrison endpoint exec NAME -- CMD` runs CMD in the endpoint's network namespace: for an
endpoint adopted from a namespace of another name (`endpoint add NAME --netns OTHER`) or by PID
it used to look for `/run/netns/NAME` only, and said there was no such endpoint while
`garrison endpoint list` showed it. An option written after NAME is refused in one line that
says where it goes, instead of being run as the command.

`garrison_policy_verdict_total`'s `match` label is "as `observe` prints it" (operating.md),
Cilium's words: `L3-Only`, not the resolver's `L3-only`.

The agent here is this module's own: its state, socket, pin root (`/sys/fs/bpf/garrison-hq-*`)
and proxy ports, names starting with `hq-`, addresses from 198.18.234.0/24; everything it makes
is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: an agent, netns, BPF")

GARRISON = str(Path(sys.executable).with_name("garrison"))
TAG = f"{os.getpid() % 10000}"


@dataclass
class Agent:
    socket: str
    args: list[str]
    metrics: str

    def cli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([GARRISON, *argv], capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, f"garrison {' '.join(argv)}: {proc.stderr}"
        return proc


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(name="agent", scope="module")
def fixture_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    if shutil.which("nsenter") is None or shutil.which("ip") is None:
        pytest.skip("needs nsenter (util-linux) and ip (iproute2)")
    work = tmp_path_factory.mktemp("hq-docs")
    pins = Path(f"/sys/fs/bpf/garrison-hq-docs-{TAG}")
    assert not pins.exists(), f"{pins} exists: not ours, left alone"
    http, grpc, kafka, metrics = _free_ports(4)
    sock = str(work / "agent.sock")
    args = ["--state-dir", str(work / "state"), "--socket", sock, "--bpffs-root", str(pins)]
    proc = subprocess.Popen(
        [GARRISON, "agent", *args, "--proxy-ports", f"http={http},grpc={grpc},kafka={kafka}",
         "--node-name", "hq-docs", "--metrics", f"127.0.0.1:{metrics}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "agent.log", "wb"))  # noqa: SIM115
    agent = Agent(sock, args, f"http://127.0.0.1:{metrics}/metrics")
    try:
        deadline = time.monotonic() + 60
        while agent.cli("status", "--socket", sock, check=False).returncode != 0:
            assert proc.poll() is None, (work / "agent.log").read_text()
            assert time.monotonic() < deadline, "the agent did not become healthy in 60 s"
            time.sleep(0.5)
        yield agent
    finally:
        proc.send_signal(signal.SIGTERM)  # ours: started above
        proc.wait(timeout=30)
        subprocess.run([GARRISON, "agent", "--cleanup", *args], capture_output=True,
                       timeout=60, check=False)
        assert not pins.exists(), "the agent's cleanup left its pin directory"


@pytest.fixture(name="adopted")
def fixture_adopted(agent: Agent) -> Iterator[tuple[str, str]]:
    """An endpoint adopted from a namespace of another name: (endpoint, namespace)."""
    netns, name = f"hq-ns-{TAG}", f"hq-adopted-{TAG}"
    assert not Path(f"/run/netns/{netns}").exists(), f"{netns} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        agent.cli("endpoint", "add", name, "--netns", netns, "--labels", "app=hq-web",
                  "--ip", "198.18.234.201", "--socket", agent.socket)
        try:
            yield name, netns
        finally:
            agent.cli("endpoint", "delete", name, "--socket", agent.socket, check=False)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=True)  # ours: made above


def test_exec_runs_in_an_adopted_namespace_of_another_name(
        agent: Agent, adopted: tuple[str, str]) -> None:
    name, _ = adopted
    assert not Path(f"/run/netns/{name}").exists()
    proc = agent.cli("endpoint", "exec", "--socket", agent.socket, name, "--",
                     "ip", "-4", "-o", "addr", "show")
    assert "198.18.234.201/32" in proc.stdout


def test_exec_runs_in_a_namespace_adopted_by_pid(agent: Agent) -> None:
    name = f"hq-bypid-{TAG}"
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        time.sleep(0.3)
        agent.cli("endpoint", "add", name, "--pid", str(holder.pid), "--labels", "app=hq-pid",
                  "--ip", "198.18.234.202", "--socket", agent.socket)
        try:
            proc = agent.cli("endpoint", "exec", "--socket", agent.socket, name, "--",
                             "ip", "-4", "-o", "addr", "show")
            assert "198.18.234.202/32" in proc.stdout
        finally:
            agent.cli("endpoint", "delete", name, "--socket", agent.socket, check=False)
    finally:
        holder.kill()  # ours: started above
        holder.wait()


def test_exec_of_an_unknown_endpoint_says_so_in_one_line(agent: Agent) -> None:
    proc = agent.cli("endpoint", "exec", "--socket", agent.socket, f"hq-none-{TAG}", "--",
                     "true", check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"no endpoint 'hq-none-{TAG}'" in proc.stderr


def test_an_option_after_the_name_is_refused_with_where_it_goes(
        agent: Agent, adopted: tuple[str, str]) -> None:
    name, _ = adopted
    proc = agent.cli("endpoint", "exec", name, "--socket", agent.socket, "--", "true",
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr == ("garrison endpoint exec: --socket after NAME: options go before it "
                           "(garrison endpoint exec [--socket PATH] NAME -- CMD...)\n")


POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hq-docs-deny-all}
spec:
  endpointSelector: {matchLabels: {app: hq-web}}
  ingress: [{}]
"""


def test_the_verdict_metric_names_the_match_as_observe_prints_it(
        agent: Agent, adopted: tuple[str, str], tmp_path: Path) -> None:
    import urllib.request

    name, _ = adopted
    policy = tmp_path / "deny-all.yaml"
    policy.write_text(POLICY)
    agent.cli("policy", "import", str(policy), "--socket", agent.socket)
    try:
        with socket.socket() as s:  # from the host: allow-localhost, an L3-only allow
            s.settimeout(2)
            s.connect_ex(("198.18.234.201", 7))  # nothing listens: the SYN is answered RST
        deadline = time.monotonic() + 10
        while True:
            seen = agent.cli("observe", "--socket", agent.socket, "--to-pod", name,
                             "--last", "5").stdout
            if "policy-verdict:L3-Only" in seen or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "policy-verdict:L3-Only INGRESS ALLOWED" in seen
        with urllib.request.urlopen(agent.metrics, timeout=10) as answer:
            text = answer.read().decode()
        verdicts = [line for line in text.splitlines()
                    if line.startswith("garrison_policy_verdict_total{")]
        assert any('match="L3-Only"' in line and 'action="allowed"' in line
                   for line in verdicts), verdicts
        assert not any('match="L3-only"' in line for line in verdicts), verdicts
    finally:
        agent.cli("policy", "delete", "hq-docs-deny-all", "--socket", agent.socket,
                  check=False)
