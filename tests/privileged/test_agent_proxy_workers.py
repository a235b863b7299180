"""`garrison agent --proxy-workers 2`: the transparent proxy served by two worker processes on
the same ports (SO_REUSEPORT), the agent deciding admission, keeping the records and the
metrics (docs/proxy.md "Workers in the agent").

A real agent of its own in a network namespace of its own (`gp-node-<pid>`), real endpoints
(`gp-ds`, the Star Wars deathstar app; `gp-tie`, an Empire ship), the Star Wars L7 policy and
real HTTP clients: the verdicts (200 / 403) through the workers, the records in the agent's flow
API and access log (whole lines only, under concurrent clients), the connections spread over
both workers by the kernel (each worker's accepted-connections counter), a policy change and a
SIGHUP reload reaching both workers' live connections, a worker killed with SIGKILL restarted
while service continues, a worker that cannot get an answer from the agent denying (with a
record), and no worker outliving the agent — killed with SIGKILL included.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from garrison.agent.proxyworkers import reuseport_assign_supported
from garrison.flows.record import FlowRecord, FlowType, Verdict
from garrison.redirect.bpffs import BPFFS_MOUNT

from .agent_harness import STARWARS, NsAgent, http_request, ip, ns_socket

pytestmark = pytest.mark.privileged

PID = os.getpid()
NODE = f"gp-node-{PID}"
DS, TIE = "gp-ds", "gp-tie"
DS_IP, TIE_IP = "198.18.55.20", "198.18.55.10"
METRICS_PORT = 19555  # the agent's --metrics, inside its own namespace
PROXY_PORTS = "http=15551,grpc=15552,kafka=15553"
WORKERS = 2
L7_POLICY = (STARWARS / "sw_l3_l4_l7_policy.yaml").read_text()
# the same rule, now also letting Empire ships PUT the exhaust port
OPEN_POLICY = L7_POLICY.replace(
    '        - method: "POST"\n          path: "/v1/request-landing"\n',
    '        - method: "POST"\n          path: "/v1/request-landing"\n'
    '        - method: "PUT"\n          path: "/v1/exhaust-port"\n',
)
assert OPEN_POLICY != L7_POLICY
# another rule, for the policy directory: Empire ships may also PUT the exhaust port
EXHAUST_RULE = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: gp-exhaust}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: PUT, path: /v1/exhaust-port}]}
"""


@dataclass
class Node:
    agent: NsAgent
    app: subprocess.Popen[bytes]
    metrics_dirs: set[str] = field(default_factory=set)  # every agent run's, seen

    def cli(self, *args: str) -> str:
        done = self.agent.cli(*args)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}\n{self.agent.log()}"
        return done.stdout

    def import_policy(self, text: str) -> None:
        path = self.agent.workdir / "gp-policy.yaml"
        path.write_text(text)
        assert "imported" in self.cli("policy", "import", str(path))

    def flows(self) -> list[FlowRecord]:
        out = self.cli("observe", "--last", "5000", "-o", "json")
        return [FlowRecord.from_json(line) for line in out.splitlines() if line.strip()]

    def wait_flows(self, predicate: Callable[[FlowRecord], bool], count: int = 1,
                   timeout: float = 15.0) -> list[FlowRecord]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.flows() if predicate(r)]
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, (
                f"{len(found)} of {count} flow records:\n"
                + "\n".join(r.to_json() for r in self.flows()[-20:]))
            time.sleep(0.2)

    @property
    def access_log(self) -> Path:
        return self.agent.workdir / "access.log"

    def metrics(self) -> dict[str, float]:
        text = subprocess.run(
            ["nsenter", f"--net=/run/netns/{NODE}", "curl", "-sf",
             f"http://127.0.0.1:{METRICS_PORT}/metrics"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                assert name not in out, f"{name} twice in the metrics"
                out[name] = float(value)
        return out

    def accepted(self) -> dict[int, float]:
        """Connections each worker accepted (its own counter, summed over its lives)."""
        m = self.metrics()
        return {i: m.get(f'garrison_proxy_accepted_connections_total{{worker="{i}"}}', 0.0)
                for i in range(WORKERS)}

    def workers(self) -> list[int]:
        """The PIDs of the agent's proxy workers (its children running the worker module)."""
        assert self.agent.proc is not None
        pids = worker_pids(self.agent.proc.pid)
        for pid in pids:
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                self.metrics_dirs.update(
                    v.decode().partition("=")[2] for v in env
                    if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
        return pids


def worker_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"garrison.agent.proxyworkers" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def wait_workers_listening(node: Node, timeout: float = 30.0) -> None:
    """Until every worker process of the agent listens on the HTTP proxy port (a worker
    restarted is a fresh interpreter: seconds before it listens)."""
    port = PROXY_PORTS.split(",")[0].split("=")[1]
    deadline = time.monotonic() + timeout
    while True:
        pids = node.workers()
        out = subprocess.run(["ip", "netns", "exec", NODE, "ss", "-Htlnp", f"sport = :{port}"],
                             capture_output=True, text=True, check=True).stdout
        listening = {int(pid) for pid in re.findall(r"pid=(\d+)", out)}
        if len(pids) == WORKERS and set(pids) <= listening:
            return
        assert time.monotonic() < deadline, f"workers {pids}, listening {listening}"
        time.sleep(0.1)


def any_worker_alive(pids: list[int]) -> bool:
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            return True
    return False


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """An agent with `--proxy-workers 2` in `gp-node-<pid>`, the deathstar app in `gp-ds`, an
    Empire ship `gp-tie` and the Star Wars L7 policy; everything removed afterwards."""
    if shutil.which("nsenter") is None or shutil.which("curl") is None:
        pytest.skip("needs nsenter (util-linux) and curl")
    if not reuseport_assign_supported():
        pytest.skip("reuseport selection for bpf_sk_assign'ed listeners needs Linux 6.5")
    for name in (NODE, DS, TIE):
        assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", NODE], check=True)
    pin_root = BPFFS_MOUNT / f"gp-proxy-workers-{PID}"
    workdir = tmp_path_factory.mktemp("gp-agent")
    agent = NsAgent(NODE, workdir, pin_root)
    agent.extra = ["--proxy-workers", str(WORKERS), "--proxy-ports", PROXY_PORTS,
                   "--metrics", f"127.0.0.1:{METRICS_PORT}",
                   "--access-log", str(workdir / "access.log"), "--node-name", "gp-node",
                   "--policy-dir", str(workdir / "policies")]
    (workdir / "policies").mkdir()
    made: list[str] = []
    app: subprocess.Popen[bytes] | None = None
    pids: list[int] = []
    n: Node | None = None
    try:
        ip(NODE, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", NODE, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True)
        agent.start()
        for name, ip_, labels in ((DS, DS_IP, "org=empire,class=deathstar"),
                                  (TIE, TIE_IP, "org=empire,class=tiefighter")):
            made.append(name)
            done = agent.cli("endpoint", "add", name, "--labels", labels, "--ip", ip_)
            assert done.returncode == 0, done.stderr
        with (workdir / "deathstar.log").open("wb") as out:
            app = subprocess.Popen(
                ["ip", "netns", "exec", DS, sys.executable, str(STARWARS / "deathstar.py"),
                 "--listen", "0.0.0.0:80"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_listening(DS, "127.0.0.1", 80)
        n = Node(agent, app)
        n.import_policy(L7_POLICY)
        assert len(n.workers()) == WORKERS, agent.log()
        yield n
    finally:
        if app is not None:
            app.terminate()
            app.wait(10)
        if agent.proc is not None and agent.proc.poll() is None:
            pids = worker_pids(agent.proc.pid)
        agent.remove(made, (DS, TIE, NODE))  # the namespaces: ours, checked absent above
    # after the agent's SIGTERM: no worker left, nothing of either run left in /tmp
    assert not any_worker_alive(pids), f"proxy workers outlived the agent: {pids}"
    assert n is not None and n.metrics_dirs
    assert not [d for d in n.metrics_dirs if Path(d).exists()], n.metrics_dirs
    # the only tracebacks: the server's own report of the lookup the SIGSTOP test made fail
    log = agent.log()
    for before_trace in log.split("Traceback")[:-1]:
        assert "policy lookup failed" in before_trace.rsplit("\n", 2)[-2], log


def wait_listening(netns_name: str, host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        sock = ns_socket(netns_name)
        try:
            sock.settimeout(0.5)
            sock.connect((host, port))
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {host}:{port}"
            time.sleep(0.05)
        finally:
            sock.close()


def request(method: str, path: str) -> int:
    """One request from the ship to the deathstar on a new connection: the status (0: the
    connection failed or closed without an answer)."""
    sock = ns_socket(TIE)
    try:
        sock.settimeout(5)
        sock.connect((DS_IP, 80))
        return http_request(sock, method, path)[0]
    except OSError:
        return 0
    finally:
        sock.close()


def app_requests() -> int:
    with ns_socket(DS) as sock:
        sock.settimeout(3)
        sock.connect(("127.0.0.1", 80))
        status, body = http_request(sock, "GET", "/v1/stats")
    assert status == 200, body
    return int(json.loads(body)["requests"])


def l7_http(record: FlowRecord, method: str, t0: int) -> bool:
    return (record.time >= t0 and record.type is FlowType.L7 and record.l7 is not None
            and record.l7.http is not None and record.l7.http.method == method
            and record.source.ip == TIE_IP and record.destination.ip == DS_IP)


def test_starwars_verdicts_through_two_workers_spread_logged_and_counted(node: Node) -> None:
    t0 = time.time_ns()
    before = node.accepted()
    m0 = node.metrics()
    clients, each = 8, 12
    statuses: list[tuple[str, int]] = []
    lock = threading.Lock()

    def ship() -> None:
        for i in range(each):
            method, path = (("POST", "/v1/request-landing") if i % 2 == 0
                            else ("PUT", "/v1/exhaust-port"))
            status = request(method, path)
            with lock:
                statuses.append((method, status))

    threads = [threading.Thread(target=ship) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    total = clients * each
    assert sorted(set(statuses)) == [("POST", 200), ("PUT", 403)], statuses
    assert len(statuses) == total

    # every request has its record in the agent's flow API ...
    posts = node.wait_flows(lambda r: l7_http(r, "POST", t0) and r.l7 is not None
                            and r.l7.type.value == "REQUEST", total // 2)
    puts = node.wait_flows(lambda r: l7_http(r, "PUT", t0) and r.l7 is not None
                           and r.l7.type.value == "REQUEST", total // 2)
    assert {r.verdict for r in posts} == {Verdict.FORWARDED}
    assert {r.verdict for r in puts} == {Verdict.DROPPED}
    assert {r.node_name for r in posts + puts} == {"gp-node"}
    assert {r.source.identity for r in puts} == {posts[0].source.identity}
    # ... and in the one access log, whole lines only (one writer: the agent)
    text = node.access_log.read_text()
    assert text.endswith("\n")
    lines = [FlowRecord.from_json(line) for line in text.splitlines()]  # torn lines fail
    logged = [r for r in lines if l7_http(r, "PUT", t0) and r.l7 is not None
              and r.l7.type.value == "REQUEST"]
    assert len(logged) == total // 2
    assert {r.verdict for r in logged} == {Verdict.DROPPED}

    # the kernel spread the connections over both workers
    after = node.accepted()
    spread = {i: after[i] - before[i] for i in range(WORKERS)}
    assert sum(spread.values()) == total, spread
    assert all(n > 0 for n in spread.values()), f"one worker got every connection: {spread}"

    # the agent's metrics: the L7 counts of both workers' requests, once each
    m1 = node.metrics()
    key = 'garrison_policy_l7_total{direction="ingress",proxy_type="http",rule="%s"}'
    assert m1[key % "received"] - m0[key % "received"] == total
    assert m1[key % "denied"] - m0[key % "denied"] == total // 2
    assert m1[key % "forwarded"] - m0[key % "forwarded"] == total // 2
    assert m1['garrison_proxy_connections{proxy_type="http"}'] == 0  # summed gauges: all closed
    assert 'garrison_proxy_upstream_pool_connections{state="idle"}' in m1
    # and the operator's view: healthy, the proxy on its ports
    status = node.cli("status")
    assert "PROBLEM" not in status and "15551" in status, status


def keepalive(sock: socket.socket, method: str, path: str) -> int:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n\r\n"
                 .encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1])


def test_a_policy_change_reaches_every_worker(node: Node) -> None:
    """Live keep-alive connections on both workers, and new ones: the next PUT reaches the
    app (its answer: 503, the deathstar explodes) once the policy allows it, and gets the
    proxy's 403 again once it does not."""
    before = node.accepted()
    conns = []
    try:
        for _ in range(10):
            sock = ns_socket(TIE)
            sock.settimeout(5)
            sock.connect((DS_IP, 80))
            assert keepalive(sock, "PUT", "/v1/exhaust-port") == 403
            conns.append(sock)
        after = node.accepted()
        assert all(after[i] > before[i] for i in range(WORKERS)), (before, after)
        node.import_policy(OPEN_POLICY)
        time.sleep(0.5)  # the revision reaches the workers asynchronously
        assert [keepalive(s, "PUT", "/v1/exhaust-port") for s in conns] == [503] * len(conns)
        assert [request("PUT", "/v1/exhaust-port") for _ in range(10)] == [503] * 10
        node.import_policy(L7_POLICY)
        time.sleep(0.5)
        assert [keepalive(s, "PUT", "/v1/exhaust-port") for s in conns] == [403] * len(conns)
        assert [request("PUT", "/v1/exhaust-port") for _ in range(10)] == [403] * 10
        # the agent's reload (SIGHUP, --policy-dir) reaches them the same way
        assert node.agent.proc is not None
        rule = node.agent.workdir / "policies" / "gp-exhaust.yaml"
        rule.write_text(EXHAUST_RULE)
        os.kill(node.agent.proc.pid, signal.SIGHUP)
        wait_status(conns[0], 503)
        assert [keepalive(s, "PUT", "/v1/exhaust-port") for s in conns] == [503] * len(conns)
        rule.unlink()
        os.kill(node.agent.proc.pid, signal.SIGHUP)
        wait_status(conns[0], 403)
        assert [keepalive(s, "PUT", "/v1/exhaust-port") for s in conns] == [403] * len(conns)
    finally:
        for sock in conns:
            sock.close()


def wait_status(sock: socket.socket, status: int, timeout: float = 10.0) -> None:
    """Until a PUT on `sock` gets `status` (a reload is applied in the background)."""
    deadline = time.monotonic() + timeout
    while (got := keepalive(sock, "PUT", "/v1/exhaust-port")) != status:
        assert time.monotonic() < deadline, f"still {got}, not {status}"
        time.sleep(0.1)


def test_a_killed_worker_is_restarted_and_service_continues(node: Node) -> None:
    pids = node.workers()
    assert len(pids) == WORKERS
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    # the other worker serves meanwhile (a connection queued at the victim may be reset)
    results = [request("POST", "/v1/request-landing") for _ in range(10)]
    assert results.count(200) >= 8, results
    deadline = time.monotonic() + 20
    while True:
        now = node.workers()
        if len(now) == WORKERS and victim not in now:
            break
        assert time.monotonic() < deadline, f"not restarted: {now}\n{node.agent.log()[-3000:]}"
        time.sleep(0.1)
    assert "was killed by SIGKILL; restarting it" in node.agent.log()
    wait_workers_listening(node)
    before = node.accepted()
    assert [request("POST", "/v1/request-landing") for _ in range(20)] == [200] * 20
    assert [request("PUT", "/v1/exhaust-port") for _ in range(4)] == [403] * 4
    after = node.accepted()
    assert all(after[i] > before[i] for i in range(WORKERS)), (before, after)


def test_a_worker_without_an_answer_from_the_agent_denies_with_a_record(node: Node) -> None:
    """The agent stopped (SIGSTOP): no admission comes, the worker gives up after its
    timeout and closes the connection unanswered; the record says why once the agent runs
    again, and the workers are replaced (their channel broke) and serve again."""
    assert node.agent.proc is not None
    served = app_requests()
    t0 = time.time_ns()
    os.kill(node.agent.proc.pid, signal.SIGSTOP)
    try:
        sock = ns_socket(TIE)
        sock.settimeout(10)
        sock.connect((DS_IP, 80))
        try:
            status = http_request(sock, "POST", "/v1/request-landing")[0]
        except OSError as exc:
            assert exc.errno in (errno.ECONNRESET, errno.EPIPE), exc
            status = 0
        finally:
            sock.close()
        assert status == 0, "answered without an admission"
    finally:
        os.kill(node.agent.proc.pid, signal.SIGCONT)
    assert app_requests() == served + 1  # only this question of ours reached the app
    rec = node.wait_flows(lambda r: r.time >= t0 and r.verdict is Verdict.ERROR
                          and r.source.ip == TIE_IP)[-1]
    assert "policy lookup failed" in rec.to_json(), rec.to_json()
    wait_workers_listening(node)
    assert [request("POST", "/v1/request-landing") for _ in range(6)] == [200] * 6


def test_no_worker_outlives_an_agent_killed_with_sigkill(node: Node) -> None:
    """Last: the agent gets SIGKILL; its workers go with it; a new agent over the same state
    starts its own workers and serves (the module's teardown then stops it)."""
    assert node.agent.proc is not None
    old = node.agent.proc.pid
    pids = node.workers()
    assert len(pids) == WORKERS
    node.agent.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any_worker_alive(pids):
        assert time.monotonic() < deadline, f"proxy workers outlived the agent: {pids}"
        time.sleep(0.05)
    node.agent.start()
    assert node.agent.proc.pid != old
    wait_workers_listening(node)
    assert [request("PUT", "/v1/exhaust-port") for _ in range(4)] == [403] * 4
