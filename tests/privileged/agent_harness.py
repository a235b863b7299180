"""Fixtures of the agent tests: a real `garrison agent` process, driven by the real CLI.

    def test_x(agent: AgentProcess, clean: None) -> None:
        a = agent.add_endpoint("pa", "app=a", 11)       # garrison endpoint add ta-pa --ip ...
        agent.import_policy("a-policy", YAML)           # garrison policy import FILE
        sock = a.connect(b.ip, 7000)                    # a python socket inside ta-pa
        rec = agent.wait_flow(lambda r: ...)            # garrison observe -o json

`agent` (module scope) starts `garrison agent` as a child process with its own state dir,
API socket, bpffs pin root (`/sys/fs/bpf/garrison-test-<pid>-<module>`), proxy ports
(`PROXY_PORTS`, apart from the defaults and from the datapath tests' 15080) and access log;
it is ready once the API answers `Status` and `garrison status` exits 0. Test modules that need
an agent in audit mode set `AGENT_ARGS = ("--audit",)`. Teardown deletes the endpoints through
the agent, stops it by PID, then removes what it leaves in the kernel on purpose with
`garrison agent --cleanup` (pinned maps; of the proxy steering rule and route, only those the
agent added — not while another agent runs, which may rely on them), deletes any namespace the
test asked the agent to create that is still there, and checks that nothing is left: no `ta-*`
namespace, none of its host veths or clsact qdiscs, no pin dir, no child process, and the
steering rule and route exactly as they were before.

`clean` (function scope) stops the processes a test started (`agent.spawn_in`), deletes the
endpoints it added and every policy, and checks the test left no namespace, veth, qdisc or
child process behind.

Names and addresses never collide with other tests running at the same time: endpoints are
`ta-*`, their addresses come from `ADDRESS_BLOCK` (198.19.100.0/24), always given explicitly.
Sockets enter an endpoint's namespace by setns on the calling thread only (pyroute2's
`pushns` keeps one process-wide stack, which threads running side by side would corrupt).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from garrison.agent.api import AgentClient, AgentUnreachableError
from garrison.agent.kernel import STEERING_RECORD
from garrison.flows.record import FlowRecord
from garrison.flows.render import render_compact
from garrison.redirect import (
    delete_endpoint,
    ensure_bpffs,
    host_ifname_for,
    proxy_steering_present,
    remove_pin_dir,
)
from garrison.redirect.bpffs import BPFFS_MOUNT
from garrison.redirect.steering import SteeringRecord

REPO = Path(__file__).resolve().parents[2]
STARWARS = REPO / "examples" / "starwars"
GARRISON = str(Path(sys.executable).with_name("garrison"))
PREFIX = "ta-"
ADDRESS_BLOCK = IPv4Network("198.19.100.0/24")
PROXY_PORTS = {"http": 15211, "grpc": 15212, "kafka": 15213}
START_TIMEOUT = 60.0

# ---- entering a namespace, one thread at a time ------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ns_socket(name: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket living in network namespace `name` (the calling thread returns home)."""
    with open(f"/run/netns/{name}") as target, open("/proc/thread-self/ns/net") as home:
        _setns(target.fileno())
        try:
            return socket.socket(socket.AF_INET, kind)
        finally:
            _setns(home.fileno())


# ---- endpoints ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentEndpoint:
    """An endpoint as `garrison endpoint add -o json` described it."""

    name: str
    ip: str
    labels: tuple[str, ...]
    identity: int
    host_veth: str

    def new_socket(self) -> socket.socket:
        return ns_socket(self.name)

    def connect(self, dst: str, port: int, timeout: float = 3.0) -> socket.socket | None:
        """A connected socket from this endpoint, or None when no answer came in time (give
        a short `timeout` where no answer is expected: a dropped SYN costs all of it)."""
        sock = self.new_socket()
        sock.settimeout(timeout)
        try:
            sock.connect((dst, port))
        except OSError:
            sock.close()
            return None
        return sock

    def listen(self, port: int) -> socket.socket:
        sock = self.new_socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.ip, port))
        sock.listen(64)
        return sock


def roundtrip(sock: socket.socket, payload: bytes = b"ping", timeout: float = 2.0) -> bool:
    """Send `payload`, read it back from an echo peer."""
    sock.settimeout(timeout)
    try:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                return False
            got += chunk
    except OSError:
        return False
    return got == payload


class EchoServer:
    """Echoes every byte, on `port` of an endpoint; one thread per connection."""

    def __init__(self, ep: AgentEndpoint, port: int) -> None:
        self.sock = ep.listen(port)
        self.sock.settimeout(0.1)
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._main = threading.Thread(target=self._serve, daemon=True)
        self._main.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._main.join()
        for t in self._threads:
            t.join()
        self.sock.close()


@contextlib.contextmanager
def echo_servers(ep: AgentEndpoint, *ports: int) -> Iterator[list[EchoServer]]:
    servers: list[EchoServer] = []
    try:
        for port in ports:
            servers.append(EchoServer(ep, port))
        yield servers
    finally:
        for server in servers:
            server.close()


def http_request(sock: socket.socket, method: str, path: str, host: str = "deathstar",
                 timeout: float = 3.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request with `Connection: close`; (status, body) of the answer."""
    sock.settimeout(timeout)
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body


def app_requests(ep: AgentEndpoint, port: int = 80) -> int:
    """Requests the deathstar app in `ep` received (this question included), asked on the
    endpoint's own loopback: no datapath, no proxy on the way."""
    with ns_socket(ep.name) as sock:
        sock.settimeout(3)
        sock.connect(("127.0.0.1", port))
        status, body = http_request(sock, "GET", "/v1/stats")
    assert status == 200, body
    return int(json.loads(body)["requests"])


# ---- the agent process --------------------------------------------------------------------


def _children() -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out |= {int(p) for p in (task / "children").read_text().split()}
    return out


def other_agents(exclude: set[int]) -> list[int]:
    """PIDs of `garrison agent` processes that are not ours (another test run, the demo)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in exclude:
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if (arg.endswith(b"garrison") or arg == b"garrison.cli.main") and (
                argv[i + 1] == b"agent"
            ):
                found.append(int(proc.name))
                break
    return found


def stop_pid(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 10.0) -> int:
    """Signal the process by its PID (SIGKILL if it lingers) and reap it; its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


@dataclass
class AgentProcess:
    """A `garrison agent` child process and what it made, with the CLI pointed at it."""

    workdir: Path
    pin_root: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    endpoints: dict[str, AgentEndpoint] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)  # every endpoint name ever added
    spawned: list[subprocess.Popen[bytes]] = field(default_factory=list)  # one test's
    kept: list[subprocess.Popen[bytes]] = field(default_factory=list)  # the module's
    starts: int = 0

    @property
    def socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        ports = ",".join(f"{k}={v}" for k, v in PROXY_PORTS.items())
        return [
            GARRISON, "agent", "--state-dir", str(self.workdir / "state"),
            "--socket", str(self.socket), "--bpffs-root", str(self.pin_root),
            "--proxy-ports", ports, "--access-log", str(self.access_log),
            "--node-name", "garrison-test", *self.args,
        ]

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.workdir.glob("agent-*.log"))
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart, over the same state and pins) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None, "the agent is running"
        self.starts += 1
        with (self.workdir / f"agent-{self.starts}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"garrison agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.call("Status")
                break
            except AgentUnreachableError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"garrison agent not ready in {START_TIMEOUT}s:\n{self.log()}"
                    ) from None
                time.sleep(0.05)
        self.cli("status")  # the command users run: exits 0 once the agent answers

    def kill(self) -> None:
        """SIGKILL: the agent gets no chance to clean anything up."""
        assert self.proc is not None
        stop_pid(self.proc, signal.SIGKILL)
        assert self.proc.returncode == -signal.SIGKILL

    def stop(self) -> int | None:
        return stop_pid(self.proc) if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- the CLI and the API -----------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 60.0,
            socket_arg: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [GARRISON, *args, *(("--socket", str(self.socket)) if socket_arg else ())]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
            )
        return done

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """The local API directly (what the CLI calls; for bookkeeping that is no test's
        subject, without a process start each time)."""
        with AgentClient(self.socket, timeout=30) as client:
            return client.call(method, **params)

    def exec_in(self, ep: AgentEndpoint, *cmd: str,
                timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        """`garrison endpoint exec NAME -- CMD...`, output as bytes (exact line ends)."""
        return subprocess.run(
            [GARRISON, "endpoint", "exec", ep.name, "--", *cmd],
            capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def spawn_in(self, ep: AgentEndpoint, *cmd: str,
                 keep: bool = False) -> subprocess.Popen[bytes]:
        """A long-running process inside the endpoint, stopped by PID after the test (or,
        with `keep`, after the module)."""
        n = len(self.spawned) + len(self.kept)
        with (self.workdir / f"{ep.name}-{n}.log").open("wb") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ep.name, *cmd], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=REPO)
        (self.kept if keep else self.spawned).append(proc)
        return proc

    def deathstar(self, ep: AgentEndpoint, port: int = 80,
                  keep: bool = False) -> subprocess.Popen[bytes]:
        """The Star Wars app inside `ep`, once it accepts on its loopback."""
        proc = self.spawn_in(ep, sys.executable, str(STARWARS / "deathstar.py"),
                             "--listen", f"0.0.0.0:{port}", keep=keep)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the deathstar app exited"
            sock = ns_socket(ep.name)
            try:
                sock.settimeout(0.5)
                sock.connect(("127.0.0.1", port))
                return proc
            except OSError:
                time.sleep(0.05)
            finally:
                sock.close()
        raise AssertionError(f"deathstar in {ep.name} does not listen on {port}")

    def stop_spawned(self, kept: bool = False) -> None:
        while self.spawned:
            stop_pid(self.spawned.pop())
        while kept and self.kept:
            stop_pid(self.kept.pop())

    # -- endpoints ---------------------------------------------------------------------------

    def add_endpoint(self, short: str, labels: str, host: int,
                     cli: bool = True, ports: Sequence[str] = (),
                     namespace: str | None = None) -> AgentEndpoint:
        """`garrison endpoint add ta-SHORT --labels LABELS --ip 198.19.100.HOST` (or the same
        request straight to the API, where the command itself is not under test); `ports`:
        `--port NAME=PORT/PROTO` each, `namespace`: `--namespace NS`."""
        name = f"{PREFIX}{short}"
        ip = str(ADDRESS_BLOCK.network_address + host)
        assert IPv4Address(ip) in ADDRESS_BLOCK and 0 < host < 255
        # teardown deletes the namespaces of `created`: never one someone else made
        assert name in self.endpoints or name not in netns.listnetns(), (
            f"namespace {name} exists and is not this test's: left alone")
        self.created.add(name)
        extra: dict[str, Any] = {}
        flags: list[str] = []
        if ports:
            extra["ports"] = list(ports)
            flags += [arg for p in ports for arg in ("--port", p)]
        if namespace:
            extra["namespace"] = namespace
            flags += ["--namespace", namespace]
        if cli:
            data = self.cli_json("endpoint", "add", name, "--labels", labels, "--ip", ip,
                                 *flags)
        else:
            data = self.call("EndpointAdd", name=name, labels=labels.split(","), ip=ip,
                             **extra)
        ep = AgentEndpoint(name, ip, tuple(data["labels"]), int(data["identity"]),
                           str(data["host_veth"]))
        assert ep.ip == data["ipv4"] and ep.identity >= 256
        self.endpoints[name] = ep
        return ep

    def refresh(self, ep: AgentEndpoint) -> AgentEndpoint:
        """The endpoint as the agent describes it now (after a relabel, a restart)."""
        data = self.call("EndpointGet", name=ep.name)
        new = AgentEndpoint(ep.name, data["ipv4"], tuple(data["labels"]), int(data["identity"]),
                            str(data["host_veth"]))
        self.endpoints[ep.name] = new
        return new

    def delete_endpoints(self) -> None:
        for name in list(self.endpoints):
            self.call("EndpointDelete", name=name)
            del self.endpoints[name]

    # -- policy ------------------------------------------------------------------------------

    def import_policy(self, name: str, text: str) -> None:
        """`garrison policy import FILE` of `text` (written to the work dir as NAME.yaml)."""
        path = self.workdir / "policies" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(text))
        self.import_file(path)

    def import_file(self, path: Path) -> None:
        out = self.cli("policy", "import", str(path)).stdout
        assert "imported" in out, out

    def delete_policies(self) -> None:
        self.call("PolicyDelete", all=True)

    # -- flows -------------------------------------------------------------------------------

    def flows(self, last: int = 1000, cli: bool = False) -> list[FlowRecord]:
        """The agent's flow records, oldest first: `garrison observe -o json` (one JSON record
        per line) with `cli`, else the API call behind it (no process start per poll)."""
        if cli:
            out = self.cli("observe", "--last", str(last), "-o", "json").stdout
            lines = out.splitlines()
        else:
            lines = self.call("Flows", filter={}, limit=last)["flows"]
        return [FlowRecord.from_json(line) for line in lines if line.strip()]

    def wait_flow(self, predicate: Callable[[FlowRecord], bool], timeout: float = 10.0,
                  cli: bool = False) -> FlowRecord:
        deadline = time.monotonic() + timeout
        while True:
            records = self.flows(cli=cli)
            found = [r for r in records if predicate(r)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                seen = "\n".join(render_compact(r) for r in records[-30:])
                raise AssertionError(f"no matching flow record in `garrison observe`:\n{seen}")
            time.sleep(0.1)

    def access_records(self) -> list[dict[str, Any]]:
        """The access log's lines as JSON objects (whole lines only)."""
        if not self.access_log.exists():
            return []
        lines = self.access_log.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def wait_access_record(self, predicate: Callable[[dict[str, Any]], bool],
                           timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.access_records() if predicate(r)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError("no matching record in the access log")
            time.sleep(0.1)


# ---- an agent in a network namespace of its own --------------------------------------------


def ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True,
                          text=True).stdout


class NsAgent:
    """A `garrison agent` inside `netns` (the API socket is a file: reachable from here)."""

    def __init__(self, netns: str, workdir: Path, pin_root: Path) -> None:
        self.netns = netns
        self.workdir = workdir
        self.pin_root = pin_root
        self.socket = workdir / "agent.sock"
        self.extra: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def args(self) -> list[str]:
        return ["--state-dir", str(self.workdir / "state"), "--socket", str(self.socket),
                "--bpffs-root", str(self.pin_root)]

    def start(self) -> None:
        self.starts += 1
        with (self.workdir / f"agent-{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", GARRISON, "agent", *self.args(),
                 *self.extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                with AgentClient(self.socket, timeout=5) as client:
                    client.call("Status")
                return
            except AgentUnreachableError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(20)

    def cleanup(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", GARRISON, "agent", "--cleanup",
             *self.args()], capture_output=True, text=True, timeout=60,
        )

    def observe_cluster(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`garrison observe --cluster --last 10 ARGS` inside the agent's namespace, over its
        socket (the cluster's flow view: etcd and the nodes' flow APIs as the agent sees them)."""
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", GARRISON, "observe", "--cluster",
             "--socket", str(self.socket), "--last", "10", *args],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([GARRISON, *args, "--socket", str(self.socket)],
                              capture_output=True, text=True, timeout=60)

    def remove(self, endpoints: Sequence[str], namespaces: Sequence[str]) -> None:
        """Take down what a test made around this agent: `endpoints` through the running agent,
        the agent (SIGTERM), its state (`--cleanup`), its pins, then `namespaces` — the test's
        own, each checked absent before the test made it."""
        if self.proc is not None and self.proc.poll() is None:
            for name in endpoints:
                self.cli("endpoint", "delete", name)
            self.stop()
        if self.proc is not None:
            self.cleanup()
        if self.pin_root.exists():
            remove_pin_dir(self.pin_root)
        for name in namespaces:
            if Path(f"/run/netns/{name}").exists():
                subprocess.run(["ip", "netns", "delete", name], check=False)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.workdir.glob("agent-*.log")))


@pytest.fixture(name="ns_agent")
def fixture_ns_agent(tmp_path: Path) -> Iterator[NsAgent]:
    """An agent of its own in a network namespace of its own (`go-steer-<pid>`): host-wide
    state such as the proxy steering rule is then the test's alone. Not started: set
    `extra` arguments, then `start()`."""
    if shutil.which("nsenter") is None:
        pytest.skip("needs nsenter (util-linux)")
    name = f"go-steer-{os.getpid()}"
    assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", name], check=True)
    pin_root = BPFFS_MOUNT / f"go-cleanup-{os.getpid()}"
    agent = NsAgent(name, tmp_path, pin_root)
    try:
        ip(name, "link", "set", "lo", "up")
        yield agent
    finally:
        if agent.proc is not None:
            agent.stop(signal.SIGKILL)
        if pin_root.exists():
            remove_pin_dir(pin_root)
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["ip", "netns", "delete", name], check=True)  # ours: made above


# ---- what is left on the machine ----------------------------------------------------------


def leftovers(agent: AgentProcess, children_before: set[int]) -> dict[str, object]:
    """Everything of `agent`'s that should be gone once it is torn down (child processes
    other than `children_before`)."""
    ours = {host_ifname_for(name) for name in agent.created}
    with IPRoute() as ipr:
        links = {str(link.get_attr("IFLA_IFNAME")): link["index"] for link in ipr.get_links()}
        mine = {name: index for name, index in links.items() if name in ours}
        clsact = sorted(
            q["index"] for q in ipr.get_qdiscs()
            if q.get_attr("TCA_KIND") == "clsact" and q["index"] in mine.values()
        )
    return {
        "netns": sorted(n for n in netns.listnetns() if n.startswith(PREFIX)),
        "links": sorted(mine),
        "clsact": clsact,
        "pins": agent.pin_root.exists(),
        "children": sorted(_children() - children_before),
    }


def module_agent(request: pytest.FixtureRequest, tmp: Path) -> Iterator[AgentProcess]:
    ensure_bpffs()
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    pin_root = BPFFS_MOUNT / f"garrison-test-{os.getpid()}-{name}"
    stale = sorted(n for n in netns.listnetns() if n.startswith(PREFIX))
    assert not stale, f"namespaces of an earlier run are left: {stale} (ip netns del NAME)"
    children_before = _children()
    agent = AgentProcess(tmp, pin_root, tuple(getattr(request.module, "AGENT_ARGS", ())))
    try:
        agent.start()
        yield agent
    finally:
        agent.stop_spawned(kept=True)
        was_alive = agent.alive
        if was_alive:
            with contextlib.suppress(Exception):
                agent.delete_endpoints()
        status = agent.stop()
        # enforcement outlives the agent on purpose: what it leaves, the test removes (only
        # namespaces of names checked absent above, that the test had the agent create)
        for ep_name in agent.created:
            delete_endpoint(ep_name)
        others = other_agents({agent.pid} if agent.proc else set())
        added = SteeringRecord(agent.workdir / "state" / STEERING_RECORD).load()
        if not others:
            cleanup = agent.cli("agent", "--cleanup", *agent.argv()[2:], check=False,
                                socket_arg=False)
        elif pin_root.exists():
            remove_pin_dir(pin_root)  # the steering stays: another agent may rely on it
    assert not was_alive or status == 0, (
        f"the agent did not stop cleanly ({status}):\n{agent.log()}")
    assert "Traceback" not in agent.log(), f"the agent logged a crash:\n{agent.log()}"
    if not others:
        assert cleanup.returncode == 0, cleanup.stderr
    left = leftovers(agent, children_before)
    assert left == {"netns": [], "links": [], "clsact": [], "pins": False, "children": []}, left
    if not others and not other_agents(set()):
        now = proxy_steering_present()
        # what the agent added is gone (that what was there before it stays is checked in
        # tests/privileged/test_agent_cleanup.py, where no other agent can change it)
        assert not (added.rule and now.rule), "the agent's steering rule was left"
        assert not (added.route and now.route), "the agent's steering route was left"


@pytest.fixture(scope="module", name="agent")
def fixture_agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    yield from module_agent(request, tmp_path_factory.mktemp("agent"))


@pytest.fixture(name="clean")
def fixture_clean(agent: AgentProcess) -> Iterator[None]:
    """After the test: its processes stopped, its endpoints and every policy deleted, and
    nothing it made left (the module's endpoints stay until the module ends)."""
    before = leftovers(agent, {agent.pid})
    endpoints = set(agent.endpoints)
    yield
    agent.stop_spawned()
    if not agent.alive:  # a test that failed between a kill and a restart
        agent.start()
    if agent.alive:
        for name in set(agent.endpoints) - endpoints:
            agent.call("EndpointDelete", name=name)
            del agent.endpoints[name]
        agent.delete_policies()
    after = leftovers(agent, {agent.pid})  # a test may restart the agent (a new PID)
    assert after == before, "the test left something behind"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def tc_filters(ifname: str) -> dict[str, list[str]]:
    """`tc filter show dev IFNAME ingress|egress`: name, program id and tag of each bpf
    filter (`from_container id 377 tag 7c51...`)."""
    out: dict[str, list[str]] = {}
    for hook in ("ingress", "egress"):
        text = subprocess.run(["tc", "filter", "show", "dev", ifname, hook],
                              capture_output=True, text=True, check=True).stdout
        out[hook] = [f"{name} id {pid} tag {tag}" for pid, name, tag in _TC_BPF.findall(text)]
    return out


_TC_BPF = re.compile(r"\bid (\d+) name (\S+) tag ([0-9a-f]+)")


def records_of(records: Sequence[FlowRecord], src: AgentEndpoint,
               dst: AgentEndpoint) -> list[FlowRecord]:
    return [r for r in records if r.source.ip == src.ip and r.destination.ip == dst.ip]
