"""How long the review page takes to open its map on a large access log.

Run: .venv/bin/python bench/ui.py [--records 1000000] [--keep PATH] [--runs 3]

Writes a log of N records made from the demo's real records (bench/observe.py's generator,
~1 KB a line), then, per run, starts `garrison ui --input-file LOG --listen 127.0.0.1:0` as a
process and times, from the process start: the page served, the first (partial) service map
answered, the whole map (the log read), then the newest page of flows and a page of flows with
a selective filter. Prints each time and the CPU seconds of the server and its reader
processes. Aim: the map of 1,000,000 records in under 3 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from observe import write_log  # the generator beside this file

ROOT = Path(__file__).resolve().parent.parent


def fetch(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"GET {path}: {response.status} {body[:200]!r}")
    return body


def run_once(log: Path) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "garrison.cli.main", "ui", "--listen", "127.0.0.1:0",
         "--input-file", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
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
            time.sleep(0.05)
        fetch(port, "/api/map")
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    times["cpu s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="reuse (or keep) the log at this path")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gu-bench-") as tmp:
        log = args.keep or Path(tmp) / "access.log"
        if not log.exists():
            size = write_log(log, args.records)
            print(f"wrote {args.records:,} records, {size / 1e6:.0f} MB to {log}")
        print(f"{os.cpu_count()} CPUs; {log.stat().st_size / 1e6:.0f} MB")
        for run in range(1, args.runs + 1):
            times = run_once(log)
            print(f"run {run}: " + ", ".join(f"{k} {v:.2f}" + ("" if k == "cpu s" else " s")
                                             for k, v in times.items()))


if __name__ == "__main__":
    main()
