"""The review page's store on real files: numbering, paging, a log read by several processes,
following appends, rotation and truncation, bad lines."""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from garrison.flows.query import MATCH_ALL
from garrison.flows.reader import FlowSourceError
from garrison.ui import store as store_mod
from garrison.ui.filters import parse_filter
from garrison.ui.store import FileSource, FlowStore

DEMO = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"
LINES = [line for line in DEMO.read_bytes().splitlines() if line.strip()]


def loaded(paths: list[Path], workers: int = 1) -> tuple[FileSource, FlowStore]:
    source = FileSource([str(p) for p in paths], workers=workers)
    store = FlowStore()
    source.load(store)
    return source, store


def wait_for(cond: Callable[[], bool], source: FileSource, store: FlowStore) -> None:
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        source.poll(store)
        time.sleep(0.02)


def test_records_are_numbered_oldest_first_across_backups(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    (tmp_path / "access.log.2.gz").write_bytes(gzip.compress(b"\n".join(LINES[:10]) + b"\n"))
    (tmp_path / "access.log.1").write_bytes(b"\n".join(LINES[10:30]) + b"\n")
    log.write_bytes(b"\n".join(LINES[30:]) + b"\n")
    source, store = loaded([log])
    assert len(store) == len(LINES)
    assert store.lines(0, len(store)) == LINES
    assert store.builder.records == len(LINES)
    source.close()


def test_parallel_read_equals_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    log = tmp_path / "big.log"
    body = (b"\n".join(LINES) + b"\n") * 40 + b"not json\n" + b"\n".join(LINES) + b"\n"
    log.write_bytes(body)
    monkeypatch.setattr(store_mod, "PARALLEL_MIN_BYTES", len(body) // 4)
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", len(body) // 7)  # parts read one by one
    _, one = loaded([log], workers=1)
    src, many = loaded([log], workers=3)
    assert len(many) == len(one) == 41 * len(LINES) + 1  # the bad line keeps its number
    assert many.lines(0, len(many)) == one.lines(0, len(one))
    assert many.builder.result() == one.builder.result()
    assert many.stats.bad == 1
    assert many.stats.samples[0].startswith(f"{log}:{40 * len(LINES) + 1}: not a flow record")
    src.close()


def test_paging_newest_first_with_a_filter(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"\n".join(LINES) + b"\n")
    _, store = loaded([log])
    query = parse_filter("--verdict DROPPED --to-pod deathstar").compile()
    found, nxt, complete = store.page(query, len(store), 3, 1_000_000)
    seqs = [seq for seq, _ in found]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == 3
    assert all(d is not None and d["verdict"] == "DROPPED" for _, d in found)
    rest, _, complete = store.page(query, nxt, 100, 1_000_000)
    assert complete
    assert [seq for seq, _ in found + rest] == [
        seq for seq in range(len(LINES) - 1, -1, -1) if query.matches(orjson.loads(LINES[seq]))]
    # a scan limit stops early and says where to go on
    _, where, complete = store.page(query, len(store), 100, 5)
    assert not complete and where == len(store) - 5
    everything, _, _ = store.page(MATCH_ALL, len(store), 1000, 10**6)
    assert len(everything) == len(LINES)


def test_follow_appends_rotation_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"\n".join(LINES[:5]) + b"\n" + LINES[5][:20])  # a line being written
    source, store = loaded([log])
    assert len(store) == 5
    with log.open("ab") as f:
        f.write(LINES[5][20:] + b"\n" + LINES[6] + b"\n")
    wait_for(lambda: len(store) == 7, source, store)
    assert store.lines(5, 7) == LINES[5:7]
    # rotation: the rest of the old file, then the new one from its start
    with log.open("ab") as f:
        f.write(LINES[7] + b"\n")
    os.rename(log, tmp_path / "access.log.1")
    log.write_bytes(LINES[8] + b"\n")
    wait_for(lambda: len(store) == 9, source, store)
    assert store.lines(7, 9) == LINES[7:9]
    # copytruncate: followed from the start again
    log.write_bytes(LINES[9] + b"\n")
    wait_for(lambda: len(store) == 10, source, store)
    assert store.lines(9, 10) == [LINES[9]]
    assert store.builder.records == 10
    source.close()


def test_truncated_loaded_file_reads_as_lost(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"\n".join(LINES[:4]) + b"\n")
    source, store = loaded([log])
    log.write_bytes(b"")
    source.poll(store)
    found, _, _ = store.page(MATCH_ALL, 4, 10, 100)
    assert found == [(3, None), (2, None), (1, None), (0, None)]
    source.close()


def test_empty_log_and_missing_log(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    source, store = loaded([empty])
    assert len(store) == 0
    assert store.builder.result()["nodes"] == []
    source.close()
    with pytest.raises(FlowSourceError, match="No such file"):
        loaded([tmp_path / "missing.log"])
    with pytest.raises(FlowSourceError, match="standard input"):
        FileSource(["-"])


def test_following_reads_in_bounded_steps(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "FOLLOW_READ", 3000)  # about three records a poll
    log = tmp_path / "access.log"
    log.write_bytes(LINES[0] + b"\n")
    source, store = loaded([log])
    with log.open("ab") as f:
        f.write(b"\n".join(LINES[1:20]) + b"\n")
    wait_for(lambda: len(store) == 20, source, store)
    assert store.lines(0, 20) == LINES[:20]
    # a line longer than one read is passed on cut, counted as no flow record, and skipped
    with log.open("ab") as f:
        f.write(b"x" * 7000 + b"\n" + LINES[20] + b"\n")
    wait_for(lambda: store.lines(len(store) - 1, len(store)) == [LINES[20]], source, store)
    assert store.stats.bad >= 1
    # rotation with more left in the old file than one read: all of it, then the new file
    with log.open("ab") as f:
        f.write(b"\n".join(LINES[21:40]) + b"\n")
    os.rename(log, tmp_path / "access.log.1")
    log.write_bytes(LINES[40] + b"\n")
    wait_for(lambda: store.lines(len(store) - 1, len(store)) == [LINES[40]], source, store)
    tail = [line for line in store.lines(0, len(store)) if line.startswith(b"{")]
    assert tail == LINES[:41]
    source.close()
