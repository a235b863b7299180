"""ApiVersions answers through the Kafka engine: a broker newer than garrison's parser.

A client uses the newest version of each API that it and the broker both support. A known API
at a version kafka-python cannot decode closes the connection (a parse error), so a broker
advertising such versions (a Kafka release newer than the installed kafka-python) would get
every client disconnected as soon as it used them. The engine passes on the versions garrison
reads instead, as an older broker would advertise them.
"""

from __future__ import annotations

from typing import Any

from garrison.parsers.kafka import KafkaResponseParser, parse_request_frame
from garrison.parsers.kafka_apis import kafka_api
from garrison.parsers.kafka_rewrite import encode_response
from garrison.policies.l7rules import KafkaRule
from garrison.proxy.commands import Close, Side
from garrison.proxy.engine_kafka import KafkaEngine
from tests.unit.proxy.test_engine_kafka import NOW, engine, rules, written

FETCH_MAX = kafka_api(1).max_version  # type: ignore[union-attr]
METADATA_MAX = kafka_api(3).max_version  # type: ignore[union-attr]
NO_CLASS = 68  # ConsumerGroupHeartbeat: kafka-python has no class, decided on its header


def api_versions_request(correlation_id: int = 1) -> bytes:
    api = kafka_api(18)
    assert api is not None
    message = api.request_class[3](client_software_name="c", client_software_version="1")
    message.with_header(correlation_id=correlation_id, client_id="client")
    return bytes(message.encode(header=True, framed=True))


def api_versions_answer(correlation_id: int, *versions: tuple[int, int, int]) -> bytes:
    api = kafka_api(18)
    assert api is not None
    entry = api.response_class.fields["api_keys"].data_class
    message = api.response_class[3](
        error_code=0,
        api_keys=[entry(api_key=k, min_version=lo, max_version=hi) for k, lo, hi in versions],
        throttle_time_ms=0,
    )
    return encode_response(18, 3, correlation_id, message)


def advertised(request: bytes, answer: bytes) -> dict[int, tuple[int, int]]:
    parser = KafkaResponseParser()
    parser.expect(parse_request_frame(request))
    parser.receive_data(answer)
    event = parser.next_event()
    assert event is not None
    decoded: Any = event.decoded
    return {e.api_key: (e.min_version, e.max_version) for e in decoded.api_keys}


def through(eng: KafkaEngine, *versions: tuple[int, int, int]) -> dict[int, tuple[int, int]]:
    request = api_versions_request()
    assert written(eng.client_data(request, NOW), Side.UPSTREAM) == request
    answer = written(eng.upstream_data(api_versions_answer(1, *versions), NOW), Side.CLIENT)
    return advertised(request, answer)


def fetch_request(version: int, correlation_id: int = 2) -> bytes:
    api = kafka_api(1)
    assert api is not None
    message = api.request_class[version](
        replica_id=-1, max_wait_ms=1, min_bytes=1, max_bytes=1, isolation_level=0,
        session_id=0, session_epoch=-1, topics=[], forgotten_topics_data=[], rack_id="",
    )
    message.with_header(correlation_id=correlation_id, client_id="client")
    return bytes(message.encode(header=True, framed=True))


def test_versions_newer_than_garrison_reads_are_advertised_as_the_newest_it_reads() -> None:
    eng = engine(rules(KafkaRule()))
    seen = through(
        eng,
        (1, 0, FETCH_MAX + 5),  # a newer Kafka's Fetch
        (3, METADATA_MAX + 1, METADATA_MAX + 2),  # only versions garrison cannot read
        (18, 0, 3),
        (NO_CLASS, 0, 1),
    )
    assert seen == {1: (0, FETCH_MAX), 18: (0, 3), NO_CLASS: (0, 1)}
    # the client's newest Fetch is one garrison reads: forwarded, not a parse error
    newest = fetch_request(FETCH_MAX)
    out = eng.client_data(newest, NOW)
    assert written(out, Side.UPSTREAM) == newest
    assert not [c for c in out if isinstance(c, Close)]


def test_an_answer_garrison_reads_whole_is_passed_on_unchanged() -> None:
    eng = engine(rules(KafkaRule()))
    request = api_versions_request()
    eng.client_data(request, NOW)
    answer = api_versions_answer(1, (1, 0, FETCH_MAX), (18, 0, 3))
    assert written(eng.upstream_data(answer, NOW), Side.CLIENT) == answer
