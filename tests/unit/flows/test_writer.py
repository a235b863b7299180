"""The access log: whole lines only, every record exactly once, rotation, external moves,
and loud failures."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from garrison.flows.build import l7_http_request
from garrison.flows.record import FlowRecord, Verdict
from garrison.flows.writer import AccessLogConfig, AccessLogError, AccessLogWriter
from tests.unit.flows import samples


def _record(tag: str) -> FlowRecord:
    return l7_http_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        method="GET",
        path=f"/r/{tag}",
        host="deathstar",
        allowed_by=[samples.RULE1],
    )


def _tag(line: str) -> str:
    record = FlowRecord.from_json(line)  # every line parses as a whole record
    assert record.l7 is not None and record.l7.http is not None
    return record.l7.http.url.removeprefix("http://deathstar/r/")


def _log_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + "*"))


def _all_lines(path: Path) -> list[str]:
    lines: list[str] = []
    for file in _log_files(path):
        data = file.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{file} ends inside a line"
        lines.extend(data.decode("ascii").splitlines())
    return lines


def _backup_index(file: Path) -> int:
    suffix = file.name.rpartition(".")[2]
    return int(suffix) if suffix.isdigit() else 0


def test_threads_and_tasks_every_record_once_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    config = AccessLogConfig(path=path, max_bytes=128 * 1024, backups=200)
    threads_n, per_thread = 8, 2000
    tasks_n, per_task = 50, 40
    line_len = len(_record("0/0000").to_json()) + 1
    # Build the records up front so the writers race on the file, not on JSON encoding.
    batches = [[_record(f"{t}/{i:04d}") for i in range(per_thread)] for t in range(threads_n)]
    task_batches = [[_record(f"a{t}/{i:04d}") for i in range(per_task)] for t in range(tasks_n)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n + 1)

    with AccessLogWriter(config) as writer:

        def run(records: list[FlowRecord]) -> None:
            start.wait()
            try:
                for record in records:
                    writer.write(record)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        async def task(records: list[FlowRecord]) -> None:
            for record in records:
                writer.write(record)
                await asyncio.sleep(0)

        async def tasks() -> None:
            await asyncio.gather(*(task(b) for b in task_batches))

        threads = [threading.Thread(target=run, args=(b,)) for b in batches]
        for t in threads:
            t.start()
        start.wait()
        asyncio.run(tasks())
        for t in threads:
            t.join()
        assert writer.rotations > 10

    assert not errors
    lines = _all_lines(path)
    counts = Counter(_tag(line) for line in lines)
    expected = {f"{t}/{i:04d}" for t in range(threads_n) for i in range(per_thread)}
    expected |= {f"a{t}/{i:04d}" for t in range(tasks_n) for i in range(per_task)}
    assert set(counts) == expected
    assert max(counts.values()) == 1
    assert writer.lines_written == len(expected)
    for file in _log_files(path):
        assert file.stat().st_size <= config.max_bytes + line_len
    # Each thread's records come out in the order it wrote them, oldest file first.
    ordered: list[str] = []
    for file in sorted(_log_files(path), key=_backup_index, reverse=True):
        ordered.extend(_tag(line) for line in file.read_text().splitlines())
    mine = [tag for tag in ordered if tag.startswith("3/")]
    assert mine == sorted(mine)


def test_rotation_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    line_len = len(_record("0000").to_json()) + 1
    config = AccessLogConfig(path=path, max_bytes=line_len * 5, backups=3)
    with AccessLogWriter(config) as writer:
        for i in range(40):
            writer.write(_record(f"{i:04d}"))
    assert [f.name for f in _log_files(path)] == [
        "access.log",
        "access.log.1",
        "access.log.2",
        "access.log.3",
    ]
    # 5 lines per file; the newest 20 records survive, oldest in .3.
    by_file = {f.name: [_tag(x) for x in f.read_text().splitlines()] for f in _log_files(path)}
    assert by_file["access.log.3"] == [f"{i:04d}" for i in range(20, 25)]
    assert by_file["access.log.2"] == [f"{i:04d}" for i in range(25, 30)]
    assert by_file["access.log.1"] == [f"{i:04d}" for i in range(30, 35)]
    assert by_file["access.log"] == [f"{i:04d}" for i in range(35, 40)]


def test_no_backups_starts_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    line_len = len(_record("0000").to_json()) + 1
    with AccessLogWriter(AccessLogConfig(path=path, max_bytes=line_len * 2, backups=0)) as w:
        for i in range(5):
            w.write(_record(f"{i:04d}"))
    assert [f.name for f in _log_files(path)] == ["access.log"]
    assert [_tag(x) for x in path.read_text().splitlines()] == ["0004"]


def test_no_rotation_when_max_bytes_is_zero(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with AccessLogWriter(AccessLogConfig(path=path, max_bytes=0)) as writer:
        for i in range(50):
            writer.write(_record(f"{i:04d}"))
    assert [f.name for f in _log_files(path)] == ["access.log"]


def test_reopens_after_logrotate_moves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    config = AccessLogConfig(path=path, reopen_check_interval_s=0)
    with AccessLogWriter(config) as writer:
        writer.write(_record("before"))
        path.rename(tmp_path / "access.log-20241121")  # logrotate `create` mode
        writer.write(_record("after"))
        writer.write(_record("after2"))
    moved = (tmp_path / "access.log-20241121").read_text().splitlines()
    assert [_tag(x) for x in moved] == ["before"]
    assert [_tag(x) for x in path.read_text().splitlines()] == ["after", "after2"]


def test_reopens_after_the_file_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with AccessLogWriter(AccessLogConfig(path=path, reopen_check_interval_s=0)) as writer:
        writer.write(_record("gone"))
        path.unlink()
        writer.write(_record("new"))
    assert [_tag(x) for x in path.read_text().splitlines()] == ["new"]


def test_periodic_check_uses_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    now = [0.0]
    config = AccessLogConfig(path=path, reopen_check_interval_s=1.0)
    with AccessLogWriter(config, clock=lambda: now[0]) as writer:
        writer.write(_record("1"))
        path.rename(tmp_path / "moved")
        now[0] = 0.5
        writer.write(_record("2"))
        now[0] = 1.5
        writer.write(_record("3"))
    assert [_tag(x) for x in (tmp_path / "moved").read_text().splitlines()] == ["1", "2"]
    assert [_tag(x) for x in path.read_text().splitlines()] == ["3"]


def test_two_writers_rotating_the_same_file(tmp_path: Path) -> None:
    """Two writers (as two processes would be: separate locks and descriptors) rotate one
    file: no line lost, none split, none duplicated."""
    path = tmp_path / "access.log"
    config = AccessLogConfig(path=path, max_bytes=16 * 1024, backups=500)
    per_writer = 1500
    records = {name: [_record(f"{name}/{i:04d}") for i in range(per_writer)] for name in ("p", "q")}

    def run(name: str) -> None:
        with AccessLogWriter(config) as writer:
            for record in records[name]:
                writer.write(record)

    threads = [threading.Thread(target=run, args=(name,)) for name in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(_tag(line) for line in _all_lines(path))
    assert len(counts) == 2 * per_writer
    assert max(counts.values()) == 1


_OTHER_PROCESS = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
line = sys.argv[2].encode()
for i in range(int(sys.argv[3])):
    os.write(fd, line.replace(b"NNNN", b"%04d" % i) + b"\\n")
"""


def test_another_process_appending(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    template = _record("x/NNNN").to_json()
    config = AccessLogConfig(path=path, max_bytes=0)
    with AccessLogWriter(config) as writer:
        other = subprocess.Popen(
            [sys.executable, "-c", _OTHER_PROCESS, str(path), template, "2000"]
        )
        for i in range(2000):
            writer.write(_record(f"me/{i:04d}"))
        assert other.wait(timeout=30) == 0
    counts = Counter(_tag(line) for line in _all_lines(path))
    assert len(counts) == 4000 and max(counts.values()) == 1


def test_write_many_is_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with AccessLogWriter(AccessLogConfig(path=path)) as writer:
        writer.write_many([_record("1"), _record("2")])
        writer.write_many([])
        assert writer.lines_written == 2
    lines = path.read_text().splitlines()
    assert [_tag(x) for x in lines] == ["1", "2"]


def test_disk_full_is_a_typed_error() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    config = AccessLogConfig(path=Path("/dev/full"), max_bytes=0)
    with AccessLogWriter(config) as writer, pytest.raises(AccessLogError) as info:
        writer.write(_record("lost"))
    assert info.value.errno == errno.ENOSPC
    assert info.value.operation == "write"
    assert not info.value.written
    assert "/dev/full" in str(info.value)


def test_cannot_open_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(AccessLogError) as info:
        AccessLogWriter(AccessLogConfig(path=tmp_path / "missing-dir" / "access.log"))
    assert info.value.errno == errno.ENOENT
    assert info.value.operation == "open"


def test_closed_writer_refuses(tmp_path: Path) -> None:
    writer = AccessLogWriter(AccessLogConfig(path=tmp_path / "access.log"))
    writer.flush()
    writer.close()
    writer.close()
    writer.flush()  # nothing to do
    assert writer.closed
    with pytest.raises(AccessLogError):
        writer.write(_record("late"))


def test_short_write_leaves_the_fragment_on_its_own_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "access.log"
    writer = AccessLogWriter(AccessLogConfig(path=path))
    real_write = os.write
    calls = {"n": 0}

    def flaky_write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, data[:10])  # the disk filled up mid-line...
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("garrison.flows.writer.os.write", flaky_write)
    with pytest.raises(AccessLogError):
        writer.write(_record("torn"))
    writer.write(_record("next"))  # ...and has room again
    writer.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    with pytest.raises(ValueError):
        json.loads(lines[0])
    assert _tag(lines[1]) == "next"


def test_failed_rotation_still_writes_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "access.log"
    line_len = len(_record("0000").to_json()) + 1
    writer = AccessLogWriter(AccessLogConfig(path=path, max_bytes=line_len, backups=2))
    writer.write(_record("0000"))

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("garrison.flows.writer.os.replace", refuse)
    with pytest.raises(AccessLogError) as info:
        writer.write(_record("0001"))
    assert info.value.operation == "rotate" and info.value.written
    writer.close()
    assert [_tag(x) for x in path.read_text().splitlines()] == ["0000", "0001"]


def test_rotation_never_renames_onto_an_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replacing a file on ext4 frees the replaced one's blocks and first writes the renamed
    one out, inside the system call: rotation moves the leaving file aside instead, and every
    backup ends up where it did before."""
    line_len = len(_record("0000").to_json()) + 1
    real_replace = os.replace
    onto_existing: list[str] = []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if os.path.exists(dst):
            onto_existing.append(f"{src} -> {dst}")
        real_replace(src, dst)

    monkeypatch.setattr("garrison.flows.writer.os.replace", replace)
    for backups in (2, 0):
        log = tmp_path / f"b{backups}" / "access.log"
        log.parent.mkdir()
        with AccessLogWriter(AccessLogConfig(path=log, max_bytes=line_len * 2,
                                             backups=backups)) as writer:
            for i in range(9):
                writer.write(_record(f"{i:04d}"))
        assert onto_existing == []
        # close() waited for the rotated-out files' unlinks: nothing hidden is left behind
        names = sorted(f.name for f in log.parent.iterdir())
        assert names == (["access.log", "access.log.1", "access.log.2"] if backups
                         else ["access.log"])
        tags = [[_tag(x) for x in (log.parent / n).read_text().splitlines()]
                for n in reversed(names)]
        assert tags == ([["0004", "0005"], ["0006", "0007"], ["0008"]] if backups
                        else [["0008"]])


def test_rotated_out_files_a_killed_writer_left_are_removed_at_start(tmp_path: Path) -> None:
    """A writer killed between moving a backup aside and unlinking it leaves a hidden file; the
    next writer of that log removes it, and nothing else."""
    path = tmp_path / "access.log"
    leftover = tmp_path / ".access.log.4242.3.rotated-out"
    leftover.write_text("old records\n")
    others = [tmp_path / ".access.log.swp", tmp_path / ".other.log.1.1.rotated-out",
              tmp_path / "access.log.1"]
    for other in others:
        other.write_text("not the writer's\n")
    with AccessLogWriter(AccessLogConfig(path=path)) as writer:
        writer.write(_record("0000"))
    assert not leftover.exists()
    assert all(other.exists() for other in others)
