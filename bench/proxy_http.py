"""HTTP/1.1 through garrison vs. direct to nginx vs. haproxy with the same path ACL.

Run: .venv/bin/python bench/proxy_http.py [--duration S] [--connections N] [--idle N]
                                          [--no-access-log] [--workers 1,2]
                                          [--only direct,floor,garrison,source,haproxy,haproxy-log]

Everything runs on loopback, as child processes this script starts and stops by PID, with
configs generated into a temporary directory:

- backend: nginx (Debian package), `return 200 "Ship landed\\n"` for the Star Wars paths,
  2 workers, keep-alive without limits;
- direct: wrk → nginx;
- floor: wrk → `bench/floor_http.py` (uvloop + httptools, relay only: no policy, no records)
  → nginx, the least a CPython proxy on this design can cost (allowed path only);
- garrison: wrk → `garrison proxy` (one process, uvloop) → nginx, with the Star Wars L7 policy
  (`POST /v1/request-landing` only), the client mapped to the tiefighter, and the access log
  written (JSON lines, every request and response) unless `--no-access-log`;
- source: the same garrison with `GARRISON_PURE=1`, its mypyc-compiled modules
  (garrison/native.py) run from source instead: what the compiled build buys;
- `--workers 1,2`: the garrison case once per count (`garrison proxy --workers N`, N worker
  processes on one SO_REUSEPORT port; default 1); its CPU is that of the parent and every
  worker, and the throughput of each count is compared with one worker's;
- haproxy 2.6 (Debian package), `nbthread 1` like garrison's single event loop, the same ACL
  (`http-request deny deny_status 403` unless POST /v1/request-landing), `http-reuse always`;
- haproxy-log: the same haproxy writing one line per request (`option httplog`, `log stdout`)
  into a file, as garrison writes its access log: issue 17's aim is garrison's CPU per request
  within 2.0x of this case's.

Each case runs wrk (`-t1 -cN --latency`, POST by a Lua script) on the allowed path
(`POST /v1/request-landing` → 200 from nginx) and on a denied one (`PUT /v1/exhaust-port` → 403
from the proxy). Reported: requests/s, p50/p99 latency, the proxy's CPU µs per request (utime +
stime from /proc/PID/stat over the run, divided by the requests wrk completed) and, with
`--idle` keep-alive connections opened and left idle after one request each, the proxy's RSS
growth per idle connection. Ratios are printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "examples" / "starwars" / "sw_l3_l4_l7_policy.yaml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
Child = tuple[int, "subprocess.Popen[bytes]"]  # (port, process)

NGINX_CONF = """
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /v1/request-landing {{ return 200 "Ship landed\\n"; }}
        location = /v1/exhaust-port {{ return 503 "Panic: deathstar exploded\\n"; }}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

PURE_ENV = "GARRISON_PURE"  # garrison/native.py: run the compiled modules from source

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 9000
{global_log}defaults
    mode http
{defaults_log}    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    option http-keep-alive
    http-reuse always
frontend deathstar
    bind 127.0.0.1:{port}
    acl landing method POST
    acl landing_path path /v1/request-landing
    http-request deny deny_status 403 unless landing landing_path
    default_backend nginx
backend nginx
    server nginx1 127.0.0.1:{backend}
"""
# `haproxy-log`: one line per request (haproxy's `option httplog`) written by haproxy itself to
# its stdout, which the bench points at a file: the fair comparison for garrison's access log.
HAPROXY_LOG_GLOBAL = "    log stdout format raw local0 info\n"
HAPROXY_LOG_DEFAULTS = "    log global\n    option httplog\n"

WRK_SCRIPT = """
wrk.method = "{method}"
wrk.body = "{{}}"
wrk.headers["Content-Type"] = "application/json"
"""


PACKAGES = {"h2load": "nghttp2-client"}  # Debian package of each tool, where named otherwise


def preflight(*tools: str) -> bool:
    """Every tool installed (else says which package to install and returns False), and the
    open-files limit raised to its hard limit (thousands of connections)."""
    for tool in tools:
        if shutil.which(tool) is None:
            package = PACKAGES.get(tool, tool)
            print(f"needs {tool}: apt-get install {package} (or make setup)", file=sys.stderr)
            return False
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return True


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
    """utime + stime of `pid` and its live children (`garrison proxy --workers N`)."""
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


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` and its live children."""
    total = 0
    for one in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: str
    cpu_us: float | None = None


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency(text: str, pct: str) -> float:
    match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def wrk(url: str, method: str, duration: float, connections: int, workdir: Path,
        pid: int | None) -> WrkResult:
    script = workdir / f"{method}.lua"
    script.write_text(WRK_SCRIPT.format(method=method))
    before = cpu_seconds(pid) if pid else 0.0
    done = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(duration)}s", "--latency",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=duration + 30, check=True,
    )
    cpu = cpu_seconds(pid) - before if pid else None
    out = done.stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    statuses = f"{non2xx.group(1)} non-2xx" if non2xx else "all 2xx"
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        statuses += f"; socket errors: {errors.group(1)}"
    return WrkResult(
        requests, rps, _latency(out, "50"), _latency(out, "99"), statuses,
        cpu * 1e6 / requests if cpu is not None and requests else None,
    )


def idle_rss_per_connection(port: int, pid: int, count: int, method: str = "POST") -> float:
    """KB of proxy RSS per keep-alive connection left idle after one request."""
    request = (f"{method} /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\n"
               "Content-Length: 2\r\n\r\n{}").encode()
    warm: list[socket.socket] = []
    for _ in range(50):  # allocator and pool warm-up, not counted
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(request)
        sock.recv(65536)
        warm.append(sock)
    time.sleep(0.5)
    base = rss_kb(pid)
    socks: list[socket.socket] = []
    try:
        # One connection at a time, each answered before the next opens: what stays is the
        # idle client connection. (Sending all requests before reading any answer made the
        # proxy open an upstream connection per request once the accept queue took them all
        # at once, and the pooled upstreams were counted per client connection: 2.9 KB with a
        # 100-deep accept queue, 9 KB with the system's.)
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.settimeout(10)
            sock.sendall(request)
            data = b""
            while b"Ship landed" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed during the idle test")
                data += chunk
            socks.append(sock)
        time.sleep(1.0)
        grown = rss_kb(pid) - base
    finally:
        for sock in socks + warm:
            sock.close()
    return grown / count


@contextlib.contextmanager
def nginx(workdir: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port))
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "nginx.stderr").open("wb"),
    )
    try:
        wait_port(port, proc, "nginx")
        yield port, proc
    finally:
        stop(proc)


@contextlib.contextmanager
def haproxy(workdir: Path, backend: int,
            log: bool = False) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """haproxy with the same ACL; `log`: one log line per request into `haproxy.log`."""
    port = free_port()
    conf = workdir / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(
        port=port, backend=backend, global_log=HAPROXY_LOG_GLOBAL if log else "",
        defaults_log=HAPROXY_LOG_DEFAULTS if log else ""))
    with (workdir / "haproxy.log").open("wb") as log_file:
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(conf)],
                                stdout=log_file if log else subprocess.DEVNULL,
                                stderr=(workdir / "haproxy.stderr").open("wb"))
    try:
        wait_port(port, proc, "haproxy")
        yield port, proc
    finally:
        stop(proc)


@contextlib.contextmanager
def garrison(workdir: Path, backend: int, access_log: bool, source: bool = False,
             workers: int = 1) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`garrison proxy --workers N`; `source`: the same code run from source
    (GARRISON_PURE=1)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "garrison.cli.main", "proxy", "--workers", str(workers),
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{backend}",
        "-f", str(POLICY), "--dst-labels", "org=empire,class=deathstar", "--dport", "80",
        "--peer", "127.0.0.1/32=org=empire,class=tiefighter",
    ]
    if access_log:
        argv += ["--access-log", str(workdir / "access.log"),
                 "--access-log-max-bytes", str(64 * 1024 * 1024), "--access-log-backups", "1"]
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    if source:
        env[PURE_ENV] = "1"
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, env=env,
                            stderr=(workdir / "garrison.stderr").open("wb"))
    try:
        wait_port(port, proc, "garrison proxy")
        if workers > 1:  # listening once the parent says every worker does
            log = workdir / "garrison.stderr"
            deadline = time.monotonic() + 30
            while "workers (pids" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
        yield port, proc
    finally:
        stop(proc)


@contextlib.contextmanager
def floor(backend: int) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """The minimal uvloop + httptools relay of `bench/floor_http.py`: the design's floor."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "floor_http.py"), str(port),
                             str(backend)], stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "floor relay")
        yield port, proc
    finally:
        stop(proc)


# ---- where an allowed request's CPU goes, in process (no sockets), same run --------------------

BREAKDOWN_REQUEST = (b"POST /v1/request-landing HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                     b"User-Agent: wrk\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
BREAKDOWN_DENIED = (b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                    b"User-Agent: wrk\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n{}")
BREAKDOWN_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: 12\r\nConnection: keep-alive\r\n\r\nShip landed\n")


class _NoLoop:
    """Stands in for the event loop: the benchmark flushes the sink itself."""

    def call_soon(self, callback: Callable[[], None]) -> None:
        pass


def breakdown(rounds: int = 5, n: int = 10_000) -> list[tuple[str, float]]:
    """CPU µs per allowed request (best of `rounds`) of cumulative stages of the engine:
    both parsers alone; + matching, engine bookkeeping and commands (records not made); + the
    two flow records; + their JSON lines; + metrics as the standalone proxy's sink does; and
    a denied request (answered by the engine) with all of it."""
    sys.path.insert(0, str(REPO))
    import garrison.proxy.engine_http1 as engine_module
    from garrison.parsers.http1 import HTTP1RequestParser, HTTP1ResponseParser
    from garrison.policies.l7rules import L7Protocol
    from garrison.policies.labels import Labels, endpoint_labels
    from garrison.policies.loader import load_paths
    from garrison.proxy.commands import ConnectionContext, Log, PeerInfo, TrafficDirection
    from garrison.proxy.config import ProxyConfig
    from garrison.proxy.metrics import ProxyMetrics
    from garrison.proxy.policyview import PeerMapping, StandalonePolicy
    from garrison.proxy.server import FlowSink

    deathstar = endpoint_labels(Labels.parse("org=empire,class=deathstar"))
    policy = StandalonePolicy(load_paths([POLICY]).policies, deathstar, 80,
                              L7Protocol.HTTP,
                              [PeerMapping.parse("127.0.0.1/32=org=empire,class=tiefighter")])
    admission = policy.admit("127.0.0.1")
    context = ConnectionContext(
        source=PeerInfo(admission.identity, admission.labels, "127.0.0.1", 40000, "default"),
        destination=PeerInfo(256, deathstar, "127.0.0.1", 80, "default"),
        direction=TrafficDirection.INGRESS, protocol=L7Protocol.HTTP,
        ruleset=admission.ruleset,
    )
    request, response = BREAKDOWN_REQUEST, BREAKDOWN_RESPONSE

    def parsers() -> None:
        requests, responses = HTTP1RequestParser(), HTTP1ResponseParser()
        for _ in range(n):
            requests.receive_data(request)
            for _event in requests.events():
                pass
            responses.expect_response("POST")
            responses.receive_data(response)
            for _event in responses.events():
                pass

    def engine(sink: FlowSink | None, build: bool, encode: bool,
               denied: bool = False) -> Callable[[], None]:
        def run() -> None:
            eng = engine_module.HTTPEngine(context, ProxyConfig())
            for i in range(n):
                batches = ((eng.client_data(BREAKDOWN_DENIED, 1.0),) if denied else
                           (eng.client_data(request, 1.0), eng.upstream_data(response, 1.0)))
                for batch in batches:
                    for command in batch:
                        if type(command) is Log:
                            if build:  # records are made when first read (`Log.later`)
                                record = command.record
                            if encode:
                                record.to_json()
                            if sink is not None:
                                sink.emit(record)
                if sink is not None and i % 8 == 7:
                    sink.flush()  # the server flushes once per loop turn (~8 requests here)
        return run

    def timed(run: Callable[[], None]) -> float:
        run()
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            run()
            best = min(best, (time.process_time() - start) / n * 1e6)
        return best

    out = [("parse request + response", timed(parsers))]
    # records are made when first read (`Log.later`): not reading them leaves them unmade
    out.append(("+ match, engine, commands", timed(engine(None, False, False))))
    out.append(("+ 2 flow records", timed(engine(None, True, False))))
    out.append(("+ 2 JSON lines", timed(engine(None, True, True))))
    # as `garrison proxy`'s sink: metrics, and no ring (the agent's sink has the ring)
    flow_sink = FlowSink(metrics=ProxyMetrics(), loop=_NoLoop())  # type: ignore[arg-type]
    out.append(("+ metrics (server sink)", timed(engine(flow_sink, True, True))))
    # the denied request (403 by the engine), everything above at once
    out.append(("denied request, all of the above", timed(engine(flow_sink, True, True, True))))
    return out


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--idle", type=int, default=1000, help="idle keep-alive connections")
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--only",
                        default="direct,floor,garrison,source,haproxy,haproxy-log")
    parser.add_argument("--workers", default="1",
                        help="garrison worker counts to run, comma-separated (e.g. 1,2)")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the in-process cost breakdown of the engine")
    args = parser.parse_args(argv)
    if not preflight("wrk", "nginx", "haproxy"):
        return 2
    only = set(args.only.split(","))
    results: dict[tuple[str, str], WrkResult] = {}
    idle: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="garrison-bench-") as tmp:
        workdir = Path(tmp)
        with nginx(workdir) as (backend, _nginx_proc):
            cases: list[tuple[str, contextlib.AbstractContextManager[Child] | None]] = []
            if "direct" in only:
                cases.append(("direct", None))
            if "floor" in only:
                cases.append(("floor", floor(backend)))
            counts = [int(n) for n in args.workers.split(",")]
            if "garrison" in only:
                for count in counts:
                    name = "garrison" if count == 1 else f"garrison x{count}"
                    cases.append((name, garrison(workdir, backend, not args.no_access_log,
                                                 workers=count)))
            if "source" in only:
                cases.append(("source", garrison(workdir, backend, not args.no_access_log,
                                                 source=True)))
            if "haproxy" in only:
                cases.append(("haproxy", haproxy(workdir, backend)))
            if "haproxy-log" in only:
                cases.append(("haproxy-log", haproxy(workdir, backend, log=True)))
            for name, manager in cases:
                if manager is None:
                    url = f"http://127.0.0.1:{backend}"
                    results[(name, "allowed")] = wrk(f"{url}/v1/request-landing", "POST",
                                                     args.duration, args.connections, workdir,
                                                     None)
                    continue
                with manager as (port, proc):
                    url = f"http://127.0.0.1:{port}"
                    wrk(f"{url}/v1/request-landing", "POST", 1, args.connections, workdir,
                        None)  # warm-up
                    results[(name, "allowed")] = wrk(
                        f"{url}/v1/request-landing", "POST", args.duration, args.connections,
                        workdir, proc.pid)
                    if name == "floor":  # a relay without policy: nothing to deny
                        continue
                    results[(name, "denied")] = wrk(
                        f"{url}/v1/exhaust-port", "PUT", args.duration, args.connections,
                        workdir, proc.pid)
                    if args.idle:
                        idle[name] = idle_rss_per_connection(port, proc.pid, args.idle)
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s, loopback, "
          f"{os.cpu_count()} CPUs; garrison access log "
          f"{'off' if args.no_access_log else 'on'}")
    print(f"{'case':<24}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}  statuses")
    for (name, path), r in results.items():
        print(f"{name + ' ' + path:<24}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
              f"{_fmt(r.cpu_us):>12}  {r.statuses}")
    for name, kb in idle.items():
        print(f"{name}: {kb:.2f} KB RSS per idle keep-alive connection ({args.idle} connections)")
    direct = results.get(("direct", "allowed"))
    g_allowed = results.get(("garrison", "allowed"))
    h_allowed = results.get(("haproxy", "allowed"))
    f_allowed = results.get(("floor", "allowed"))
    g_denied = results.get(("garrison", "denied"))
    h_denied = results.get(("haproxy", "denied"))
    print("ratios:")
    if direct and g_allowed:
        print(f"  garrison allowed throughput / direct: {g_allowed.rps / direct.rps:.2f}")
    if direct and h_allowed:
        print(f"  haproxy allowed throughput / direct:  {h_allowed.rps / direct.rps:.2f}")
    if g_allowed and h_allowed and g_allowed.cpu_us and h_allowed.cpu_us:
        print(f"  garrison / haproxy CPU per allowed request: "
              f"{g_allowed.cpu_us / h_allowed.cpu_us:.2f}")
    if g_denied and h_denied and g_denied.cpu_us and h_denied.cpu_us:
        print(f"  garrison / haproxy CPU per denied request:  "
              f"{g_denied.cpu_us / h_denied.cpu_us:.2f}")
    for path in ("allowed", "denied"):  # issue 17's aim: <= 2.0x haproxy logging to a file
        g, hl = results.get(("garrison", path)), results.get(("haproxy-log", path))
        if g and hl and g.cpu_us and hl.cpu_us:
            print(f"  garrison / haproxy-log CPU per {path} request: "
                  f"{g.cpu_us / hl.cpu_us:.2f} (aim <= 2.0)")
    if direct and f_allowed:
        print(f"  floor (uvloop + httptools relay) throughput / direct: "
              f"{f_allowed.rps / direct.rps:.2f}")
    if f_allowed and h_allowed and f_allowed.cpu_us and h_allowed.cpu_us:
        print(f"  floor / haproxy CPU per allowed request: "
              f"{f_allowed.cpu_us / h_allowed.cpu_us:.2f}")
    if g_allowed and f_allowed and g_allowed.cpu_us and f_allowed.cpu_us:
        print(f"  garrison / floor CPU per allowed request: "
              f"{g_allowed.cpu_us / f_allowed.cpu_us:.2f}")
    s_allowed = results.get(("source", "allowed"))
    if g_allowed and s_allowed and g_allowed.cpu_us and s_allowed.cpu_us:
        print(f"  garrison compiled / from source CPU per allowed request: "
              f"{g_allowed.cpu_us / s_allowed.cpu_us:.2f}")
    for (name, path), r in results.items():
        if name.startswith("garrison x") and path == "allowed" and g_allowed:
            print(f"  {name} / garrison (1 worker) allowed throughput: "
                  f"{r.rps / g_allowed.rps:.2f}; CPU per request "
                  f"{_fmt(r.cpu_us)} vs {_fmt(g_allowed.cpu_us)} us")
    if "garrison" in idle:
        print(f"  garrison KB per idle connection: {idle['garrison']:.2f} (issue 17's aim <= 2)")
    if "garrison" in only and not args.no_breakdown:
        rows = breakdown()
        import garrison as garrison_package
        state = "compiled" if garrison_package.COMPILED_IN_USE else "from source"
        print(f"garrison CPU per request in process, {state}, no sockets "
              "(cumulative, best of 5):")
        for name, micros in rows:
            print(f"  {name:<34}{micros:>7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
