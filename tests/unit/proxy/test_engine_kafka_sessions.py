"""Fetch sessions (KIP-227) through the Kafka engine.

kafka-python and the Java client open a fetch session with a full Fetch; their incremental
Fetches then list only the partitions that changed (usually none) and the broker answers for
every partition of the session. A topic the rules stop allowing (a policy reload) must not go
on being fetched through a session, and a client must not read a session it did not open on
its connection. tansu opens no sessions, so the broker's answers here are kafka-python's
encoding of what a Kafka broker sends.
"""

from __future__ import annotations

from typing import Any

from garrison.flows.record import Verdict
from garrison.parsers.kafka import KafkaResponseParser, parse_request_frame
from garrison.parsers.kafka_apis import kafka_api
from garrison.parsers.kafka_rewrite import encode_response
from garrison.policies.l7rules import KafkaRole, KafkaRule
from garrison.proxy.commands import Side
from garrison.proxy.engine_kafka import KafkaEngine
from tests.unit.proxy.test_engine_kafka import NOW, engine, injected, records, rules, written

VERSION = 12  # kafka-python's consumer: names, not ids
SESSION = 424242
CONSUME_ORDERS = rules(KafkaRule(role=KafkaRole.CONSUME, topic="orders"))
CONSUME_OTHER = rules(KafkaRule(role=KafkaRole.CONSUME, topic="other"))


def fetch(correlation_id: int, session_id: int, epoch: int, *topics: str) -> bytes:
    api = kafka_api(1)
    assert api is not None
    topic_cls = api.request_class.fields["topics"].data_class
    partition_cls = api.request_class.fields["topics"].fields["partitions"].data_class
    message = api.request_class[VERSION](
        replica_id=-1, max_wait_ms=500, min_bytes=1, max_bytes=1 << 20, isolation_level=0,
        session_id=session_id, session_epoch=epoch,
        topics=[
            topic_cls(
                topic=topic,
                partitions=[
                    partition_cls(
                        partition=0, current_leader_epoch=-1, fetch_offset=0,
                        last_fetched_epoch=-1, log_start_offset=-1, partition_max_bytes=1 << 20,
                    )
                ],
            )
            for topic in topics
        ],
        forgotten_topics_data=[], rack_id="",
    )
    message.with_header(correlation_id=correlation_id, client_id="consumer")
    return bytes(message.encode(header=True, framed=True))


def answer(correlation_id: int, session_id: int, *topics: str, error: int = 0) -> bytes:
    """The broker's Fetch answer: `session_id` (0: none), records of every topic listed."""
    api = kafka_api(1)
    assert api is not None
    topic_cls = api.response_class.fields["responses"].data_class
    partition_cls = api.response_class.fields["responses"].fields["partitions"].data_class
    message = api.response_class[VERSION](
        throttle_time_ms=0, error_code=error, session_id=session_id,
        responses=[
            topic_cls(
                topic=topic,
                partitions=[
                    partition_cls(
                        partition_index=0, error_code=0, high_watermark=1, last_stable_offset=1,
                        log_start_offset=0, aborted_transactions=[], preferred_read_replica=-1,
                        records=b"",
                    )
                ],
            )
            for topic in topics
        ],
    )
    return encode_response(1, VERSION, correlation_id, message)


def decoded_answer(request: bytes, frame: bytes) -> Any:
    parser = KafkaResponseParser()
    parser.expect(parse_request_frame(request))
    parser.receive_data(frame)
    event = parser.next_event()
    assert event is not None
    return event.decoded


def opened_session(eng: KafkaEngine, *topics: str) -> None:
    """A full Fetch of `topics`, forwarded, and the broker's answer opening SESSION."""
    full = fetch(1, 0, 0, *topics)
    assert written(eng.client_data(full, NOW), Side.UPSTREAM) == full
    assert written(eng.upstream_data(answer(1, SESSION, *topics), NOW), Side.CLIENT)


def test_an_incremental_fetch_of_an_allowed_session_is_forwarded() -> None:
    eng = engine(CONSUME_ORDERS)
    opened_session(eng, "orders")
    incremental = fetch(2, SESSION, 1)
    out = eng.client_data(incremental, NOW)
    assert written(out, Side.UPSTREAM) == incremental
    [record] = records(out)
    assert record.verdict is Verdict.FORWARDED
    assert record.l7 is not None and record.l7.kafka is not None
    assert record.l7.kafka.topics == ("orders",)  # what the session fetches


def test_after_a_reload_denying_the_topic_the_session_fetches_nothing_more() -> None:
    eng = engine(CONSUME_ORDERS)
    opened_session(eng, "orders")
    eng.update_ruleset(CONSUME_OTHER)  # "orders" is no longer allowed
    incremental = fetch(2, SESSION, 1)

    out = eng.client_data(incremental, NOW)

    assert not written(out, Side.UPSTREAM)  # the broker would answer with "orders" records
    denied = decoded_answer(incremental, injected(out))
    assert denied.error_code == 29 and denied.session_id == 0
    request_record = records(out)[0]
    assert request_record.verdict is Verdict.DROPPED
    assert request_record.l7 is not None and request_record.l7.kafka is not None
    assert request_record.l7.kafka.topics == ("orders",)


def test_an_incremental_fetch_adding_a_denied_topic_is_denied_and_leaves_the_session() -> None:
    eng = engine(CONSUME_ORDERS)
    opened_session(eng, "orders")
    adding = fetch(2, SESSION, 1, "secret")
    out = eng.client_data(adding, NOW)
    assert not written(out, Side.UPSTREAM) and injected(out)
    # the session still fetches only "orders": the next incremental Fetch is allowed
    later = fetch(3, SESSION, 1)
    assert written(eng.client_data(later, NOW), Side.UPSTREAM) == later


def test_a_session_not_opened_on_this_connection_is_not_readable() -> None:
    """Another client's session (ids are 31-bit numbers), or one opened before the proxy
    started: garrison cannot know its topics."""
    eng = engine(CONSUME_ORDERS)
    foreign = fetch(1, SESSION, 5)
    out = eng.client_data(foreign, NOW)
    assert not written(out, Side.UPSTREAM)
    assert decoded_answer(foreign, injected(out)).error_code == 29


def test_a_rule_allowing_any_topic_allows_any_session() -> None:
    eng = engine(rules(KafkaRule(role=KafkaRole.CONSUME)))
    foreign = fetch(1, SESSION, 5)
    assert written(eng.client_data(foreign, NOW), Side.UPSTREAM) == foreign


def test_a_full_fetch_closing_the_session_forgets_it() -> None:
    eng = engine(CONSUME_ORDERS)
    opened_session(eng, "orders")
    closing = fetch(2, SESSION, -1, "orders")  # fetch without a session, closing SESSION
    assert written(eng.client_data(closing, NOW), Side.UPSTREAM) == closing
    eng.upstream_data(answer(2, 0, "orders"), NOW)
    stale = fetch(3, SESSION, 1)
    out = eng.client_data(stale, NOW)
    assert not written(out, Side.UPSTREAM) and injected(out)
