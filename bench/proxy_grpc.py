"""gRPC unary calls through garrison vs. direct to the door manager vs. haproxy (h2c both sides).

Run: .venv/bin/python bench/proxy_grpc.py [--requests N] [--clients C] [--streams M]
                                          [--rounds R] [--no-access-log] [--skip-in-process]
                                          [--only direct,garrison,haproxy]

First, in process (CPU time, best of rounds): what one unary call costs in `H2Engine`,
with and without building its two flow records, against the floor of any proxy built on h2 —
a bare relay on two h2 connections that decodes and re-encodes each header block and passes
DATA on, nothing else. Then the processes:

Everything runs on loopback, as child processes this script starts and stops by PID, with
configs generated into a temporary directory:

- upstream: the door manager (examples/grpc/doors_server.py: grpcio, 8 handler threads);
- direct: h2load → door manager;
- garrison: h2load → `garrison proxy --protocol grpc --workers 1` (one process, uvloop) → door
  manager,
  with examples/grpc/doors-policy.yaml, the client mapped to the guard, and the access log
  written (JSON lines, every call's request and response records) unless `--no-access-log`;
- haproxy 2.6 (Debian package), `nbthread 1` like garrison's single event loop, HTTP/2 on
  both sides (`bind ... proto h2`, `server ... proto h2`: cleartext prior knowledge, as gRPC
  uses) and the same method allowlist as an ACL on the path.

The load: h2load (Debian nghttp2-client), `-c C -m M` (C connections, M calls in flight on
each), N unary `GetName` calls per run, each a POST of a real gRPC request body (built from
the door-manager messages) with `content-type: application/grpc` and `te: trailers`. Cases
run in turn, `--rounds` times, and the medians are reported: calls/s, p50/p99 latency (from
h2load's per-request log), the proxy's CPU µs per call (utime + stime from /proc/PID/stat)
and the door manager's. Before timing, a grpcio client checks through each proxy that the
allowed method answers and a denied one gets PERMISSION_DENIED. A denied-call case
(`SetAccessCode`, answered by the proxy itself) is measured for garrison and haproxy too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from proxy_http import preflight

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "grpc"
POLICY = EXAMPLE / "doors-policy.yaml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALLOWED = "/doors.DoorManager/GetName"
DENIED = "/doors.DoorManager/SetAccessCode"

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend doors
    bind 127.0.0.1:{port} proto h2
    acl guard_methods path /doors.DoorManager/GetName /doors.DoorManager/GetLocation
    acl guard_methods path /doors.DoorManager/GetStatus
    http-request deny deny_status 403 unless METH_POST guard_methods
    default_backend door_manager
backend door_manager
    server doors1 127.0.0.1:{backend} proto h2
"""


def load_doors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doors", EXAMPLE / "doors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live children (a proxy with worker processes)."""
    total = 0.0
    for one in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return total


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


@contextlib.contextmanager
def child(
    argv: list[str], port: int, what: str, workdir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / f"{what}.stderr").open("wb"),
    )
    try:
        wait_port(port, proc, what)
        yield proc
    finally:
        stop(proc)


def door_manager(
    workdir: Path,
) -> tuple[int, contextlib.AbstractContextManager[subprocess.Popen[bytes]]]:
    port = free_port()
    argv = [sys.executable, str(EXAMPLE / "doors_server.py"), "--listen", f"127.0.0.1:{port}"]
    return port, child(argv, port, "doors", workdir)


def garrison(
    workdir: Path, backend: int, access_log: bool
) -> tuple[int, contextlib.AbstractContextManager[subprocess.Popen[bytes]]]:
    port = free_port()
    argv = [
        sys.executable, "-m", "garrison.cli.main", "proxy",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{backend}",
        "--protocol", "grpc", "-f", str(POLICY), "--dst-labels", "app=door-manager",
        "--dport", "50051", "--peer", "127.0.0.1/32=app=guard",
        "--workers", "1",  # one process, as haproxy runs nbthread 1
    ]  # fmt: skip
    if access_log:
        log = str(workdir / "access.log")
        argv += ["--access-log", log, "--access-log-max-bytes", str(64 << 20)]
        argv += ["--access-log-backups", "1"]
    return port, child(argv, port, "garrison", workdir)


def haproxy(
    workdir: Path, backend: int
) -> tuple[int, contextlib.AbstractContextManager[subprocess.Popen[bytes]]]:
    port = free_port()
    conf = workdir / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(port=port, backend=backend))
    return port, child(["haproxy", "-db", "-f", str(conf)], port, "haproxy", workdir)


def check_through(port: int, doors: ModuleType, expect_deny: bool) -> None:
    """A real grpcio client: the allowed method answers, the denied one is refused."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", [("grpc.enable_http_proxy", 0)]) as ch:
        reply = ch.unary_unary(ALLOWED)(doors.message((1, "front")), timeout=10)
        assert doors.decode(reply) == {1: b"door front"}, reply
        if not expect_deny:
            return
        try:
            ch.unary_unary(DENIED)(doors.message((1, "front"), (2, "1")), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.PERMISSION_DENIED, exc
        else:
            raise AssertionError("SetAccessCode was not denied")


@dataclass
class Run:
    calls: int
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    statuses: str
    proxy_cpu_us: float | None
    upstream_cpu_us: float | None


def h2load(
    port: int,
    path: str,
    body: Path,
    args: argparse.Namespace,
    workdir: Path,
    proxy_pid: int | None,
    upstream_pid: int | None,
    requests: int | None = None,
) -> Run:
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    n = requests or args.requests
    before = {pid: cpu_seconds(pid) for pid in (proxy_pid, upstream_pid) if pid}
    command = ["h2load", "-n", str(n), "-c", str(args.clients), "-m", str(args.streams)]
    command += ["-t", "1", "-d", str(body), "-H", "content-type: application/grpc"]
    command += ["-H", "te: trailers", f"--log-file={log}", f"http://127.0.0.1:{port}{path}"]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    cpu = {pid: cpu_seconds(pid) - t for pid, t in before.items()}
    out = done.stdout
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    completed = int(re.search(r"(\d+) done", out).group(1))  # type: ignore[union-attr]
    failed = int(re.search(r"(\d+) failed", out).group(1))  # type: ignore[union-attr]
    statuses = re.search(r"status codes: (.*)", out).group(1)  # type: ignore[union-attr]
    durations = sorted(
        int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip()
    )
    if not durations:
        durations = [0]
    p50 = durations[len(durations) // 2] / 1000
    p99 = durations[min(len(durations) - 1, len(durations) * 99 // 100)] / 1000

    def per_call(pid: int | None) -> float | None:
        return cpu[pid] * 1e6 / completed if pid and completed else None

    return Run(
        completed, rps, p50, p99, failed, statuses, per_call(proxy_pid), per_call(upstream_pid)
    )


def median_run(runs: list[Run]) -> Run:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    return Run(
        calls=sum(r.calls for r in runs),
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        failed=sum(r.failed for r in runs),
        statuses=runs[-1].statuses,
        proxy_cpu_us=med([r.proxy_cpu_us for r in runs]),
        upstream_cpu_us=med([r.upstream_cpu_us for r in runs]),
    )


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


# ---- in process: CPU per call of the engine vs. a bare h2 relay ----------------------------------

# grpcio's GetName call and the door manager's answer, as captured (tests/data/http2).
_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", ALLOWED.encode()),
    (b":authority", b"127.0.0.1:50051"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
    (b"user-agent", b"grpc-python/1.85.1 grpc-c/58.0.0 (linux; chttp2)"),
]
_RESPONSE = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
]
_TRAILERS = [(b"grpc-status", b"0")]


def h2_relay_floor(doors: ModuleType, calls: int, batch: int) -> float:
    """CPU µs per unary call of the least a proxy built on h2 must do: two h2 connections
    (same validation settings as garrison's), each request and answer decoded on one and
    re-encoded on the other, DATA acknowledged; no policy, no records, no bookkeeping."""
    import h2.config
    import h2.connection
    import h2.events

    def conn(client: bool) -> h2.connection.H2Connection:
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        c = h2.connection.H2Connection(config)
        c.initiate_connection()
        return c

    client, front, back, server = conn(True), conn(False), conn(True), conn(False)
    body, reply = doors.frame(doors.message((1, "front"))), doors.frame(doors.message((1, "x")))
    spent = 0.0

    def proxy(receiver: h2.connection.H2Connection, data: bytes) -> None:
        nonlocal spent
        start = time.process_time()
        other = back if receiver is front else front
        for ev in receiver.receive_data(data):
            sid = getattr(ev, "stream_id", 0)
            peer_sid = sid  # one call per stream id on both connections, in the same order
            if isinstance(ev, h2.events.RequestReceived | h2.events.ResponseReceived):
                other.send_headers(peer_sid, ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                other.send_data(peer_sid, ev.data, end_stream=ev.stream_ended is not None)
                receiver.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.TrailersReceived):
                other.send_headers(peer_sid, ev.headers, end_stream=True)
        spent += time.process_time() - start

    def pump() -> None:
        moved = True
        while moved:
            moved = False
            for sender, receiver in ((client, front), (server, back)):
                data = sender.data_to_send()
                if data:
                    moved = True
                    proxy(receiver, data)
            for sender, receiver in ((front, client), (back, server)):
                data = sender.data_to_send()
                if data:
                    moved = True
                    for ev in receiver.receive_data(data):
                        answer(receiver, ev)

    def answer(receiver: h2.connection.H2Connection, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            receiver.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        if receiver is server and isinstance(ev, h2.events.StreamEnded):
            server.send_headers(ev.stream_id, _RESPONSE)
            server.send_data(ev.stream_id, reply)
            server.send_headers(ev.stream_id, _TRAILERS, end_stream=True)

    pump()
    spent = 0.0
    for _ in range(calls // batch):
        for _ in range(batch):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, _REQUEST)
            client.send_data(sid, body, end_stream=True)
        pump()
    return spent / calls * 1e6


def _bench_context() -> tuple[object, object]:
    """The door manager's context (the client mapped to the guard) and its rule's reference."""
    from garrison.policies.l7rules import GRPCRule, L7Protocol, L7RuleSet
    from garrison.policies.labels import Labels
    from garrison.policies.refs import PolicyKind, RuleRef
    from garrison.proxy.commands import ConnectionContext, PeerInfo, TrafficDirection

    ref = RuleRef(PolicyKind.CNP, "default", "door-manager", "ingress")
    context = ConnectionContext(
        source=PeerInfo(257, Labels.parse("app=guard"), "127.0.0.1", 40000, "default"),
        destination=PeerInfo(256, Labels.parse("app=door-manager"), "127.0.0.1", 50051),
        direction=TrafficDirection.INGRESS,
        protocol=L7Protocol.GRPC,
        ruleset=L7RuleSet(L7Protocol.GRPC, ((GRPCRule("doors.DoorManager", "GetName"), ref),)),
    )
    return context, ref


def engine_cost(doors: ModuleType, calls: int, batch: int) -> float:
    """CPU µs per unary call spent in `H2Engine` (both of its connections, policy, records),
    between a real HTTP/2 client and upstream (garrison's own connection objects)."""
    from garrison.parsers.http2 import DataReceived, StreamEnded
    from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection
    from garrison.proxy.commands import Forward, Inject, Side
    from garrison.proxy.config import ProxyConfig
    from garrison.proxy.engine_h2 import H2Engine

    context, _ref = _bench_context()
    engine = H2Engine(context, ProxyConfig())  # type: ignore[arg-type]
    client, server = H2ClientConnection(), H2ServerConnection()
    body, reply = doors.frame(doors.message((1, "front"))), doors.frame(doors.message((1, "x")))
    spent = 0.0

    def run(upstream: bool, data: bytes) -> None:
        nonlocal spent
        start = time.process_time()
        commands = engine.upstream_data(data, 0.0) if upstream else engine.client_data(data, 0.0)
        spent += time.process_time() - start
        for cmd in commands:
            if isinstance(cmd, Forward | Inject):
                peer = client if cmd.side is Side.CLIENT else server
                for ev in peer.receive_data(cmd.data, 0.0):
                    if isinstance(ev, DataReceived):
                        peer.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
                    if peer is server and isinstance(ev, StreamEnded):
                        server.send_headers(ev.stream_id, _RESPONSE)
                        server.send_data(ev.stream_id, reply)
                        server.send_trailers(ev.stream_id, _TRAILERS)

    def pump() -> None:
        moved = True
        while moved:
            moved = False
            for upstream, peer in ((False, client), (True, server)):
                data = peer.data_to_send()
                if data:
                    moved = True
                    run(upstream, data)

    pump()
    spent = 0.0
    for _ in range(calls // batch):
        for _ in range(batch):
            sid = client.send_request(_REQUEST)
            client.send_data(sid, body, end_stream=True)
        pump()
    return spent / calls * 1e6


def records_cost(calls: int) -> float:
    """CPU µs of building one allowed call's two flow records (request, response with its
    trailers), as the engine builds them: its own record methods on a received call. (The
    engine may be compiled, so the records cannot be switched off inside a run.)"""
    from garrison.parsers.grpc import grpc_call
    from garrison.parsers.http2 import RequestReceived
    from garrison.policies.l7rules import L7Verdict
    from garrison.proxy.config import ProxyConfig
    from garrison.proxy.engine_h2 import H2Engine

    context, ref = _bench_context()
    engine = H2Engine(context, ProxyConfig())  # type: ignore[arg-type]
    grpc, _error = grpc_call("POST", ALLOWED)
    request = RequestReceived(1, "POST", "http", "127.0.0.1:50051", ALLOWED,
                              tuple(_REQUEST), False, grpc, None)  # fmt: skip
    outcome = engine._outcome(L7Verdict(allowed=True, rule=ref))  # type: ignore[arg-type]
    answer = (*_RESPONSE, *_TRAILERS)
    start = time.process_time()
    for _ in range(calls):
        engine._request_record(request, outcome, ALLOWED)
        engine._response_record(request, outcome, ALLOWED, http_code=200, grpc_status=0,
                                latency_ns=1000, headers=answer)  # fmt: skip
    return (time.process_time() - start) / calls * 1e6


def in_process(doors: ModuleType, rounds: int) -> dict[str, float]:
    """Best of `rounds` (CPU time, so other load on the machine matters less)."""
    calls, batch = 4_000, 10
    cases: dict[str, Callable[[], float]] = {
        "h2 relay floor (bare h2, both connections)": lambda: h2_relay_floor(doors, calls, batch),
        "garrison engine": lambda: engine_cost(doors, calls, batch),
        "of which building the two records": lambda: records_cost(calls),
    }
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            best[name] = min(best[name], case())
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="calls per h2load run")
    parser.add_argument("--clients", type=int, default=4, help="h2load connections")
    parser.add_argument("--streams", type=int, default=10, help="calls in flight per connection")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--only", default="direct,garrison,haproxy")
    parser.add_argument("--skip-in-process", action="store_true")
    args = parser.parse_args(argv)
    if not preflight("h2load", "haproxy"):
        return 2
    only = args.only.split(",")
    doors = load_doors()
    costs = {} if args.skip_in_process else in_process(doors, max(3, args.rounds))
    samples: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="garrison-bench-grpc-") as tmp:
        workdir = Path(tmp)
        allowed_body = workdir / "getname.bin"
        allowed_body.write_bytes(doors.frame(doors.message((1, "front"))))
        denied_body = workdir / "setaccesscode.bin"
        denied_body.write_bytes(doors.frame(doors.message((1, "front"), (2, "1234"))))
        backend, upstream_ctx = door_manager(workdir)
        with contextlib.ExitStack() as stack:
            upstream = stack.enter_context(upstream_ctx)
            ports: dict[str, tuple[int, int | None]] = {"direct": (backend, None)}
            if "garrison" in only:
                port, ctx = garrison(workdir, backend, not args.no_access_log)
                ports["garrison"] = (port, stack.enter_context(ctx).pid)
            if "haproxy" in only:
                port, ctx = haproxy(workdir, backend)
                ports["haproxy"] = (port, stack.enter_context(ctx).pid)
            for name in only:
                port, pid = ports[name]
                check_through(port, doors, expect_deny=pid is not None)
                h2load(port, ALLOWED, allowed_body, args, workdir, None, None, 2_000)  # warm-up
            for _ in range(args.rounds):
                for name in only:
                    port, pid = ports[name]
                    samples.setdefault((name, "allowed"), []).append(
                        h2load(port, ALLOWED, allowed_body, args, workdir, pid, upstream.pid)
                    )
                    if pid is not None:
                        samples.setdefault((name, "denied"), []).append(
                            h2load(port, DENIED, denied_body, args, workdir, pid, upstream.pid)
                        )
    results = {key: median_run(runs) for key, runs in samples.items()}
    if costs:
        print("in process, CPU per unary call (best of rounds, batches of 10 calls):")
        floor = costs["h2 relay floor (bare h2, both connections)"]
        for name, cost in costs.items():
            print(f"  {name:<46}{cost:7.0f} us  {cost / floor:5.2f} x floor")
    print(
        f"h2load -c{args.clients} -m{args.streams} -n{args.requests} x {args.rounds} rounds "
        f"(medians), gRPC unary GetName, loopback, {os.cpu_count()} CPUs; garrison access log "
        f"{'off' if args.no_access_log else 'on'}"
    )
    print(
        f"{'case':<18}{'calls/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'proxy CPU us/call':>19}{'upstream CPU us/call':>22}  statuses"
    )
    for (name, kind), r in results.items():
        print(
            f"{name + ' ' + kind:<18}{r.rps:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{_fmt(r.proxy_cpu_us):>19}{_fmt(r.upstream_cpu_us):>22}  {r.statuses}"
            + (f"; {r.failed} failed (4xx count as failed)" if r.failed else "")
        )
    direct = results.get(("direct", "allowed"))
    print("ratios:")
    for name in ("garrison", "haproxy"):
        run = results.get((name, "allowed"))
        if direct and run:
            print(
                f"  {name} calls/s / direct: {run.rps / direct.rps:.2f}"
                + ("  (aim >= 0.6)" if name == "garrison" else "")
            )
    g, h = results.get(("garrison", "allowed")), results.get(("haproxy", "allowed"))
    if g and h and g.proxy_cpu_us and h.proxy_cpu_us:
        print(f"  garrison / haproxy CPU per allowed call: {g.proxy_cpu_us / h.proxy_cpu_us:.1f}")
    g, h = results.get(("garrison", "denied")), results.get(("haproxy", "denied"))
    if g and h and g.proxy_cpu_us and h.proxy_cpu_us:
        print(f"  garrison / haproxy CPU per denied call:  {g.proxy_cpu_us / h.proxy_cpu_us:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
