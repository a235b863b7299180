"""The filter flags shared by `garrison observe`, `accesslog summary` and `accesslog export`.

Every flag of `garrison.flows.query.FLAGS` becomes `--NAME VALUE` (repeatable); `--not`
negates the filter flag right after it. argparse runs the actions in command-line order, so
each one records (flag, value, negated) and the query is built from that list.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from garrison.flows.query import FLAGS, FilterError, FlowQuery, parse_time_bound

_FILTERS = "flow_filters"
_PENDING = "_not_pending"
_MISTAKE = "_filter_mistake"  # the first misuse of --not, reported by build_query in one line


class _FilterAction(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        filters = list(getattr(namespace, _FILTERS, None) or [])
        negated = bool(getattr(namespace, _PENDING, False))
        value = "true" if self.nargs == 0 else str(values)
        filters.append((self.metavar_name, value, negated))
        setattr(namespace, _FILTERS, filters)
        setattr(namespace, _PENDING, False)

    @property
    def metavar_name(self) -> str:
        return self.dest.removeprefix("filter_").replace("_", "-")


class _NotAction(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, _PENDING, False) and not getattr(namespace, _MISTAKE, None):
            setattr(namespace, _MISTAKE, "--not --not: negate a filter flag once (as Hubble, "
                    "which refuses consecutive --not)")
        setattr(namespace, _PENDING, True)


class _BoundAction(argparse.Action):
    """--since / --until: not negatable, so a pending --not before them is a mistake."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, _PENDING, False) and not getattr(namespace, _MISTAKE, None):
            setattr(namespace, _MISTAKE, f"--not cannot negate {option_string}: it applies to "
                    "filter flags")
        setattr(namespace, self.dest, values)


def add_filter_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "filters",
        "As hubble observe: flags AND together, a repeated flag ORs its values. A flag without "
        "a direction (--pod, --namespace, --label, --ip, --port, --identity) selects flows "
        "from it or to it, the other flags applying to the same side. --not moves the next "
        "flag to one exclusion filter: a flow is hidden when it matches all the --not flags. "
        "A bare pod NAME is default/NAME; NS/ is every pod of NS.",
    )
    group.add_argument("--not", action=_NotAction, nargs=0, dest=_PENDING, default=False,
                       help="negate the filter flag that follows")
    for name, spec in FLAGS.items():
        flags = [f"--{name}"]
        if spec.short:
            flags.insert(0, f"-{spec.short}")
        dest = "filter_" + name.replace("-", "_")
        if spec.takes_value:
            group.add_argument(*flags, action=_FilterAction, dest=dest, metavar=spec.metavar,
                               help=spec.help)
        else:
            group.add_argument(*flags, action=_FilterAction, dest=dest, nargs=0,
                               help=spec.help)
    group.add_argument("--since", action=_BoundAction, metavar="TIME",
                       help="records at or after TIME: a duration back from now (5m, 1h30m), "
                       "an RFC 3339 time (also 2026-12-05T11:59Z), an RFC 1123 time, or "
                       "'YYYY-MM-DD[ HH:MM[:SS]]' (UTC)")
    group.add_argument("--until", action=_BoundAction, metavar="TIME",
                       help="records at or before TIME (same forms as --since)")
    group.add_argument("--first", type=_count, metavar="N", help="the first N matching records")
    group.add_argument("--last", type=_count, metavar="N", help="the last N matching records")


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of records, got {n}")
    return n


def build_query(args: argparse.Namespace, now_ns: int | None = None) -> FlowQuery:
    """The query the filter flags describe; raises FilterError (exit 2 for the caller)."""
    mistake = getattr(args, _MISTAKE, None)
    if mistake:
        raise FilterError(mistake)
    if getattr(args, _PENDING, False):
        raise FilterError("--not must be followed by a filter flag (--not --verdict FORWARDED)")
    if args.first is not None and args.last is not None:
        raise FilterError("--first and --last exclude each other")
    now = time.time_ns() if now_ns is None else now_ns
    since = None if args.since is None else parse_time_bound(args.since, now, "since")
    until = None if args.until is None else parse_time_bound(args.until, now, "until")
    if since is not None and until is not None and since > until:
        raise FilterError(f"--since {args.since} is after --until {args.until}: nothing between")
    query = FlowQuery.of(getattr(args, _FILTERS, None) or [], since_ns=since, until_ns=until)
    query.compile()  # every value checked now, with the flag's name in the message
    return query
