"""Property tests: whatever bytes arrive, the Kafka parsers raise only KafkaError, keep their
buffers bounded, and a request that does parse can always be denied or is refused cleanly."""

from __future__ import annotations

import itertools
import struct
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from garrison.parsers.kafka import (
    KafkaError,
    KafkaLengthError,
    KafkaLimits,
    KafkaRequest,
    KafkaRequestParser,
    KafkaResponseParser,
    TopicIdRegistry,
)
from garrison.parsers.kafka_apis import kafka_api, known_api_keys, request_codec, response_codec
from garrison.parsers.kafka_lengths import check_message
from garrison.proxy.deny import KafkaDenyUnencodableError, kafka_deny_response
from tests.unit.parsers.kafka_fixtures import connections, request_frames
from tests.unit.parsers.kafka_hostile_corpus import hostile_requests

LIMIT = 4096
LIMITS = KafkaLimits(max_request_frame=LIMIT, max_response_frame=LIMIT)
REQUEST_FRAMES = [frame for _, _, frame in request_frames()]
# Seeds: captured frames and the hostile corpus (lengths no protocol version carries).
SEEDS = REQUEST_FRAMES + [case.frame for case in hostile_requests()]
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
    frame = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "set", "length", "varint"]))
        at = draw(st.integers(0, len(frame)))
        if kind == "length":  # a length or count no reader accepts, or one past the end
            width = draw(st.sampled_from([2, 4]))
            limit = 2 ** (8 * width - 1)
            value = draw(st.sampled_from([-limit, -2, limit - 1]) | st.integers(-limit, -2))
            frame[at : at + width] = value.to_bytes(width, "big", signed=True)
        elif kind == "varint":  # over-long or overflowing unsigned varints
            frame[at : at + 1] = draw(
                st.sampled_from([b"\xff\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x80\x01", b"\x00"])
            )
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
# found by this test: a byte that is not UTF-8 in a response's string (the compiled parser
# raised TypeError instead of its decode error)
@example(which=16, flips=[(854929, 7)], cuts=[])
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


# ---- every count the protocol cannot carry, in generated requests ------------------------------

PRODUCE = kafka_api(0)
assert PRODUCE is not None
TOPIC = PRODUCE.request_class.fields["topic_data"].data_class
PARTITION = PRODUCE.request_class.fields["topic_data"].fields["partition_data"].data_class
NAMES = st.text("abcdefghijklmnopqrstuvwxyz._-", min_size=3, max_size=40)


def produce(version: int, names: list[str]) -> bytes:
    message = PRODUCE.request_class[version](
        transactional_id=None,
        acks=-1,
        timeout_ms=1000,
        topic_data=[TOPIC(name=n, partition_data=[PARTITION(index=0, records=b"")]) for n in names],
    )
    message.with_header(correlation_id=1, client_id="fuzz")
    return bytes(message.encode(header=True, framed=True))


def name_at(frame: bytes, name: str, flexible: bool) -> int:
    prefix = bytes([len(name) + 1]) if flexible else struct.pack(">h", len(name))
    return frame.index(prefix + name.encode())


@FUZZ
@given(
    version=st.integers(3, 12),
    names=st.lists(NAMES, min_size=1, max_size=4, unique=True),
    count=st.integers(-(2**31), -2) | st.integers(2**20, 2**31 - 1),
)
def test_a_produce_topic_count_no_reader_accepts_is_always_a_length_error(
    version: int, names: list[str], count: int
) -> None:
    """Int32 counts (v3-v8) below -1 or larger than the frame, compact ones (v9+) that are
    null or overflow: the parser never reads them as an empty or short topic list."""
    flexible = version >= 9
    frame = produce(version, names)
    at = name_at(frame, names[0], flexible)
    if flexible:  # a compact count: N + 1 as an unsigned varint (there is no negative one)
        width, encoded = 1, _uvarint(count + 1 if count >= 0 else 2**32 + count + 1)
    else:
        width, encoded = 4, count.to_bytes(4, "big", signed=True)
    at -= width
    body = frame[4:at] + encoded + frame[at + width :]
    parser = KafkaRequestParser()
    parser.receive_data(len(body).to_bytes(4, "big") + body)
    with pytest.raises(KafkaLengthError):
        parser.next_event()


@FUZZ
@given(
    version=st.integers(3, 12),
    names=st.lists(NAMES, min_size=1, max_size=3, unique=True),
    which=st.integers(0, 2),
    length=st.integers(-(2**15), -2) | st.integers(1000, 2**15 - 1),
)
def test_a_produce_topic_name_length_no_reader_accepts_is_always_a_length_error(
    version: int, names: list[str], which: int, length: int
) -> None:
    flexible = version >= 9
    frame = produce(version, names)
    name = names[which % len(names)]
    at = name_at(frame, name, flexible)
    if flexible:
        width, encoded = 1, _uvarint(length + 1 if length >= 0 else 2**32 + length + 1)
    else:
        width, encoded = 2, length.to_bytes(2, "big", signed=True)
    body = frame[4:at] + encoded + frame[at + width :]
    parser = KafkaRequestParser()
    parser.receive_data(len(body).to_bytes(4, "big") + body)
    with pytest.raises(KafkaLengthError):
        parser.next_event()


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ---- whatever the schema allows passes the length checks ---------------------------------------

# One record batch as aiokafka sends it (Produce v7 captured against tansu).
_AIOKAFKA_PRODUCE = next(
    conn.request_frame(f)
    for conn in connections()
    if conn.name == "aiokafka/conn1"
    for f in conn.requests
    if f.api_key == 0
)
BATCH = _AIOKAFKA_PRODUCE[-77:]
assert BATCH[16] == 2  # magic v2
_INTS = {"int8": 7, "int16": 15, "uint16": 16, "int32": 31, "int64": 63}


def _value(draw: st.DrawFn, field: object, version: int, in_array: bool = False) -> object:
    """A value of a kafka-python schema field, as any client could send it."""
    f: Any = field
    nullable = not in_array and f.nullable_for_version_q(version)
    if nullable and draw(st.integers(0, 4)) == 0:
        return None
    if f.is_struct_array():
        count = draw(st.integers(0, 2))
        return [_struct(draw, f.array_of, version) for _ in range(count)]
    if f.is_array():
        count = draw(st.integers(0, 3))
        return [_value(draw, f.array_of, version, in_array=True) for _ in range(count)]
    if f.is_struct():
        return _struct(draw, f, version)
    kind = f.type_str
    if kind in _INTS:
        bits = _INTS[kind]
        low = 0 if kind == "uint16" else -(2**bits)
        return draw(st.integers(low, 2**bits - 1))
    if kind == "bool":
        return draw(st.booleans())
    if kind == "float64":
        return draw(st.floats(allow_nan=False))
    if kind == "uuid":
        return uuid.UUID(int=draw(st.integers(1, 2**128 - 1)))
    if kind == "string":
        return draw(st.text(max_size=12))
    if kind == "records":
        return draw(st.sampled_from([b"", BATCH, BATCH + BATCH]))
    if kind == "bytes":
        return draw(st.binary(max_size=12))
    if kind == "bitfield":
        return draw(st.sets(st.integers(0, 30), max_size=3))
    raise AssertionError(f"no strategy for {kind}")


def _struct(draw: st.DrawFn, struct_field: Any, version: int) -> object:
    values = {
        f.name: _value(draw, f, version)
        for f in struct_field.fields.values()
        if f.for_version_q(version)
    }
    return struct_field.data_class(**values)


MESSAGES = [
    (key, version, request)
    for key in sorted(known_api_keys())
    for version in range(kafka_api(key).max_version + 1)  # type: ignore[union-attr]
    for request in (True, False)
]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(MESSAGES), data=st.data())
def test_every_message_the_schema_allows_passes_the_length_checks(
    which: tuple[int, int, bool], data: st.DataObject
) -> None:
    """No false alarm: any message kafka-python encodes from values its schema allows (nulls
    where nullable, any counts, tagged fields, real record batches) passes, and the checks end
    exactly where the message does. The checks must never refuse a client's honest request."""
    key, version, request = which
    api = kafka_api(key)
    assert api is not None
    cls = (api.request_class if request else api.response_class)[version]
    fields = {
        f.name: _value(data.draw, f, version)
        for f in cls.fields.values()
        if f.for_version_q(version)
    }
    body = memoryview(bytes(cls(**fields).encode(header=False, framed=False)))
    codec = request_codec(key, version) if request else response_codec(key, version)
    assert codec is not None
    assert check_message(codec.plan, body) == len(body)
    codec.decode(body)
