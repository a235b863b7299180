"""Writing a state file so that a crash leaves the old version or the new one, never half.

The agent's records (endpoints, policies, what it added to the host's routing and devices,
the cluster cache) live in its state directory and are read again by the next agent or by
`garrison agent --cleanup`: a torn file there would lose what garrison made on the host.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path`: a temporary file beside it (its directory made, mode 0700, when
    missing), flushed to disk, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StateFileError(ValueError):
    """A file of the state directory that cannot be read as what it records (corrupted or
    edited by hand); the message names the file and what to do. The agent refuses to start
    rather than run on less than the file recorded."""
