"""Kafka parser against hostile and broken input: every failure is a typed KafkaError."""

from __future__ import annotations

import struct
import uuid

import pytest

from garrison.parsers.errors import LocalProtocolError, RemoteProtocolError
from garrison.parsers.kafka import (
    KafkaCorrelationError,
    KafkaDecodeError,
    KafkaError,
    KafkaFrameSizeError,
    KafkaLengthError,
    KafkaLimits,
    KafkaRequest,
    KafkaRequestParser,
    KafkaResponseParser,
    KafkaTruncatedError,
    KafkaUnsupportedVersionError,
)
from garrison.parsers.kafka_apis import kafka_api, known_api_keys, request_codec, response_codec
from garrison.parsers.kafka_lengths import RECORDS, FieldPlan
from tests.unit.parsers.kafka_fixtures import connections
from tests.unit.parsers.kafka_hostile_corpus import HostileFrame, hostile_answers, hostile_requests


def request_frame(api_key: int, version: int, correlation_id: int = 7, **fields: object) -> bytes:
    api = kafka_api(api_key)
    assert api is not None
    message = api.request_class[version](**fields)
    message.with_header(correlation_id=correlation_id, client_id="hostile-test")
    return bytes(message.encode(header=True, framed=True))


def produce_frame(correlation_id: int = 7, acks: int = -1, topic: str = "orders") -> bytes:
    produce = kafka_api(0)
    assert produce is not None
    topic_cls = produce.request_class.fields["topic_data"].data_class
    partition_cls = produce.request_class.fields["topic_data"].fields["partition_data"].data_class
    return request_frame(
        0,
        9,
        correlation_id,
        transactional_id=None,
        acks=acks,
        timeout_ms=1000,
        topic_data=[topic_cls(name=topic, partition_data=[partition_cls(index=0, records=b"")])],
    )


def api_versions_frame(correlation_id: int = 1, version: int = 3) -> bytes:
    return request_frame(
        18,
        version,
        correlation_id,
        client_software_name="garrison-test",
        client_software_version="1",
    )


def header_only_frame(api_key: int, version: int, correlation_id: int, body: bytes) -> bytes:
    """A request of a key kafka-python has no class for: header v2 then an opaque body."""
    client_id = b"rdkafka"
    payload = (
        struct.pack(">hhih", api_key, version, correlation_id, len(client_id))
        + client_id
        + b"\x00"
        + body
    )
    return struct.pack(">i", len(payload)) + payload


def feed(data: bytes, limits: KafkaLimits | None = None, eof: bool = True) -> list[KafkaRequest]:
    parser = KafkaRequestParser(limits)
    parser.receive_data(data)
    if eof:
        parser.receive_data(b"")
    return parser.events()


def with_size(frame: bytes, size: int) -> bytes:
    return struct.pack(">i", size) + frame[4:]


# ---- framing --------------------------------------------------------------------------------


def test_kafka_errors_are_remote_protocol_errors() -> None:
    assert issubclass(KafkaError, RemoteProtocolError)


@pytest.mark.parametrize("cut", [1, 3, 4, 10, -1])
def test_a_stream_ending_inside_a_frame_is_truncated(cut: int) -> None:
    frame = produce_frame()
    with pytest.raises(KafkaTruncatedError):
        feed(frame[:cut])


def test_a_partial_frame_waits_for_more_bytes() -> None:
    parser = KafkaRequestParser()
    frame = produce_frame()
    parser.receive_data(frame[:-1])
    assert parser.events() == []
    parser.receive_data(frame[-1:])
    assert [e.raw for e in parser.events()] == [frame]


def test_a_size_bigger_than_the_content_swallows_the_next_frame_and_fails() -> None:
    first, second = produce_frame(1), produce_frame(2)
    lying = with_size(first, len(first) - 4 + 10)  # claims 10 bytes of the next frame
    parser = KafkaRequestParser()
    parser.receive_data(lying + second)
    parser.receive_data(b"")
    # Kafka ignores bytes after a request's last field, so the lying frame itself decodes;
    # what follows is no longer framed right and the stream fails.
    assert parser.next_event() is not None
    with pytest.raises(KafkaError):
        parser.next_event()


def test_a_size_smaller_than_the_content_fails_to_decode() -> None:
    frame = produce_frame()
    with pytest.raises(KafkaDecodeError):
        feed(with_size(frame, len(frame) - 4 - 3)[:-3])


@pytest.mark.parametrize("size", [-1, -(2**31), 0, 3, 9])
def test_negative_or_headerless_sizes_are_rejected(size: int) -> None:
    with pytest.raises(KafkaFrameSizeError):
        feed(struct.pack(">i", size) + bytes(16), eof=False)


def test_an_oversized_frame_is_rejected_from_its_size_alone_and_not_buffered() -> None:
    parser = KafkaRequestParser(KafkaLimits(max_request_frame=1000))
    parser.receive_data(struct.pack(">i", 1001))
    parser.receive_data(bytes(100_000))  # the body never gets buffered
    assert parser.buffered <= 4
    with pytest.raises(KafkaFrameSizeError):
        parser.events()


def test_a_frame_at_the_limit_is_accepted() -> None:
    frame = produce_frame()
    assert len(feed(frame, KafkaLimits(max_request_frame=len(frame) - 4))) == 1
    with pytest.raises(KafkaFrameSizeError):
        feed(frame, KafkaLimits(max_request_frame=len(frame) - 5))


def test_requests_before_a_bad_frame_come_out_first_and_the_error_sticks() -> None:
    good = produce_frame(1)
    parser = KafkaRequestParser()
    parser.receive_data(good + struct.pack(">i", -5) + bytes(8))
    request = parser.next_event()
    assert request is not None and request.correlation_id == 1
    with pytest.raises(KafkaFrameSizeError) as first:
        parser.next_event()
    with pytest.raises(KafkaFrameSizeError) as again:
        parser.events()
    assert again.value is first.value
    parser.receive_data(good)  # ignored: nothing is buffered after a bad frame
    assert parser.buffered <= 4


def test_events_raise_at_a_bad_frame_even_with_good_ones_before_it() -> None:
    with pytest.raises(KafkaFrameSizeError):
        feed(produce_frame(1) + struct.pack(">i", -5))


def test_data_after_end_of_stream_is_a_local_error() -> None:
    parser = KafkaRequestParser()
    parser.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"x")


def test_an_empty_stream_ends_cleanly() -> None:
    parser = KafkaRequestParser()
    parser.receive_data(b"")
    assert parser.events() == [] and parser.next_event() is None


# ---- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_key", "names_no_topic"),
    [(71, True), (72, True), (68, False), (9999, False), (32767, False)],
)
def test_unknown_api_keys_become_header_only_events(api_key: int, names_no_topic: bool) -> None:
    (request,) = feed(header_only_frame(api_key, 0, 42, b"\x00" * 17))
    assert (request.api_key, request.api_version, request.correlation_id) == (api_key, 0, 42)
    assert request.client_id == "rdkafka"
    assert request.decoded is None
    assert request.topics == ()
    assert request.topics_unknown is not names_no_topic
    assert request.topics_complete is names_no_topic


def test_a_negative_api_key_is_rejected() -> None:
    with pytest.raises(KafkaDecodeError):
        feed(header_only_frame(-1, 0, 1, b""))


@pytest.mark.parametrize(("api_key", "version"), [(0, 14), (0, 99), (1, 19), (3, -1), (12, 5)])
def test_known_keys_at_versions_kafka_python_does_not_know_are_rejected(
    api_key: int, version: int
) -> None:
    frame = header_only_frame(api_key, version, 1, b"\x00" * 8)
    with pytest.raises(KafkaUnsupportedVersionError):
        feed(frame)


def test_a_too_new_api_versions_request_is_header_only_as_brokers_expect() -> None:
    """Clients send their newest ApiVersions first; the broker answers UNSUPPORTED_VERSION."""
    (request,) = feed(header_only_frame(18, 9, 5, b"\x0e" + b"x" * 13))
    assert request.api_key == 18 and request.api_version == 9
    assert request.decoded is None and request.topics_complete


def test_api_versions_v3_header_carries_tagged_fields_and_a_classic_client_id() -> None:
    (request,) = feed(api_versions_frame(version=3))
    assert request.client_id == "hostile-test"
    assert request.decoded.client_software_name == "garrison-test"


def test_a_null_client_id_is_none() -> None:
    payload = struct.pack(">hhih", 12, 0, 3, -1) + struct.pack(">h", 1) + b"g"
    payload += struct.pack(">ih", 1, 1) + b"m"
    (request,) = feed(struct.pack(">i", len(payload)) + payload)
    assert request.client_id is None and request.decoded.group_id == "g"


@pytest.mark.parametrize("length", [-2, 200])
def test_client_id_lengths_that_lie_are_rejected(length: int) -> None:
    payload = struct.pack(">hhih", 18, 0, 1, length) + b"abc"
    with pytest.raises(KafkaDecodeError):
        feed(struct.pack(">i", len(payload)) + payload)


def test_a_client_id_that_is_not_utf8_is_rejected() -> None:
    payload = struct.pack(">hhih", 18, 0, 1, 2) + b"\xff\xfe"
    with pytest.raises(KafkaDecodeError):
        feed(struct.pack(">i", len(payload)) + payload)


def test_tagged_fields_running_past_the_frame_are_rejected() -> None:
    frame = api_versions_frame()
    header_end = 4 + 8 + 2 + len("hostile-test")
    broken = frame[:header_end] + b"\x01\x00\x7f" + frame[header_end + 1 :]
    with pytest.raises(KafkaDecodeError):
        feed(with_size(broken, len(broken) - 4))


# ---- bodies ---------------------------------------------------------------------------------


def test_garbage_inside_a_known_request_is_a_decode_error() -> None:
    frame = bytearray(produce_frame())
    topics_at = frame.index(b"\x07orders") - 1  # compact array length of topic_data
    frame[topics_at : topics_at + 1] = b"\xff\xff\xff\xff\x0f"  # ~4 billion topics
    with pytest.raises(KafkaDecodeError):
        feed(with_size(bytes(frame), len(frame) - 4))


def test_a_string_running_past_the_frame_is_a_decode_error() -> None:
    frame = bytearray(produce_frame())
    name_at = frame.index(b"\x07orders")
    frame[name_at] = 0x7F  # a topic name longer than the frame
    with pytest.raises(KafkaDecodeError):
        feed(bytes(frame))


# ---- lengths and counts no protocol version carries (tests/data/kafka/hostile) ----------------


@pytest.mark.parametrize("case", hostile_requests(), ids=lambda case: case.name)
def test_every_hostile_request_is_a_length_error(case: HostileFrame) -> None:
    parser = KafkaRequestParser()
    parser.receive_data(case.frame)
    with pytest.raises(KafkaLengthError) as exc:
        parser.next_event()
    assert str(exc.value) == case.error


@pytest.mark.parametrize("case", hostile_answers(), ids=lambda case: case.name)
def test_every_hostile_answer_is_a_length_error(case: HostileFrame) -> None:
    requests = KafkaRequestParser()
    requests.receive_data(case.request)
    parser = KafkaResponseParser()
    parser.expect(requests.events()[0])
    parser.receive_data(case.frame)
    with pytest.raises(KafkaLengthError) as exc:
        parser.next_event()
    assert str(exc.value) == case.error


def test_the_hostile_corpus_frames_have_honest_sizes() -> None:
    """Each case fails on the length it names, not on its frame size."""
    for case in hostile_requests() + hostile_answers():
        assert struct.unpack_from(">i", case.frame)[0] == len(case.frame) - 4, case.name


def _plans(plan: FieldPlan) -> list[FieldPlan]:
    found = [plan]
    for child in (*plan.fields, *(plan.tagged or {}).values(), plan.element):
        if child is not None:
            found += _plans(child)
    return found


@pytest.mark.parametrize("api_key", sorted(known_api_keys()))
def test_every_version_of_every_api_has_a_length_plan(api_key: int) -> None:
    api = kafka_api(api_key)
    assert api is not None
    for version in range(api.max_version + 1):
        request, response = request_codec(api_key, version), response_codec(api_key, version)
        assert request is not None and response is not None
        # Record batches are checked in requests only: a Fetch answer may end mid-batch.
        assert not any(p.kind == RECORDS for p in _plans(response.plan))
        if api_key == 0:
            assert any(p.kind == RECORDS for p in _plans(request.plan))


def test_every_captured_frame_passes_the_length_checks() -> None:
    for conn in connections():
        requests = KafkaRequestParser()
        requests.receive_data(conn.requests_bytes)
        responses = KafkaResponseParser()
        for request in requests.events():
            responses.expect(request)
        responses.receive_data(conn.responses_bytes)
        assert len(responses.events()) == len(conn.responses)


def test_bytes_after_the_last_field_are_ignored_as_kafka_brokers_do() -> None:
    padded = produce_frame() + b"\x00\x01\x02"
    frame = with_size(padded, len(padded) - 4)
    (request,) = feed(frame)
    assert request.topics == ("orders",) and request.raw == frame


def test_produce_with_acks_0_expects_no_response() -> None:
    (request,) = feed(produce_frame(acks=0))
    assert request.acks == 0 and not request.expects_response


def test_metadata_v0_with_an_empty_list_asks_for_every_topic() -> None:
    (v0,) = feed(request_frame(3, 0, topics=[]))
    (v1,) = feed(request_frame(3, 1, topics=[]))
    (null,) = feed(request_frame(3, 4, topics=None, allow_auto_topic_creation=False))
    assert v0.all_topics and not v1.all_topics and null.all_topics


def test_offset_fetch_for_all_topics_of_a_group_counts_as_unknown_topics() -> None:
    (request,) = feed(request_frame(9, 5, group_id="g", topics=None))
    assert request.topics_unknown and not request.topics_complete


def test_a_metadata_topic_named_and_identified_counts_both() -> None:
    metadata = kafka_api(3)
    assert metadata is not None
    topic_cls = metadata.request_class.fields["topics"].data_class
    topic_id = uuid.uuid4()
    frame = request_frame(
        3,
        12,
        topics=[topic_cls(name="allowed", topic_id=topic_id)],
        allow_auto_topic_creation=False,
        include_topic_authorized_operations=False,
    )
    (request,) = feed(frame)
    assert request.topics == ("allowed",)
    assert request.unresolved_topic_ids == (topic_id,)


# ---- responses ------------------------------------------------------------------------------


def response_frame(correlation_id: int, body: bytes = b"\x00\x00") -> bytes:
    payload = struct.pack(">i", correlation_id) + body
    return struct.pack(">i", len(payload)) + payload


def expecting(*frames: bytes) -> KafkaResponseParser:
    parser = KafkaResponseParser()
    for frame in frames:
        (request,) = feed(frame)
        parser.expect(request)
    return parser


def test_a_response_for_another_correlation_id_is_rejected() -> None:
    parser = expecting(api_versions_frame(1), api_versions_frame(2))
    parser.receive_data(response_frame(2))
    with pytest.raises(KafkaCorrelationError):
        parser.events()


def test_a_response_with_no_request_in_flight_is_rejected() -> None:
    parser = KafkaResponseParser()
    parser.receive_data(response_frame(1))
    with pytest.raises(KafkaCorrelationError):
        parser.events()


def test_an_acks0_produce_answered_after_all_is_matched_and_flagged() -> None:
    parser = expecting(produce_frame(5, acks=0), api_versions_frame(6))
    assert parser.in_flight == 1
    produce = kafka_api(0)
    assert produce is not None
    answer = produce.response_class[9](responses=[], throttle_time_ms=0)
    answer.with_header(correlation_id=5)
    parser.receive_data(bytes(answer.encode(header=True, framed=True)))
    (unsolicited,) = parser.events()
    assert unsolicited.unsolicited and unsolicited.request.acks == 0
    assert parser.in_flight == 1


def test_an_acks0_answer_cannot_jump_ahead_of_a_later_request() -> None:
    parser = expecting(api_versions_frame(4), produce_frame(5, acks=0))
    parser.receive_data(response_frame(5))
    with pytest.raises(KafkaCorrelationError):
        parser.events()


def test_a_response_that_does_not_decode_is_rejected() -> None:
    parser = expecting(produce_frame(5))
    parser.receive_data(response_frame(5, b"\x05garbage"))
    with pytest.raises(KafkaDecodeError):
        parser.events()


def test_undecoded_apis_pass_through_without_decoding() -> None:
    parser = KafkaResponseParser(decode_api_keys={3})
    (request,) = feed(produce_frame(5))
    parser.expect(request)
    parser.receive_data(response_frame(5, b"garbage"))
    (response,) = parser.events()
    assert response.decoded is None and response.error_code is None


def test_responses_to_header_only_requests_are_not_decoded() -> None:
    parser = KafkaResponseParser()
    (request,) = feed(header_only_frame(71, 0, 9, bytes(16) + b"\x00"))
    parser.expect(request)
    parser.receive_data(response_frame(9, b"anything"))
    (response,) = parser.events()
    assert response.decoded is None and response.request is request


def test_an_unsupported_version_answer_to_a_too_new_api_versions_is_decoded_as_v0() -> None:
    parser = KafkaResponseParser()
    (request,) = feed(header_only_frame(18, 9, 3, b""))
    parser.expect(request)
    body = struct.pack(">hi", 35, 1) + struct.pack(">hhh", 18, 0, 4)  # UNSUPPORTED_VERSION
    parser.receive_data(response_frame(3, body))
    (response,) = parser.events()
    assert response.error_code == 35 and response.decoded.api_keys[0].max_version == 4


def test_too_many_requests_in_flight_is_an_error() -> None:
    parser = KafkaResponseParser(KafkaLimits(max_in_flight=2))
    for correlation_id in (1, 2):
        (request,) = feed(api_versions_frame(correlation_id))
        parser.expect(request)
    (third,) = feed(api_versions_frame(3))
    with pytest.raises(KafkaError):
        parser.expect(third)


def test_a_response_frame_too_short_for_a_correlation_id_is_rejected() -> None:
    parser = expecting(api_versions_frame(1))
    parser.receive_data(struct.pack(">i", 2) + b"\x00\x00")
    with pytest.raises(KafkaFrameSizeError):
        parser.events()


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KafkaLimits(max_request_frame=0)
    with pytest.raises(ValueError):
        KafkaLimits(max_unanswered_acks0=-1)


# ---- what one request may cost to decode ------------------------------------------------------


def tiny_topics_produce(entries: int, correlation_id: int = 7) -> bytes:
    """Produce v9 naming topic "a" `entries` times, 4 bytes each (name, no partitions)."""
    count = entries + 1  # compact array count
    varint = b""
    while True:
        byte, count = count & 0x7F, count >> 7
        varint += bytes([byte | (0x80 if count else 0)])
        if not count:
            break
    body = b"\x00" + struct.pack(">hi", -1, 1000) + varint + b"\x02a\x01\x00" * entries + b"\x00"
    header = struct.pack(">hhih", 0, 9, correlation_id, 2) + b"hk" + b"\x00"
    return struct.pack(">i", len(header) + len(body)) + header + body


def test_a_request_holding_more_elements_than_the_limit_is_a_length_error() -> None:
    limits = KafkaLimits(max_request_elements=1000)
    assert feed(tiny_topics_produce(1000), limits)[0].topics == ("a",)
    with pytest.raises(KafkaLengthError, match="more than 1000 array elements"):
        feed(tiny_topics_produce(1001), limits)


def test_record_batches_count_towards_the_element_limit() -> None:
    from kafka.record.memory_records import MemoryRecordsBuilder

    batches = b""
    for _ in range(3):
        builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20)
        builder.append(timestamp=None, key=None, value=b"v", headers=[])
        builder.close()
        batches += bytes(builder.buffer())
    produce = kafka_api(0)
    assert produce is not None
    topic_cls = produce.request_class.fields["topic_data"].data_class
    partition_cls = produce.request_class.fields["topic_data"].fields["partition_data"].data_class
    frame = request_frame(
        0, 9, 7, transactional_id=None, acks=-1, timeout_ms=1000,
        topic_data=[topic_cls(name="t", partition_data=[partition_cls(index=0, records=batches)])],
    )
    # one topic + one partition + three batches
    assert feed(frame, KafkaLimits(max_request_elements=5))
    with pytest.raises(KafkaLengthError, match="records: more than 4 array elements"):
        feed(frame, KafkaLimits(max_request_elements=4))


def test_the_default_element_limit_refuses_a_frame_of_millions_of_tiny_entries() -> None:
    """A 3.8 MiB Produce of a million 4-byte topic entries took seconds of CPU to decode
    (a 100 MiB one minutes), stalling every other connection of the worker."""
    with pytest.raises(KafkaLengthError, match="array elements"):
        feed(tiny_topics_produce(1_000_000))
