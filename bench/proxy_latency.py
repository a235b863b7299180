"""HTTP/1.1 latency at a fixed request rate: what garrison adds over going direct.

Run: .venv/bin/python bench/proxy_latency.py [--duration S] [--clients N] [--fraction F]
                                             [--rate R] [--only garrison,haproxy]
                                             [--workers 1,2]

Issue 17's latency aim: at a fixed rate of half of garrison's one-worker capacity, the p99
that garrison adds over direct is at most 0.3 ms. Open-loop, so a slow answer does not slow
the load down (a closed loop like wrk's hides queueing: coordinated omission):

1. capacity: `wrk` against garrison (one worker, access log on, compiled build as installed)
   for `--capacity-duration` seconds on the allowed path; the rate is `--fraction` (0.5) of
   the requests/s it completes, or `--rate` if given;
2. at that rate, for `--duration` seconds each: direct to nginx, through garrison, through
   haproxy (the same ACL as in `bench/proxy_http.py`, logging every request to a file as
   garrison does) — `h2load --h1 -c N --rps R/N` (each client sends R/N requests per second,
   one at a time) with `--log-file`, one line per request: its start, status and duration;
   h2load paces each connection with its own timer, and the timers start together: requests
   arrive in bursts of up to N, and a burst of N queues behind itself in a one-loop proxy
   (with 50 connections at 1,000 req/s even direct nginx had a p50 of 0.8 ms). So the default
   is few connections (5), each at R/5 per second, which a connection waiting for each answer
   can sustain while answers take less than 5/R s;
3. percentiles from the logs (p50, p90, p99, p99.9, max), the p99 added over direct, and the
   proxy's CPU per request at that rate.

`--workers 1,2` runs garrison once per worker count at the same rate (the capacity is still
one worker's). On a machine without a core to spare for a second worker, a throughput ratio
says how the scheduler shared the cores; the CPU per request at a rate that leaves CPU idle
says whether anything per request grows with the number of workers.

The backend, garrison and haproxy are `bench/proxy_http.py`'s (same configs, same policy:
`POST /v1/request-landing` allowed). Everything on loopback, child processes stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from proxy_http import Child, cpu_seconds, garrison, haproxy, nginx, preflight, wrk

PATH = "/v1/request-landing"


@dataclass(frozen=True)
class Latency:
    requests: int
    failed: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    cpu_us: float | None


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


def read_h2load_log(path: Path) -> tuple[list[float], int]:
    """Durations in ms of the requests answered 2xx, and how many were not (h2load's
    `--log-file`: start µs, status, duration µs, tab-separated)."""
    durations: list[float] = []
    failed = 0
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        if not fields[1].startswith("2"):
            failed += 1
            continue
        durations.append(int(fields[2]) / 1000)
    durations.sort()
    return durations, failed


def fixed_rate(url: str, rate: int, clients: int, duration: int, workdir: Path,
               pid: int | None) -> Latency:
    body = workdir / "body.json"
    body.write_text("{}")
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    per_client = max(1, round(rate / clients))
    before = cpu_seconds(pid) if pid else 0.0
    subprocess.run(
        ["h2load", "--h1", f"-c{clients}", "-m1", f"--rps={per_client}",
         f"-n{per_client * clients * duration}", "-d", str(body),
         "-H", "content-type: application/json", f"--log-file={log}", url],
        capture_output=True, text=True, timeout=duration * 3 + 60, check=True,
    )
    cpu = cpu_seconds(pid) - before if pid else None
    durations, failed = read_h2load_log(log)
    answered = len(durations)
    return Latency(
        answered + failed, failed, percentile(durations, 50), percentile(durations, 90),
        percentile(durations, 99), percentile(durations, 99.9),
        durations[-1] if durations else float("nan"),
        cpu * 1e6 / answered if cpu is not None and answered else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per fixed-rate run")
    parser.add_argument("--capacity-duration", type=int, default=5,
                        help="seconds of wrk to find garrison's one-worker capacity")
    parser.add_argument("--clients", type=int, default=5,
                        help="h2load connections (each paced on its own; see the docstring)")
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="the rate as a fraction of garrison's capacity")
    parser.add_argument("--rate", type=int, default=0,
                        help="requests/s to run at (skips the capacity run)")
    parser.add_argument("--only", default="garrison,haproxy")
    parser.add_argument("--workers", default="1",
                        help="garrison worker counts to run at the rate, comma-separated")
    args = parser.parse_args(argv)
    worker_counts = [int(n) for n in args.workers.split(",")]
    if not preflight("wrk", "nginx", "haproxy", "h2load"):
        return 2
    only = set(args.only.split(","))
    results: dict[str, Latency] = {}
    with tempfile.TemporaryDirectory(prefix="garrison-latency-") as tmp:
        workdir = Path(tmp)
        with nginx(workdir) as (backend, _nginx_proc):
            rate = args.rate
            capacity = None
            if not rate:
                with garrison(workdir, backend, True) as (port, proc):
                    url = f"http://127.0.0.1:{port}{PATH}"
                    wrk(url, "POST", 1, 32, workdir, None)  # warm-up
                    capacity = wrk(url, "POST", args.capacity_duration, 32, workdir, proc.pid)
                rate = max(args.clients, round(capacity.rps * args.fraction))
            results["direct"] = fixed_rate(f"http://127.0.0.1:{backend}{PATH}", rate,
                                           args.clients, args.duration, workdir, None)
            cases: list[tuple[str, contextlib.AbstractContextManager[Child]]] = []
            if "garrison" in only:
                for n in worker_counts:
                    name = "garrison" if n == 1 else f"garrison x{n}"
                    cases.append((name, garrison(workdir, backend, True, workers=n)))
            if "haproxy" in only:
                cases.append(("haproxy-log", haproxy(workdir, backend, log=True)))
            for name, manager in cases:
                with manager as (port, proc):
                    url = f"http://127.0.0.1:{port}{PATH}"
                    wrk(url, "POST", 1, 8, workdir, None)  # warm-up
                    results[name] = fixed_rate(url, rate, args.clients, args.duration,
                                               workdir, proc.pid)
    load = os.getloadavg()
    if capacity is not None:
        print(f"garrison one-worker capacity (wrk -t1 -c32, {args.capacity_duration} s): "
              f"{capacity.rps:.0f} req/s, p99 at saturation {capacity.p99_ms:.2f} ms")
    print(f"fixed rate {rate} req/s (h2load --h1 -c{args.clients} -m1 "
          f"--rps={max(1, round(rate / args.clients))}, {args.duration} s), "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f}")
    print(f"{'case':<20}{'requests':>9}{'failed':>7}{'p50':>8}{'p90':>8}{'p99':>8}"
          f"{'p99.9':>8}{'max':>8}{'CPU us/req':>12}   (ms)")
    for name, r in results.items():
        cpu = f"{r.cpu_us:.1f}" if r.cpu_us is not None else "-"
        print(f"{name:<20}{r.requests:>9}{r.failed:>7}{r.p50_ms:>8.2f}{r.p90_ms:>8.2f}"
              f"{r.p99_ms:>8.2f}{r.p999_ms:>8.2f}{r.max_ms:>8.2f}{cpu:>12}")
    direct = results["direct"]
    for name, r in results.items():
        if name != "direct":
            print(f"  {name}: p50 added {r.p50_ms - direct.p50_ms:+.2f} ms, p99 added "
                  f"{r.p99_ms - direct.p99_ms:+.2f} ms"
                  + (" (aim <= +0.3 ms)" if name == "garrison" else ""))
    if "garrison" in results:
        for name, r in results.items():
            if name.startswith("garrison x") and r.cpu_us and results["garrison"].cpu_us:
                print(f"  {name} / garrison CPU per request at the same rate: "
                      f"{r.cpu_us / results['garrison'].cpu_us:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
