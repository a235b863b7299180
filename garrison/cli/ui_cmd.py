"""`garrison ui`: the review page over access-log files or the local agent.

Exit codes: 0 after Ctrl-C, 1 a source that cannot be read or an address that cannot be bound,
2 bad usage, 3 no agent answered.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from garrison.agent.config import DEFAULT_SOCKET


def run(args: argparse.Namespace) -> int:
    from garrison.flows.reader import FlowSourceError
    from garrison.ui.app import ReviewApp, UIError, agent_source, file_source, parse_listen

    try:
        listen = parse_listen(args.listen, args.allow_remote)
        known, policies_from = _policies(args.policy)
    except UIError as exc:
        print(f"garrison: {exc}", file=sys.stderr)
        return 2
    try:
        if args.input_file:
            source: Any = file_source(args.input_file, backups=not args.no_backups,
                                      cache=not args.no_cache)
        else:
            source = agent_source(args.socket)
        app = ReviewApp(source, listen, allow_remote=args.allow_remote, known_rules=known,
                        policies_from=policies_from)
        url = app.start()
    except (UIError, FlowSourceError) as exc:
        print(f"garrison: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from garrison.agent.api import AgentUnreachableError

        if isinstance(exc, AgentUnreachableError):
            print(f"garrison: {exc}", file=sys.stderr)
            return 3
        raise
    print(f"garrison ui: serving {url} (Ctrl-C stops)", flush=True)
    started = time.monotonic()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    reported = False
    with contextlib.suppress(KeyboardInterrupt):
        while not stop.wait(0.1):
            if not reported and app.store.loading is None:
                reported = True
                skipped = app.store.stats.bad
                note = f"; {skipped} lines were no flow record" if skipped else ""
                records = len(app.store) - skipped  # the store keeps skipped lines too
                print(f"garrison ui: {records} records from {source.describe()} read in "
                      f"{time.monotonic() - started:.1f} s{note}", flush=True)
    app.stop()
    return 0


def _policies(paths: list[str] | None) -> tuple[Any, str]:
    if not paths:
        return None, ""
    from garrison.flows.summary import rule_keys
    from garrison.policies.errors import PolicyValidationError
    from garrison.policies.loader import load_paths
    from garrison.ui.app import UIError

    try:
        return rule_keys(load_paths(paths).policies), ", ".join(paths)
    except PolicyValidationError as exc:
        raise UIError(f"--policy: {exc}") from exc


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ui", help="the review web page: service map, flows, policy review",
        description="Serve the review page over access-log files (--input-file) or the local "
        "agent: a service map with L7 detail and the rules behind each edge, the flows with "
        "observe's filters and follow mode, and the policy review. Read-only; loopback only "
        "unless --allow-remote.",
    )
    p.add_argument("--listen", default="127.0.0.1:12000", metavar="HOST:PORT",
                   help="address to serve on (default: %(default)s; port 0 picks one)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --listen address (the page is read-only)")
    p.add_argument("--input-file", action="append", metavar="PATH",
                   help="an access log (its rotated and gzip backups are read too); "
                   "repeatable; without it the local agent's records are shown")
    p.add_argument("--no-backups", action="store_true",
                   help="read only the named files, not their rotated backups")
    p.add_argument("--no-cache", action="store_true",
                   help="neither use nor keep the map of a large log between runs "
                        "(kept in $XDG_CACHE_HOME/garrison/ui)")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                   help="agent API socket (default: %(default)s)")
    p.add_argument("--policy", action="append", metavar="PATH",
                   help="policy files or directories in force: lists the rules never matched")
    p.set_defaults(func=run)
