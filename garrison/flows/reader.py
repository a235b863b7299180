"""Reading access logs back: a log with its rotated backups, gzip, standard input, and
following a live file as `tail -F` does.

The writer (`garrison.flows.writer`) rotates by size: `access.log` is live, `access.log.1` the
newest backup, `access.log.N` the oldest. logrotate may also compress backups
(`access.log.2.gz`) or name them by date (`access.log-20241121[.gz]`). `log_files()` lists a
log's files oldest first, so records come out in the order they were written. Compression is
recognised by the gzip magic bytes, not by the name.

`LogFollower` notices rotation by the path naming another file (inode or device changed):
it reads what is left of the old file, the final line without a newline included (it belongs
to the rotated file and will never be completed), then the backups made after it when the log
rotated more than once between two polls, and goes on with the new one from its start.
A file that shrank below what was read (copytruncate) is read again from the start.
"""

from __future__ import annotations

import gzip
import os
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

_GZIP_MAGIC = b"\x1f\x8b"
_NUMBERED = re.compile(r"\.(\d+)(\.gz)?$")
_DATEEXT = re.compile(r"^-\d{8,10}(\.gz)?$")
CHUNK = 1 << 20


class FlowSourceError(Exception):
    """A log that cannot be opened or read; the message names the path and the reason."""


def _os_error(name: str, operation: str, exc: OSError) -> FlowSourceError:
    reason = exc.strerror or str(exc)
    fix = ""
    if isinstance(exc, PermissionError):
        fix = " (run as root or as a member of the log's group)"
    return FlowSourceError(f"access log {name}: cannot {operation}: {reason}{fix}")


@dataclass(frozen=True, slots=True)
class LogFile:
    path: Path  # Path("-") for standard input
    compressed: bool

    @property
    def name(self) -> str:
        return "<stdin>" if str(self.path) == "-" else str(self.path)


def _is_gzip(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) == _GZIP_MAGIC
    except OSError as exc:
        raise _os_error(str(path), "open", exc) from exc


def log_files(path: str | Path, include_backups: bool = True) -> list[LogFile]:
    """The files of one log, oldest first: dateext backups (oldest date first), numbered
    backups from the highest number to `.1` (`.N.gz` before `.N`), then PATH. `-` is standard
    input. A PATH that is itself a backup or compressed is read alone."""
    if str(path) == "-":
        return [LogFile(Path("-"), False)]
    live = Path(path)
    if not live.exists():
        raise FlowSourceError(f"access log {live}: cannot open: No such file or directory")
    if live.is_dir():
        raise FlowSourceError(f"access log {live}: is a directory (give the log file's path)")
    compressed = _is_gzip(live)
    if not include_backups or compressed or _NUMBERED.search(live.name):
        return [LogFile(live, compressed)]
    numbered: list[tuple[int, int, Path]] = []
    dated: list[Path] = []
    prefix = live.name
    try:
        siblings = list(live.parent.iterdir())
    except OSError as exc:
        raise _os_error(str(live.parent), "list", exc) from exc
    for sibling in siblings:
        rest = sibling.name[len(prefix):] if sibling.name.startswith(prefix) else None
        if not rest or not sibling.is_file():
            continue
        if m := re.fullmatch(r"\.(\d+)(\.gz)?", rest):
            numbered.append((int(m.group(1)), 0 if m.group(2) else 1, sibling))
        elif _DATEEXT.match(rest):
            dated.append(sibling)
    ordered = sorted(dated, key=lambda p: p.name.removesuffix(".gz"))
    ordered += [p for _, _, p in sorted(numbered, key=lambda t: (-t[0], t[1]))]
    return [LogFile(p, _is_gzip(p)) for p in ordered] + [LogFile(live, compressed)]


def open_lines(log: LogFile) -> Iterator[bytes]:
    """The non-blank lines of one file as bytes, without line endings, streamed."""
    if str(log.path) == "-":
        yield from _lines(sys.stdin.buffer, log.name)
        return
    try:
        raw: IO[bytes] = (
            gzip.open(log.path, "rb")  # type: ignore[assignment]  # noqa: SIM115 - with below
            if log.compressed
            else log.path.open("rb")
        )
    except OSError as exc:
        raise _os_error(log.name, "open", exc) from exc
    with raw:
        yield from _lines(raw, log.name)


def _lines(stream: IO[bytes], name: str) -> Iterator[bytes]:
    # the line not yet ended, in pieces: a line longer than a read is joined once, when its
    # newline comes, not copied again on every read (which was quadratic in its length)
    pending: list[bytes] = []
    while True:
        try:
            chunk = stream.read(CHUNK)
        except (OSError, EOFError, zlib.error) as exc:
            raise FlowSourceError(f"access log {name}: cannot read: {exc}") from exc
        if not chunk:
            break
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
        lines = chunk.split(b"\n")
        pending = [lines.pop()]
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                yield line
    rest = b"".join(pending)
    if rest.endswith(b"\r"):
        rest = rest[:-1]
    if rest.strip():
        yield rest  # a log cut short by a crash: the last line has no newline


class LogFollower:
    """New complete lines of a live log, across rotation and truncation; `poll()` never
    blocks. `start_at_end` False reads the file's current content first."""

    def __init__(self, path: str | Path, *, start_at_end: bool = True) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self._ident: tuple[int, int] | None = None
        self._partial = b""
        self._offset = 0
        if not self._open():
            raise FlowSourceError(f"access log {self.path}: cannot open: No such file or directory")
        if start_at_end and self._file is not None:
            self._offset = self._file.seek(0, os.SEEK_END)

    def _open(self) -> bool:
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _os_error(str(self.path), "open", exc) from exc
        st = os.fstat(f.fileno())
        self._file, self._ident, self._offset, self._partial = f, (st.st_dev, st.st_ino), 0, b""
        return True

    def _read(self, *, final: bool) -> list[bytes]:
        assert self._file is not None
        self._file.seek(self._offset)
        data = self._file.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return [line.removesuffix(b"\r") for line in lines if line.strip()]

    def poll(self) -> list[bytes]:
        out: list[bytes] = []
        if self._file is None and not self._open():
            return out
        assert self._file is not None
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current != self._ident:  # rotated (or removed): finish the old file
            out += self._read(final=True)
            self._file.close()
            self._file = None
            if current is not None:
                for backup in self._newer_backups():
                    out += open_lines(backup)
                if self._open():
                    out += self._read(final=False)
            return out
        if os.fstat(self._file.fileno()).st_size < self._offset:  # truncated in place
            self._offset, self._partial = 0, b""
        out += self._read(final=False)
        return out

    def _newer_backups(self) -> list[LogFile]:
        """The backups made after the file just finished (the log rotated more than once
        between two polls): whole files, read oldest first. None when that file is not
        among the backups (it was removed or compressed): which ones are newer is unknown."""
        try:
            backups = log_files(self.path)[:-1]
        except FlowSourceError:
            return []
        for index, backup in enumerate(backups):
            try:
                st = os.stat(backup.path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == self._ident:
                return backups[index + 1:]
        return []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
