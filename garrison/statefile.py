"""Writing a state file so that a crash leaves the old version or the new one, never half.

The agent's records (endpoints, policies, what it added to the host's routing and devices,
the cluster cache) live in its state directory and are read again by the next agent or by
`garrison agent --cleanup`: a torn file there would lose what garrison made on the host.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class StateWriteError(OSError):
    """A state file that cannot be written (a full or read-only filesystem, permissions):
    `str()` names the file, the cause and the fix; the old version is still there."""

    def __str__(self) -> str:
        return (f"cannot write {self.filename}: {self.strerror}; free space on its filesystem"
                " or make it writable (the agent keeps its records in --state-dir)")


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path`: a temporary file beside it (its directory made, mode 0700, when
    missing), flushed to disk, then renamed over it. Raises StateWriteError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise StateWriteError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StateWriteError):
            raise StateWriteError(exc.errno, exc.strerror, str(path)) from exc
        raise


class StateFileError(ValueError):
    """A file of the state directory that cannot be read as what it records (corrupted or
    edited by hand); the message names the file and what to do. The agent refuses to start
    rather than run on less than the file recorded."""
