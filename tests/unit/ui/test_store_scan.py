"""Loading a log into the review page's store: record offsets, line numbers of bad lines and
the map, for plain and compressed files, with blank lines, CRLF endings and hostile lines,
read in parts smaller than a line."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import orjson
import pytest

from garrison.flows.flowdict import not_a_record
from garrison.flows.servicemap import ServiceMapBuilder
from garrison.ui import store as store_mod
from garrison.ui.store import FileSource, FlowStore
from tests.unit.ui.test_mapscan import DEMO_LINES, HOSTILE

BODY_LINES = [
    *DEMO_LINES[:20],
    b"",
    b"   ",
    DEMO_LINES[20] + b"\r",
    *HOSTILE[:12],
    b"\t\r",
    *DEMO_LINES[21:],
    *HOSTILE[12:],
    DEMO_LINES[5],
]


def expected(compressed: bool) -> tuple[dict[str, object], list[int], list[bytes]]:
    """The map, the line numbers of the lines that are no record, and the records as the
    store gives them back. A plain file's line numbers count blank lines; a compressed one
    is read as `garrison observe` reads it (`reader.open_lines`: only empty lines are
    passed over, a line of spaces is a bad line)."""
    builder, bad, records = ServiceMapBuilder(), [], []
    number = 0
    for line in BODY_LINES:
        if compressed:
            line = line.removesuffix(b"\r")
            if not line:
                continue
            records.append(line)
        else:
            number += 1
            if not line.strip():
                continue
            records.append(line.strip())
        number += compressed
        try:
            flow = orjson.loads(line)
        except orjson.JSONDecodeError:
            flow = None
        if type(flow) is dict and not_a_record(flow) is None:
            builder.add(flow)
        else:
            builder.skipped += 1
            bad.append(number)
    return builder.result(), bad, records


@pytest.mark.parametrize("read_chunk", [64, 1000, 4 << 20])
@pytest.mark.parametrize("compressed", [False, True])
def test_a_log_loads_as_line_by_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     read_chunk: int, compressed: bool) -> None:
    monkeypatch.setattr(store_mod, "READ_CHUNK", read_chunk)
    monkeypatch.setattr(store_mod, "BATCH_LINES", max(1, read_chunk // 100))
    monkeypatch.setattr(store_mod, "MAX_BAD_SAMPLES", 100)
    body = b"\n".join(BODY_LINES) + b"\n"
    log = tmp_path / "access.log"
    if compressed:  # a rotated backup, read whole; the live file is empty
        (tmp_path / "access.log.1.gz").write_bytes(gzip.compress(body))
        log.write_bytes(b"")
    else:
        log.write_bytes(body)
    source = FileSource([str(log)], workers=1)
    store = FlowStore()
    source.load(store)
    try:
        result, bad, records = expected(compressed)
        assert store.builder.result() == result
        assert store.lines(0, len(store)) == records
        name = f"{tmp_path / 'access.log.1.gz'}" if compressed else str(log)
        assert [s.split(": not a flow record")[0] for s in store.stats.samples] == \
            [f"{name}:{n}" for n in bad]
        assert store.stats.bad == len(bad)
    finally:
        source.close()


def test_records_that_come_later_count_as_line_by_line() -> None:
    """Lines a followed file or the agent gives after loading, in batches as polls bring
    them."""
    store = FlowStore()
    store.start_tail()
    lines = [line.strip() for line in BODY_LINES if line.strip()]
    for at in range(0, len(lines), 7):
        store.append(lines[at:at + 7], "agent")
    result, bad, records = expected(False)
    assert store.builder.result() == result
    assert store.lines(0, len(store)) == records
    assert store.stats.bad == len(bad)
    assert all(s.startswith("agent: not a flow record (not") for s in store.stats.samples)


def test_a_line_of_eight_mib_loads_in_linear_time(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A line far longer than a read used to be copied again on every read."""
    monkeypatch.setattr(store_mod, "READ_CHUNK", 4096)
    log = tmp_path / "access.log"
    log.write_bytes(DEMO_LINES[0] + b"\n" + b"x" * (8 << 20) + b"\n" + DEMO_LINES[1] + b"\n")
    source = FileSource([str(log)], workers=1)
    store = FlowStore()
    started = time.process_time()
    source.load(store)
    spent = time.process_time() - started
    try:
        lines = store.lines(0, len(store))
        assert [len(line) for line in lines] == [len(DEMO_LINES[0]), 8 << 20, len(DEMO_LINES[1])]
        assert (lines[0], lines[2]) == (DEMO_LINES[0], DEMO_LINES[1])
        assert store.stats.bad == 1
        assert store.stats.samples[0].startswith(f"{log}:2: not a flow record")
        assert spent < 1.0, f"{spent:.2f} s of CPU to load an 8 MiB line"
    finally:
        source.close()
