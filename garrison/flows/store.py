"""The in-memory ring of recent flows, and the filters `garrison observe` applies to it.

The proxy (event loop thread) and the datapath event reader add records while the agent's API
(another thread) reads them, so every operation takes one lock, held only to copy references:
filtering runs on a snapshot, outside the lock. When the ring is full the oldest record goes.

Each record gets a sequence number when added; `since(cursor)` returns what came after a
cursor, which is how a follower (`observe --follow`) reads without missing or repeating
records (records evicted before it read them are counted in `missed`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from garrison.flows.record import (
    Endpoint,
    FlowRecord,
    FlowType,
    TrafficDirection,
    Verdict,
)
from garrison.policies.labels import SOURCE_ANY, SOURCE_K8S, Label, parse_label, split_source


class FilterError(ValueError):
    """A filter given as text that cannot be read."""


PROTOCOLS = frozenset({"http", "grpc", "kafka", "l3"})


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """`k=v,k2=v2,k3`: every term must hold on one endpoint. A term without `=` asks for the
    key to exist; a key without a source prefix (`k8s:`, `reserved:`) matches any source."""

    terms: tuple[tuple[str, str, str | None], ...]  # (source, key, value or None = exists)

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        terms = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            key_part, eq, value = part.partition("=")
            source, key = split_source(key_part.strip(), SOURCE_ANY)
            if not key:
                raise FilterError(f"label selector {text!r}: empty key in {part!r}")
            terms.append((source, key, value.strip() if eq else None))
        if not terms:
            raise FilterError("empty label selector")
        return cls(tuple(terms))

    def matches(self, labels: Iterable[Label]) -> bool:
        present = list(labels)
        return all(
            any(
                label.matches_key(source, key) and (value is None or label.value == value)
                for label in present
            )
            for source, key, value in self.terms
        )


def _endpoint_labels(ep: Endpoint) -> list[Label]:
    out = []
    for text in ep.labels:
        try:
            out.append(parse_label(text, SOURCE_K8S))
        except ValueError:
            continue  # a label we cannot read matches no selector
    return out


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Which flows to show. Each field left empty accepts everything; fields combine with
    AND, the values inside one field with OR. `namespaces`, `pods`, `identities` and `labels`
    match when the source or the destination matches.

    - `pods`: `namespace/prefix` or `prefix` (any namespace); the pod name is a prefix, as in
      `hubble observe --pod`.
    - `labels`: label selectors (`LabelSelector.parse`), e.g. `org=empire,class=xwing`.
    - `protocols`: `http`, `grpc`, `kafka` (proxy records), `l3` (datapath records).
    - `since_ns` / `until_ns`: inclusive bounds on the record time.
    """

    verdicts: frozenset[Verdict] = frozenset()
    types: frozenset[FlowType] = frozenset()
    directions: frozenset[TrafficDirection] = frozenset()
    protocols: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()
    pods: tuple[str, ...] = ()
    identities: frozenset[int] = frozenset()
    labels: tuple[LabelSelector, ...] = ()
    since_ns: int | None = None
    until_ns: int | None = None

    def __post_init__(self) -> None:
        unknown = self.protocols - PROTOCOLS
        if unknown:
            raise FilterError(
                f"unknown protocol {', '.join(sorted(unknown))} (known: http, grpc, kafka, l3)"
            )

    @classmethod
    def build(
        cls,
        *,
        verdicts: Iterable[Verdict | str] = (),
        types: Iterable[FlowType | str] = (),
        directions: Iterable[TrafficDirection | str] = (),
        protocols: Iterable[str] = (),
        namespaces: Iterable[str] = (),
        pods: Iterable[str] = (),
        identities: Iterable[int] = (),
        labels: Iterable[str] = (),
        since_ns: int | None = None,
        until_ns: int | None = None,
    ) -> FlowFilter:
        """From text, as a command line or an API request gives it; raises FilterError."""
        try:
            return cls(
                verdicts=frozenset(Verdict(str(v).upper()) for v in verdicts),
                types=frozenset(FlowType(str(t).upper()) for t in types),
                directions=frozenset(TrafficDirection.of(d) for d in directions),
                protocols=frozenset(p.lower() for p in protocols),
                namespaces=frozenset(namespaces),
                pods=tuple(pods),
                identities=frozenset(identities),
                labels=tuple(LabelSelector.parse(text) for text in labels),
                since_ns=since_ns,
                until_ns=until_ns,
            )
        except FilterError:
            raise
        except ValueError as exc:
            raise FilterError(str(exc)) from exc

    def matches(self, record: FlowRecord) -> bool:
        if self.since_ns is not None and record.time < self.since_ns:
            return False
        if self.until_ns is not None and record.time > self.until_ns:
            return False
        if self.verdicts and record.verdict not in self.verdicts:
            return False
        if self.types and record.type not in self.types:
            return False
        if self.directions and record.traffic_direction not in self.directions:
            return False
        if self.protocols and record.protocol not in self.protocols:
            return False
        sides = (record.source, record.destination)
        if self.namespaces and not any(ep.namespace in self.namespaces for ep in sides):
            return False
        if self.identities and not any(ep.identity in self.identities for ep in sides):
            return False
        if self.pods and not any(_pod_matches(p, ep) for p in self.pods for ep in sides):
            return False
        if self.labels:
            side_labels = [_endpoint_labels(ep) for ep in sides]
            if not any(sel.matches(labels) for sel in self.labels for labels in side_labels):
                return False
        return True


def _pod_matches(pattern: str, ep: Endpoint) -> bool:
    if not ep.pod_name:
        return False
    namespace, slash, prefix = pattern.rpartition("/")
    if slash and namespace != ep.namespace:
        return False
    return ep.pod_name.startswith(prefix)


MATCH_ALL = FlowFilter()


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
        for record in records:
            self.add(record)

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

    def query(self, flt: FlowFilter = MATCH_ALL, limit: int | None = None) -> list[FlowRecord]:
        """Matching records, oldest first; at most the first `limit`."""
        out: list[FlowRecord] = []
        for _, record in self._snapshot():
            if flt.matches(record):
                out.append(record)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def last(self, n: int, flt: FlowFilter = MATCH_ALL) -> list[FlowRecord]:
        """The newest `n` matching records, oldest first (as `hubble observe --last n`)."""
        if n <= 0:
            return []
        out: list[FlowRecord] = []
        for _, record in reversed(self._snapshot()):
            if flt.matches(record):
                out.append(record)
                if len(out) >= n:
                    break
        out.reverse()
        return out

    def since(self, cursor: int, flt: FlowFilter = MATCH_ALL) -> FollowBatch:
        """Records added at or after sequence number `cursor` (0 = from the start)."""
        with self._lock:
            items = list(self._ring)
            next_seq = self._next_seq
        oldest = items[0][0] if items else next_seq
        missed = max(0, oldest - cursor)
        records = [record for seq, record in items if seq >= cursor and flt.matches(record)]
        return FollowBatch(records=records, cursor=next_seq, missed=missed)

    def clear(self) -> None:
        with self._lock:
            self._ring.clear()
