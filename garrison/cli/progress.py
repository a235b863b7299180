"""A progress bar while `observe`, `accesslog summary` and `accesslog export` read access-log
files: on stderr, only when standard output and error are both the terminal and nothing else
is printed to it meanwhile (`observe --last N`, `summary`, `export --out FILE`). Piped or
captured runs never see it, and pay nothing for it (no wrapper at all).

Progress is in bytes of the files on disk: plain files advance line by line, a gzip backup
all at once when it has been read (its uncompressed size is not known up front).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import IO, Any

from garrison.flows.reader import LogFile

# below this much to read, a bar would only flicker
MIN_BYTES = 8 * 1024 * 1024
UPDATE_EVERY = 4096  # lines


def wanted(stderr: IO[Any], output_streams_to_terminal: bool,
           stdout: IO[Any] | None = None) -> bool:
    """Show a bar? Only when both standard output and error are the terminal (a piped
    output, `| grep` or `| less`, would share the screen with it), and not while records
    stream to it."""
    if output_streams_to_terminal or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stderr.isatty() and (stdout or sys.stdout).isatty()
    except (AttributeError, ValueError):
        return False


class ReadProgress:
    """`with ReadProgress(logs) as p: for line in p.track(log, lines): ...`"""

    def __init__(self, logs: list[LogFile], stderr: IO[Any] | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._sizes = {log.path: _size(log) for log in logs}
        self._progress = Progress(
            TextColumn("reading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(file=stderr or sys.stderr),
            transient=True,  # the bar goes when reading is done; the results stay
        )
        self._task = self._progress.add_task(
            _describe(logs), total=sum(self._sizes.values()) or None
        )
        self._done = 0

    def __enter__(self) -> ReadProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def track(self, log: LogFile, lines: Iterable[bytes]) -> Iterator[bytes]:
        update, task, base = self._progress.update, self._task, self._done
        read = 0
        if log.compressed:
            yield from lines
        else:
            for n, line in enumerate(lines, 1):
                read += len(line) + 1
                if n % UPDATE_EVERY == 0:
                    update(task, completed=base + read)
                yield line
        self._done = base + self._sizes.get(log.path, read)
        update(task, completed=self._done)


def total_bytes(logs: list[LogFile]) -> int:
    return sum(_size(log) for log in logs)


def _size(log: LogFile) -> int:
    if str(log.path) == "-":
        return 0
    try:
        return log.path.stat().st_size
    except OSError:
        return 0


def _describe(logs: list[LogFile]) -> str:
    names = [log.path.name for log in logs]
    return names[0] if len(names) == 1 else f"{len(names)} files"
