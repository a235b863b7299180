"""How long the review page takes to open its map on a large access log.

Run: .venv/bin/python bench/ui.py [--records 10000,100000,1000000] [--keep DIR] [--runs 3]

Writes logs of N records made from the demo's real records (bench/observe.py's generator,
~1 KB a line; `--keep DIR` keeps them there and reuses them), then, per size and run, starts
`garrison ui --input-file LOG --listen 127.0.0.1:0` as a process and times, from the process
start: the page served, the first (partial) service map answered, the whole map (the log
read), then the newest page of flows and a page of flows with a selective filter. CPU is the
server's and its reader processes' (user + system). Each run starts with an empty map cache
(`XDG_CACHE_HOME` in the run's temporary directory); the log is then opened once more, with
what the first run kept (`garrison.ui.mapcache`).

The machine is shared, so each run is paired with a reference measured just before it on the
same log: decoding every line with `orjson.loads` in one process (what any Python reader of
the log pays at least; reading and splitting the file included). `ratio` is the server's CPU
over the reference's: it moves far less with the load than either time does. Aim: the map of
1,000,000 records in under 3 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from observe import write_log  # the generator beside this file

ROOT = Path(__file__).resolve().parent.parent

REFERENCE = """
import sys, orjson
loads, bad = orjson.loads, 0
with open(sys.argv[1], "rb") as f:
    rest = b""
    while chunk := f.read(4 << 20):
        lines = (rest + chunk).split(b"\\n")
        rest = lines.pop()
        for line in lines:
            try:
                loads(line)
            except orjson.JSONDecodeError:
                bad += 1
"""


def fetch(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"GET {path}: {response.status} {body[:200]!r}")
    return body


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reference(log: Path) -> float:
    """CPU seconds of decoding every line of `log` with orjson, one process."""
    before = children_cpu()
    subprocess.run([sys.executable, "-c", REFERENCE, str(log)], check=True)
    return children_cpu() - before


def run_once(log: Path, cache: Path) -> dict[str, float]:
    before = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "garrison.cli.main", "ui", "--listen", "127.0.0.1:0",
         "--input-file", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
    )
    try:
        assert proc.stdout is not None
        port = 0
        while not port:
            line = proc.stdout.readline().decode()
            if not line:
                raise SystemExit(f"garrison ui failed: {proc.stderr.read().decode()}")
            if m := re.search(r"serving http://127\.0\.0\.1:(\d+)/", line):
                port = int(m.group(1))
        times = {"serving": time.perf_counter() - t0}
        fetch(port, "/")
        fetch(port, "/api/map")
        times["first map"] = time.perf_counter() - t0
        while json.loads(fetch(port, "/api/info"))["loading"] is not None:
            time.sleep(0.02)
        whole = json.loads(fetch(port, "/api/map"))
        times["whole map"] = time.perf_counter() - t0
        t = time.perf_counter()
        fetch(port, "/api/flows?limit=100")
        times["flows page"] = time.perf_counter() - t
        t = time.perf_counter()
        fetch(port, "/api/flows?limit=100&q=" + quote("--verdict DROPPED --to-pod deathstar"))
        times["filtered page"] = time.perf_counter() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    times["cpu s"] = children_cpu() - before
    times["records"] = whole["records"]
    return times


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default="10000,100000,1000000",
                        help="log sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--keep", type=Path, help="write (or reuse) the logs in this directory")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(n) for n in args.records.split(",")]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
          f"load average {load()}")
    with tempfile.TemporaryDirectory(prefix="gu-bench-") as tmp:
        where = args.keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        summary = []
        for records in sizes:
            log = where / f"access-{records}.log"
            if not log.exists():
                write_log(log, records)
            print(f"{records:,} records, {log.stat().st_size / 1e6:.0f} MB:")
            walls, cpus, ratios, reopen = [], [], [], []
            for run in range(1, args.runs + 1):
                cache = Path(tmp) / f"cache-{records}-{run}"  # empty: the log is read
                ref = reference(log)
                times = run_once(log, cache)
                if times["records"] != records:
                    raise SystemExit(f"the map counted {times['records']} records, not {records}")
                walls.append(times["whole map"])
                cpus.append(times["cpu s"])
                ratios.append(times["cpu s"] / ref)
                again = run_once(log, cache)  # what the first run kept (logs of 32 MB and more)
                reopen.append(again["whole map"])
                print(f"  run {run}: " + ", ".join(
                    f"{k} {v:.2f} s" for k, v in times.items() if k not in ("cpu s", "records"))
                    + f"; CPU {times['cpu s']:.2f} s, orjson reference {ref:.2f} s, ratio "
                    f"{times['cpu s'] / ref:.2f}; opened again: whole map "
                    f"{again['whole map']:.2f} s, CPU {again['cpu s']:.2f} s; load {load()}")
            summary.append((records, statistics.median(walls), statistics.median(cpus),
                            statistics.median(ratios), statistics.median(reopen)))
        print("median: records, whole map (wall s), CPU s, ratio to orjson, opened again (s)")
        for records, wall, cpu, ratio, again_s in summary:
            print(f"  {records:>9,}  {wall:6.2f}  {cpu:6.2f}  {ratio:5.2f}  {again_s:6.2f}")


if __name__ == "__main__":
    main()
