"""What loading a log file found, kept between runs of `garrison ui`: reopening is instant.

Per plain log file of at least `MIN_BYTES`, the store's parts as they were read — each byte
range's record offsets, map counters and lines that were no record — with the file's device
and inode, how far it was read and a digest of the last 64 KB read. They are used again when
the path names the same file (device, inode), unchanged (size and modification time) or grown
with the same bytes before that point, and read with the same code: a log copied for review,
a rotated backup, or the live log appended to since, of which only the new records are read.
A file rewritten, truncated or replaced, or another version of the map's code, reads the log
again.

Where: `$XDG_CACHE_HOME/garrison/ui` (else `~/.cache/garrison/ui`), one file per log, the
`KEEP` most recently used kept. The entries are pickles, which run code when loaded, so the
directory is made 0700 and an entry is only read when it and its directory belong to the user
and no one else may write them. A cache that cannot be read or written is not used; the log
is read as without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_BYTES = 32 << 20  # a smaller log is read again in well under a second
KEEP = 8
TAIL_BYTES = 64 << 10
FORMAT = 1
# the code whose counting is kept: another version of any of these reads the log again
CODE = ("garrison.flows.servicemap", "garrison.flows.mapscan", "garrison.flows.summary",
        "garrison.flows.codec", "garrison.flows.flowdict", "garrison.ui.store")


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "garrison" / "ui"


def code_digest() -> str:
    digest = hashlib.sha256(f"{FORMAT}".encode())
    for name in CODE:
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None)
        if where is None:
            return ""  # not loaded from a file: nothing to compare with
        digest.update(Path(where).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedParts:
    """The parts of a file read before, covering bytes [0, `end`): (begin, end, the part
    pickled, the part) in file order."""

    end: int
    parts: list[tuple[int, int, bytes, Any]]


class MapCache:
    """`load()` what was kept of a file, `save()` what was read of it."""

    def __init__(self, directory: Path, keep: int = KEEP, min_bytes: int = MIN_BYTES) -> None:
        self.directory = directory
        self.keep = keep
        self.min_bytes = min_bytes
        self._code = code_digest()

    def _entry(self, path: Path) -> Path:
        name = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:32]
        return self.directory / f"{name}.map"

    def _trusted(self, st: os.stat_result) -> bool:
        return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)

    def load(self, path: Path, fd: int, end: int) -> CachedParts | None:
        """The parts kept of the file open as `fd` (read up to `end`), when still valid."""
        if not self._code or end < self.min_bytes:
            return None
        entry = self._entry(path)
        try:
            if not self._trusted(os.stat(self.directory)):
                return None
            with open(entry, "rb") as f:
                if not self._trusted(os.fstat(f.fileno())):
                    return None
                kept = pickle.load(f)
            st = os.fstat(fd)
            if (kept["format"], kept["code"], kept["dev"], kept["ino"]) != (
                    FORMAT, self._code, st.st_dev, st.st_ino):
                return None
            # unchanged, or grown (appended to) with the same bytes where reading stopped
            same = (st.st_size, st.st_mtime_ns) == (kept["size"], kept["mtime_ns"])
            covered = kept["end"]
            if not (same or st.st_size > kept["size"]) or not 0 < covered <= end \
                    or kept["tail"] != _tail(fd, covered):
                return None
            parts = [(a, b, data, pickle.loads(data)) for a, b, data in kept["parts"]]
            os.utime(entry)  # recently used
            return CachedParts(covered, parts)
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError,
                AttributeError, ImportError, IndexError):
            return None

    def save(self, path: Path, fd: int, parts: list[tuple[int, int, bytes]]) -> None:
        """Keep the parts read of a file (they cover [0, the last part's end))."""
        if not self._code or not parts or parts[-1][1] < self.min_bytes:
            return
        end = parts[-1][1]
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self._trusted(os.stat(self.directory)):
                return
            st = os.fstat(fd)
            kept = {"format": FORMAT, "code": self._code, "dev": st.st_dev, "ino": st.st_ino,
                    "size": st.st_size, "mtime_ns": st.st_mtime_ns, "end": end,
                    "tail": _tail(fd, end), "parts": parts}
            with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp",
                                             delete=False) as f:
                try:
                    pickle.dump(kept, f, protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException:
                    os.unlink(f.name)
                    raise
            os.replace(f.name, self._entry(path))
            self._evict()
        except OSError:
            return

    def _evict(self) -> None:
        entries = []
        for entry in self.directory.glob("*.map"):
            with contextlib.suppress(OSError):
                entries.append((entry.stat().st_mtime, entry))
        for entry in self.directory.glob("*.tmp"):  # left by a run stopped while writing
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < time.time() - 3600:
                    entry.unlink()
        entries.sort(reverse=True)
        for _, entry in entries[self.keep:]:
            with contextlib.suppress(OSError):
                entry.unlink()


def _tail(fd: int, end: int) -> str:
    start = max(0, end - TAIL_BYTES)
    return hashlib.sha256(os.pread(fd, end - start, start)).hexdigest()


__all__ = ["MIN_BYTES", "CachedParts", "MapCache", "default_directory"]
