"""The filter box of the review page: the filter flags of `garrison observe`, typed as text.

`--verdict DROPPED --to-pod deathstar` in the page is parsed by the same argparse flags the
command line has (`garrison.cli.flowargs`), so a filter copied from a terminal works in the page
and one shared as a URL works in a terminal. `--first` and `--last` are not taken: the page
pages by itself.
"""

from __future__ import annotations

import argparse
import shlex
from typing import NoReturn

from garrison.cli.flowargs import add_filter_flags, build_query
from garrison.flows.query import FilterError, FlowQuery

MAX_FILTER_CHARS = 4096


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise FilterError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise FilterError(message or "bad filter")


def parse_filter(text: str, now_ns: int | None = None) -> FlowQuery:
    """The query `text` describes; raises FilterError with the flag and the reason."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter longer than {MAX_FILTER_CHARS} characters")
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise FilterError(f"cannot split the filter into words: {exc}") from None
    parser = _Parser(prog="filter", add_help=False, exit_on_error=False)
    add_filter_flags(parser)
    try:
        args, extra = parser.parse_known_args(words)
    except argparse.ArgumentError as exc:
        raise FilterError(str(exc)) from None
    if extra:
        raise FilterError(f"not a filter flag: {' '.join(extra)} (write flags as `garrison "
                          "observe` takes them: --verdict DROPPED --to-pod deathstar)")
    if args.first is not None or args.last is not None:
        raise FilterError("--first and --last do not apply here: the page pages by itself")
    return build_query(args, now_ns)
