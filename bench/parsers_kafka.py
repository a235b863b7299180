"""Kafka request parsing cost per request, on frames captured from real clients.

Run: .venv/bin/python bench/parsers_kafka.py [--requests N] [--rounds R]

Frames come from tests/data/kafka (scripts/capture_kafka_fixtures.py against tansu):
kafka-python's Produce v9 (one record batch of one record), librdkafka's Produce v10,
kafka-python's Fetch v12 (4 partitions, topic by name) and librdkafka's Fetch v16 (topics by
id, resolved through a TopicIdRegistry). Each frame is repeated N times in one byte stream,
fed in 64 KiB reads, as a proxy reads a busy connection. Timed per request:

- `parse`: framing, request header, the whole body decoded by kafka-python's protocol class
  and the topic names extracted (ids resolved): everything the verdict needs;
- `parse+match`: the same plus `KafkaMatcher.match` against a six-rule topic policy that
  allows the request (the common path);
- `parse+match+deny`: the same plus a deny answer encoded (`kafka_deny_response`), the cost
  of a denied request.

The header-only row (librdkafka's GetTelemetrySubscriptions, which kafka-python has no class
for) is the floor: framing, header and the event, no body decoding.

`results()` is what the aggregate bench file imports; the best of R rounds is reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from garrison.parsers.kafka import KafkaRequestParser, TopicIdRegistry
from garrison.policies.l7rules import KafkaRole, KafkaRule, L7Protocol, L7RuleSet
from garrison.policies.match_kafka import KafkaMatcher
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.proxy.deny import kafka_deny_response
from tests.unit.parsers.kafka_fixtures import connections, scenario_connections

READ_SIZE = 64 * 1024
FRAMES = {
    # name: (scenario, api key, api version)
    "produce v9 (kafka-python)": ("kafka-python-producer", 0, 9),
    "produce v10 (librdkafka)": ("librdkafka-producer", 0, 10),
    "fetch v12 (kafka-python)": ("kafka-python-consumer", 1, 12),
    "fetch v16 by topic id (librdkafka)": ("librdkafka-consumer", 1, 16),
    # No kafka-python class: framing + header only, the floor under any body decoding.
    "header only: telemetry v0 (librdkafka)": ("librdkafka-producer", 71, 0),
}


def captured(scenario: str, api_key: int, api_version: int) -> bytes:
    for conn in scenario_connections(scenario):
        for frame in conn.requests:
            wanted = (frame.api_key, frame.api_version) == (api_key, api_version)
            if wanted and frame.acks != 0:  # a Produce the broker answers
                return conn.request_frame(frame)
    raise LookupError(f"no {api_key} v{api_version} request in {scenario}")


def learnt_registry() -> TopicIdRegistry:
    """Topic ids of the captured topics, as the proxy learns them from Metadata answers."""
    from garrison.parsers.kafka import KafkaResponseParser

    registry = TopicIdRegistry()
    for conn in connections():
        requests = KafkaRequestParser()
        requests.receive_data(conn.requests_bytes)
        responses = KafkaResponseParser(topic_ids=registry, decode_api_keys={3})
        for request in requests.events():
            responses.expect(request)
        responses.receive_data(conn.responses_bytes)
        responses.events()
    return registry


def policy() -> KafkaMatcher:
    """Six topic-bound rules; the captured requests are allowed by the last ones."""
    ref = RuleRef(PolicyKind.CNP, "default", "kafka", "ingress")
    rules = tuple(
        (KafkaRule(role=role, topic=topic), ref)
        for topic in ("audit", "payments", "kp-orders", "rk-orders")
        for role in (KafkaRole.PRODUCE, KafkaRole.CONSUME)
        if topic not in ("audit", "payments") or role is KafkaRole.PRODUCE
    )
    return KafkaMatcher(L7RuleSet(protocol=L7Protocol.KAFKA, rules=rules))


def run(stream: bytes, registry: TopicIdRegistry, mode: str) -> tuple[float, int]:
    """(seconds spent, requests seen) for the whole stream."""
    parser = KafkaRequestParser(topic_ids=registry)
    matcher = policy()
    seen = 0
    clock = time.perf_counter
    t0 = clock()
    for at in range(0, len(stream), READ_SIZE):
        parser.receive_data(stream[at : at + READ_SIZE])
        for request in parser.events():
            seen += 1
            if mode == "parse":
                continue
            verdict = matcher.match(
                request.api_key,
                request.api_version,
                request.client_id,
                request.topics,
                request.all_topics,
                unknown_topics=not request.topics_complete,
            )
            if mode == "parse+match+deny":
                kafka_deny_response(request)
            elif not verdict.allowed and request.api_key != 71:
                raise AssertionError(f"the bench policy denies {request}: {verdict.reason}")
    return clock() - t0, seen


def results(requests: int = 10_000, rounds: int = 3) -> list[dict[str, object]]:
    registry = learnt_registry()
    rows: list[dict[str, object]] = []
    for name, where in FRAMES.items():
        frame = captured(*where)
        stream = frame * requests
        run(frame * 100, registry, "parse+match+deny")  # compile kafka-python's codecs first
        for mode in ("parse", "parse+match", "parse+match+deny"):
            best = float("inf")
            for _ in range(rounds):
                spent, seen = run(stream, registry, mode)
                assert seen == requests
                best = min(best, spent)
            rows.append(
                {
                    "name": f"kafka {name} {len(frame)} B: {mode}",
                    "requests_per_s": round(requests / best),
                    "us_per_request": round(best / requests * 1e6, 2),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for row in results(args.requests, args.rounds):
        print(
            f"{row['name']:<62} {row['requests_per_s']:>9} req/s "
            f"{row['us_per_request']:>8} us/request"
        )


if __name__ == "__main__":
    main()
