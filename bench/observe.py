"""Records per second that `garrison observe` and `garrison accesslog` get through on a large
access log, with a selective filter and with none.

Run: .venv/bin/python bench/observe.py [--records 1000000] [--keep PATH]

Writes a log of N records (default 1,000,000) made from the real records of the Star Wars demo
(tests/data/flows/starwars-demo.log: HTTP, gRPC, Kafka and kernel records, ~1 KB a line), one
millisecond apart, then times each command end to end (process start included) with its
output going to /dev/null. References measured in the same run, on the same file: `grep -c`
(reading the bytes, the floor of any line filter) and `jq -c` with the same filter (a C JSON
filter people use on such logs). Prints records per second, CPU seconds and the ratio to jq.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tests" / "data" / "flows" / "starwars-demo.log"
GARRISON = [str(Path(sys.executable).parent / "garrison")]
BASE_S = 1_764_936_000  # 2025-12-05T12:00:00Z


def write_log(path: Path, records: int) -> int:
    templates = [line for line in DEMO.read_bytes().splitlines() if line.startswith(b'{"time":"')]
    size = 0
    with path.open("wb") as out:
        chunk: list[bytes] = []
        for i in range(records):
            line = templates[i % len(templates)]
            ns = BASE_S * 1_000_000_000 + i * 1_000_000
            s, frac = divmod(ns, 1_000_000_000)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:09d}Z"
            chunk.append(line[:9] + stamp.encode() + line[39:] + b"\n")
            if len(chunk) >= 10_000:
                data = b"".join(chunk)
                size += len(data)
                out.write(data)
                chunk.clear()
        data = b"".join(chunk)
        size += len(data)
        out.write(data)
    return size


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # GNU grep stops at the first match when its output is /dev/null: give it a pipe
    out = subprocess.PIPE if cmd[0] == "grep" else subprocess.DEVNULL
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def count(cmd: list[str]) -> int:
    out = subprocess.run(cmd, stdout=subprocess.PIPE, cwd=ROOT, check=True).stdout
    return out.count(b"\n")


SELECTIVE = ["--verdict", "DROPPED", "--to-pod", "deathstar"]
JQ_SELECTIVE = ('select(.verdict == "DROPPED" and '
                '((.destination.pod_name // "") | startswith("deathstar")))')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the log here and keep it")
    args = parser.parse_args()
    jq = shutil.which("jq")
    with tempfile.TemporaryDirectory() as tmp:
        log = args.keep or Path(tmp) / "access.log"
        t0 = time.perf_counter()
        size = write_log(log, args.records)
        print(f"log: {args.records:,} records, {size / 1e6:.0f} MB, written in "
              f"{time.perf_counter() - t0:.1f} s; machine load {os.getloadavg()[0]:.1f}")
        matching = count([*GARRISON, "observe", "--input-file", str(log), "-o", "json",
                          *SELECTIVE])
        print(f"selective filter ({' '.join(SELECTIVE)}) matches {matching:,} records\n")
        runs: list[tuple[str, str, list[str]]] = [
            ("selective", "grep -c (bytes only)", ["grep", "-c", "DROPPED", str(log)]),
            ("selective", "garrison observe -o json",
             [*GARRISON, "observe", "--input-file", str(log), "-o", "json", *SELECTIVE]),
            ("selective", "garrison observe -o compact",
             [*GARRISON, "observe", "--input-file", str(log), *SELECTIVE]),
            ("selective", "garrison accesslog summary",
             [*GARRISON, "accesslog", "summary", "--input-file", str(log), "-o", "json",
              *SELECTIVE]),
            ("none", "garrison observe -o json",
             [*GARRISON, "observe", "--input-file", str(log), "-o", "json"]),
            ("none", "garrison observe -o compact",
             [*GARRISON, "observe", "--input-file", str(log)]),
            ("none", "garrison accesslog export -o csv",
             [*GARRISON, "accesslog", "export", "--input-file", str(log), "-o", "csv"]),
            ("none", "garrison accesslog summary",
             [*GARRISON, "accesslog", "summary", "--input-file", str(log), "-o", "json"]),
        ]
        if jq:
            runs.insert(1, ("selective", "jq -c (reference)", [jq, "-c", JQ_SELECTIVE, str(log)]))
            runs.insert(5, ("none", "jq -c (reference)", [jq, "-c", ".", str(log)]))
        else:
            print("jq not installed (apt-get install jq): no jq reference rows\n")
        reference: dict[str, float] = {}
        print(f"{'filter':<10} {'command':<36} {'wall s':>7} {'cpu s':>7} {'records/s':>11}"
              f" {'vs jq':>7}")
        for what, name, cmd in runs:
            wall, cpu = timed(cmd)
            rate = args.records / wall
            if name.startswith("jq"):
                reference[what] = rate
            ratio = f"{rate / reference[what]:.2f}x" if what in reference else "-"
            print(f"{what:<10} {name:<36} {wall:>7.2f} {cpu:>7.2f} {rate:>11,.0f} {ratio:>7}")


if __name__ == "__main__":
    main()
