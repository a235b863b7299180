"""The restart backoff both supervisors use (`garrison proxy --workers`, the agent's
`--proxy-workers`): 0.5 s, doubling while a worker keeps dying within 10 s of its start, at
most 30 s; a worker that ran 10 s starts the count again."""

from __future__ import annotations

from dataclasses import dataclass

from garrison.proxy.workers import schedule_restart


@dataclass
class Slot:
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


def test_quick_failures_double_the_delay_up_to_thirty_seconds() -> None:
    slot = Slot(started=100.0)
    delays = []
    for _ in range(8):
        delays.append(schedule_restart(slot, slot.started + 1.0))
        slot.started = slot.restart_at
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_worker_that_ran_long_enough_starts_the_count_again() -> None:
    slot = Slot(started=100.0, failures=5)
    assert schedule_restart(slot, 110.0) == 0.5
    assert (slot.failures, slot.restart_at) == (1, 110.5)
