"""Kafka produce through garrison vs. direct to the broker, measured in one run.

Run: .venv/bin/python bench/proxy_kafka.py [--messages N] [--requests N] [--rounds R]

A tansu broker (tests/kafka_broker.py) and `garrison proxy --protocol kafka` in front of it,
enforcing examples/kafka/kafka_policy.yaml for the producer identity (empire-hq may produce to
empire-announce), writing every flow record to a JSON-lines access log, as deployed. The same
kafka-python producer code runs against the broker directly and through the proxy, rounds
alternating, best round of each kept:

- `batched`: N messages of 100 bytes sent without waiting, then `flush()`: kafka-python packs
  them into record batches (16 KiB, up to 5 requests in flight). Messages per second; the
  ratio garrison / direct is the throughput a producer keeps behind the proxy.
- `one request per message`: each `send()` waited for (`.get()`), so every message is one
  Produce request and one answer, nothing else in flight: the proxy's added time per request
  is (time through garrison - time direct) / requests.

The proxy's CPU time (from /proc/PID/stat) is divided by the Produce requests it handled in
the timed rounds (counted in its access log), as µs of proxy CPU per request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kafka import KafkaProducer  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402

from tests.kafka_broker import LOOPBACK, free_port, running_tansu  # noqa: E402

TOPIC = "empire-announce"
POLICY = ROOT / "examples" / "kafka" / "kafka_policy.yaml"
GARRISON = ROOT / ".venv" / "bin" / "garrison"
PAYLOAD = b"x" * 100
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_proxy(upstream: str, access_log: Path) -> Iterator[tuple[str, int]]:
    """`garrison proxy` in front of `upstream`, every client mapped to empire-hq: yields
    (the proxy's address as HOST:PORT, its PID)."""
    port = free_port()
    command = [
        str(GARRISON),
        "proxy",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--upstream",
        upstream,
        "--protocol",
        "kafka",
        "-f",
        str(POLICY),
        "--dst-labels",
        "app=kafka",
        "--dport",
        "9092",
        "--peer",
        "0.0.0.0/0=app=empire-hq",
        "--access-log",
        str(access_log),
    ]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"garrison proxy exited with {proc.returncode}")
            try:
                socket.create_connection((LOOPBACK, port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"{LOOPBACK}:{port}", proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def producer(bootstrap: str) -> KafkaProducer:
    producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="bench", acks=1)
    producer.send(TOPIC, PAYLOAD).get(timeout=30)  # metadata, connection, warm codecs
    return producer


def batched(bootstrap: str, messages: int) -> float:
    """Seconds to send `messages` and have every one acknowledged."""
    p = producer(bootstrap)
    try:
        start = time.perf_counter()
        for _ in range(messages):
            p.send(TOPIC, PAYLOAD)
        p.flush(timeout=120)
        return time.perf_counter() - start
    finally:
        p.close(timeout=5)


def one_by_one(bootstrap: str, requests: int) -> float:
    """Seconds for `requests` Produce round trips, one message each, one at a time."""
    p = producer(bootstrap)
    try:
        start = time.perf_counter()
        for _ in range(requests):
            p.send(TOPIC, PAYLOAD).get(timeout=30)
        return time.perf_counter() - start
    finally:
        p.close(timeout=5)


def produce_requests(access_log: Path) -> int:
    count = 0
    with access_log.open() as lines:
        for line in lines:
            record = json.loads(line)
            kafka = record.get("l7", {}).get("kafka", {})
            if record["l7"]["type"] == "REQUEST" and kafka.get("api_key") == "produce":
                count += 1
    return count


@dataclass
class Case:
    name: str
    run: Callable[[str], float]
    units: int  # messages (batched) or requests (one by one)
    direct: float = float("inf")
    proxied: float = float("inf")
    proxy_cpu: float = 0.0
    proxy_requests: int = 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="batched case")
    parser.add_argument("--requests", type=int, default=2_000, help="one-by-one case")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = [
        Case("batched", lambda b: batched(b, args.messages), args.messages),
        Case("one request per message", lambda b: one_by_one(b, args.requests), args.requests),
    ]
    with running_tansu() as broker, tempfile.TemporaryDirectory() as tmp:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic(TOPIC, 1, 1)])
        admin.close()
        access_log = Path(tmp) / "access.log"
        with running_proxy(broker.bootstrap, access_log) as (through, pid):
            for case in cases:
                case.run(broker.bootstrap)  # warm-up, not timed
                case.run(through)
                for _ in range(args.rounds):
                    case.direct = min(case.direct, case.run(broker.bootstrap))
                    time.sleep(0.2)  # let the access log catch up before counting
                    before, cpu = produce_requests(access_log), cpu_seconds(pid)
                    elapsed = case.run(through)
                    time.sleep(0.2)
                    case.proxy_cpu += cpu_seconds(pid) - cpu
                    case.proxy_requests += produce_requests(access_log) - before
                    case.proxied = min(case.proxied, elapsed)
    print(
        f"kafka-python {args.messages} x 100 B batched, {args.requests} single requests; "
        f"best of {args.rounds} rounds"
    )
    print(
        f"{'case':<26}{'direct':>14}{'garrison':>14}{'ratio':>8}{'added/req':>12}"
        f"{'proxy CPU/req':>15}"
    )
    for case in cases:
        ratio = case.direct / case.proxied
        cpu = case.proxy_cpu / case.proxy_requests * 1e6 if case.proxy_requests else 0.0
        if case.name == "batched":
            direct = f"{case.units / case.direct:,.0f} msg/s"
            proxied = f"{case.units / case.proxied:,.0f} msg/s"
            added = (case.proxied - case.direct) / max(1, case.proxy_requests // args.rounds)
        else:
            direct = f"{case.direct / case.units * 1e6:,.0f} µs/req"
            proxied = f"{case.proxied / case.units * 1e6:,.0f} µs/req"
            added = (case.proxied - case.direct) / case.units
        print(
            f"{case.name:<26}{direct:>14}{proxied:>14}{ratio:>8.2f}{added * 1e6:>9.0f} µs"
            f"{cpu:>12.0f} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
