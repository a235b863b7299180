"""The in-memory ring of recent flows that `garrison observe` reads from the agent.

The proxy (event loop thread) and the datapath event reader add records while the agent's API
(another thread) reads them, so every operation takes one lock, held only to copy references:
filtering (a `garrison.flows.query` query) runs on a snapshot, outside the lock. When the
ring is full the oldest record goes.

Each record gets a sequence number when added; `since(cursor)` returns what came after a
cursor, which is how a follower (`observe --follow`) reads without missing or repeating
records (records evicted before it read them are counted in `missed`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from garrison.flows.query import MATCH_ALL
from garrison.flows.record import FlowRecord


class RecordTest(Protocol):
    """What the store filters with: a compiled `garrison.flows.query` query."""

    def matches_record(self, record: FlowRecord) -> bool: ...


@dataclass(frozen=True, slots=True)
class StoreConfig:
    capacity: int = 4096

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("the flow store holds at least one record")


@dataclass(frozen=True, slots=True)
class FollowBatch:
    """What `since()` returns: the records after the cursor, the cursor to pass next time,
    and how many records were evicted before the follower read them."""

    records: list[FlowRecord] = field(default_factory=list)
    cursor: int = 0
    missed: int = 0


class FlowStore:
    """A bounded, thread-safe ring of flow records, oldest first."""

    def __init__(self, config: StoreConfig | None = None) -> None:
        self._config = config or StoreConfig()
        self._ring: deque[tuple[int, FlowRecord]] = deque(maxlen=self._config.capacity)
        self._lock = threading.Lock()
        self._next_seq = 0

    @property
    def capacity(self) -> int:
        return self._config.capacity

    def add(self, record: FlowRecord) -> int:
        """Keep `record` (evicting the oldest when full); returns its sequence number."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._ring.append((seq, record))
        return seq

    def extend(self, records: Iterable[FlowRecord]) -> None:
        """Keep every record of `records`, in order, under one hold of the lock."""
        with self._lock:
            seq = self._next_seq
            append = self._ring.append
            for record in records:
                append((seq, record))
                seq += 1
            self._next_seq = seq

    def _snapshot(self) -> list[tuple[int, FlowRecord]]:
        with self._lock:
            return list(self._ring)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ring)

    def __iter__(self) -> Iterator[FlowRecord]:
        """Iterates over a snapshot: adding while iterating is safe."""
        return iter([record for _, record in self._snapshot()])

    @property
    def total(self) -> int:
        """Records ever added (kept or evicted)."""
        with self._lock:
            return self._next_seq

    def query(self, flt: RecordTest = MATCH_ALL, limit: int | None = None) -> list[FlowRecord]:
        """Matching records, oldest first; at most the first `limit`."""
        out: list[FlowRecord] = []
        for _, record in self._snapshot():
            if flt.matches_record(record):
                out.append(record)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def tail(self, n: int, flt: RecordTest = MATCH_ALL) -> FollowBatch:
        """The newest `n` matching records, oldest first (as `hubble observe --last n`), and
        the cursor right after them, from one snapshot: what a follower prints first before
        it asks `since(cursor)` for what comes next."""
        with self._lock:
            items = list(self._ring)
            next_seq = self._next_seq
        out: list[FlowRecord] = []
        if n > 0:
            for _, record in reversed(items):
                if flt.matches_record(record):
                    out.append(record)
                    if len(out) >= n:
                        break
        out.reverse()
        return FollowBatch(records=out, cursor=next_seq)

    def since(self, cursor: int, flt: RecordTest = MATCH_ALL) -> FollowBatch:
        """Records added at or after sequence number `cursor` (0 = from the start)."""
        with self._lock:
            items = list(self._ring)
            next_seq = self._next_seq
        oldest = items[0][0] if items else next_seq
        missed = max(0, oldest - cursor)
        records = [record for seq, record in items if seq >= cursor and flt.matches_record(record)]
        return FollowBatch(records=records, cursor=next_seq, missed=missed)
