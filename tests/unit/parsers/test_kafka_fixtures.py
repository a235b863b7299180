"""Kafka parser against traffic captured from kafka-python, librdkafka and aiokafka."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from garrison.parsers.kafka import (
    KafkaLimits,
    KafkaRequest,
    KafkaRequestParser,
    KafkaResponse,
    KafkaResponseParser,
    TopicIdRegistry,
)
from garrison.parsers.kafka_apis import kafka_api
from tests.unit.parsers.kafka_fixtures import (
    FixtureConnection,
    connections,
    index,
    scenario_connections,
)

CONNECTIONS = connections()
IDS = [c.name for c in CONNECTIONS]

# APIs whose requests name the scenario's topics, and group/cluster APIs that name none.
TOPIC_APIS = {0, 1, 2, 8, 9, 19, 20}
TOPICLESS_APIS = {10, 11, 12, 13, 14, 15, 16, 18, 22}
GET_TELEMETRY_SUBSCRIPTIONS = 71


def learnt_registry(scenario: str) -> TopicIdRegistry:
    """A registry that has seen every response of the scenario (ids of all its topics)."""
    registry = TopicIdRegistry()
    for conn in scenario_connections(scenario):
        responses = KafkaResponseParser(topic_ids=registry)
        for request in parse_requests(conn, TopicIdRegistry()):
            responses.expect(request)
        responses.receive_data(conn.responses_bytes)
        responses.events()
    return registry


def parse_requests(
    conn: FixtureConnection, registry: TopicIdRegistry, chunks: Iterable[bytes] | None = None
) -> list[KafkaRequest]:
    parser = KafkaRequestParser(topic_ids=registry)
    events: list[KafkaRequest] = []
    for chunk in chunks if chunks is not None else [conn.requests_bytes]:
        parser.receive_data(chunk)
        events.extend(parser.events())
    parser.receive_data(b"")
    assert parser.events() == []
    assert parser.buffered == 0
    return events


def parse_responses(
    conn: FixtureConnection, requests: list[KafkaRequest], chunks: Iterable[bytes] | None = None
) -> list[KafkaResponse]:
    parser = KafkaResponseParser()
    for request in requests:
        parser.expect(request)
    events: list[KafkaResponse] = []
    for chunk in chunks if chunks is not None else [conn.responses_bytes]:
        parser.receive_data(chunk)
        events.extend(parser.events())
    parser.receive_data(b"")
    assert parser.events() == []
    assert parser.in_flight == conn.unanswered
    return events


def test_fixtures_cover_the_clients_and_apis_the_proxy_must_handle() -> None:
    seen = {(c.client, f.api_key, f.api_version) for c in CONNECTIONS for f in c.requests}
    clients = {client for client, _, _ in seen}
    assert clients == {"kafka-python", "confluent-kafka", "aiokafka"}
    keys = {key for _, key, _ in seen}
    assert {0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 22} <= keys
    assert ("confluent-kafka", GET_TELEMETRY_SUBSCRIPTIONS, 0) in seen  # no kafka-python class
    assert any(c == "confluent-kafka" and k == 1 and v >= 13 for c, k, v in seen)  # by topic id
    assert any(f.acks == 0 for c in CONNECTIONS for f in c.requests)
    assert set(index()["clients"]) == clients


@pytest.mark.parametrize("conn", CONNECTIONS, ids=IDS)
def test_every_captured_request_decodes_and_names_the_scenario_topics(
    conn: FixtureConnection,
) -> None:
    registry = learnt_registry(conn.scenario)
    events = parse_requests(conn, registry)
    assert len(events) == len(conn.requests)
    for event, frame in zip(events, conn.requests, strict=True):
        assert (event.api_key, event.api_version, event.correlation_id) == (
            frame.api_key,
            frame.api_version,
            frame.correlation_id,
        )
        assert event.raw == conn.request_frame(frame)
        assert event.client_id
        if kafka_api(event.api_key) is None:
            assert event.api_key == GET_TELEMETRY_SUBSCRIPTIONS
            assert event.decoded is None and not event.topics_unknown  # known to name no topic
            continue
        assert event.decoded is not None
        assert event.topics_complete
        assert event.acks == frame.acks
        if event.api_key in TOPIC_APIS:
            assert event.topics == conn.topics, event
        elif event.api_key in TOPICLESS_APIS:
            assert event.topics == ()
        elif event.api_key == 3:  # Metadata: brokers only, the scenario's topics, or all
            assert set(event.topics) <= set(conn.topics)
            assert not (event.all_topics and event.topics)


@pytest.mark.parametrize(
    "scenario", ["kafka-python-consumer", "kafka-python-admin", "librdkafka-consumer"]
)
def test_all_topics_metadata_is_flagged(scenario: str) -> None:
    flagged = [
        event
        for conn in scenario_connections(scenario)
        for event in parse_requests(conn, TopicIdRegistry())
        if event.all_topics
    ]
    assert flagged and all(e.api_key == 3 and e.decoded.topics is None for e in flagged)


def test_fetch_by_topic_id_resolves_once_metadata_has_been_seen() -> None:
    """librdkafka's Fetch v13+ names topics by id only. Replayed in capture order across the
    scenario's connections with one registry, every Fetch resolves; before any Metadata answer
    the same frames stay unresolved (and incomplete, so the matcher fails closed)."""
    conns = scenario_connections("librdkafka-consumer")
    registry = TopicIdRegistry()
    parsers = {c.number: KafkaRequestParser(topic_ids=registry) for c in conns}
    responses = {c.number: KafkaResponseParser(topic_ids=registry) for c in conns}
    timeline = sorted(
        [(f.sequence, 0, c, f) for c in conns for f in c.requests]
        + [(f.sequence, 1, c, f) for c in conns for f in c.responses],
        key=lambda item: (item[0], item[1]),
    )
    fetches = []
    for _, direction, conn, frame in timeline:
        if direction == 0:
            parsers[conn.number].receive_data(conn.request_frame(frame))
            (request,) = parsers[conn.number].events()
            responses[conn.number].expect(request)
            if request.api_key == 1:
                fetches.append(request)
        else:
            responses[conn.number].receive_data(conn.response_frame(frame))
            assert len(responses[conn.number].events()) == 1
    assert fetches and all(f.api_version >= 13 for f in fetches)
    for fetch in fetches:
        assert fetch.topics == ("rk-orders",) and fetch.topics_complete
        assert fetch.decoded.topics[0].topic_id is not None
        cold = KafkaRequestParser(topic_ids=TopicIdRegistry())
        cold.receive_data(fetch.raw)
        (unresolved,) = cold.events()
        assert unresolved.topics == ()
        assert unresolved.unresolved_topic_ids == (fetch.decoded.topics[0].topic_id,)
        assert not unresolved.topics_complete
    assert registry.cluster is not None and registry.cluster.brokers


@pytest.mark.parametrize("conn", CONNECTIONS, ids=IDS)
def test_every_captured_response_matches_its_request_and_decodes(conn: FixtureConnection) -> None:
    requests = parse_requests(conn, learnt_registry(conn.scenario))
    events = parse_responses(conn, requests)
    assert len(events) == len(conn.responses)
    for event, frame in zip(events, conn.responses, strict=True):
        assert event.correlation_id == frame.correlation_id == event.request.correlation_id
        assert event.request.api_key == frame.api_key
        assert event.raw == conn.response_frame(frame)
        assert event.unsolicited == frame.answers_acks_0
        if kafka_api(frame.api_key) is None:
            assert event.decoded is None
        else:
            assert event.decoded is not None


def test_the_acks0_answer_of_tansu_is_matched_not_an_error() -> None:
    unsolicited = [
        response
        for conn in CONNECTIONS
        for response in parse_responses(conn, parse_requests(conn, TopicIdRegistry()))
        if response.unsolicited
    ]
    assert len(unsolicited) == 1 and unsolicited[0].request.acks == 0


def _split_everywhere(data: bytes) -> Iterable[list[bytes]]:
    for cut in range(1, len(data)):  # b"" would mean end of stream
        yield [data[:cut], data[cut:]]


@pytest.mark.parametrize("conn", CONNECTIONS, ids=IDS)
def test_requests_split_anywhere_give_the_same_events(conn: FixtureConnection) -> None:
    registry = learnt_registry(conn.scenario)
    whole = parse_requests(conn, registry)
    data = conn.requests_bytes
    assert parse_requests(conn, registry, [data[i : i + 1] for i in range(len(data))]) == whole
    for chunks in _split_everywhere(data):
        assert parse_requests(conn, registry, chunks) == whole


@pytest.mark.parametrize("conn", CONNECTIONS, ids=IDS)
def test_responses_split_anywhere_give_the_same_events(conn: FixtureConnection) -> None:
    requests = parse_requests(conn, learnt_registry(conn.scenario))
    whole = parse_responses(conn, requests)
    data = conn.responses_bytes
    one_by_one = parse_responses(conn, requests, [data[i : i + 1] for i in range(len(data))])
    assert one_by_one == whole
    for chunks in _split_everywhere(data):
        assert parse_responses(conn, requests, chunks) == whole


def test_the_smallest_frame_limit_that_fits_the_fixtures_accepts_them() -> None:
    largest = max(f.size for c in CONNECTIONS for f in c.requests)
    conn = next(c for c in CONNECTIONS if any(f.size == largest for f in c.requests))
    parser = KafkaRequestParser(KafkaLimits(max_request_frame=largest - 4))
    parser.receive_data(conn.requests_bytes)
    assert len(parser.events()) == len(conn.requests)


@pytest.mark.parametrize("conn", CONNECTIONS, ids=IDS)
def test_one_frame_per_read_gives_the_same_events(conn: FixtureConnection) -> None:
    """A read that is exactly one frame is handed out without buffering (a client waiting for
    each answer): the same events as the stream read at once, and the same bytes."""
    registry = learnt_registry(conn.scenario)
    frames = [conn.request_frame(f) for f in conn.requests]
    requests = parse_requests(conn, registry, frames)
    assert requests == parse_requests(conn, registry)
    assert [r.raw for r in requests] == frames
    answers = [conn.response_frame(f) for f in conn.responses]
    assert parse_responses(conn, requests, answers) == parse_responses(conn, requests)


def test_a_whole_frame_not_yet_read_stays_ahead_of_what_comes_after_it() -> None:
    conn = next(c for c in CONNECTIONS if len(c.requests) >= 3)
    first, second, third = (conn.request_frame(f) for f in conn.requests[:3])
    parser = KafkaRequestParser(topic_ids=learnt_registry(conn.scenario))
    parser.receive_data(first)  # whole: kept as it came
    parser.receive_data(second[:5])  # more before the first was read
    assert parser.buffered == len(first) + 5
    parser.receive_data(second[5:] + third)
    assert [r.raw for r in parser.events()] == [first, second, third]
    assert parser.buffered == 0
