"""`Log.later` and the server's `FlowSink`: records are made after the loop turn, in order,
and a record that cannot be built is reported without losing the others."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from garrison.flows.build import proxy_error
from garrison.flows.record import DropReasonDesc, Endpoint, FlowRecord
from garrison.flows.store import FlowStore
from garrison.flows.writer import AccessLogConfig, AccessLogWriter
from garrison.policies.l7rules import L7Protocol
from garrison.proxy.commands import Log
from garrison.proxy.server import FlowSink


def _record(n: int) -> FlowRecord:
    return proxy_error(time_ns=n, direction="INGRESS", client=Endpoint(), server=Endpoint(),
                       protocol=L7Protocol.HTTP, error=f"error {n}",
                       reason=DropReasonDesc.PROXY_ERROR)


class _Loop:
    """Collects `call_soon` callbacks; the test runs them as the end of a loop turn."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def end_turn(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


def test_log_later_builds_once_on_first_read_and_equals_the_eager_log() -> None:
    calls: list[int] = []

    def build(n: int) -> FlowRecord:
        calls.append(n)
        return _record(n)

    log = Log.later(build, 7)
    assert calls == []
    assert log.record == _record(7)
    assert log.record is log.record
    assert calls == [7]
    assert log == Log(_record(7))
    assert repr(log) == repr(Log(_record(7)))


def test_records_reach_the_ring_at_the_end_of_the_turn_in_emission_order() -> None:
    loop = _Loop()
    store = FlowStore()
    sink = FlowSink(store=store, loop=loop)  # type: ignore[arg-type]
    built: list[int] = []

    def build(n: int) -> FlowRecord:
        built.append(n)
        return _record(n)

    sink.emit(Log.later(build, 1))
    sink.emit(_record(2))
    sink.emit(Log.later(build, 3))
    assert built == [] and len(store) == 0  # nothing is made on the request's path
    loop.end_turn()
    assert built == [1, 3]
    assert [r.error for r in store.tail(10).records] == ["error 1", "error 2", "error 3"]


def test_a_record_that_cannot_be_built_is_reported_and_the_others_are_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlowStore()
    sink = FlowSink(store=store)

    def broken() -> FlowRecord:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR):
        sink.emit(Log.later(broken))
        sink.emit(_record(5))
    assert [r.error for r in store.tail(10).records] == ["error 5"]
    assert "could not be built" in caplog.text


def test_without_a_ring_records_go_to_the_access_log_and_a_failed_write_says_they_are_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # the standalone `garrison proxy`: nothing reads a ring there, so it keeps none
    loop = _Loop()
    writer = AccessLogWriter(AccessLogConfig(tmp_path / "access.log"))
    sink = FlowSink(writer=writer, loop=loop)  # type: ignore[arg-type]
    assert sink.store is None
    sink.emit(_record(1))
    sink.emit(Log.later(_record, 2))
    loop.end_turn()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert [FlowRecord.from_json(line).error for line in lines] == ["error 1", "error 2"]
    writer.close()
    with caplog.at_level(logging.ERROR):
        sink.emit(_record(3))
        loop.end_turn()
    assert "writer is closed (records are lost: the standalone proxy keeps no ring)" in caplog.text
