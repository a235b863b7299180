"""Kafka frames whose lengths or counts no protocol version can carry
(tests/data/kafka/hostile/lengths.json, built and annotated by build.py beside it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

from tests.unit.parsers.kafka_fixtures import DATA


@dataclass(frozen=True)
class HostileFrame:
    name: str
    why: str
    side: str  # "client": a request; "broker": an answer to `request`
    frame: bytes
    error: str  # the KafkaLengthError's message, exactly
    request: bytes = b""


@cache
def hostile_frames() -> tuple[HostileFrame, ...]:
    cases = json.loads((DATA / "hostile" / "lengths.json").read_text())["cases"]
    return tuple(
        HostileFrame(
            name=case["name"],
            why=case["why"],
            side=case["side"],
            frame=bytes.fromhex(case["frame"]),
            error=case["error"],
            request=bytes.fromhex(case.get("request", "")),
        )
        for case in cases
    )


def hostile_requests() -> tuple[HostileFrame, ...]:
    return tuple(case for case in hostile_frames() if case.side == "client")


def hostile_answers() -> tuple[HostileFrame, ...]:
    return tuple(case for case in hostile_frames() if case.side == "broker")
