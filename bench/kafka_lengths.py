"""What checking every Kafka length and count costs, against kafka-python's own decode.

Run: .venv/bin/python bench/kafka_lengths.py [--requests N] [--rounds R]

Frames captured from real clients (tests/data/kafka). Per request body, in process: the
length checks alone (`garrison.parsers.kafka_lengths.check_message`, run before every decode
since issue 17) and kafka-python's compiled decode alone. CPU time (`time.process_time_ns`),
best of R rounds of N calls, so other load on the machine inflates it less than wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from garrison.parsers.kafka_apis import request_codec  # noqa: E402
from garrison.parsers.kafka_lengths import check_message  # noqa: E402
from tests.unit.parsers.kafka_fixtures import scenario_connections  # noqa: E402

CASES = [
    ("Produce v9 (kafka-python)", "kafka-python-producer", 1, 0, 9),
    ("Produce v10 (librdkafka)", "librdkafka-producer", 1, 0, 10),
    ("Fetch v12 (kafka-python, 4 partitions)", "kafka-python-consumer", 1, 1, 12),
    ("Fetch v16 by topic id (librdkafka)", "librdkafka-consumer", 1, 1, 16),
]


def body_of(scenario: str, number: int, api_key: int) -> memoryview:
    conn = scenario_connections(scenario)[number]
    frame = next(conn.request_frame(f) for f in conn.requests if f.api_key == api_key)
    client_id = int.from_bytes(frame[12:14], "big")
    return memoryview(frame)[14 + client_id + 1 :]  # flexible: header v2 ends with a 0 byte


def best_us(call: Callable[[], object], requests: int, rounds: int) -> float:
    timings = []
    for _ in range(rounds):
        start = time.process_time_ns()
        for _ in range(requests):
            call()
        timings.append((time.process_time_ns() - start) / requests / 1000)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print("| request | kafka-python decode µs | length checks µs | ratio |")
    print("|---|---|---|---|")
    for name, scenario, number, api_key, version in CASES:
        codec = request_codec(api_key, version)
        assert codec is not None and codec.flexible
        body = body_of(scenario, number, api_key)
        decode = best_us(partial(codec.decode_from, body, 0), args.requests, args.rounds)
        check = best_us(partial(check_message, codec.plan, body), args.requests, args.rounds)
        print(f"| {name} | {decode:.2f} | {check:.2f} | {check / decode:.2f} |")


if __name__ == "__main__":
    main()
