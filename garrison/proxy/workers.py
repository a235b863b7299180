"""Several proxy worker processes on one port (`garrison proxy --workers N`), and the parent
that keeps them running.

The parent forks `count` workers, each running a whole proxy (its own event loop, upstream
pool, policy reloader and access-log writer) on a `SO_REUSEPORT` listener of the same port,
so the kernel spreads new connections over them. The parent only supervises:

- workers tell it things in lines on one pipe (`message(fd, text)`): `ready` once listening
  (the parent waits for every worker's before saying it is ready; a worker that fails before
  that — the port is taken — stops the start, with its exit status), anything else goes to
  `on_message(index, text)`;
- SIGHUP, and a tick about once a second, go to `on_hup` / `on_tick` (the CLI reloads the
  policy there and passes SIGHUP on to the workers with `signal_workers`);
- a worker that exits while the proxy runs is restarted, after 0.5 s, doubling up to 30 s
  while restarted workers keep failing within 10 s of their start;
- SIGTERM / SIGINT: every worker gets SIGTERM (each closes its connections and writes what
  it owes) and `grace` seconds to exit, then SIGKILL. A parent that dies without stopping
  them (SIGKILL) takes them along: each asked the kernel for SIGTERM when it does.

The parent blocks those signals and takes them with `sigtimedwait`, so threads it starts
after `block_signals()` (the metrics endpoint) never receive them; each worker unblocks them
first thing. Workers write the access log themselves: one `write()` per batch of whole lines
on a file opened with `O_APPEND`, which Linux never interleaves with another process's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("garrison.proxy")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
RESTART_FIRST = 0.5  # seconds before a crashed worker is started again
RESTART_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that ran this long resets the backoff
PR_SET_PDEATHSIG = 1

# run_worker(index, message_fd) -> exit status; runs in the forked child, sends `ready` on
# message_fd (`message`) once it listens.
WorkerMain = Callable[[int, int], int]


def message(fd: int, index: int, text: str) -> None:
    """One line from worker `index` to the parent (one write below PIPE_BUF: atomic)."""
    os.write(fd, f"{index} {text.replace(chr(10), ' ')[:400]}\n".encode())


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(slots=True)
class _Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    failures: int = 0  # consecutive quick failures
    restart_at: float = 0.0  # monotonic; 0 = not waiting for a restart


class Restartable(Protocol):
    """A supervised worker's restart state (this module's slots and the agent's)."""

    started: float  # monotonic, when it was last started
    failures: int  # consecutive quick failures
    restart_at: float  # monotonic; 0 = not waiting for a restart


def schedule_restart(slot: Restartable, now: float) -> float:
    """`slot`'s worker exited at `now`: when to start it again. RESTART_FIRST, doubling up to
    RESTART_MAX while it keeps failing within STABLE_AFTER of its start. Returns the delay."""
    if now - slot.started >= STABLE_AFTER:
        slot.failures = 0
    slot.failures += 1
    delay = min(RESTART_MAX, RESTART_FIRST * 2.0 ** (slot.failures - 1))
    slot.restart_at = now + delay
    return delay


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the parent dies (even by SIGKILL): no orphaned workers keep
    the port. Linux `prctl(PR_SET_PDEATHSIG)`; where it is missing, nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _remove_orphaned_metrics() -> None:
    """The parent died without its clean-up (SIGKILL): the last of its workers removes the
    per-run metrics directory it made, so nothing of the run is left in /tmp. Several workers
    may race here; whichever is last finds nothing left to remove."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(directory).startswith("garrison-proxy-metrics-"):
        shutil.rmtree(directory, ignore_errors=True)


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    def __init__(
        self,
        count: int,
        run_worker: WorkerMain,
        *,
        grace: float = 5.0,
        on_exit: Callable[[int], None] | None = None,
        on_message: Callable[[int, str], None] | None = None,
        on_hup: Callable[[], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self._on_message = on_message
        self._on_hup = on_hup
        self._on_tick = on_tick
        self._buffer = b""
        self._ready: set[int] = set()
        self.count = count
        self._run_worker = run_worker
        self._grace = grace
        self._on_exit = on_exit
        self._start_timeout = start_timeout
        self._slots = [_Slot(i) for i in range(count)]
        self._ready_r = -1
        self._ready_w = -1
        self._stopping = False
        self._parent = 0
        self._next_tick = 0.0

    @property
    def pids(self) -> list[int]:
        return [slot.pid for slot in self._slots if slot.pid]

    def block_signals(self) -> None:
        """Take SIGTERM, SIGINT, SIGHUP and SIGCHLD with `sigtimedwait` from now on (call
        before starting any thread, so none of them receives these signals)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    # -- start ------------------------------------------------------------------------------------

    def run(self, on_ready: Callable[[], None]) -> int:
        """Start the workers, call `on_ready` once all listen, supervise until SIGTERM /
        SIGINT; the exit status (a worker's when the start failed)."""
        self.block_signals()
        self._parent = os.getpid()
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        try:
            for slot in self._slots:
                self._spawn(slot)
            failed = self._wait_ready()
            if failed is not None:
                self._stop_all()
                return failed
            on_ready()
            self._supervise()
            self._stop_all()
            return 0
        finally:
            os.close(self._ready_r)
            os.close(self._ready_w)

    def _spawn(self, slot: _Slot) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                _die_with_parent(self._parent)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                os.close(self._ready_r)
                status = self._run_worker(slot.index, self._ready_w)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                if os.getppid() != self._parent:
                    _remove_orphaned_metrics()
                os._exit(status)
        slot.pid = pid
        slot.started = time.monotonic()
        slot.restart_at = 0.0

    def _wait_ready(self) -> int | None:
        """None once every worker listens; else the exit status of one that failed."""
        ready = 0
        deadline = time.monotonic() + self._start_timeout
        while ready < self.count:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("the workers did not start within %.0f s", self._start_timeout)
                return 1
            readable, _, _ = select.select([self._ready_r], [], [], min(left, 0.1))
            if readable:
                self._read_messages()
            ready = len(self._ready)
            for slot, status in self._reap():
                if self._on_exit is not None:
                    self._on_exit(slot.pid)
                slot.pid = 0
                code = os.waitstatus_to_exitcode(status)
                return code if code > 0 else 1
            pending = signal.sigpending() & {signal.SIGTERM, signal.SIGINT}
            if pending:
                signal.sigwait(pending)
                return 0
        return None

    # -- running ----------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            waits = [slot.restart_at - now for slot in self._slots if slot.restart_at]
            timeout = max(0.0, min([0.05, *waits]))
            info = signal.sigtimedwait(SIGNALS, timeout)
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    self._stopping = True
                    break
                if info.si_signo == signal.SIGHUP:
                    if self._on_hup is not None:
                        self._on_hup()
                    else:
                        self.signal_workers(signal.SIGHUP)
            self._read_messages()
            if self._on_tick is not None and now >= self._next_tick:
                self._next_tick = now + 1.0
                self._on_tick()
            self._handle_exits()
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at and now >= slot.restart_at:
                    self._spawn(slot)
                    log.info("worker %d restarted (pid %d)", slot.index, slot.pid)

    def _reap(self) -> list[tuple[_Slot, int]]:
        out: list[tuple[_Slot, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return out
            if pid == 0:
                return out
            for slot in self._slots:
                if slot.pid == pid:
                    out.append((slot, status))

    def _handle_exits(self) -> None:
        for slot, status in self._reap():
            pid, slot.pid = slot.pid, 0
            if self._on_exit is not None:
                self._on_exit(pid)
            delay = schedule_restart(slot, time.monotonic())
            log.error("worker %d (pid %d) %s; restarting it in %.1f s",
                      slot.index, pid, describe_status(status), delay)

    def _read_messages(self) -> None:
        while True:
            try:
                data = os.read(self._ready_r, 65536)
            except BlockingIOError:
                return
            if not data:
                return
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            for raw in lines:
                index_text, _, text = raw.decode(errors="replace").partition(" ")
                if not index_text.isdigit():
                    continue
                if text == "ready":
                    self._ready.add(int(index_text))
                elif self._on_message is not None:
                    self._on_message(int(index_text), text)

    def worker_pid(self, index: int) -> int:
        return self._slots[index].pid

    def signal_workers(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    # -- stop -------------------------------------------------------------------------------------

    def _stop_all(self) -> None:
        self.signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self._grace
        while self.pids and time.monotonic() < deadline:
            for slot, _status in self._reap():
                if self._on_exit is not None:
                    self._on_exit(slot.pid)
                slot.pid = 0
            if self.pids:
                signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        for slot in self._slots:
            if slot.pid:
                log.error("worker %d (pid %d) did not stop within %.1f s: killed",
                          slot.index, slot.pid, self._grace)
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                    os.waitpid(slot.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                except OSError as exc:  # pragma: no cover
                    if exc.errno != errno.ECHILD:
                        raise
                if self._on_exit is not None:
                    self._on_exit(slot.pid)
                slot.pid = 0
