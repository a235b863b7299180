"""The in-memory ring: bounded, filtered, safe to read while others write."""

from __future__ import annotations

import threading

import pytest

from garrison.flows.query import CompiledQuery, FlowQuery
from garrison.flows.record import FlowRecord
from garrison.flows.store import FlowStore, StoreConfig
from tests.unit.flows import samples


def q(*flags: tuple[str, str]) -> CompiledQuery:
    return FlowQuery.of((name, value, False) for name, value in flags).compile()


def _all_kinds() -> dict[str, FlowRecord]:
    return {name: make() for name, make in samples.ALL_KINDS.items()}


RECORDS = _all_kinds()


@pytest.fixture
def store() -> FlowStore:
    s = FlowStore(StoreConfig(capacity=100))
    s.extend(RECORDS.values())
    return s


def test_ring_evicts_oldest() -> None:
    store = FlowStore(StoreConfig(capacity=3))
    records = [samples.l3_drop_denied() for _ in range(5)]
    for record in records:
        store.add(record)
    assert len(store) == 3
    assert store.total == 5
    assert [id(r) for r in store] == [id(r) for r in records[2:]]


def test_tail_gives_the_newest_records_oldest_first(store: FlowStore) -> None:
    names = list(RECORDS)
    assert store.tail(2).records == [RECORDS[names[-2]], RECORDS[names[-1]]]
    assert store.tail(0).records == []
    assert store.tail(1000).records == list(RECORDS.values())
    dropped_l3 = store.tail(2, q(("verdict", "DROPPED"), ("protocol", "tcp"), ("protocol", "udp")))
    assert dropped_l3.records == [RECORDS["l3_drop_deny_rule"], RECORDS["l3_verdict_denied_egress"]]


def test_query_limit_takes_the_oldest(store: FlowStore) -> None:
    assert store.query(limit=2) == list(RECORDS.values())[:2]


def test_since_follows_without_gaps_or_repeats() -> None:
    store = FlowStore(StoreConfig(capacity=4))
    a, b, c = (samples.l3_drop_denied() for _ in range(3))
    store.add(a)
    first = store.since(0)
    assert first.records == [a] and first.missed == 0
    store.add(b)
    store.add(c)
    second = store.since(first.cursor)
    assert second.records == [b, c] and second.missed == 0
    for _ in range(6):
        store.add(samples.l3_drop_denied())
    third = store.since(second.cursor)
    assert len(third.records) == 4 and third.missed == 2
    assert store.since(third.cursor).records == []


def test_a_batch_is_numbered_like_records_added_one_by_one() -> None:
    store = FlowStore(StoreConfig(capacity=4))
    a, b, c, d, e = (samples.l3_drop_denied() for _ in range(5))
    store.add(a)
    first = store.since(0)
    store.extend([b, c, d, e])  # a is evicted
    batch = store.since(first.cursor)
    assert batch.records == [b, c, d, e] and batch.missed == 0 and store.total == 5
    assert store.since(0).missed == 1
    store.extend([])
    assert store.since(batch.cursor).records == [] and store.total == 5


def test_tail_returns_the_cursor_after_the_last_records(store: FlowStore) -> None:
    dropped = q(("verdict", "DROPPED"), ("type", "drop"))
    batch = store.tail(1, dropped)
    assert batch.records == [RECORDS["l3_drop_deny_rule"]]
    assert batch.cursor == store.total
    new = samples.l3_drop_denied()
    store.add(new)
    assert store.since(batch.cursor, dropped).records == [new]
    assert store.tail(0).records == []


def test_concurrent_writers_and_readers() -> None:
    store = FlowStore(StoreConfig(capacity=500))
    record = samples.http_request_allowed()
    errors: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        for _ in range(5000):
            store.add(record)

    def read() -> None:
        try:
            while not stop.is_set():
                assert len(store.tail(50).records) <= 50
                assert len(store.query(q(("protocol", "http")))) <= 500
                list(store)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write) for _ in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert store.total == 20000
    assert len(store) == 500


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StoreConfig(capacity=0)
