"""The access log: flow records as JSON lines in a file, rotated by size.

Whole lines only. Every line (or batch of lines) goes to the file in one `os.write` on a
descriptor opened with `O_APPEND`, under a lock: threads and asyncio tasks of this process
never interleave, and on a local Linux filesystem another process appending to the same file
with `O_APPEND` cannot split a line either (the kernel appends each write at the end of file in
one piece).

Rotation by size keeps `backups` old files (`access.log.1` newest ... `access.log.N` oldest):
move the oldest out of the way, shift the others by renaming, rename the live file to `.1`,
open a new one. A record is never written while that happens (the lock is held), so none is
lost or split across files. No rename lands on an existing file, and the file that leaves is
unlinked by a short-lived thread under a hidden name (`.access.log.PID.N.rotated-out`): on
ext4, replacing or deleting a 100 MiB file frees (and, mounted with `discard`, trims) its
blocks inside the system call, and replacing one also writes the renamed file out first —
each stalled the event loop for tens of milliseconds at every rotation. The
writer also notices when someone else moved or removed the file (logrotate's `create` mode, or
another process that rotated first): it checks the path every `reopen_check_interval_s` and
reopens.

Called from the event loop. A write is one system call into the page cache (microseconds);
the lock is held at most for a rotation (a few renames and an open; `close()` waits for the
unlinks it started). The proxy therefore writes
synchronously from the loop, with no thread and no queue that could drop or reorder records;
`flush()` (an fsync, milliseconds) is for shutdown or a timer run in an executor.

Failures are loud. A write that fails (disk full, file not writable, descriptor gone) raises
`AccessLogError` with the errno; the caller logs it and counts it in
`garrison_proxy_access_log_errors_total` (the agent also keeps the record in its in-memory
ring). A write that was cut short leaves a partial line; the next write starts with a newline,
so the fragment stays alone on its line and the following records parse.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from garrison.flows.record import FlowRecord


class AccessLogError(Exception):
    """The access log could not be opened, written or rotated.

    `written` tells whether the record of the failing call still reached the file (a failed
    rotation does not stop the write into the current file)."""

    def __init__(
        self, path: Path, operation: str, error: OSError | None, written: bool = False
    ) -> None:
        self.path = path
        self.operation = operation
        self.errno = error.errno if error is not None else None
        self.written = written
        reason = error.strerror if error is not None and error.strerror else str(error)
        super().__init__(f"access log {path}: {operation} failed: {reason}")


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """`max_bytes` 0 = never rotate. `backups` 0 = rotation truncates (starts a new file and
    keeps no old one)."""

    path: Path
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5
    file_mode: int = 0o640
    reopen_check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.max_bytes < 0 or self.backups < 0:
            raise ValueError("max_bytes and backups must not be negative")

    def backup_path(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")


_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_DISCARD_SUFFIX = ".rotated-out"  # `.access.log.PID.N.rotated-out`: unlinked by a thread
_DISCARD_JOIN_S = 10.0

log = logging.getLogger(__name__)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("access log: cannot remove the rotated-out file %s: %s", path, exc.strerror)


def _try_lock(fd: int) -> bool:
    """Exclusive flock on the file; False where the filesystem has no locks (rotation then
    relies on the inode check alone)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


class AccessLogWriter:
    """JSON lines to `config.path`. Thread-safe; usable as a context manager."""

    def __init__(
        self, config: AccessLogConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ident = (0, 0)
        self._size = 0
        self._next_check = 0.0
        self._torn = False
        self._vacated = 0
        self._discards: list[threading.Thread] = []
        self.lines_written = 0
        self.rotations = 0
        with self._lock:
            self._open()
            self._discard_leftovers()

    @property
    def config(self) -> AccessLogConfig:
        return self._config

    # -- writing ---------------------------------------------------------------------------

    def write(self, record: FlowRecord) -> None:
        self._write(record.to_json().encode("ascii") + b"\n", 1)

    def write_many(self, records: Iterable[FlowRecord]) -> None:
        """Several records in one system call (all or, on error, a reported prefix)."""
        lines = [record.to_json() for record in records]
        if lines:
            lines.append("")  # the last line's newline
            self._write("\n".join(lines).encode("ascii"), len(lines) - 1)

    def _write(self, data: bytes, count: int) -> None:
        with self._lock:
            if self._fd is None:
                raise AccessLogError(
                    self._config.path, "write", OSError(errno_mod.EBADF, "writer is closed")
                )
            self._notice_external_move()
            rotate_error = self._rotate_if_needed(len(data))
            self._write_all(data)
            self.lines_written += count
        if rotate_error is not None:
            raise AccessLogError(self._config.path, "rotate", rotate_error, written=True)

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        if self._torn:
            data = b"\n" + data
        done = 0
        try:
            while done < len(data):
                n = os.write(self._fd, data[done:])
                if n <= 0:
                    raise OSError(errno_mod.EIO, "write returned nothing")
                done += n
        except OSError as exc:
            if done:
                self._torn = True
                self._size += done
            raise AccessLogError(self._config.path, "write", exc) from exc
        self._torn = False
        self._size += done

    # -- files -----------------------------------------------------------------------------

    def _open(self) -> None:
        path = self._config.path
        try:
            fd = os.open(path, _OPEN_FLAGS, self._config.file_mode)
        except OSError as exc:
            raise AccessLogError(path, "open", exc) from exc
        st = os.fstat(fd)
        old, self._fd = self._fd, fd
        self._ident = (st.st_dev, st.st_ino)
        self._size = st.st_size
        self._next_check = self._clock() + self._config.reopen_check_interval_s
        if old is not None:
            os.close(old)

    def _notice_external_move(self) -> None:
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._config.reopen_check_interval_s
        try:
            st = os.stat(self._config.path)
        except FileNotFoundError:
            self._open()
            return
        except OSError as exc:
            raise AccessLogError(self._config.path, "stat", exc) from exc
        if (st.st_dev, st.st_ino) != self._ident:
            self._open()
        else:
            self._size = st.st_size  # other processes append too

    def _rotate_if_needed(self, incoming: int) -> OSError | None:
        cfg = self._config
        if cfg.max_bytes <= 0 or self._size == 0 or self._size + incoming <= cfg.max_bytes:
            return None
        lock_fd = self._fd
        assert lock_fd is not None
        # Writers in other processes may rotate the same file. Whoever holds the lock on the
        # live file's inode, and still finds that inode at the path, rotates; the others wait,
        # then find a new file at the path and reopen it. Opening the new file closes the old
        # descriptor, which releases the lock.
        locked = _try_lock(lock_fd)
        try:
            st = os.stat(cfg.path)
            if (st.st_dev, st.st_ino) != self._ident:
                self._open()  # someone else rotated first: write into the file they started
                return None
            # No rename ever lands on an existing file: the file that leaves (the oldest
            # backup, or the live file with no backups) first moves to a hidden name and is
            # unlinked by a thread (see `_discard`), and every other file moves into a name
            # just vacated.
            leaving = cfg.backup_path(cfg.backups) if cfg.backups > 0 else cfg.path
            doomed = self._vacate(leaving)
            for index in range(cfg.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(cfg.backup_path(index), cfg.backup_path(index + 1))
            if cfg.backups > 0:
                os.replace(cfg.path, cfg.backup_path(1))
            self._open()
            self.rotations += 1
            if doomed is not None:
                self._discard(doomed)
        except FileNotFoundError:
            self._open()  # moved away under us: the fresh file is what rotation wants anyway
        except OSError as exc:
            return exc  # keep writing to the current file; the caller hears about it
        finally:
            if locked and self._fd == lock_fd:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        return None

    def _vacate(self, path: Path) -> Path | None:
        """Move `path` (if there) to a hidden name of its own in the same directory."""
        self._vacated += 1
        hidden = path.with_name(f".{self._config.path.name}.{os.getpid()}.{self._vacated}"
                                f"{_DISCARD_SUFFIX}")
        try:
            os.replace(path, hidden)
        except FileNotFoundError:
            return None
        return hidden

    def _discard_leftovers(self) -> None:
        """Rotated-out files a killed writer of this log left behind (ours by their name)."""
        pattern = re.compile(rf"\.{re.escape(self._config.path.name)}\.\d+\.\d+"
                             rf"{re.escape(_DISCARD_SUFFIX)}")
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._config.path.parent):
                if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    self._discard(Path(entry.path))

    def _discard(self, path: Path) -> None:
        """Unlink a file rotation let go, in a thread of its own. Freeing a large file's
        blocks is synchronous in `unlink`/`rename` (ext4 with `discard` also trims them):
        tens of milliseconds for 100 MiB, measured in the event loop before this moved here
        (BENCHMARKS.md, "p99 at saturation"). Renaming onto an existing file did the same and
        also made ext4 write the renamed file out first (`auto_da_alloc`)."""
        self._discards = [t for t in self._discards if t.is_alive()]
        thread = threading.Thread(
            target=_unlink_quietly, args=(path,), name="garrison-access-log-discard", daemon=True
        )
        thread.start()
        self._discards.append(thread)

    def flush(self) -> None:
        """Make the written lines durable (fsync). Blocks: call it from a thread."""
        with self._lock:
            if self._fd is None:
                return
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise AccessLogError(self._config.path, "fsync", exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
            discards, self._discards = self._discards, []
        for thread in discards:
            thread.join(_DISCARD_JOIN_S)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> AccessLogWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
