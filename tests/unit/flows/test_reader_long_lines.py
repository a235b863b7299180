"""A line far longer than one read (a runaway writer, a binary file given by mistake) is
read in time linear in its length: reading it used to copy the line so far on every read."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from garrison.flows.reader import LogFile, open_lines


class _ShortReads(io.RawIOBase):
    """A stream that returns at most 4 KiB a read, as a pipe or socket may."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = 4096 if size < 0 else min(size, 4096)
        out = self._data[self._at:self._at + size]
        self._at += len(out)
        return out


def test_a_line_of_eight_mib_read_4_kib_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    long_line = b"x" * (8 << 20)
    data = b'{"first":1}\n' + long_line + b'\n{"last":2}\r\n' + long_line[:5000]
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=_ShortReads(data)))
    started = time.process_time()
    lines = list(open_lines(LogFile(Path("-"), False)))
    spent = time.process_time() - started
    assert [len(line) for line in lines] == [11, 8 << 20, 10, 5000]
    assert lines[0] == b'{"first":1}' and lines[2] == b'{"last":2}'
    assert lines[1] == long_line
    assert spent < 1.0, f"{spent:.2f} s of CPU to read 8 MiB"
