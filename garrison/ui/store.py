"""The records the review page shows: read once, aggregated once, paged by number.

Every record gets a sequence number, oldest first across the inputs (each log's rotated and
compressed backups first, as `garrison observe` reads them). The store keeps no decoded
records: a plain log file is kept as the byte offset where each record starts and read again
with `pread` for the page asked for; a compressed backup and the agent's records are kept as
their lines. While loading, one `ServiceMapBuilder` counts everything, so the map and the
policy review are ready when the log is read; new records are added to it as they come. A
loaded line is decoded only as far as the map reads it (`garrison.flows.mapscan`).

A large plain file is read by several processes at once (one per core, each a byte range
aligned on a line start); their offsets and builders are merged in order. Forking is done
before any thread starts (`FileSource.load()` is called before the server runs).

Following: the live file of each `--input-file` (the last of its files) is polled; lines
appended are numbered and counted. When the path names a new file (rotation), the rest of the
old one is read and the new one followed from its start. A file cut shorter than what was read
(copytruncate) is followed from its start; the records read from it before are still counted
in the map but can no longer be shown (their rows say so).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
import pickle
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from garrison.flows.flowdict import flow_of, not_a_record
from garrison.flows.mapscan import MapScan
from garrison.flows.query import CompiledQuery
from garrison.flows.reader import FlowSourceError, LogFile, log_files, open_lines
from garrison.flows.servicemap import ServiceMapBuilder
from garrison.ui.mapcache import MapCache

PARALLEL_MIN_BYTES = 32 << 20  # below this one process reads faster than several start
CHUNK_BYTES = 64 << 20  # the part of a file one reader process reads at a time
READ_CHUNK = 4 << 20
BATCH_LINES = 4096  # lines of a compressed file given to the map at a time
MAX_BAD_SAMPLES = 5
TAIL_CAP = 500_000  # records that arrive while the page runs, kept in memory
FOLLOW_READ = 16 << 20  # what one poll reads of a followed file at most
LOST = b""  # a record whose file was truncated under us


@dataclass
class LoadStats:
    """What loading saw: lines that were no flow record (the first few named)."""

    bad: int = 0
    samples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.samples) < MAX_BAD_SAMPLES:
            self.samples.append(f"{where}: not a flow record ({reason})")

    def merge(self, other: LoadStats) -> None:
        self.bad += other.bad
        self.samples.extend(other.samples[: MAX_BAD_SAMPLES - len(self.samples)])


def decode(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """A line's flow dict, or None and why not."""
    try:
        d = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(d, dict):
        return None, "not a JSON object"
    d = flow_of(d)
    why = not_a_record(d)
    if why is not None:
        return None, why
    return d, ""


class Segment(Protocol):
    def __len__(self) -> int: ...

    def lines(self, lo: int, hi: int) -> list[bytes]: ...


class MemorySegment:
    """Lines kept in memory: a compressed backup, or the agent's records (`cap`: the newest
    ones kept; older ones read as LOST)."""

    def __init__(self, cap: int | None = None) -> None:
        self._lines: deque[bytes] = deque(maxlen=cap)
        self._dropped = 0

    def __len__(self) -> int:
        return self._dropped + len(self._lines)

    def append(self, line: bytes) -> None:
        if self._lines.maxlen is not None and len(self._lines) == self._lines.maxlen:
            self._dropped += 1
        self._lines.append(line)

    def lines(self, lo: int, hi: int) -> list[bytes]:
        out = []
        for i in range(lo, hi):
            j = i - self._dropped
            out.append(self._lines[j] if j >= 0 else LOST)
        return out


class FileSegment:
    """A plain log file read in place: where each record starts, and where the last one ends
    (`stop`)."""

    def __init__(self, path: Path, fd: int, starts: array[int], stop: int) -> None:
        self.path, self.fd, self.starts, self.stop = path, fd, starts, stop
        self.lost = False

    def __len__(self) -> int:
        return len(self.starts)

    def lines(self, lo: int, hi: int) -> list[bytes]:
        if lo >= hi:
            return []
        if self.lost:
            return [LOST] * (hi - lo)
        starts = self.starts
        base = starts[lo]
        stop = starts[hi] if hi < len(starts) else self.stop
        try:
            data = os.pread(self.fd, stop - base, base)
        except OSError:
            return [LOST] * (hi - lo)
        out = []
        for i in range(lo, hi):
            a = starts[i] - base
            b = (starts[i + 1] if i + 1 < hi else stop) - base
            out.append(data[a:b].strip())
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Follow:
    """New complete lines of a live file from `offset` on (`final`: the last line without a
    newline too, for a file rotated away). `segments`: the loaded parts of this file, which
    are lost if it is truncated."""

    def __init__(self, path: Path, fd: int, offset: int, segments: list[FileSegment]) -> None:
        self.path, self.fd, self.offset, self.segments = path, fd, offset, segments

    def read(self, final: bool = False) -> list[bytes]:
        """At most FOLLOW_READ bytes a call; a line longer than that is passed on cut (it is
        no flow record a writer of garrison's makes, and is counted as a bad line)."""
        try:
            size = os.fstat(self.fd).st_size
            if size <= self.offset:
                return []
            want = min(size - self.offset, FOLLOW_READ)
            data = os.pread(self.fd, want, self.offset)
        except OSError:
            return []
        whole = final and self.offset + len(data) >= size
        cut = len(data) if whole else data.rfind(b"\n") + 1
        if cut <= 0:
            if len(data) < FOLLOW_READ:
                return []  # the writer is still writing this line
            cut = len(data)
        self.offset += cut
        return [line.strip() for line in data[:cut].split(b"\n") if line.strip()]

    def close(self) -> None:
        if not self.segments:  # a file opened for following; loaded ones close with the source
            with contextlib.suppress(OSError):
                os.close(self.fd)


# ---------------------------------------------------------------------------------------------
# Reading a plain file, in one or several processes


@dataclass
class _Part:
    """What one reader of a byte range found. `bad` holds (line number in the range, reason)
    of the first few lines that were no flow record; `lines` counts every line, blank ones
    too, so the parts' line numbers add up without a pass to count them first."""

    starts: array[int]
    builder: ServiceMapBuilder
    bad: list[tuple[int, str]]
    bad_count: int
    lines: int


def _scan(path: str, begin: int, end: int) -> _Part:
    """Record offsets and the map of the lines in [begin, end) of `path` (begin is a line
    start). Runs in a worker process for large files."""
    starts: array[int] = array("q")
    builder = ServiceMapBuilder()
    scan = MapScan(builder)
    bad: list[tuple[int, str]] = []
    bad_count = 0
    pos, number = begin, 0
    # the line not yet ended, in pieces: joined once when its newline comes (copying it on
    # every read was quadratic in the length of a long line)
    pending: list[bytes] = []
    with open(path, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            if left > 0 and b"\n" not in chunk:
                pending.append(chunk)
                continue
            if pending:
                pending.append(chunk)
                chunk = b"".join(pending)
            lines = chunk.split(b"\n")
            pending = [lines.pop()] if left > 0 else []
            if left <= 0 and lines and lines[-1] == b"":
                lines.pop()
            # where each line starts (and the next after the last)
            at = list(itertools.accumulate(map(_NEXT, map(len, lines)), initial=pos))
            numbers: Sequence[int]
            if b"" in lines or any(map(bytes.isspace, lines)):  # blank lines: no records
                numbers = [i for i, line in enumerate(lines) if line and not line.isspace()]
                records = [lines[i] for i in numbers]
                starts.extend(at[i] for i in numbers)
            else:
                numbers, records = range(len(lines)), lines
                starts.extend(at[:-1])
            for index, why in scan.add_lines(records):
                bad_count += 1
                if len(bad) < MAX_BAD_SAMPLES:
                    bad.append((number + numbers[index] + 1, why))
            number += len(lines)
            pos = at[-1]
    scan.flush()
    builder.skipped += bad_count
    return _Part(starts, builder, bad, bad_count, number)


_NEXT = (1).__add__  # a line's length to where the next one starts, with its newline


def _split_points(fd: int, size: int, parts: int, begin: int = 0) -> list[int]:
    """Offsets that cut [begin, size) into `parts` ranges, each starting on a line start
    (`begin` is one)."""
    points = [begin]
    for k in range(1, parts):
        at = begin + (size - begin) * k // parts
        while at < size:
            block = os.pread(fd, 1 << 16, at)
            nl = block.find(b"\n")
            if nl >= 0:
                at += nl + 1
                break
            at += len(block)
            if not block:
                break
        if at > points[-1] and at < size:
            points.append(at)
    points.append(size)
    return points


def _open_plain(log: LogFile, live: bool) -> tuple[int, int]:
    """An open descriptor of a plain log and where its records end (the live file's
    unfinished last line excluded: it is followed)."""
    try:
        fd = os.open(log.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FlowSourceError(f"access log {log.name}: cannot open: {exc.strerror}") from exc
    size = os.fstat(fd).st_size
    if not live or not size:
        return fd, size
    tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    nl = tail.rfind(b"\n")
    return fd, (size - len(tail) + nl + 1 if nl >= 0 else 0)


def _size(log: LogFile) -> int:
    try:
        return log.path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# The store


class FlowStore:
    """Numbered records in segments, the map of all of them, and a condition that is notified
    when records are added (`version` counts the additions)."""

    def __init__(self) -> None:
        self.builder = ServiceMapBuilder()
        self.stats = LoadStats()
        self.changed = threading.Condition()
        self.version = 0
        self._segments: list[Segment] = []
        self._firsts: list[int] = []
        self._count = 0
        self._tail = MemorySegment(0)
        # while the inputs are read: {"bytes": total, "done": read so far}; None after
        self.loading: dict[str, int] | None = None

    def __len__(self) -> int:
        return self._count

    def add_segment(self, segment: Segment, builder: ServiceMapBuilder | None = None,
                    stats: LoadStats | None = None) -> None:
        """A loaded part of the log; before `start_tail()`."""
        with self.changed:
            self._firsts.append(self._count)
            self._segments.append(segment)
            self._count += len(segment)
            if builder is not None:
                self.builder.merge(builder)
            if stats is not None:
                self.stats.merge(stats)
            self.version += 1
            self.changed.notify_all()

    def progress(self, done: int) -> None:
        if self.loading is not None:
            self.loading = {**self.loading, "done": self.loading["done"] + done}

    def start_tail(self, cap: int = TAIL_CAP) -> None:
        """After loading: records that come later are kept here (the newest `cap`)."""
        self._tail = MemorySegment(cap)
        self.loading = None
        self.add_segment(self._tail)

    def append(self, lines: list[bytes], where: str) -> None:
        """New records: numbered after all others, counted in the map, announced."""
        if not lines:
            return
        with self.changed:
            tail = self._tail
            for line in lines:
                tail.append(line)
            scan = MapScan(self.builder)
            for _, why in scan.add_lines(lines):
                self.stats.add(where, why)
                self.builder.skipped += 1
            scan.flush()
            self._count = self._firsts[-1] + len(tail)
            self.version += 1
            self.changed.notify_all()

    def lines(self, lo: int, hi: int) -> list[bytes]:
        """Records lo..hi-1 as lines (LOST where they can no longer be read)."""
        out: list[bytes] = []
        with self.changed:
            segments = list(zip(self._firsts, self._segments, strict=True))
        for first, segment in segments:
            n = len(segment)
            a, b = max(lo, first), min(hi, first + n)
            if a < b:
                out.extend(segment.lines(a - first, b - first))
        return out

    def newest_first(self, before: int, block: int = 2048) -> Iterator[tuple[int, bytes]]:
        """(seq, line) from `before - 1` down to 0."""
        hi = min(before, self._count)
        while hi > 0:
            lo = max(0, hi - block)
            lines = self.lines(lo, hi)
            for i in range(len(lines) - 1, -1, -1):
                yield lo + i, lines[i]
            hi = lo

    def page(self, query: CompiledQuery, before: int, limit: int,
             scan_limit: int) -> tuple[list[tuple[int, dict[str, Any] | None]], int, bool]:
        """The newest `limit` matching records before `before`, newest first; looks at no
        more than `scan_limit` records. Returns them, where the next page starts, and whether
        the start of the log was reached. A LOST record is (seq, None)."""
        found: list[tuple[int, dict[str, Any] | None]] = []
        nxt = min(before, self._count)
        everything = query.selects_all
        for scanned, (seq, line) in enumerate(self.newest_first(before), 1):
            nxt = seq
            if line is LOST or not line:
                if everything:
                    found.append((seq, None))
            elif everything or query.may_match(line):
                d, _ = decode(line)
                if d is not None and (everything or query.matches(d)):
                    found.append((seq, d))
            if len(found) >= limit or scanned >= scan_limit:
                return found, nxt, nxt == 0
        return found, 0, True

    def matching_after(self, query: CompiledQuery, after: int,
                       limit: int) -> tuple[list[tuple[int, dict[str, Any]]], int]:
        """Matching records from `after` on (at most `limit`, the newest when more) and the
        sequence number to continue from."""
        end = self._count
        start = max(after, end - 100 * limit)  # a burst larger than this is skipped
        out = []
        query_all = query.selects_all
        for offset, line in enumerate(self.lines(start, end)):
            if not line or (not query_all and not query.may_match(line)):
                continue
            d, _ = decode(line)
            if d is not None and (query_all or query.matches(d)):
                out.append((start + offset, d))
        return out[-limit:], end

    def scan_map(self, query: CompiledQuery) -> ServiceMapBuilder:
        """The map of the matching records only (a full read)."""
        builder = ServiceMapBuilder()
        for seq in range(0, self._count, 8192):
            for line in self.lines(seq, min(self._count, seq + 8192)):
                if line and query.may_match(line):
                    d, _ = decode(line)
                    if d is not None and query.matches(d):
                        builder.add(d)
        return builder


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class _FileJob:
    """One file of the inputs: a compressed one is read whole in memory; a plain one in byte
    ranges (`ranges`), up to `end` (the live file's unfinished last line is left for
    following)."""

    log: LogFile
    live: bool
    fd: int = -1
    end: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    cached: list[tuple[int, int, bytes, Any]] = field(default_factory=list)  # read before


class FileSource:
    """`--input-file` paths: loaded into a store, then their live files followed.

    `start()` plans the reading and starts the reader processes (it forks: call it before any
    thread starts); `finish()` adds the parts to the store in order as they come (the map grows
    while the page is already served), then starts following. `load()` does both."""

    def __init__(self, paths: list[str], *, backups: bool = True,
                 workers: int | None = None, cache: MapCache | None = None) -> None:
        for path in paths:
            if path == "-":
                raise FlowSourceError("the review page reads files, not standard input: give "
                                      "--input-file PATH")
        self.paths = paths
        self.backups = backups
        self.workers = workers or os.cpu_count() or 1
        self.cache = cache  # what was read of large files before (`garrison.ui.mapcache`)
        self._live: list[_Follow] = []
        self._jobs: list[_FileJob] = []
        self._futures: list[concurrent.futures.Future[_Part]] = []
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._fds: list[int] = []

    def describe(self) -> str:
        return ", ".join(self.paths)

    def load(self, store: FlowStore) -> None:
        self.start(store)
        self.finish(store)

    def start(self, store: FlowStore) -> None:
        jobs: list[_FileJob] = []
        for path in self.paths:
            files = log_files(path, include_backups=self.backups)
            for log in files:
                job = _FileJob(log, live=log is files[-1])
                if not log.compressed:
                    job.fd, job.end = _open_plain(log, job.live)
                    self._fds.append(job.fd)
                    begin = 0
                    kept = self.cache.load(log.path, job.fd, job.end) if self.cache else None
                    if kept is not None:
                        job.cached, begin = kept.parts, kept.end
                    parts = max(1, -(-(job.end - begin) // CHUNK_BYTES))
                    points = _split_points(job.fd, job.end, parts, begin)
                    job.ranges = list(itertools.pairwise(points)) if job.end > begin or \
                        not job.cached else []
                jobs.append(job)
        plain = sum(job.end for job in jobs)
        store.loading = {"bytes": plain + sum(
            _size(job.log) for job in jobs if job.log.compressed), "done": 0}
        to_read = sum(b - a for job in jobs for a, b in job.ranges)
        if self.workers > 1 and to_read >= PARALLEL_MIN_BYTES:
            ctx = multiprocessing.get_context("fork")
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx)
            self._futures = [self._pool.submit(_scan, str(job.log.path), a, b)
                             for job in jobs for a, b in job.ranges]
        self._jobs = jobs

    def finish(self, store: FlowStore) -> None:
        futures = iter(self._futures)
        try:
            for job in self._jobs:
                if job.log.compressed:
                    self._read_compressed(job.log, store)
                    store.progress(_size(job.log))
                    continue
                segments: list[FileSegment] = []
                lines_before = 0
                keep = self.cache is not None and job.end >= self.cache.min_bytes
                kept: list[tuple[int, int, bytes]] = []
                parts: Iterator[tuple[int, int, _Part, bytes | None]] = itertools.chain(
                    ((a, b, part, data) for a, b, data, part in job.cached),
                    ((a, b, next(futures).result() if self._pool
                      else _scan(str(job.log.path), a, b), None) for a, b in job.ranges))
                for a, b, part, data in parts:
                    if keep:  # as read: the store's map takes the part's counters over
                        kept.append((a, b, data if data is not None
                                     else pickle.dumps(part, pickle.HIGHEST_PROTOCOL)))
                    stats = LoadStats()
                    for number, why in part.bad:
                        stats.add(f"{job.log.name}:{lines_before + number}", why)
                    stats.bad += part.bad_count - len(part.bad)
                    lines_before += part.lines
                    segment = FileSegment(job.log.path, job.fd, part.starts, b)
                    segments.append(segment)
                    store.add_segment(segment, part.builder, stats)
                    store.progress(b - a)
                if keep and job.ranges and self.cache is not None:
                    self.cache.save(job.log.path, job.fd, kept)
                if job.live:
                    self._live.append(_Follow(job.log.path, job.fd, job.end, segments))
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        store.start_tail()

    @staticmethod
    def _read_compressed(log: LogFile, store: FlowStore) -> None:
        segment = MemorySegment()
        builder = ServiceMapBuilder()
        scan = MapScan(builder)
        stats = LoadStats()
        lines = open_lines(log)
        number = 0
        while batch := list(itertools.islice(lines, BATCH_LINES)):
            for line in batch:
                segment.append(line)
            for index, why in scan.add_lines(batch):
                stats.add(f"{log.name}:{number + index + 1}", why)
                builder.skipped += 1
            number += len(batch)
        scan.flush()
        store.add_segment(segment, builder, stats)

    def poll(self, store: FlowStore) -> None:
        for i, follow in enumerate(self._live):
            path = follow.path
            store.append(follow.read(), str(path))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # rotated away and not yet replaced: the old file is read on
            ident = os.fstat(follow.fd)
            if (st.st_dev, st.st_ino) != (ident.st_dev, ident.st_ino):
                while batch := follow.read(final=True):  # the rest of the old file
                    store.append(batch, str(path))
            elif st.st_size < follow.offset:
                for segment in follow.segments:
                    segment.lost = True  # copytruncate: what was read is gone
            else:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            follow.close()
            fresh = _Follow(path, fd, 0, [])
            self._live[i] = fresh
            store.append(fresh.read(), str(path))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for follow in self._live:
            follow.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


class AgentFeed:
    """The local agent's flow ring over its API: what it holds now, then its new records."""

    RING_READ = 100_000
    KEEP = 200_000

    def __init__(self, socket: Path) -> None:
        from garrison.agent.api import AgentClient

        self.socket = socket
        self._client = AgentClient(socket, timeout=10.0)
        self._cursor = 0
        self.missed = 0

    def describe(self) -> str:
        return f"agent at {self.socket}"

    def load(self, store: FlowStore) -> None:
        data = self._client.call("Flows", query={}, limit=self.RING_READ)
        store.start_tail(self.KEEP)
        store.append(self._take(data), "agent")
        self._cursor = int(data.get("cursor", 0))

    @staticmethod
    def _take(data: dict[str, Any]) -> list[bytes]:
        return [text.encode() if isinstance(text, str) else bytes(text)
                for text in data.get("flows", [])]

    def poll(self, store: FlowStore) -> None:
        data = self._client.call("FlowsSince", query={}, cursor=self._cursor)
        self.missed += int(data.get("missed", 0))
        self._cursor = int(data.get("cursor", self._cursor))
        store.append(self._take(data), "agent")

    def rule_keys(self) -> list[dict[str, Any]]:
        data = self._client.call("PolicyGet")
        return [ref for p in data.get("policies", []) for ref in p.get("rule_refs", [])]

    def close(self) -> None:
        self._client.close()


class Source(Protocol):
    def describe(self) -> str: ...

    def load(self, store: FlowStore) -> None: ...

    def poll(self, store: FlowStore) -> None: ...


class Poller(threading.Thread):
    """Polls the source for new records until stopped; errors are kept for the page
    (`on_error`), and the first poll that works again after one says so (`on_ok`)."""

    def __init__(self, source: Source, store: FlowStore, interval_s: float = 0.25,
                 on_error: Callable[[str], None] | None = None,
                 on_ok: Callable[[], None] | None = None) -> None:
        super().__init__(name="garrison-ui-poll", daemon=True)
        self.source, self.store, self.interval_s = source, store, interval_s
        self.on_error, self.on_ok = on_error, on_ok
        self._stop_event = threading.Event()

    def run(self) -> None:
        failing = False
        while not self._stop_event.wait(self.interval_s):
            try:
                self.source.poll(self.store)
            except Exception as exc:  # a source error is shown, the page keeps serving
                failing = True
                if self.on_error is not None:
                    self.on_error(str(exc))
                time.sleep(1.0)
            else:
                if failing and self.on_ok is not None:
                    self.on_ok()
                failing = False

    def stop(self) -> None:
        self._stop_event.set()
