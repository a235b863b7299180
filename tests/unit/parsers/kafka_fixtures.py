"""Kafka traffic captured from real clients against tansu (scripts/capture_kafka_fixtures.py).

`tests/data/kafka/index.json` describes every stored stream frame by frame, built by the
capture script with a plain struct reader, independent of garrison's parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "data" / "kafka"


@dataclass(frozen=True)
class IndexedFrame:
    offset: int
    size: int
    sequence: int  # global capture order across the scenario's connections
    api_key: int
    api_version: int
    correlation_id: int
    acks: int | None = None  # Produce requests
    answers_acks_0: bool = False  # a response to a Produce with acks=0 (tansu answers them)


@dataclass(frozen=True)
class FixtureConnection:
    scenario: str
    client: str
    number: int
    topics: tuple[str, ...]
    groups: tuple[str, ...]
    requests_bytes: bytes
    responses_bytes: bytes
    requests: tuple[IndexedFrame, ...]
    responses: tuple[IndexedFrame, ...]
    unanswered: int

    @property
    def name(self) -> str:
        return f"{self.scenario}/conn{self.number}"

    def request_frame(self, frame: IndexedFrame) -> bytes:
        return self.requests_bytes[frame.offset : frame.offset + frame.size]

    def response_frame(self, frame: IndexedFrame) -> bytes:
        return self.responses_bytes[frame.offset : frame.offset + frame.size]


def _frame(entry: dict[str, Any]) -> IndexedFrame:
    return IndexedFrame(
        offset=entry["offset"],
        size=entry["size"],
        sequence=entry["sequence"],
        api_key=entry["api_key"],
        api_version=entry["api_version"],
        correlation_id=entry["correlation_id"],
        acks=entry.get("acks"),
        answers_acks_0=entry.get("answers_acks_0", False),
    )


@cache
def index() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DATA / "index.json").read_text())
    return loaded


@cache
def connections() -> tuple[FixtureConnection, ...]:
    found = []
    for scenario in index()["scenarios"]:
        for number, conn in enumerate(scenario["connections"]):
            found.append(
                FixtureConnection(
                    scenario=scenario["name"],
                    client=scenario["client"],
                    number=number,
                    topics=tuple(scenario["topics"]),
                    groups=tuple(scenario["groups"]),
                    requests_bytes=(DATA / conn["requests_file"]).read_bytes(),
                    responses_bytes=(DATA / conn["responses_file"]).read_bytes(),
                    requests=tuple(_frame(e) for e in conn["requests"]),
                    responses=tuple(_frame(e) for e in conn["responses"]),
                    unanswered=conn["unanswered"],
                )
            )
    return tuple(found)


def scenario_connections(scenario: str) -> tuple[FixtureConnection, ...]:
    return tuple(c for c in connections() if c.scenario == scenario)


def request_frames() -> list[tuple[FixtureConnection, IndexedFrame, bytes]]:
    return [(c, f, c.request_frame(f)) for c in connections() for f in c.requests]
