"""Several nodes' flow records as one time-ordered view (Hubble Relay's merge; no I/O).

`merge_recent` merges each node's newest (or oldest) records into the cluster's: every node
sent its own `last` N, so the cluster's last N are among them. `SortBuffer` orders records
that arrive from several live streams: a record waits `delay_s` after it arrived, so one a
slower node reports a moment later still takes its place in time; the buffer never holds
more than `max_held` (the oldest then go out at once), as Hubble Relay's sort buffer.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from garrison.flows.codec import parse_time
from garrison.flows.record import FlowDecodeError

T = TypeVar("T")


def flow_time_ns(d: Mapping[str, Any]) -> int | None:
    """The record's `time` in nanoseconds, None when it has none readable."""
    stamp = d.get("time")
    if not isinstance(stamp, str):
        return None
    try:
        return parse_time(stamp)
    except (FlowDecodeError, ValueError, OverflowError):
        return None


def merge_recent(
    batches: Iterable[Sequence[tuple[int, T]]], first: int | None, last: int | None
) -> list[T]:
    """(time_ns, item) batches → the items in time order (ties keep the batches' order), the
    first `first` or the last `last` of them when given."""
    timed = sorted(
        ((t, n, i, item) for n, batch in enumerate(batches) for i, (t, item) in enumerate(batch)),
        key=lambda x: (x[0], x[1], x[2]),
    )
    items = [item for _, _, _, item in timed]
    if first is not None:
        return items[:first]
    if last is not None:
        return items[-last:] if last else []
    return items


class SortBuffer(Generic[T]):
    """Items of several streams out in time order, each after at most `delay_s` held."""

    def __init__(self, delay_s: float, max_held: int = 10_000) -> None:
        self.delay_s = delay_s
        self.max_held = max_held
        self._heap: list[tuple[int, int, float, T]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, time_ns: int, item: T, now: float) -> None:
        heapq.heappush(self._heap, (time_ns, next(self._seq), now, item))

    def drain(self, now: float, *, everything: bool = False) -> list[T]:
        """The items due at `now` (monotonic seconds), oldest first: while the oldest item
        has waited its delay (or too many are held), it goes out."""
        out = []
        heap = self._heap
        while heap and (
            everything or len(heap) > self.max_held or heap[0][2] + self.delay_s <= now
        ):
            out.append(heapq.heappop(heap)[3])
        return out
