"""Metadata filtering and broker address rewriting on captured broker answers."""

from __future__ import annotations

import pytest

from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.kafka import KafkaRequestParser, KafkaResponse, KafkaResponseParser
from garrison.parsers.kafka_apis import kafka_api
from garrison.parsers.kafka_rewrite import (
    NODE_ENDPOINTS_SINCE,
    rewrite_broker_addresses,
    rewrite_metadata_response,
)
from tests.unit.parsers.kafka_fixtures import connections


def captured_responses() -> list[KafkaResponse]:
    found = []
    for conn in connections():
        requests = KafkaRequestParser()
        requests.receive_data(conn.requests_bytes)
        responses = KafkaResponseParser()
        for request in requests.events():
            responses.expect(request)
        responses.receive_data(conn.responses_bytes)
        found += responses.events()
    return found


RESPONSES = captured_responses()
ALL_TOPICS = [
    r
    for r in RESPONSES
    if r.request.api_key == 3 and r.request.all_topics and len(r.decoded.topics) >= 2
]
METADATA = [r for r in RESPONSES if r.request.api_key == 3]
COORDINATORS = [r for r in RESPONSES if r.request.api_key == 10]


def decode(response: KafkaResponse, frame: bytes) -> object:
    api = kafka_api(response.request.api_key)
    assert api is not None
    decoded = api.response_class.decode(
        frame, version=response.request.api_version, header=True, framed=True
    )
    assert decoded.header.correlation_id == response.correlation_id
    return decoded


def test_the_fixtures_hold_all_topics_metadata_with_several_topics() -> None:
    assert len(ALL_TOPICS) >= 2
    assert {r.request.api_version for r in COORDINATORS} >= {1, 2, 6}


@pytest.mark.parametrize("response", ALL_TOPICS, ids=lambda r: f"v{r.request.api_version}")
def test_all_topics_metadata_is_filtered_to_the_allowed_topics(response: KafkaResponse) -> None:
    names = [t.name for t in response.decoded.topics]
    keep = names[0]
    frame = rewrite_metadata_response(response, allowed_topics={keep, "not-in-the-answer"})
    filtered = decode(response, frame)
    assert [t.name for t in filtered.topics] == [keep]  # type: ignore[attr-defined]
    assert filtered.brokers == response.decoded.brokers  # type: ignore[attr-defined]
    assert filtered.topics[0] == response.decoded.topics[0]  # type: ignore[attr-defined]
    assert [t.name for t in response.decoded.topics] == names  # the input is left alone
    assert decode(response, rewrite_metadata_response(response, allowed_topics=set())).topics == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("response", METADATA, ids=lambda r: f"v{r.request.api_version}")
def test_unchanged_metadata_reencodes_to_the_captured_bytes(response: KafkaResponse) -> None:
    """Re-encoding with kafka-python is faithful: no rewrite gives the broker's bytes back."""
    assert rewrite_metadata_response(response) == response.raw


def test_broker_addresses_in_metadata_are_rewritten() -> None:
    response = METADATA[0]
    frame = rewrite_broker_addresses(response, lambda node, host, port: ("10.0.0.9", port + 1))
    decoded = decode(response, frame)
    original = response.decoded.brokers
    assert [(b.host, b.port) for b in decoded.brokers] == [  # type: ignore[attr-defined]
        ("10.0.0.9", b.port + 1) for b in original
    ]
    assert decoded.topics == response.decoded.topics  # type: ignore[attr-defined]
    assert response.decoded.brokers[0].host != "10.0.0.9"


@pytest.mark.parametrize("response", COORDINATORS, ids=lambda r: f"v{r.request.api_version}")
def test_coordinator_addresses_are_rewritten(response: KafkaResponse) -> None:
    seen: list[tuple[int, str, int]] = []

    def move(node: int, host: str, port: int) -> tuple[str, int]:
        seen.append((node, host, port))
        return ("proxy.local", 19092)

    decoded = decode(response, rewrite_broker_addresses(response, move))
    if response.request.api_version >= 4:
        assert [(c.host, c.port) for c in decoded.coordinators] == [  # type: ignore[attr-defined]
            ("proxy.local", 19092)
        ] * len(seen)
    else:
        assert (decoded.host, decoded.port) == ("proxy.local", 19092)  # type: ignore[attr-defined]
    assert seen and all(node >= 0 for node, _, _ in seen)


def test_filter_and_rewrite_in_one_pass() -> None:
    response = ALL_TOPICS[0]
    keep = response.decoded.topics[-1].name
    frame = rewrite_metadata_response(
        response, allowed_topics=[keep], address_for=lambda n, h, p: ("proxy", 1)
    )
    decoded = decode(response, frame)
    assert [t.name for t in decoded.topics] == [keep]  # type: ignore[attr-defined]
    assert {(b.host, b.port) for b in decoded.brokers} == {("proxy", 1)}  # type: ignore[attr-defined]


def test_rewriting_another_api_is_a_local_error() -> None:
    produce = next(r for r in RESPONSES if r.request.api_key == 0)
    with pytest.raises(LocalProtocolError):
        rewrite_metadata_response(produce, allowed_topics={"x"})
    commit = next(r for r in RESPONSES if r.request.api_key == 8)
    with pytest.raises(LocalProtocolError):
        rewrite_broker_addresses(commit, lambda n, h, p: (h, p))


def _answered(request_frame: bytes, response_message: object, correlation_id: int) -> KafkaResponse:
    requests = KafkaRequestParser()
    requests.receive_data(request_frame)
    (request,) = requests.events()
    response_message.with_header(correlation_id=correlation_id)  # type: ignore[attr-defined]
    parser = KafkaResponseParser()
    parser.expect(request)
    parser.receive_data(bytes(response_message.encode(header=True, framed=True)))  # type: ignore[attr-defined]
    (response,) = parser.events()
    return response


def test_new_leader_endpoints_in_produce_answers_are_rewritten() -> None:
    """KIP-951: Produce v10+ (and Fetch v16+) answers may name a new leader's address."""
    produce = next(
        (c, f) for c in connections() for f in c.requests if (f.api_key, f.api_version) == (0, 10)
    )
    conn, frame = produce
    api = kafka_api(0)
    assert api is not None
    endpoint = api.response_class.fields["node_endpoints"].data_class
    answer = api.response_class[10](
        responses=[],
        throttle_time_ms=0,
        node_endpoints=[endpoint(node_id=7, host="broker-7.internal", port=9092, rack=None)],
    )
    response = _answered(conn.request_frame(frame), answer, frame.correlation_id)
    rewritten = decode(response, rewrite_broker_addresses(response, lambda n, h, p: ("proxy", 1)))
    assert [(e.node_id, e.host, e.port) for e in rewritten.node_endpoints] == [(7, "proxy", 1)]  # type: ignore[attr-defined]


def test_produce_and_fetch_answers_without_new_leaders_are_left_as_they_are() -> None:
    plain = [r for r in RESPONSES if r.request.api_key in (0, 1)]
    assert plain
    for response in plain:
        assert rewrite_broker_addresses(response, lambda n, h, p: ("proxy", 1)) == response.raw


def test_describe_cluster_brokers_are_rewritten() -> None:
    api = kafka_api(60)
    assert api is not None
    request = api.request_class[0](include_cluster_authorized_operations=False)
    request.with_header(correlation_id=9, client_id="admin")
    broker = api.response_class.fields["brokers"].data_class
    answer = api.response_class[0](
        error_code=0,
        cluster_id="c",
        controller_id=1,
        brokers=[broker(broker_id=1, host="10.1.1.1", port=9092, rack=None)],
    )
    response = _answered(bytes(request.encode(header=True, framed=True)), answer, 9)
    rewritten = decode(response, rewrite_broker_addresses(response, lambda n, h, p: ("proxy", 2)))
    assert [(b.broker_id, b.host, b.port) for b in rewritten.brokers] == [(1, "proxy", 2)]  # type: ignore[attr-defined]


def test_the_versions_with_new_leader_endpoints_are_kafka_pythons() -> None:
    """`carries_broker_addresses` looks for KIP-951's `node_endpoints` only from the version
    whose schema has it (asking an older answer for it raises inside kafka-python)."""
    for api_key, since in NODE_ENDPOINTS_SINCE.items():
        api = kafka_api(api_key)
        assert api is not None
        assert api.response_class.fields["node_endpoints"].min_version == since
