"""The in-memory ring: bounded, filtered, safe to read while others write."""

from __future__ import annotations

import threading

import pytest

from garrison.flows.record import FlowRecord, FlowType, TrafficDirection, Verdict
from garrison.flows.store import (
    FilterError,
    FlowFilter,
    FlowStore,
    LabelSelector,
    StoreConfig,
)
from garrison.policies.labels import parse_label
from tests.unit.flows import samples


def _all_kinds() -> dict[str, FlowRecord]:
    return {name: make() for name, make in samples.ALL_KINDS.items()}


def _names(store: FlowStore, flt: FlowFilter) -> set[str]:
    by_id = {id(record): name for name, record in RECORDS.items()}
    return {by_id[id(record)] for record in store.query(flt)}


RECORDS = _all_kinds()


@pytest.fixture
def store() -> FlowStore:
    s = FlowStore(StoreConfig(capacity=100))
    s.extend(RECORDS.values())
    return s


L7_DROPPED = {
    "http_request_denied",
    "kafka_request_denied",
    "kafka_response_denied",
    "grpc_response_denied",
}


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (FlowFilter.build(verdicts=["dropped"], types=["L7"]), L7_DROPPED),
        (FlowFilter.build(verdicts=["ERROR"]), {"proxy_parse_error"}),
        (FlowFilter.build(protocols=["kafka"]), {
            "kafka_request_denied", "kafka_response_denied", "kafka_request_many_topics",
            "proxy_parse_error",
        }),
        (FlowFilter.build(protocols=["grpc"]), {"grpc_request_allowed", "grpc_response_denied"}),
        (FlowFilter.build(protocols=["l3"], verdicts=["DROPPED"]), {
            "l3_drop_denied", "l3_drop_deny_rule", "l3_verdict_denied_egress",
        }),
        (FlowFilter.build(directions=["egress"]), {"l3_verdict_denied_egress"}),
        (FlowFilter.build(namespaces=["kafka"]), {
            "kafka_request_denied", "kafka_response_denied", "kafka_request_many_topics",
            "proxy_parse_error",
        }),
        (FlowFilter.build(pods=["default/door"]), {"grpc_request_allowed", "grpc_response_denied"}),
        (FlowFilter.build(pods=["kafka/door"]), set()),
        (FlowFilter.build(pods=["kafka-"]), {
            "kafka_request_denied", "kafka_response_denied", "kafka_request_many_topics",
            "proxy_parse_error",
        }),
        (FlowFilter.build(identities=[2]), {"l3_verdict_denied_egress"}),
        (FlowFilter.build(labels=["class=xwing"], verdicts=["DROPPED"]), {
            "kafka_request_denied", "kafka_response_denied", "grpc_response_denied",
            "l3_drop_denied", "l3_drop_deny_rule", "l3_verdict_denied_egress",
        }),
        # a selector must hold on one endpoint: xwing is never a deathstar
        (FlowFilter.build(labels=["class=xwing,class=deathstar"]), set()),
        # several selectors: either
        (FlowFilter.build(labels=["app=door-manager", "reserved:world"]), {
            "grpc_request_allowed", "grpc_response_denied", "l3_verdict_denied_egress",
        }),
        (FlowFilter.build(labels=["k8s:app"], protocols=["http"]), set()),
        (FlowFilter.build(labels=["reserved:app=kafka"]), set()),
    ],
)  # fmt: skip
def test_filters(store: FlowStore, flt: FlowFilter, expected: set[str]) -> None:
    assert _names(store, flt) == expected


def test_time_bounds_are_inclusive(store: FlowStore) -> None:
    t = samples.T0
    later = {"http_response_allowed", "kafka_response_denied", "grpc_response_denied"}
    assert _names(store, FlowFilter(since_ns=t + 1)) == later
    assert _names(store, FlowFilter(until_ns=t)) == set(RECORDS) - later
    assert _names(store, FlowFilter(since_ns=t + 2_500_000, until_ns=t + 2_500_000)) == {
        "http_response_allowed"
    }


def test_empty_filter_matches_all(store: FlowStore) -> None:
    assert store.query() == list(RECORDS.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"verdicts": ["MAYBE"]},
        {"types": ["L9"]},
        {"protocols": ["dns"]},
        {"directions": ["sideways"]},
        {"labels": [""]},
        {"labels": ["=v"]},
    ],
)
def test_bad_filters(kwargs: dict[str, list[str]]) -> None:
    with pytest.raises(FilterError):
        FlowFilter.build(**kwargs)  # type: ignore[arg-type]


def test_label_selector_terms() -> None:
    labels = [parse_label("k8s:org=empire"), parse_label("reserved:host")]
    assert LabelSelector.parse("org=empire").matches(labels)
    assert LabelSelector.parse("k8s:org=empire").matches(labels)
    assert not LabelSelector.parse("container:org=empire").matches(labels)
    assert LabelSelector.parse("org").matches(labels)
    assert not LabelSelector.parse("org=").matches(labels)  # exists with an empty value
    assert LabelSelector.parse("reserved:host").matches(labels)
    assert LabelSelector.parse(" org = empire , host ").matches(labels)


def test_ring_evicts_oldest() -> None:
    store = FlowStore(StoreConfig(capacity=3))
    records = [samples.l3_drop_denied() for _ in range(5)]
    for record in records:
        store.add(record)
    assert len(store) == 3
    assert store.total == 5
    assert [id(r) for r in store] == [id(r) for r in records[2:]]


def test_last(store: FlowStore) -> None:
    names = list(RECORDS)
    assert store.last(2) == [RECORDS[names[-2]], RECORDS[names[-1]]]
    assert store.last(0) == []
    assert store.last(1000) == list(RECORDS.values())
    dropped_l3 = store.last(2, FlowFilter.build(protocols=["l3"], verdicts=["DROPPED"]))
    assert dropped_l3 == [RECORDS["l3_drop_deny_rule"], RECORDS["l3_verdict_denied_egress"]]


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


def test_filter_by_type_and_verdict_enums() -> None:
    flt = FlowFilter(verdicts=frozenset({Verdict.FORWARDED}), types=frozenset({FlowType.L3_L4}))
    assert flt.matches(samples.l3_verdict_allowed())
    assert not flt.matches(samples.http_request_allowed())
    assert FlowFilter(directions=frozenset({TrafficDirection.INGRESS})).matches(
        samples.l3_drop_denied()
    )


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
                assert len(store.last(50)) <= 50
                assert len(store.query(FlowFilter.build(protocols=["http"]))) <= 500
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
