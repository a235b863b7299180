"""The Kafka engine driven with captured client and broker bytes (tests/data/kafka).

Each test feeds real frames to `KafkaEngine` and asserts the exact bytes that go to each side
and the flow records that come out: allowed frames unchanged, denied ones answered in order
among the broker's answers, acks=0, Fetch by topic id, Metadata filtering and broker address
rewriting, and every way a connection ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from garrison.flows.record import DropReasonDesc, FlowRecord, L7FlowType, Verdict
from garrison.parsers.kafka import (
    KafkaLimits,
    KafkaRequest,
    KafkaRequestParser,
    KafkaResponse,
    KafkaResponseParser,
    TopicIdRegistry,
)
from garrison.parsers.kafka_apis import kafka_api
from garrison.parsers.kafka_rewrite import rewrite_metadata_response
from garrison.policies.l7rules import KafkaRole, KafkaRule, L7Protocol, L7RuleSet
from garrison.policies.labels import Labels
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.proxy.commands import (
    Close,
    Command,
    ConnectionContext,
    Forward,
    Inject,
    Log,
    PeerInfo,
    Side,
    TrafficDirection,
)
from garrison.proxy.config import ProxyConfig
from garrison.proxy.deny import kafka_deny_response
from garrison.proxy.engine import make_engine
from garrison.proxy.engine_kafka import TOPIC_IDS_KEY, KafkaEngine, shared_topic_ids
from tests.unit.parsers.kafka_fixtures import FixtureConnection, connections, scenario_connections

REF = RuleRef(PolicyKind.CNP, "default", "kafka-acl", "ingress")
CLIENT = PeerInfo(300, Labels.parse("app=empire-hq"), "127.0.0.2", 40000, namespace="default")
BROKER = PeerInfo(256, Labels.parse("app=kafka"), "127.0.0.1", 9092, namespace="default")
ADVERTISE = ("127.0.0.1", 19092)
NOW = 1_700_000_000.0


def ns(seconds: float) -> int:
    """A time as the engine records it (`now` is seconds since the epoch, as a float)."""
    return int(seconds * 1_000_000_000)


def rules(*kafka_rules: KafkaRule) -> L7RuleSet:
    return L7RuleSet(L7Protocol.KAFKA, tuple((rule, REF) for rule in kafka_rules))


ALLOW_ALL = L7RuleSet(L7Protocol.KAFKA, (), allow_all=True, allow_all_ref=REF)


def engine(
    ruleset: L7RuleSet,
    *,
    audit: bool = False,
    advertise: tuple[str, int] | None = None,
    shared: dict[str, object] | None = None,
    limits: KafkaLimits | None = None,
) -> KafkaEngine:
    context = ConnectionContext(
        source=CLIENT,
        destination=BROKER,
        direction=TrafficDirection.INGRESS,
        protocol=L7Protocol.KAFKA,
        ruleset=ruleset,
        audit=audit,
        advertise=advertise,
        shared={} if shared is None else shared,
    )
    config = ProxyConfig(kafka=limits) if limits is not None else ProxyConfig()
    built = make_engine(context, config)
    assert isinstance(built, KafkaEngine)
    return built


def conn(name: str) -> FixtureConnection:
    scenario, _, number = name.partition("/conn")
    return scenario_connections(scenario)[int(number)]


# ---- reading commands -------------------------------------------------------------------------


def written(commands: Iterable[Command], side: Side) -> bytes:
    """Every byte the commands write to `side`, forwarded or injected, in order."""
    return b"".join(c.data for c in commands if isinstance(c, Forward | Inject) and c.side is side)


def injected(commands: Iterable[Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, Inject))


def records(commands: Iterable[Command]) -> list[FlowRecord]:
    return [c.record for c in commands if isinstance(c, Log)]


def closes(commands: Iterable[Command]) -> list[Close]:
    return [c for c in commands if isinstance(c, Close)]


def summary(commands: Iterable[Command]) -> list[tuple[str, str, int | None]]:
    """(REQUEST|RESPONSE|ERROR, verdict, correlation id) per record, in order."""
    found = []
    for record in records(commands):
        kafka = record.l7.kafka if record.l7 is not None else None
        kind = "ERROR" if record.verdict is Verdict.ERROR else record.l7.type.value  # type: ignore[union-attr]
        found.append((kind, record.verdict.value, kafka.correlation_id if kafka else None))
    return found


# ---- fixture frames ---------------------------------------------------------------------------


def request_frames(connection: FixtureConnection, *correlation_ids: int) -> list[bytes]:
    frames = {f.correlation_id: connection.request_frame(f) for f in connection.requests}
    return [frames[c] for c in correlation_ids] if correlation_ids else list(frames.values())


def response_frames(
    connection: FixtureConnection, *correlation_ids: int, hide_telemetry: bool = False
) -> list[bytes]:
    """The broker's answers; `hide_telemetry`: as a client whose rules deny the telemetry APIs
    receives them (ApiVersions without keys 71 and 72, see `without_telemetry`)."""
    frames = {
        f.correlation_id: (
            without_telemetry(connection.response_frame(f), f.api_version)
            if hide_telemetry and f.api_key == 18
            else connection.response_frame(f)
        )
        for f in connection.responses
        if not f.answers_acks_0
    }
    return [frames[c] for c in correlation_ids] if correlation_ids else list(frames.values())


def without_telemetry(frame: bytes, version: int) -> bytes:
    """An ApiVersions answer as a broker with no telemetry receiver sends it (KIP-714): the
    same answer re-encoded by kafka-python without GetTelemetrySubscriptions (71) and
    PushTelemetry (72)."""
    api = kafka_api(18)
    assert api is not None
    decoded = api.response_class.decode(frame, version=version, header=True, framed=True)
    assert {71} <= {k.api_key for k in decoded.api_keys}  # tansu advertises telemetry
    decoded.api_keys = [k for k in decoded.api_keys if k.api_key not in (71, 72)]
    decoded.with_header(correlation_id=decoded.header.correlation_id)
    return bytes(decoded.encode(header=True, framed=True))


def parsed_requests(
    frames: Sequence[bytes], registry: TopicIdRegistry | None = None
) -> list[KafkaRequest]:
    parser = KafkaRequestParser(topic_ids=registry)
    parser.receive_data(b"".join(frames))
    return parser.events()


def parsed_responses(
    requests: Sequence[KafkaRequest], frames: Sequence[bytes]
) -> list[KafkaResponse]:
    parser = KafkaResponseParser()
    for request in requests:
        parser.expect(request)
    parser.receive_data(b"".join(frames))
    return parser.events()


def decode_answer(request: KafkaRequest, frame: bytes) -> Any:
    api = kafka_api(request.api_key)
    assert api is not None
    version = 0 if request.api_key == 18 else request.api_version
    decoded = api.response_class.decode(frame, version=version, header=True, framed=True)
    assert decoded.header.correlation_id == request.correlation_id
    return decoded


def learnt_registry(shared: dict[str, object]) -> TopicIdRegistry:
    """Let one connection see the broker's Metadata answers (librdkafka's, naming both
    topics with their ids), as a real first connection would."""
    first = conn("librdkafka-consumer/conn0")
    eng = engine(ALLOW_ALL, shared=shared)
    eng.client_data(first.requests_bytes, NOW)
    eng.upstream_data(b"".join(response_frames(first)), NOW)
    registry = shared[TOPIC_IDS_KEY]
    assert isinstance(registry, TopicIdRegistry) and len(registry) == 2
    return registry


# ---- allowed traffic passes unchanged ---------------------------------------------------------


@pytest.mark.parametrize("connection", connections(), ids=lambda c: c.name)
def test_allowed_frames_pass_byte_for_byte(connection: FixtureConnection) -> None:
    eng = engine(ALLOW_ALL)
    sent = eng.client_data(connection.requests_bytes, NOW)
    assert written(sent, Side.UPSTREAM) == connection.requests_bytes
    assert not written(sent, Side.CLIENT) and not closes(sent)
    answered = eng.upstream_data(connection.responses_bytes, NOW + 0.002)
    # tansu answers acks=0 Produce requests; Kafka never does and clients expect nothing.
    assert written(answered, Side.CLIENT) == b"".join(response_frames(connection))
    assert not closes(answered) and not injected(answered)
    assert [r.verdict for r in records(sent) + records(answered)] == [Verdict.FORWARDED] * (
        len(connection.requests) + len(response_frames(connection))
    )
    expected = [f.correlation_id for f in connection.requests if f.acks != 0]
    assert [r.l7.kafka.correlation_id for r in records(answered)] == expected  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "name", ["librdkafka-consumer/conn1", "kafka-python-consumer/conn2", "aiokafka/conn1"]
)
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_any_split_of_the_stream_gives_the_same_bytes(name: str, chunk: int) -> None:
    connection = conn(name)
    eng = engine(ALLOW_ALL)
    upstream, client = b"", b""
    data, answers = connection.requests_bytes, connection.responses_bytes
    for at in range(0, len(data), chunk):
        upstream += written(eng.client_data(data[at : at + chunk], NOW), Side.UPSTREAM)
    for at in range(0, len(answers), chunk):
        client += written(eng.upstream_data(answers[at : at + chunk], NOW), Side.CLIENT)
    assert upstream == data
    assert client == b"".join(response_frames(connection))


# ---- denied requests are answered in order ----------------------------------------------------

# Every request kafka-python's producer sends but Produce itself.
NO_PRODUCE = rules(
    KafkaRule(api_key=18), KafkaRule(api_key=22), KafkaRule(api_key=3, topic="kp-orders")
)


def test_denied_requests_wait_for_the_answers_of_allowed_requests_before_them() -> None:
    """kafka-python pipelines ApiVersions, InitProducerId, Metadata and three Produce
    requests; the Produce answers (error 29) come after the broker's three answers. (Every
    denial recorded on its own: the repeats are not aggregated here, see
    test_engine_kafka_noise.py.)"""
    connection = conn("kafka-python-producer/conn1")
    eng = engine(NO_PRODUCE, limits=KafkaLimits(repeat_window=0))
    sent = eng.client_data(connection.requests_bytes, NOW)
    assert written(sent, Side.UPSTREAM) == b"".join(request_frames(connection, 1, 2, 3))
    assert not written(sent, Side.CLIENT)
    assert summary(sent) == [
        ("REQUEST", "FORWARDED", 1),
        ("REQUEST", "FORWARDED", 2),
        ("REQUEST", "FORWARDED", 3),
        ("REQUEST", "DROPPED", 4),
        ("REQUEST", "DROPPED", 5),
        ("REQUEST", "DROPPED", 6),
    ]
    first = eng.upstream_data(b"".join(response_frames(connection, 1, 2)), NOW + 0.001)
    assert written(first, Side.CLIENT) == b"".join(
        response_frames(connection, 1, 2, hide_telemetry=True)
    )
    assert not injected(first)

    last = eng.upstream_data(response_frames(connection, 3)[0], NOW + 0.0625)
    produce = parsed_requests(request_frames(connection, 4, 5, 6))
    answers = [kafka_deny_response(r) for r in produce]
    assert written(last, Side.CLIENT) == response_frames(connection, 3)[0] + b"".join(
        a for a in answers if a is not None
    )
    assert [type(c).__name__ for c in last if not isinstance(c, Log)] == ["Forward", "Inject"]
    for request, answer in zip(produce, answers, strict=True):
        assert answer is not None
        decoded = decode_answer(request, answer)
        assert {p.error_code for t in decoded.responses for p in t.partition_responses} == {29}
    assert summary(last) == [
        ("RESPONSE", "FORWARDED", 3),
        ("RESPONSE", "DROPPED", 4),
        ("RESPONSE", "DROPPED", 5),
        ("RESPONSE", "DROPPED", 6),
    ]
    assert [r.l7.kafka.error_code for r in records(last)] == [0, 29, 29, 29]  # type: ignore[union-attr]
    assert [r.l7.latency_ns for r in records(last)] == [ns(NOW + 0.0625) - ns(NOW)] * 4  # type: ignore[union-attr]


@pytest.mark.parametrize("chunk", [1, 3, 17, 4096])
def test_denied_answers_keep_their_place_however_the_bytes_arrive(chunk: int) -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(NO_PRODUCE)
    data, answers = connection.requests_bytes, b"".join(response_frames(connection, 1, 2, 3))
    upstream = client = b""
    for at in range(0, len(data), chunk):
        upstream += written(eng.client_data(data[at : at + chunk], NOW), Side.UPSTREAM)
    for at in range(0, len(answers), chunk):
        client += written(eng.upstream_data(answers[at : at + chunk], NOW), Side.CLIENT)
    denied = parsed_requests(request_frames(connection, 4, 5, 6))
    assert upstream == b"".join(request_frames(connection, 1, 2, 3))
    proxied = b"".join(response_frames(connection, 1, 2, 3, hide_telemetry=True))
    assert client == proxied + b"".join(kafka_deny_response(r) or b"" for r in denied)


def test_a_denied_request_with_nothing_in_flight_is_answered_at_once() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(NO_PRODUCE)
    frames = request_frames(connection)
    eng.client_data(b"".join(frames[:3]), NOW)
    eng.upstream_data(b"".join(response_frames(connection, 1, 2, 3)), NOW)
    out = eng.client_data(frames[3], NOW + 1)
    (request,) = parsed_requests(frames[3:4])
    assert [c for c in out if not isinstance(c, Log)] == [
        Inject(Side.CLIENT, kafka_deny_response(request) or b"")
    ]
    assert summary(out) == [("REQUEST", "DROPPED", 4), ("RESPONSE", "DROPPED", 4)]
    assert records(out)[1].l7.latency_ns == 0  # type: ignore[union-attr]


def test_denied_requests_between_allowed_ones_keep_their_place() -> None:
    """allowed, denied, allowed, denied: each denied answer goes out right after the answer
    of the allowed request before it, never earlier."""
    connection = conn("kafka-python-producer/conn1")
    api_versions, _, metadata, produce, *_ = request_frames(connection)
    eng = engine(NO_PRODUCE)
    sent = eng.client_data(api_versions + produce + metadata + produce, NOW)
    assert written(sent, Side.UPSTREAM) == api_versions + metadata
    (denied,) = parsed_requests([produce])
    answer = kafka_deny_response(denied) or b""
    r1, r3 = response_frames(connection, 1, 3)
    (proxied,) = response_frames(connection, 1, hide_telemetry=True)
    assert written(eng.upstream_data(r1, NOW), Side.CLIENT) == proxied + answer
    assert written(eng.upstream_data(r3, NOW), Side.CLIENT) == r3 + answer


def test_a_denied_produce_with_acks_0_gets_no_answer() -> None:
    connection = conn("kafka-python-producer/conn3")  # ApiVersions, Produce acks=0
    eng = engine(rules(KafkaRule(api_key=18)))
    sent = eng.client_data(connection.requests_bytes, NOW)
    assert written(sent, Side.UPSTREAM) == request_frames(connection, 1)[0]
    assert summary(sent) == [("REQUEST", "FORWARDED", 1), ("REQUEST", "DROPPED", 2)]
    answered = eng.upstream_data(response_frames(connection, 1)[0], NOW)
    assert written(answered, Side.CLIENT) == response_frames(connection, 1, hide_telemetry=True)[0]
    assert summary(answered) == [("RESPONSE", "FORWARDED", 1)]


def test_the_brokers_answer_to_an_allowed_acks_0_produce_is_not_forwarded() -> None:
    connection = conn("kafka-python-producer/conn3")
    eng = engine(rules(KafkaRule(role=KafkaRole.PRODUCE, topic="kp-orders")))
    assert written(eng.client_data(connection.requests_bytes, NOW), Side.UPSTREAM) == (
        connection.requests_bytes
    )
    answered = eng.upstream_data(connection.responses_bytes, NOW)  # tansu answers acks=0
    assert written(answered, Side.CLIENT) == response_frames(connection, 1, hide_telemetry=True)[0]
    assert summary(answered) == [("RESPONSE", "FORWARDED", 1)]


# ---- topic ids --------------------------------------------------------------------------------

CONSUME_RK = rules(KafkaRule(role=KafkaRole.CONSUME, topic="rk-orders"))


def fetches() -> tuple[FixtureConnection, list[bytes]]:
    connection = conn("librdkafka-consumer/conn1")
    return connection, [connection.request_frame(f) for f in connection.requests if f.api_key == 1]


def test_a_fetch_by_unknown_topic_id_fails_closed() -> None:
    _, frames = fetches()
    eng = engine(CONSUME_RK)
    out = eng.client_data(frames[0], NOW)
    assert not written(out, Side.UPSTREAM)
    (request,) = parsed_requests(frames[:1])
    assert request.unresolved_topic_ids
    answer = injected(out)
    decoded = decode_answer(request, answer)
    assert [p.error_code for t in decoded.responses for p in t.partitions] == [29]
    assert all(p.records == b"" for t in decoded.responses for p in t.partitions)
    request_record = records(out)[0]
    assert request_record.verdict is Verdict.DROPPED
    assert request_record.l7.kafka.topics == (str(request.unresolved_topic_ids[0]),)  # type: ignore[union-attr]


def test_a_fetch_by_topic_id_is_resolved_with_what_other_connections_learnt() -> None:
    _, frames = fetches()
    shared: dict[str, object] = {}
    learnt_registry(shared)
    eng = engine(CONSUME_RK, shared=shared)
    out = eng.client_data(b"".join(frames), NOW)
    assert written(out, Side.UPSTREAM) == b"".join(frames)
    assert {r.l7.kafka.topic for r in records(out)} == {"rk-orders"}  # type: ignore[union-attr]
    assert {r.verdict for r in records(out)} == {Verdict.FORWARDED}


def test_a_fetch_by_topic_id_of_another_topic_is_denied_once_resolved() -> None:
    _, frames = fetches()
    shared: dict[str, object] = {}
    learnt_registry(shared)
    eng = engine(rules(KafkaRule(role=KafkaRole.CONSUME, topic="kp-orders")), shared=shared)
    out = eng.client_data(frames[0], NOW)
    assert not written(out, Side.UPSTREAM) and injected(out)
    assert records(out)[0].l7.kafka.topics == ("rk-orders",)  # type: ignore[union-attr]


def test_the_registry_is_kept_per_upstream_in_the_shared_state() -> None:
    shared: dict[str, object] = {}
    registry = shared_topic_ids(shared)
    assert shared[TOPIC_IDS_KEY] is registry and shared_topic_ids(shared) is registry


# ---- Metadata: filtering and addresses --------------------------------------------------------


def test_an_all_topics_metadata_answer_is_filtered_to_the_allowed_topics() -> None:
    connection = conn("kafka-python-admin/conn1")  # correlation 4: every topic
    eng = engine(rules(KafkaRule(role=KafkaRole.CONSUME, topic="kp-orders")))
    frames = request_frames(connection, 1, 4)
    assert written(eng.client_data(b"".join(frames), NOW), Side.UPSTREAM) == b"".join(frames)
    answers = response_frames(connection, 1, 4)
    out = eng.upstream_data(b"".join(answers), NOW)
    requests = parsed_requests(frames)
    metadata = parsed_responses(requests, answers)[1]
    assert [t.name for t in metadata.decoded.topics] == ["kp-admin", "kp-orders"]
    filtered = rewrite_metadata_response(metadata, allowed_topics={"kp-orders"})
    (proxied,) = response_frames(connection, 1, hide_telemetry=True)
    assert written(out, Side.CLIENT) == proxied + filtered
    assert [t.name for t in decode_answer(requests[1], filtered).topics] == ["kp-orders"]


def test_an_all_topics_metadata_answer_passes_when_any_topic_is_allowed() -> None:
    connection = conn("kafka-python-admin/conn1")
    eng = engine(rules(KafkaRule(role=KafkaRole.CONSUME)))
    eng.client_data(b"".join(request_frames(connection, 1, 4)), NOW)
    answers = b"".join(response_frames(connection, 1, 4))
    proxied = b"".join(response_frames(connection, 1, 4, hide_telemetry=True))
    assert written(eng.upstream_data(answers, NOW), Side.CLIENT) == proxied


def test_a_metadata_answer_lists_only_the_topics_the_request_named() -> None:
    """tansu answers librdkafka's request for no topic with every topic; a client whose
    rules name topics sees only what it asked for, as Kafka answers."""
    connection = conn("librdkafka-consumer/conn0")
    frames = request_frames(connection, 1, 2)
    answers = response_frames(connection, 1, 2)
    eng = engine(CONSUME_RK)
    eng.client_data(b"".join(frames), NOW)
    out = eng.upstream_data(b"".join(answers), NOW)
    metadata = parsed_requests(frames)[1]
    assert metadata.topics == () and not metadata.all_topics
    (proxied,) = response_frames(connection, 1, hide_telemetry=True)
    decoded = decode_answer(metadata, written(out, Side.CLIENT)[len(proxied) :])
    assert decoded.topics == [] and decoded.brokers
    # Rules allowing any topic leave the answer as the broker gave it.
    eng = engine(ALLOW_ALL)
    eng.client_data(b"".join(frames), NOW)
    assert written(eng.upstream_data(b"".join(answers), NOW), Side.CLIENT) == b"".join(answers)


def test_standalone_mode_moves_every_broker_address_to_the_proxy() -> None:
    connection = conn("kafka-python-consumer/conn1")  # FindCoordinator v6, Metadata v12
    eng = engine(ALLOW_ALL, advertise=ADVERTISE)
    eng.client_data(connection.requests_bytes, NOW)
    out = eng.upstream_data(connection.responses_bytes, NOW)
    requests = parsed_requests(request_frames(connection))
    parser = KafkaResponseParser()
    for request in requests:
        parser.expect(request)
    parser.receive_data(written(out, Side.CLIENT))
    seen = parser.events()
    assert [r.correlation_id for r in seen] == [r.correlation_id for r in requests]
    for response in seen:
        if response.request.api_key == 3:
            assert [(b.host, b.port) for b in response.decoded.brokers] == [ADVERTISE]
        if response.request.api_key == 10:
            coordinators = response.decoded.coordinators
            assert [(c.host, c.port) for c in coordinators] == [ADVERTISE]
    untouched = [r for r in seen if r.request.api_key not in (3, 10)]
    assert untouched and all(
        r.raw == connection.response_frame(f)
        for r in untouched
        for f in connection.responses
        if f.correlation_id == r.correlation_id
    )


def test_a_denied_metadata_answer_lists_the_proxy_as_the_broker() -> None:
    shared: dict[str, object] = {}
    learnt_registry(shared)
    connection = conn("kafka-python-producer/conn1")
    (metadata,) = request_frames(connection, 3)  # names kp-orders
    for advertise, expected in ((ADVERTISE, ADVERTISE), (None, None)):
        eng = engine(NO_PRODUCE_RK, advertise=advertise, shared=shared)
        out = eng.client_data(metadata, NOW)
        decoded = decode_answer(parsed_requests([metadata])[0], injected(out))
        assert [t.error_code for t in decoded.topics] == [29]
        brokers = [(b.host, b.port) for b in decoded.brokers]
        if expected is None:  # transparent mode: the broker's own address
            assert brokers and brokers != [ADVERTISE]
        else:
            assert brokers == [expected]


NO_PRODUCE_RK = rules(KafkaRule(role=KafkaRole.PRODUCE, topic="rk-orders"))


# ---- API keys kafka-python cannot decode ------------------------------------------------------


def telemetry() -> bytes:
    (frame,) = request_frames(conn("librdkafka-producer/conn1"), 2)
    return frame


def test_an_unknown_api_key_is_forwarded_by_a_rule_for_any_key() -> None:
    for ruleset in (ALLOW_ALL, rules(KafkaRule())):
        eng = engine(ruleset)
        out = eng.client_data(telemetry(), NOW)
        assert written(out, Side.UPSTREAM) == telemetry()
        assert records(out)[0].l7.kafka.api_key == "gettelemetrysubscriptions"  # type: ignore[union-attr]


def test_an_unknown_api_key_is_denied_by_role_rules_with_a_telemetry_error() -> None:
    eng = engine(rules(KafkaRule(role=KafkaRole.PRODUCE, topic="rk-orders")))
    out = eng.client_data(telemetry(), NOW)
    (request,) = parsed_requests([telemetry()])
    assert not written(out, Side.UPSTREAM)
    assert injected(out) == kafka_deny_response(request)
    assert summary(out) == [("REQUEST", "DROPPED", 2), ("RESPONSE", "DROPPED", 2)]
    assert records(out)[1].l7.kafka.error_code == 31  # type: ignore[union-attr]


def header_only_frame(api_key: int, correlation_id: int) -> bytes:
    body = api_key.to_bytes(2, "big") + b"\x00\x00" + correlation_id.to_bytes(4, "big")
    body += b"\x00\x01x" + b"\x00" * 6
    return len(body).to_bytes(4, "big") + body


def test_a_denied_request_without_possible_answer_closes_after_the_answers_before_it() -> None:
    connection = conn("kafka-python-producer/conn1")
    api_versions, _, metadata, *_ = request_frames(connection)
    eng = engine(NO_PRODUCE)
    sent = eng.client_data(api_versions + header_only_frame(99, 7) + metadata, NOW)
    # Nothing after the unanswerable request is forwarded: the connection is ending.
    assert written(sent, Side.UPSTREAM) == api_versions
    assert summary(sent) == [("REQUEST", "FORWARDED", 1), ("REQUEST", "DROPPED", 7)]
    assert records(sent)[1].l7.kafka.api_key == "99"  # type: ignore[union-attr]
    assert not closes(sent)
    assert eng.client_data(metadata, NOW) == []
    out = eng.upstream_data(response_frames(connection, 1)[0], NOW)
    assert written(out, Side.CLIENT) == response_frames(connection, 1, hide_telemetry=True)[0]
    assert summary(out) == [("RESPONSE", "FORWARDED", 1), ("ERROR", "ERROR", None)]
    error = records(out)[-1]
    assert error.drop_reason_desc is DropReasonDesc.POLICY_DENIED and "99" in error.error
    assert isinstance(out[-1], Close) and out[-1].side is Side.BOTH and out[-1].error
    assert eng.upstream_data(response_frames(connection, 3)[0], NOW) == []


def test_a_denied_request_without_possible_answer_and_nothing_in_flight_closes_at_once() -> None:
    out = engine(NO_PRODUCE).client_data(header_only_frame(99, 7), NOW)
    assert summary(out) == [("REQUEST", "DROPPED", 7), ("ERROR", "ERROR", None)]
    assert closes(out) == [out[-1]] and out[-1].error  # type: ignore[union-attr]


# ---- broken peers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x02\x00\x00",  # shorter than a request header
        b"\xff\xff\xff\xf0",  # negative size
        b"\x00\x00\x00\x0c\x00\x00\x00\x63\x00\x00\x00\x01\xff\xff\x00\x00",  # Produce v99
        b"\x00\x00\x00\x0a\x00\x03\x00\x0c\x00\x00\x00\x01\xff\xff",  # Metadata v12, no body
    ],
)
def test_a_frame_that_cannot_be_parsed_closes_the_connection(garbage: bytes) -> None:
    connection = conn("kafka-python-producer/conn1")
    api_versions = request_frames(connection, 1)[0]
    eng = engine(ALLOW_ALL)
    out = eng.client_data(api_versions + garbage + api_versions, NOW)
    assert written(out, Side.UPSTREAM) == api_versions
    assert summary(out)[-1] == ("ERROR", "ERROR", None)
    assert records(out)[-1].drop_reason_desc is DropReasonDesc.PARSE_ERROR
    assert out[-1] == Close(Side.BOTH, records(out)[-1].error, error=True)
    assert eng.client_data(api_versions, NOW) == []


def test_a_broker_answer_out_of_order_closes_the_connection() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(ALLOW_ALL)
    eng.client_data(b"".join(request_frames(connection, 1, 2)), NOW)
    out = eng.upstream_data(response_frames(connection, 2)[0], NOW)
    assert not written(out, Side.CLIENT)
    assert summary(out) == [("ERROR", "ERROR", None)] and out[-1].error  # type: ignore[union-attr]


def test_too_many_requests_in_flight_close_the_connection() -> None:
    connection = conn("kafka-python-producer/conn1")
    api_versions = request_frames(connection, 1)[0]
    eng = engine(ALLOW_ALL, limits=KafkaLimits(max_in_flight=2))
    out = eng.client_data(api_versions * 3, NOW)
    assert written(out, Side.UPSTREAM) == api_versions * 2
    assert summary(out)[-1] == ("ERROR", "ERROR", None) and closes(out)


# ---- endings ----------------------------------------------------------------------------------


def test_the_broker_closing_with_requests_unanswered_is_an_error() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(ALLOW_ALL)
    eng.client_data(b"".join(request_frames(connection, 1, 2)), NOW)
    eng.upstream_data(response_frames(connection, 1)[0], NOW)
    out = eng.upstream_eof(NOW)
    assert summary(out) == [("ERROR", "ERROR", None)]
    assert records(out)[0].drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
    assert closes(out)[0].error


def test_the_broker_closing_an_idle_connection_is_a_clean_close() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(ALLOW_ALL)
    eng.client_data(request_frames(connection, 1)[0], NOW)
    eng.upstream_data(response_frames(connection, 1)[0], NOW)
    assert eng.upstream_eof(NOW) == [Close(Side.BOTH, "broker closed the connection")]
    assert eng.client_data(request_frames(connection, 2)[0], NOW) == []


def test_a_client_closing_with_answers_pending_gets_them_first() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(NO_PRODUCE)
    frames = request_frames(connection, 1, 4)
    eng.client_data(b"".join(frames), NOW)
    assert eng.client_eof(NOW) == []
    out = eng.upstream_data(response_frames(connection, 1)[0], NOW)
    proxied = response_frames(connection, 1, hide_telemetry=True)[0]
    assert written(out, Side.CLIENT).startswith(proxied)
    assert injected(out) and out[-1] == Close(Side.BOTH, "client closed the connection")


def test_a_client_closing_inside_a_frame_is_a_parse_error() -> None:
    frame = request_frames(conn("kafka-python-producer/conn1"), 1)[0]
    eng = engine(ALLOW_ALL)
    assert eng.client_data(frame[:10], NOW) == []
    out = eng.client_eof(NOW)
    assert summary(out) == [("ERROR", "ERROR", None)] and closes(out)[0].error


def test_abort_logs_an_error_and_closes_everything() -> None:
    eng = engine(ALLOW_ALL)
    out = eng.abort("upstream reply timeout", NOW)
    assert records(out)[0].error == "upstream reply timeout"
    assert records(out)[0].drop_reason_desc is DropReasonDesc.PROXY_ERROR
    assert out[-1] == Close(Side.BOTH, "upstream reply timeout", error=True)
    assert eng.abort("again", NOW) == [] and eng.client_eof(NOW) == []


# ---- audit mode -------------------------------------------------------------------------------


def test_audit_mode_forwards_what_would_be_denied_and_logs_it_as_audit() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(NO_PRODUCE, audit=True)
    sent = eng.client_data(connection.requests_bytes, NOW)
    assert written(sent, Side.UPSTREAM) == connection.requests_bytes
    assert [v for _, v, _ in summary(sent)] == ["FORWARDED"] * 3 + ["AUDIT"] * 3
    answered = eng.upstream_data(connection.responses_bytes, NOW)
    assert written(answered, Side.CLIENT) == connection.responses_bytes
    assert [v for _, v, _ in summary(answered)] == ["FORWARDED"] * 3 + ["AUDIT"] * 3
    audit = records(answered)[-1]
    assert audit.drop_reason_desc is DropReasonDesc.POLICY_DENIED


# ---- records ----------------------------------------------------------------------------------


def test_request_and_response_records_carry_the_kafka_fields() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(rules(KafkaRule(role=KafkaRole.PRODUCE, topic="kp-orders")))
    sent = eng.client_data(b"".join(request_frames(connection, 4)), NOW)
    (request,) = records(sent)
    assert request.verdict is Verdict.FORWARDED and not request.is_reply
    assert request.time == int(NOW * 1e9)
    assert request.l7 is not None and request.l7.type is L7FlowType.REQUEST
    kafka = request.l7.kafka
    assert kafka is not None
    assert (kafka.api_key, kafka.api_version, kafka.correlation_id) == ("produce", 9, 4)
    assert (kafka.topic, kafka.topics, kafka.error_code) == ("kp-orders", ("kp-orders",), None)
    assert (request.source.ip, request.source.port, request.source.identity) == (
        "127.0.0.2",
        40000,
        300,
    )
    assert (request.destination.ip, request.destination.port) == ("127.0.0.1", 9092)
    assert [p.name for p in request.ingress_allowed_by] == ["kafka-acl"]
    assert request.drop_reason_desc is None

    # The Produce answer (correlation 4) is the fourth answer of the capture.
    answered = eng.upstream_data(response_frames(connection, 4)[0], NOW + 0.015625)
    (response,) = records(answered)
    assert response.is_reply and response.source.ip == "127.0.0.1"
    assert response.l7 is not None and response.l7.type is L7FlowType.RESPONSE
    assert response.l7.latency_ns == ns(NOW + 0.015625) - ns(NOW)
    assert response.l7.kafka is not None and response.l7.kafka.error_code == 0
    assert [p.name for p in response.ingress_allowed_by] == ["kafka-acl"]


def test_denied_records_name_no_rule_and_say_policy_denied() -> None:
    connection = conn("kafka-python-producer/conn1")
    eng = engine(NO_PRODUCE)
    out = eng.client_data(request_frames(connection, 4)[0], NOW)
    request, response = records(out)
    for record in (request, response):
        assert record.verdict is Verdict.DROPPED
        assert record.drop_reason_desc is DropReasonDesc.POLICY_DENIED
        assert record.ingress_allowed_by == ()
    assert response.l7.kafka.error_code == 29  # type: ignore[union-attr]
    assert "Kafka request produce correlation id 4 topic 'kp-orders'" in request.summary


# ---- what the server asks ---------------------------------------------------------------------


def test_waiting_tells_the_server_which_timer_applies() -> None:
    connection = conn("kafka-python-producer/conn1")
    frame = request_frames(connection, 1)[0]
    eng = engine(ALLOW_ALL)
    assert eng.waiting == "idle"
    eng.client_data(frame[:7], NOW)
    assert eng.waiting == "head"
    eng.client_data(frame[7:], NOW)
    assert eng.waiting == "upstream"
    eng.upstream_data(response_frames(connection, 1)[0], NOW)
    assert eng.waiting == "idle"


def test_a_new_ruleset_applies_from_the_next_request() -> None:
    connection = conn("kafka-python-producer/conn1")
    produce = request_frames(connection, 4)[0]
    eng = engine(rules(KafkaRule(role=KafkaRole.PRODUCE, topic="kp-orders")))
    assert written(eng.client_data(produce, NOW), Side.UPSTREAM) == produce
    eng.update_ruleset(NO_PRODUCE)
    out = eng.client_data(produce, NOW)
    assert not written(out, Side.UPSTREAM) and not injected(out)  # behind the first answer
    answered = eng.upstream_data(response_frames(connection, 4)[0], NOW)
    assert summary(answered) == [("RESPONSE", "FORWARDED", 4), ("RESPONSE", "DROPPED", 4)]


def test_the_records_error_code_is_the_answers_first_error() -> None:
    """The engine reads Produce and Fetch error codes directly; it must agree with the
    parser's generic reading on every captured answer."""
    from garrison.proxy.engine_kafka import _error_code

    for connection in connections():
        requests = parsed_requests(request_frames(connection))
        parser = KafkaResponseParser()
        for request in requests:
            parser.expect(request)
        parser.receive_data(connection.responses_bytes)
        for response in parser.events():
            assert _error_code(response) == (response.error_code or 0)


# ---- Metadata naming allowed and denied topics ------------------------------------------------


def metadata_for(*topics: str, correlation_id: int = 3) -> bytes:
    """kafka-python's producer Metadata v12 request (as captured) for `topics`."""
    api = kafka_api(3)
    assert api is not None
    entry = api.request_class.fields["topics"].data_class
    message = api.request_class[12](
        topics=[entry(name=name, topic_id=None) for name in topics],
        allow_auto_topic_creation=True,
        include_topic_authorized_operations=False,
    )
    message.with_header(correlation_id=correlation_id, client_id="kafka-python-producer-1")
    return bytes(message.encode(header=True, framed=True))


def test_metadata_for_allowed_and_denied_topics_is_answered_per_topic() -> None:
    """As a broker with ACLs: the allowed topic described by the broker, the other one with
    error 29. Only the allowed topic reaches the broker (a denied one could be created)."""
    connection = conn("kafka-python-producer/conn1")
    (captured,) = request_frames(connection, 3)  # the same request for kp-orders alone
    assert metadata_for("kp-orders") == captured
    eng = engine(rules(KafkaRule(role=KafkaRole.PRODUCE, topic="kp-orders")), advertise=ADVERTISE)
    sent = eng.client_data(metadata_for("secret-plans", "kp-orders"), NOW)
    assert written(sent, Side.UPSTREAM) == captured
    assert [(r.verdict, r.l7.kafka.topics) for r in records(sent)] == [  # type: ignore[union-attr]
        (Verdict.FORWARDED, ("kp-orders",)),
        (Verdict.DROPPED, ("secret-plans",)),
    ]
    (broker_answer,) = response_frames(connection, 3)
    out = eng.upstream_data(broker_answer, NOW)
    (request,) = parsed_requests([metadata_for("secret-plans", "kp-orders")])
    decoded = decode_answer(request, written(out, Side.CLIENT))
    assert [(t.name, t.error_code, len(t.partitions)) for t in decoded.topics] == [
        ("kp-orders", 0, 4),  # the captured answer: four partitions
        ("secret-plans", 29, 0),
    ]
    assert [(b.host, b.port) for b in decoded.brokers] == [ADVERTISE]
    assert [(r.verdict, r.l7.kafka.topics, r.l7.kafka.error_code) for r in records(out)] == [  # type: ignore[union-attr]
        (Verdict.FORWARDED, ("kp-orders",), 0),
        (Verdict.DROPPED, ("secret-plans",), 29),
    ]


def test_metadata_for_denied_topics_only_is_denied_whole() -> None:
    shared: dict[str, object] = {}
    learnt_registry(shared)  # the brokers are known: answered here, nothing forwarded
    eng = engine(rules(KafkaRule(role=KafkaRole.PRODUCE, topic="kp-orders")), shared=shared)
    out = eng.client_data(metadata_for("secret-plans", "other"), NOW)
    assert not written(out, Side.UPSTREAM)
    (request,) = parsed_requests([metadata_for("secret-plans", "other")])
    decoded = decode_answer(request, injected(out))
    assert [(t.name, t.error_code) for t in decoded.topics] == [
        ("secret-plans", 29),
        ("other", 29),
    ]


# ---- hostile bytes ----------------------------------------------------------------------------

STREAMS = [c.requests_bytes for c in connections()]
ANSWERS = [c.responses_bytes for c in connections()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.integers(0, len(STREAMS) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4),
    deny=st.booleans(),
)
def test_corrupted_client_bytes_end_in_forwarded_frames_answers_or_a_close(
    stream: int, flips: list[tuple[int, int]], deny: bool
) -> None:
    """Whatever a client sends, the engine forwards whole frames it parsed, answers, or
    closes with an ERROR record; it never raises."""
    data = bytearray(STREAMS[stream])
    for at, mask in flips:
        data[at % len(data)] ^= mask
    eng = engine(NO_PRODUCE if deny else CONSUME_RK)
    out = eng.client_data(bytes(data), NOW)
    out += eng.upstream_data(ANSWERS[stream], NOW)
    out += eng.client_eof(NOW)
    for command in out:
        assert isinstance(command, Forward | Inject | Log | Close)
    errors = [r for r in records(out) if r.verdict is Verdict.ERROR]
    assert len(errors) <= 1
    if errors:
        assert isinstance(out[-1], Close) and out[-1].error
