"""What real clients do to the access log when they are denied, and what the engine makes of it.

- aiokafka with a denied topic assigned re-sends Metadata without backoff (about 900 a second
  against tansu): repeats of one denial on a connection become one record with Hubble's
  `aggregate` count, the first one recorded at once and in full;
- librdkafka asks for telemetry subscriptions (API key 71) on every connection to a broker
  that advertises them: where the rules do not allow telemetry, the ApiVersions answer does not
  advertise it, as a Kafka broker without a telemetry receiver answers, and nothing is denied;
- a denied Metadata answer must list the brokers, or clients retry instead of reporting the
  error: before any Metadata answer taught the engine the brokers, it asks the broker (for no
  topic) and answers with what the broker said.
"""

from __future__ import annotations

import struct

from garrison.flows.record import Aggregate, DropReasonDesc, FlowRecord, Verdict
from garrison.parsers.kafka import KafkaLimits
from garrison.parsers.kafka_apis import kafka_api
from garrison.policies.l7rules import KafkaRole, KafkaRule
from garrison.proxy.commands import Close, Side
from garrison.proxy.deny import kafka_deny_response
from garrison.proxy.engine_kafka import shared_topic_ids
from tests.unit.proxy.test_engine_kafka import (
    ADVERTISE,
    ALLOW_ALL,
    NOW,
    conn,
    decode_answer,
    engine,
    injected,
    learnt_registry,
    metadata_for,
    ns,
    parsed_requests,
    records,
    request_frames,
    response_frames,
    rules,
    written,
)

PRODUCE_ORDERS = rules(KafkaRule(role=KafkaRole.PRODUCE, topic="kp-orders"))


def flood(count: int, first: int = 100) -> list[bytes]:
    """aiokafka's loop: the same Metadata request for a denied topic, again and again."""
    return [metadata_for("secret-plans", correlation_id=first + n) for n in range(count)]


def kafka_of(record: FlowRecord) -> tuple[str, int | None, tuple[str, ...], int | None]:
    assert record.l7 is not None and record.l7.kafka is not None
    kafka = record.l7.kafka
    return record.l7.type.value, kafka.correlation_id, kafka.topics, kafka.error_code


def known_brokers() -> dict[str, object]:
    shared: dict[str, object] = {}
    learnt_registry(shared)
    return shared


# ---- repeated denials -------------------------------------------------------------------------


def test_a_metadata_flood_is_answered_every_time_and_recorded_once_with_a_count() -> None:
    shared = known_brokers()
    learnt = shared_topic_ids(shared).cluster
    eng = engine(PRODUCE_ORDERS, shared=shared)
    frames = flood(500)
    out = eng.client_data(b"".join(frames), NOW)
    # Every request is answered, in order, exactly as a lone denial would be.
    assert not written(out, Side.UPSTREAM)
    expected = [kafka_deny_response(r, learnt) for r in parsed_requests(frames)]
    assert injected(out) == b"".join(a or b"" for a in expected)
    assert len(_split(injected(out))) == 500
    # The first denial is recorded at once, in full; the 499 repeats are not (yet).
    assert [kafka_of(r) for r in records(out)] == [
        ("REQUEST", 100, ("secret-plans",), None),
        ("RESPONSE", 100, ("secret-plans",), 29),
    ]
    assert all(r.aggregate is None for r in records(out))
    closed = eng.client_eof(NOW + 1)
    request, response = records(closed)
    assert kafka_of(request) == ("REQUEST", 101, ("secret-plans",), None)
    assert kafka_of(response) == ("RESPONSE", 101, ("secret-plans",), 29)
    for record in (request, response):
        assert record.verdict is Verdict.DROPPED
        assert record.drop_reason_desc is DropReasonDesc.POLICY_DENIED
        assert record.aggregate == Aggregate(ingress_flow_count=499)
        assert record.time == ns(NOW)  # the first repeat's time
        assert record.to_dict()["aggregate"] == {"ingress_flow_count": 499}
    assert closed[-1] == Close(Side.BOTH, "client closed the connection")


def _split(data: bytes) -> list[bytes]:
    frames = []
    while data:
        (size,) = struct.unpack_from(">i", data)
        frames.append(data[: 4 + size])
        data = data[4 + size :]
    return frames


def test_repeats_are_recorded_once_per_window_on_the_next_event() -> None:
    eng = engine(PRODUCE_ORDERS, shared=known_brokers(), limits=KafkaLimits(repeat_window=10))
    frames = flood(8)
    first = eng.client_data(frames[0], NOW)
    assert len(records(first)) == 2
    for n, frame in enumerate(frames[1:4], start=1):  # repeats at NOW+1 .. NOW+3
        assert records(eng.client_data(frame, NOW + n)) == []
    # 10 s after the first repeat, the next event (another repeat) records the group first.
    out = eng.client_data(frames[4], NOW + 11)
    (request, response) = records(out)
    assert [kafka_of(r)[1] for r in (request, response)] == [101, 101]
    assert request.aggregate == response.aggregate == Aggregate(ingress_flow_count=3)
    assert request.time == ns(NOW + 1)
    # ... and the repeat that came with it starts the next group.
    assert records(eng.client_data(frames[5], NOW + 12)) == []
    closed = eng.client_eof(NOW + 13)
    assert [(kafka_of(r)[1], r.aggregate) for r in records(closed)] == [
        (104, Aggregate(ingress_flow_count=2)),
        (104, Aggregate(ingress_flow_count=2)),
    ]


def test_different_denials_are_different_groups() -> None:
    eng = engine(PRODUCE_ORDERS, shared=known_brokers())
    frames = [
        metadata_for("secret-plans", correlation_id=1),
        metadata_for("other", correlation_id=2),
        metadata_for("secret-plans", correlation_id=3),
        metadata_for("other", correlation_id=4),
        metadata_for("other", correlation_id=5),
    ]
    out = eng.client_data(b"".join(frames), NOW)
    assert [kafka_of(r)[:3] for r in records(out)] == [
        ("REQUEST", 1, ("secret-plans",)),
        ("RESPONSE", 1, ("secret-plans",)),
        ("REQUEST", 2, ("other",)),
        ("RESPONSE", 2, ("other",)),
    ]
    closed = records(eng.client_eof(NOW))
    assert sorted((kafka_of(r)[:2], r.aggregate) for r in closed) == [  # type: ignore[type-var]
        (("REQUEST", 3), Aggregate(ingress_flow_count=1)),
        (("REQUEST", 4), Aggregate(ingress_flow_count=2)),
        (("RESPONSE", 3), Aggregate(ingress_flow_count=1)),
        (("RESPONSE", 4), Aggregate(ingress_flow_count=2)),
    ]


def test_a_window_of_0_records_every_denial() -> None:
    eng = engine(PRODUCE_ORDERS, shared=known_brokers(), limits=KafkaLimits(repeat_window=0))
    out = eng.client_data(b"".join(flood(5)), NOW)
    assert len(records(out)) == 10 and all(r.aggregate is None for r in records(out))
    assert records(eng.client_eof(NOW)) == []


def test_counted_repeats_are_recorded_before_the_error_that_closes_the_connection() -> None:
    eng = engine(PRODUCE_ORDERS, shared=known_brokers())
    eng.client_data(b"".join(flood(3)), NOW)
    out = eng.client_data(b"\xff\xff\xff\xf0", NOW + 1)  # a negative frame size
    assert [(r.verdict, r.aggregate) for r in records(out)] == [
        (Verdict.DROPPED, Aggregate(ingress_flow_count=2)),
        (Verdict.DROPPED, Aggregate(ingress_flow_count=2)),
        (Verdict.ERROR, None),
    ]
    assert isinstance(out[-1], Close) and out[-1].error


def test_allowed_requests_are_never_aggregated() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(ALLOW_ALL)
    api_versions = request_frames(connection, 1)[0]
    out = eng.client_data(api_versions * 3, NOW)
    assert len(records(out)) == 3 and all(r.aggregate is None for r in records(out))


# ---- telemetry ----------------------------------------------------------------------------------

LIBRDKAFKA = conn("librdkafka-producer/conn1")  # ApiVersions v3, GetTelemetrySubscriptions v0
PRODUCE_RK = rules(KafkaRule(role=KafkaRole.PRODUCE, topic="rk-orders"))


def advertised(frame: bytes, version: int) -> set[int]:
    api = kafka_api(18)
    assert api is not None
    decoded = api.response_class.decode(frame, version=version, header=True, framed=True)
    return {k.api_key for k in decoded.api_keys}


def api_versions_answer(ruleset: object, audit: bool = False) -> bytes:
    eng = engine(ruleset, audit=audit)  # type: ignore[arg-type]
    (request,) = request_frames(LIBRDKAFKA, 1)
    assert written(eng.client_data(request, NOW), Side.UPSTREAM) == request
    out = eng.upstream_data(response_frames(LIBRDKAFKA, 1)[0], NOW)
    assert [r.verdict for r in records(out)] == [Verdict.FORWARDED]
    return written(out, Side.CLIENT)


def test_telemetry_the_rules_deny_is_not_advertised_so_librdkafka_never_asks() -> None:
    (broker,) = response_frames(LIBRDKAFKA, 1)
    assert {71} <= advertised(broker, 3)
    answer = api_versions_answer(PRODUCE_RK)
    assert advertised(answer, 3) == advertised(broker, 3) - {71, 72}
    assert answer == response_frames(LIBRDKAFKA, 1, hide_telemetry=True)[0]


def test_telemetry_the_rules_allow_is_advertised_unchanged() -> None:
    (broker,) = response_frames(LIBRDKAFKA, 1)
    with_telemetry = rules(
        KafkaRule(role=KafkaRole.PRODUCE, topic="rk-orders"),
        KafkaRule(api_key=71),
        KafkaRule(api_key=72),
    )
    assert api_versions_answer(with_telemetry) == broker
    assert api_versions_answer(ALLOW_ALL) == broker
    assert api_versions_answer(PRODUCE_RK, audit=True) == broker


def test_a_client_asking_for_telemetry_anyway_is_still_denied() -> None:
    (telemetry,) = request_frames(LIBRDKAFKA, 2)
    out = engine(PRODUCE_RK).client_data(telemetry, NOW)
    assert not written(out, Side.UPSTREAM) and injected(out)
    assert [r.verdict for r in records(out)] == [Verdict.DROPPED, Verdict.DROPPED]


# ---- the brokers in a denied Metadata answer --------------------------------------------------

NO_TOPIC_ANSWER = conn("kafka-python-producer/conn0")  # Metadata v12 for no topic, answered


def test_before_the_brokers_are_known_a_denied_metadata_asks_the_broker_for_no_topic() -> None:
    eng = engine(PRODUCE_ORDERS)  # a fresh broker registry: no Metadata answer seen yet
    out = eng.client_data(metadata_for("secret-plans", correlation_id=7), NOW)
    # Forwarded for no topic: the denied one never reaches the broker.
    assert written(out, Side.UPSTREAM) == metadata_for(correlation_id=7)
    assert not injected(out)
    assert [(r.verdict, kafka_of(r)) for r in records(out)] == [
        (Verdict.DROPPED, ("REQUEST", 7, ("secret-plans",), None))
    ]
    (answer,) = response_frames(NO_TOPIC_ANSWER, 2)
    answer = answer[:4] + struct.pack(">i", 7) + answer[8:]
    out = eng.upstream_data(answer, NOW + 0.001)
    (request,) = parsed_requests([metadata_for("secret-plans", correlation_id=7)])
    decoded = decode_answer(request, written(out, Side.CLIENT))
    broker = decode_answer(request, answer)
    assert [(t.name, t.error_code) for t in decoded.topics] == [("secret-plans", 29)]
    assert decoded.brokers == broker.brokers and decoded.brokers
    assert decoded.controller_id == broker.controller_id != -1
    assert decoded.cluster_id == broker.cluster_id
    assert [(r.verdict, kafka_of(r)) for r in records(out)] == [
        (Verdict.DROPPED, ("RESPONSE", 7, ("secret-plans",), 29))
    ]


def test_before_the_brokers_are_known_standalone_mode_lists_the_proxy() -> None:
    eng = engine(PRODUCE_ORDERS, advertise=ADVERTISE)
    eng.client_data(metadata_for("secret-plans", correlation_id=7), NOW)
    (answer,) = response_frames(NO_TOPIC_ANSWER, 2)
    out = eng.upstream_data(answer[:4] + struct.pack(">i", 7) + answer[8:], NOW)
    (request,) = parsed_requests([metadata_for("secret-plans", correlation_id=7)])
    decoded = decode_answer(request, written(out, Side.CLIENT))
    assert [(b.host, b.port) for b in decoded.brokers] == [ADVERTISE]


def test_once_the_brokers_are_known_a_denied_metadata_is_answered_here() -> None:
    eng = engine(PRODUCE_ORDERS, shared=known_brokers())
    out = eng.client_data(metadata_for("secret-plans", correlation_id=7), NOW)
    assert not written(out, Side.UPSTREAM)
    (request,) = parsed_requests([metadata_for("secret-plans", correlation_id=7)])
    decoded = decode_answer(request, injected(out))
    assert decoded.brokers and decoded.controller_id != -1


def test_rules_that_deny_metadata_itself_never_send_it_to_the_broker() -> None:
    produce_only = rules(KafkaRule(api_key=0, topic="kp-orders"))
    out = engine(produce_only).client_data(metadata_for("secret-plans"), NOW)
    assert not written(out, Side.UPSTREAM) and injected(out)


def test_repeated_metadata_for_allowed_and_denied_topics_aggregates_only_the_denials() -> None:
    """kafka-python asks for every topic it knows in one Metadata request, again on every
    refresh: the allowed part is forwarded and recorded each time, the denied part once and
    then counted."""
    connection = conn("kafka-python-producer/conn1")
    (answer,) = response_frames(connection, 3)  # the broker's answer for kp-orders
    eng = engine(PRODUCE_ORDERS, shared=known_brokers())
    seen = []
    for n in range(4):
        frame = metadata_for("kp-orders", "secret-plans", correlation_id=3)
        out = eng.client_data(frame, NOW + n)
        assert written(out, Side.UPSTREAM) == metadata_for("kp-orders", correlation_id=3)
        out += eng.upstream_data(answer, NOW + n)
        (request,) = parsed_requests([frame])
        decoded = decode_answer(request, written(out, Side.CLIENT))
        assert [(t.name, t.error_code) for t in decoded.topics] == [
            ("kp-orders", 0),
            ("secret-plans", 29),
        ]
        seen += [(r.verdict, kafka_of(r)[0], kafka_of(r)[2]) for r in records(out)]
    forwarded = (Verdict.FORWARDED, "REQUEST", ("kp-orders",))
    answered = (Verdict.FORWARDED, "RESPONSE", ("kp-orders",))
    assert (
        seen
        == [
            forwarded,
            (Verdict.DROPPED, "REQUEST", ("secret-plans",)),
            answered,
            (Verdict.DROPPED, "RESPONSE", ("secret-plans",)),
        ]
        + [forwarded, answered] * 3
    )
    closed = records(eng.client_eof(NOW + 5))
    assert [(kafka_of(r)[0], kafka_of(r)[2], r.aggregate) for r in closed] == [
        ("REQUEST", ("secret-plans",), Aggregate(ingress_flow_count=3)),
        ("RESPONSE", ("secret-plans",), Aggregate(ingress_flow_count=3)),
    ]
