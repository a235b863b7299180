"""Lengths and counts the Kafka protocol cannot carry, through the whole engine.

A Produce whose topic array count was 0x80000000 used to decode as "no topics", be allowed on
its API key alone and reach the broker with its record batch. Each shape here must end the
connection with exactly one ERROR record (PARSE_ERROR) and a Close, and forward nothing.
"""

from __future__ import annotations

import struct
import uuid

import pytest

from garrison.flows.build import proxy_error
from garrison.flows.record import DropReasonDesc, Verdict
from garrison.flows.record import TrafficDirection as FlowDirection
from garrison.parsers.kafka_apis import kafka_api
from garrison.policies.l7rules import KafkaRole, KafkaRule, L7Protocol
from garrison.proxy.commands import Close, Log, Side, flow_endpoint
from tests.unit.parsers.kafka_hostile_corpus import HostileFrame, hostile_answers, hostile_requests
from tests.unit.proxy.test_engine_kafka import (
    ALLOW_ALL,
    BROKER,
    CLIENT,
    NOW,
    conn,
    engine,
    ns,
    records,
    request_frames,
    rules,
    written,
)

# aiokafka's producer: ApiVersions v0, Metadata v5, Produce v7 for topic "aio-orders".
AIOKAFKA = conn("aiokafka/conn1")
OTHER_TOPIC_ONLY = rules(KafkaRule(role=KafkaRole.PRODUCE, topic="other"))


def produce_frame() -> bytes:
    (frame,) = [AIOKAFKA.request_frame(f) for f in AIOKAFKA.requests if f.api_key == 0][:1]
    return frame


def topic_count_offset(frame: bytes) -> int:
    """Where a Produce v3-v8 frame holds its topic array count."""
    (client_id_len,) = struct.unpack_from(">h", frame, 12)
    pos = 14 + max(client_id_len, 0)
    (transactional_id_len,) = struct.unpack_from(">h", frame, pos)
    return pos + 2 + max(transactional_id_len, 0) + 2 + 4  # + acks + timeout


def with_topic_count(frame: bytes, count: int) -> bytes:
    at = topic_count_offset(frame)
    return frame[:at] + struct.pack(">I", count) + frame[at + 4 :]


def error_close(text: str) -> list[object]:
    record = proxy_error(
        time_ns=ns(NOW),
        direction=FlowDirection.INGRESS,
        client=flow_endpoint(CLIENT),
        server=flow_endpoint(BROKER),
        protocol=L7Protocol.KAFKA,
        error=text,
        reason=DropReasonDesc.PARSE_ERROR,
    )
    return [Log(record), Close(Side.BOTH, text, error=True)]


def test_the_captured_produce_is_for_a_topic_the_rules_deny() -> None:
    """The fixture the tests below corrupt: as captured, it is denied, never forwarded."""
    frame = produce_frame()
    assert struct.unpack_from(">i", frame, topic_count_offset(frame))[0] == 1
    out = engine(OTHER_TOPIC_ONLY).client_data(frame, NOW)
    assert not written(out, Side.UPSTREAM) and written(out, Side.CLIENT)


@pytest.mark.parametrize(
    ("count", "error"),
    [
        (0x80000000, "topic_data: length -2147483648 is negative (only -1 means null)"),
        (0xFFFFFFFE, "topic_data: length -2 is negative (only -1 means null)"),
        (0xFFFFFFFF, "topic_data: null where the schema allows none"),
    ],
)
def test_a_produce_with_a_topic_count_no_protocol_carries_is_closed_unforwarded(
    count: int, error: str
) -> None:
    frame = with_topic_count(produce_frame(), count)
    out = engine(OTHER_TOPIC_ONLY).client_data(frame, NOW)
    assert out == error_close(f"client sent a bad Kafka frame: ProduceRequest v7: {error}")


def test_a_topic_count_larger_than_the_frame_could_hold_is_closed_unforwarded() -> None:
    frame = with_topic_count(produce_frame(), 0x7FFFFFFF)
    left = len(frame) - topic_count_offset(frame) - 4
    out = engine(OTHER_TOPIC_ONLY).client_data(frame, NOW)
    assert out == error_close(
        "client sent a bad Kafka frame: ProduceRequest v7: topic_data: "
        f"2147483647 elements cannot fit in the {left} bytes left"
    )


def test_requests_before_the_bad_frame_are_forwarded_and_nothing_after_it() -> None:
    api_versions, metadata = request_frames(AIOKAFKA, 1, 2)
    bad = with_topic_count(produce_frame(), 0x80000000)
    eng = engine(OTHER_TOPIC_ONLY)
    out = eng.client_data(api_versions + bad + api_versions, NOW)
    assert written(out, Side.UPSTREAM) == api_versions
    assert isinstance(out[-1], Close) and out[-1].error
    assert eng.client_data(metadata, NOW) == []


@pytest.mark.parametrize("case", hostile_requests(), ids=lambda case: case.name)
def test_every_hostile_request_closes_the_connection_and_forwards_nothing(
    case: HostileFrame,
) -> None:
    out = engine(ALLOW_ALL).client_data(case.frame, NOW)
    assert out == error_close(f"client sent a bad Kafka frame: {case.error}")


@pytest.mark.parametrize("case", hostile_answers(), ids=lambda case: case.name)
def test_every_hostile_answer_closes_the_connection_and_reaches_no_client(
    case: HostileFrame,
) -> None:
    eng = engine(ALLOW_ALL)
    assert written(eng.client_data(case.request, NOW), Side.UPSTREAM) == case.request
    out = eng.upstream_data(case.frame, NOW)
    assert out == error_close(f"broker sent a bad Kafka frame: {case.error}")


# ---- an entry naming no topic at all ---------------------------------------------------------


def zero_id_produce() -> bytes:
    """Produce v13 names topics by id only; the all-zero id is "no id" (kafka-python: None)."""
    api = kafka_api(0)
    assert api is not None
    topic = api.request_class.fields["topic_data"].data_class
    partition = api.request_class.fields["topic_data"].fields["partition_data"].data_class
    message = api.request_class[13](
        transactional_id=None,
        acks=-1,
        timeout_ms=1000,
        topic_data=[topic(topic_id=uuid.UUID(int=0), partition_data=[partition(index=0)])],
    )
    message.with_header(correlation_id=3, client_id="zero-id")
    return bytes(message.encode(header=True, framed=True))


def test_a_produce_entry_with_neither_name_nor_id_is_denied_not_read_as_no_topic() -> None:
    out = engine(OTHER_TOPIC_ONLY).client_data(zero_id_produce(), NOW)
    assert not written(out, Side.UPSTREAM)
    assert [r.verdict for r in records(out)] == [Verdict.DROPPED, Verdict.DROPPED]
    assert records(out)[1].l7.kafka.error_code == 29  # type: ignore[union-attr]


def test_a_rule_for_any_topic_still_allows_it() -> None:
    frame = zero_id_produce()
    out = engine(rules(KafkaRule(role=KafkaRole.PRODUCE))).client_data(frame, NOW)
    assert written(out, Side.UPSTREAM) == frame
