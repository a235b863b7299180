"""HTTP/1.1 through the agent's transparent proxy, the path users run, vs haproxy-log.

Run (root): .venv/bin/python bench/proxy_agent.py [--duration S] [--connections N]

`bench/proxy_http.py` measures the standalone `garrison proxy` on loopback. Here the request
takes the product's path: a client in one endpoint's network namespace, the datapath's
redirect of the deathstar's port 80 (it has L7 rules) to the agent's proxy, the agent's
proxy, the deathstar's nginx in another namespace. Its own `garrison agent` (state dir,
socket, bpffs pins, proxy ports and access log of its own, compiled build as installed), two
endpoints it makes (`tiefighter`, `deathstar`, 198.18.220.0/24), the Star Wars L3/L4/L7 policy
on port 80 plus an L4-only allow of ports 8000 and 8080. `wrk -t1 -cN` from the tiefighter's
namespace:

- `L4 only`: nginx's port 8000, allowed in the kernel, no proxy (the datapath alone);
- `garrison`: port 80 through the agent's proxy (allowed `POST /v1/request-landing`, and the
  denied `PUT /v1/exhaust-port`), CPU per request of the agent's process (the proxy runs in
  it: `--proxy-workers 1`, the default);
- `haproxy-log`: the same ACL in haproxy, logging every request to a file, in the deathstar's
  namespace on port 8080 in front of the same nginx (one L7 hop with a log line, as garrison
  is), CPU per request of haproxy.

Everything it made is removed at the end: endpoints through the agent, the agent stopped by
PID, then `garrison agent --cleanup` for its pins and whatever it left by design.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from proxy_http import (
    CLK_TCK,
    HAPROXY_CONF,
    HAPROXY_LOG_DEFAULTS,
    HAPROXY_LOG_GLOBAL,
    NGINX_CONF,
    POLICY,
    REPO,
    WRK_SCRIPT,
    cpu_seconds,
    preflight,
    stop,
)

DEATHSTAR_IP, TIEFIGHTER_IP = "198.18.220.2", "198.18.220.3"
L4_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-l4-only
spec:
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "8000"
        protocol: TCP
      - port: "8080"
        protocol: TCP
"""


def garrison(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "garrison.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=check)


@contextlib.contextmanager
def agent(work: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    pins = f"/sys/fs/bpf/garrison-bench-agent-{os.getpid()}"
    where = ["--state-dir", str(work / "state"), "--socket", str(work / "agent.sock"),
             "--bpffs-root", pins]
    base = 16000 + os.getpid() % 1000 * 3  # proxy ports of its own, beside another agent's
    argv = [sys.executable, "-m", "garrison.cli.main", "agent", *where,
            "--access-log", str(work / "access.log"),
            "--proxy-ports", f"http={base},grpc={base + 1},kafka={base + 2}"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=(work / "agent.log").open("wb"))
    sock = ["--socket", str(work / "agent.sock")]
    try:
        deadline = time.monotonic() + 60
        while garrison("status", *sock, check=False).returncode == 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start: {(work / 'agent.log').read_text()}")
            time.sleep(0.2)
        yield proc, sock
    finally:
        stop(proc)
        done = garrison("agent", "--cleanup", *where, check=False)
        for line in (done.stdout + done.stderr).strip().splitlines()[-1:]:
            print(f"agent --cleanup: {line}")


@contextlib.contextmanager
def endpoint(sock: list[str], name: str, labels: str, ip: str) -> Iterator[str]:
    garrison("endpoint", "add", name, "--labels", labels, "--ip", ip, *sock)
    try:
        yield name
    finally:
        garrison("endpoint", "delete", name, *sock, check=False)


@contextlib.contextmanager
def in_netns(netns: str, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} in {netns} exited: {log.read_text()}")
        yield proc
    finally:
        stop(proc)


def run_wrk(netns: str, url: str, method: str, seconds: int, connections: int, work: Path,
            pid: int | None) -> tuple[float, float, str, float | None]:
    """req/s, p99 ms, statuses, CPU µs per request of `pid`."""
    script = work / f"{method}.lua"
    script.write_text(WRK_SCRIPT.format(method=method))
    before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(["ip", "netns", "exec", netns, "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    cpu = cpu_seconds(pid) - before if pid else None
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    p99_ms = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    statuses = f"{non2xx.group(1)} non-2xx" if non2xx else "all 2xx"
    if errors:
        statuses += f"; socket errors: {errors.group(1)}"
    per = cpu * 1e6 / requests if cpu is not None and requests else None
    return rps, p99_ms, statuses, per


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/proxy_agent.py: needs root (BPF programs, network namespaces): run it "
              "with sudo", file=sys.stderr)
        return 2
    if not preflight("wrk", "nginx", "haproxy"):
        return 2
    tag = os.getpid() % 100000
    rows: list[tuple[str, float, float, str, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="garrison-bench-agent-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # nginx's workers read their files as nobody
        with contextlib.ExitStack() as stack:
            proc, sock = stack.enter_context(agent(work))
            ds = stack.enter_context(endpoint(sock, f"gb-ds{tag}", "org=empire,class=deathstar",
                                              DEATHSTAR_IP))
            tf = stack.enter_context(endpoint(sock, f"gb-tf{tag}", "org=empire,class=tiefighter",
                                              TIEFIGHTER_IP))
            conf = NGINX_CONF.format(dir=work, port=80).replace(
                "listen 127.0.0.1:80 reuseport backlog=4096;",
                "listen 0.0.0.0:80 reuseport backlog=4096;\n"
                "        listen 0.0.0.0:8000 reuseport backlog=4096;")
            (work / "nginx.conf").write_text(conf)
            stack.enter_context(in_netns(ds, ["nginx", "-c", str(work / "nginx.conf"), "-p",
                                              str(work), "-g", "daemon off;"],
                                         work / "nginx.out"))
            (work / "haproxy.cfg").write_text(HAPROXY_CONF.format(
                port=8080, backend=80, global_log=HAPROXY_LOG_GLOBAL,
                defaults_log=HAPROXY_LOG_DEFAULTS).replace("bind 127.0.0.1:8080",
                                                           "bind 0.0.0.0:8080"))
            haproxy = stack.enter_context(in_netns(
                ds, ["haproxy", "-db", "-f", str(work / "haproxy.cfg")], work / "haproxy.log"))
            (work / "l4.yaml").write_text(L4_POLICY)
            garrison("policy", "import", str(POLICY), *sock)
            garrison("policy", "import", str(work / "l4.yaml"), *sock)
            time.sleep(1)
            base = f"http://{DEATHSTAR_IP}"
            landing, exhaust = "/v1/request-landing", "/v1/exhaust-port"
            cases = [
                ("L4 only (no proxy)", f"{base}:8000{landing}", "POST", None),
                ("garrison allowed", f"{base}{landing}", "POST", proc.pid),
                ("garrison denied", f"{base}{exhaust}", "PUT", proc.pid),
                ("haproxy-log allowed", f"{base}:8080{landing}", "POST", haproxy.pid),
                ("haproxy-log denied", f"{base}:8080{exhaust}", "PUT", haproxy.pid),
            ]
            for name, url, method, pid in cases:  # a short warm-up, then the measured run
                run_wrk(tf, url, method, 1, args.connections, work, None)
                rows.append((name, *run_wrk(tf, url, method, args.duration, args.connections,
                                            work, pid)))
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s from the tiefighter's namespace, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; CLK_TCK {CLK_TCK}")
    print(f"{'case':24}{'req/s':>10}{'p99 ms':>9}{'CPU us/req':>12}  statuses")
    for name, rps, p99, statuses, cpu in rows:
        cpu_text = f"{cpu:.1f}" if cpu is not None else "-"
        print(f"{name:24}{rps:>10.0f}{p99:>9.2f}{cpu_text:>12}  {statuses}")
    by = {name: cpu for name, _, _, _, cpu in rows}
    for kind in ("allowed", "denied"):
        g, h = by.get(f"garrison {kind}"), by.get(f"haproxy-log {kind}")
        if g and h:
            print(f"  garrison's agent / haproxy-log CPU per {kind} request: {g / h:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
