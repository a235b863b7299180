"""Reading access logs: backups oldest first, gzip by magic, stdin, errors, and following a
live file across rotation and truncation."""

from __future__ import annotations

import gzip
import io
import os
import sys
from pathlib import Path

import pytest

from garrison.flows.reader import FlowSourceError, LogFile, LogFollower, log_files, open_lines
from garrison.flows.writer import AccessLogConfig, AccessLogWriter
from tests.unit.flows import samples


def _read(path: Path, backups: bool = True) -> list[bytes]:
    return [line for log in log_files(path, backups) for line in open_lines(log)]


def test_backups_oldest_first(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"live\n")
    (tmp_path / "access.log.1").write_bytes(b"one\n")
    with gzip.open(tmp_path / "access.log.2.gz", "wb") as f:
        f.write(b"two-gz\n")
    (tmp_path / "access.log.2").write_bytes(b"two\n")
    (tmp_path / "access.log.10").write_bytes(b"ten\n")
    (tmp_path / "access.log-20241120").write_bytes(b"day-20\n")
    with gzip.open(tmp_path / "access.log-20241119.gz", "wb") as f:
        f.write(b"day-19\n")
    (tmp_path / "access.log.bak").write_bytes(b"not a backup\n")
    (tmp_path / "other.log.1").write_bytes(b"other log\n")
    assert _read(log) == [b"day-19", b"day-20", b"ten", b"two-gz", b"two", b"one", b"live"]
    assert _read(log, backups=False) == [b"live"]
    # a backup named alone is read alone
    assert _read(tmp_path / "access.log.2.gz") == [b"two-gz"]


def test_gzip_by_magic_not_name(tmp_path: Path) -> None:
    path = tmp_path / "flows"
    path.write_bytes(gzip.compress(b"a\r\nb\n\nc"))
    assert log_files(path) == [LogFile(path, True)]
    assert _read(path) == [b"a", b"b", b"c"]


def test_writer_rotation_reads_back_every_record_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    record = samples.http_request_denied()
    with AccessLogWriter(AccessLogConfig(path, max_bytes=5000, backups=50)) as writer:
        for _ in range(40):
            writer.write(record)
    assert len(log_files(path)) > 3
    lines = _read(path)
    assert len(lines) == 40
    assert set(lines) == {record.to_json().encode()}


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    class Stdin:
        buffer = io.BytesIO(b"x\ny\n")

    monkeypatch.setattr(sys, "stdin", Stdin())
    assert log_files("-") == [LogFile(Path("-"), False)]
    assert [line for log in log_files("-") for line in open_lines(log)] == [b"x", b"y"]
    assert log_files("-")[0].name == "<stdin>"


def test_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FlowSourceError, match=r"access log .*nope\.log: cannot open: No such"):
        log_files(tmp_path / "nope.log")
    bad = tmp_path / "bad.log"
    bad.write_bytes(gzip.compress(os.urandom(100_000))[:5000])  # cut short
    with pytest.raises(FlowSourceError, match=r"bad\.log: cannot read"):
        _read(bad)
    with pytest.raises(FlowSourceError, match="is a directory"):
        log_files(tmp_path)


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def test_follower_start_partial_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"old\n")
    with LogFollower(path) as follower:
        assert follower.poll() == []
        _append(path, b"a\nb")
        assert follower.poll() == [b"a"]
        _append(path, b"-end\nc")
        assert follower.poll() == [b"b-end"]
        # rotation: the rest of the old file, its partial tail included, then the new file
        _append(path, b"-tail")
        os.rename(path, tmp_path / "access.log.1")
        assert follower.poll() == [b"c-tail"]  # the path is missing for a while
        assert follower.poll() == []
        path.write_bytes(b"new1\nnew2\n")
        assert follower.poll() == [b"new1", b"new2"]
        # copytruncate: the file shrank, read it again from the start
        path.write_bytes(b"t\n")
        assert follower.poll() == [b"t"]
        assert follower.poll() == []


def test_follower_reads_every_file_of_several_rotations_between_two_polls(
    tmp_path: Path,
) -> None:
    """The writer rotates by renaming (live → .1 → .2 ...); twice within one poll interval the
    middle file is already a backup when the follower notices: its lines come too, in order."""
    path = tmp_path / "access.log"
    path.write_bytes(b"old\n")

    def rotate(new_content: bytes) -> None:
        for index in (2, 1):
            if (tmp_path / f"access.log.{index}").exists():
                os.rename(tmp_path / f"access.log.{index}", tmp_path / f"access.log.{index + 1}")
        os.rename(path, tmp_path / "access.log.1")
        path.write_bytes(new_content)

    with LogFollower(path) as follower:
        _append(path, b"a\n")
        assert follower.poll() == [b"a"]
        _append(path, b"b\n")
        rotate(b"m1\nm2\n")
        rotate(b"n1\n")
        assert follower.poll() == [b"b", b"m1", b"m2", b"n1"]
        _append(path, b"n2\n")
        assert follower.poll() == [b"n2"]
        rotate(b"p1\n")  # one rotation: nothing read twice
        assert follower.poll() == [b"p1"]


def test_follower_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"one\ntwo\n")
    with LogFollower(path, start_at_end=False) as follower:
        assert follower.poll() == [b"one", b"two"]
    with pytest.raises(FlowSourceError, match="No such file"):
        LogFollower(tmp_path / "missing")
