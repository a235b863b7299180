"""One agent per state directory, API socket and pin root, held while it runs.

Two agents sharing any of the three corrupt each other: the second takes over the first's
socket (the first is then unreachable, though it runs on), writes its own endpoints and
policies into the first's maps (its reconcile deletes every entry it does not want), or
rewrites the first's records. So an agent takes an exclusive `flock` on each before it
touches anything — `<state-dir>/agent.lock`, `.<socket name>.lock` beside the socket, and
the pin root directory itself (bpffs holds no regular files) — and refuses to start when
another process holds one. `garrison agent --cleanup` takes the same locks: it never removes
what a running agent uses, whichever --socket it was given. The kernel releases the locks
when the process ends, SIGKILL included, so a killed agent never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from garrison.statefile import StateWriteError


class AgentRunningError(Exception):
    """Another process holds one of the agent's locks: `flag` (`--socket PATH`), `who`."""

    def __init__(self, flag: str, who: str) -> None:
        super().__init__(f"{flag} is in use by a running agent ({who})")
        self.flag = flag
        self.who = who


class Claim:
    """The locks an agent holds (open descriptors); released by `release` or process end."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def take(self, path: Path, flag: str, directory: bool = False) -> None:
        """Lock `path` (a lock file, made when missing, or an existing directory) or raise
        AgentRunningError naming `flag` and the process that holds it."""
        if directory:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if not path.is_file():  # a read-only directory: say which and what to do
                    raise StateWriteError(exc.errno, exc.strerror, str(path)) from exc
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # a lock needs no write
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise AgentRunningError(flag, who) from None
        except BaseException:
            os.close(fd)
            raise
        self._fds.append(fd)


def lock_path_of_socket(socket_path: Path) -> Path:
    return socket_path.with_name(f".{socket_path.name}.lock")


def claim(state_dir: Path, socket_path: Path, pin_root: Path | None) -> Claim:
    """The three locks of a starting agent (the state directory and the socket's directory
    made when missing; `pin_root` must exist, None: not locked). Raises AgentRunningError
    (after releasing what it took) when another agent holds one."""
    held = Claim()
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        held.take(state_dir / "agent.lock", f"--state-dir {state_dir}")
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        held.take(lock_path_of_socket(socket_path), f"--socket {socket_path}")
        if pin_root is not None:
            held.take(pin_root, f"--bpffs-root {pin_root}", directory=True)
    except BaseException:
        held.release()
        raise
    return held


def check_stopped(state_dir: Path, socket_path: Path, pin_root: Path) -> Claim:
    """The locks `--cleanup` holds while it removes an agent's things: only those whose
    paths exist (it creates nothing). Raises AgentRunningError when an agent holds one."""
    held = Claim()
    try:
        if state_dir.is_dir():
            held.take(state_dir / "agent.lock", f"--state-dir {state_dir}")
        if socket_path.parent.is_dir():
            held.take(lock_path_of_socket(socket_path), f"--socket {socket_path}")
        if pin_root.is_dir():
            held.take(pin_root, f"--bpffs-root {pin_root}", directory=True)
    except BaseException:
        held.release()
        raise
    return held


def _holder(fd: int) -> int | None:
    """The pid holding a flock on the file of `fd`, from /proc/locks (None: not found)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF" (blocked waiters: "-> ...")
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
            with contextlib.suppress(ValueError):
                return int(parts[4])
    return None
