"""Property tests: whatever bytes arrive, the Kafka parsers raise only KafkaError, keep their
buffers bounded, and a request that does parse can always be denied or is refused cleanly."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from garrison.parsers.kafka import (
    KafkaError,
    KafkaLimits,
    KafkaRequest,
    KafkaRequestParser,
    KafkaResponseParser,
    TopicIdRegistry,
)
from garrison.proxy.deny import kafka_deny_response
from garrison.proxy.deny_kafka_support import KafkaDenyUnencodableError
from tests.unit.parsers.kafka_fixtures import connections, request_frames

LIMIT = 4096
LIMITS = KafkaLimits(max_request_frame=LIMIT, max_response_frame=LIMIT)
REQUEST_FRAMES = [frame for _, _, frame in request_frames()]
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def drain_requests(parser: KafkaRequestParser) -> list[KafkaRequest]:
    found = []
    try:
        while (event := parser.next_event()) is not None:
            found.append(event)
    except KafkaError:
        pass
    assert parser.buffered <= 4 + LIMIT
    return found


@st.composite
def mutated_frame(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(REQUEST_FRAMES)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        at = draw(st.integers(0, len(frame)))
        if kind == "flip" and at < len(frame):
            frame[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and at < len(frame):
            del frame[at : at + draw(st.integers(1, 8))]
        elif kind == "set" and at < len(frame):
            frame[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
    if draw(st.booleans()) and len(frame) >= 4:  # keep the size honest half of the time
        frame[:4] = (len(frame) - 4).to_bytes(4, "big", signed=True)
    return bytes(frame)


@FUZZ
@given(data=st.binary(max_size=2 * LIMIT), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_arbitrary_bytes_raise_only_kafka_errors(data: bytes, cuts: list[int]) -> None:
    parser = KafkaRequestParser(LIMITS)
    for chunk in split(data, cuts):
        parser.receive_data(chunk)
        drain_requests(parser)
    parser.receive_data(b"")
    drain_requests(parser)


@FUZZ
@given(frames=st.lists(mutated_frame(), min_size=1, max_size=4), cuts=st.lists(st.integers()))
def test_mutated_captured_requests_raise_only_kafka_errors(
    frames: list[bytes], cuts: list[int]
) -> None:
    parser = KafkaRequestParser(LIMITS, topic_ids=TopicIdRegistry())
    requests = []
    for chunk in split(b"".join(frames), cuts):
        parser.receive_data(chunk)
        requests += drain_requests(parser)
    for request in requests:
        # Whatever decoded can be answered, or is refused with the one documented error.
        try:
            answer = kafka_deny_response(request)
        except KafkaDenyUnencodableError:
            continue
        expected = request.correlation_id.to_bytes(4, "big", signed=True)
        assert answer is None or answer[4:8] == expected


RESPONSE_STREAMS = [
    (conn, conn.responses_bytes) for conn in connections() if conn.responses and conn.requests
]


@FUZZ
@given(
    which=st.integers(0, len(RESPONSE_STREAMS) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
)
def test_mutated_captured_responses_raise_only_kafka_errors(
    which: int, flips: list[tuple[int, int]], cuts: list[int]
) -> None:
    conn, data = RESPONSE_STREAMS[which]
    requests = KafkaRequestParser()
    requests.receive_data(conn.requests_bytes)
    parser = KafkaResponseParser(KafkaLimits(), topic_ids=TopicIdRegistry())
    for request in requests.events():
        parser.expect(request)
    mutated = bytearray(data)
    for at, bit in flips:
        mutated[at % len(mutated)] ^= 1 << bit
    try:
        for chunk in split(bytes(mutated), cuts):
            parser.receive_data(chunk)
            parser.events()
        parser.receive_data(b"")
        parser.events()
    except KafkaError:
        pass


@pytest.mark.parametrize("frame", REQUEST_FRAMES[:3])
def test_the_mutation_strategy_reaches_the_parser(frame: bytes) -> None:
    parser = KafkaRequestParser(LIMITS)
    parser.receive_data(frame)
    assert len(drain_requests(parser)) == 1
