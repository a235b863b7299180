"""Policy reload for `garrison proxy`: on SIGHUP, or when a policy file changes.

The files are polled every `interval` seconds (modification time, size and inode of every
policy file the paths name, so a file added to a policy directory counts too). A new policy
set is applied whole or not at all: if any file is invalid, every error is logged with its
`file:line` and the policy in force stays. What the server does with live connections is in
`garrison.proxy.server` ("Policy reload").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from garrison.policies.errors import PolicyValidationError
from garrison.policies.loader import load_paths, policy_files
from garrison.policies.model import Policy
from garrison.proxy.policyview import PolicyConfigError, PolicySource

log = logging.getLogger("garrison.proxy.reload")

Snapshot = tuple[tuple[str, int, int, int], ...]
PolicyBuilder = Callable[[Sequence[Policy]], PolicySource]


class PolicyLoadError(Exception):
    """The policy files cannot be used; `lines` are the messages (`file:line: ...`)."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))


def snapshot(paths: Sequence[str | Path]) -> Snapshot:
    """What identifies the current content of the policy files (cheap: stat only)."""
    files, _ = policy_files(paths)
    out = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, -1, -1, -1))
            continue
        out.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def load_policy(paths: Sequence[str | Path], build: PolicyBuilder) -> PolicySource:
    """Read, validate and build; raises PolicyLoadError with every problem."""
    try:
        result = load_paths(paths)
    except PolicyValidationError as exc:
        issues = sorted(exc.issues, key=lambda i: (i.path, i.document, i.line))
        raise PolicyLoadError([str(issue) for issue in issues]) from exc
    for warning in result.warnings:
        log.warning("%s", warning)
    try:
        return build(result.policies)
    except PolicyConfigError as exc:
        raise PolicyLoadError([str(exc)]) from exc
    except ValueError as exc:  # e.g. an RE2 pattern the matcher cannot compile
        raise PolicyLoadError([f"policy cannot be enforced: {exc}"]) from exc


class PolicyReloader:
    """Watches `paths`; on a change or SIGHUP builds a new PolicySource and hands it to
    `apply`. `revision` counts the policies applied (the first load is revision 1)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        build: PolicyBuilder,
        apply: Callable[[PolicySource], None],
        *,
        interval: float = 1.0,
        revision: int = 1,
        announce: bool = True,
    ) -> None:
        # announce: log "policy revision N applied" (the parent of several workers says it
        # itself, once every worker has applied it)
        self._announce = announce
        self._paths = list(paths)
        self._build = build
        self._apply = apply
        self._interval = interval
        self.revision = revision
        self._snapshot = snapshot(self._paths)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(
        self, loop: asyncio.AbstractEventLoop, *, sighup: bool = True, watch: bool = True
    ) -> None:
        """SIGHUP reloads (`sighup`); the files are polled (`watch`)."""
        self._loop = loop
        if sighup:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        if watch:
            self._task = loop.create_task(self._poll())

    def changed(self) -> bool:
        """Whether the files changed since the last load (for a caller that polls itself)."""
        current = snapshot(self._paths)
        if current == self._snapshot:
            return False
        self._snapshot = current
        log.info("policy files changed")
        return True

    async def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                current = snapshot(self._paths)
            except Exception:
                log.exception("cannot check the policy files")
                continue
            if current != self._snapshot:
                self._snapshot = current
                log.info("policy files changed")
                self.reload()

    def reload(self) -> bool:
        """Load now; True when a new policy was applied."""
        self._snapshot = snapshot(self._paths)
        try:
            policy = load_policy(self._paths, self._build)
        except PolicyLoadError as exc:
            for line in exc.lines:
                log.error("%s", line)
            log.error(
                "policy reload refused (%d problem%s); policy revision %d stays in force",
                len(exc.lines),
                "" if len(exc.lines) == 1 else "s",
                self.revision,
            )
            return False
        except Exception:
            log.exception("policy reload failed; revision %d stays in force", self.revision)
            return False
        self.revision += 1
        self._apply(policy)
        if self._announce:
            log.info("policy revision %d applied", self.revision)
        return True
