"""`garrison policy validate PATH...`: check policy files and directories offline.

Exit 0 with a one-line summary on stdout when every file is valid (warnings go to stderr);
exit 1 with every problem on stderr, one `PATH:LINE: field: reason` line each, and a count.
"""

from __future__ import annotations

import argparse
import sys

from garrison.policies.errors import PolicyIssue, PolicyValidationError
from garrison.policies.loader import load_paths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        help="validate policy files or directories",
        description="Validate CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and "
        "NetworkPolicy files. Directories are searched for *.yaml, *.yml and *.json.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="policy file or directory")
    p.set_defaults(func=run)


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _by_place(issues: tuple[PolicyIssue, ...]) -> list[PolicyIssue]:
    """Errors and warnings together, by file, document and line."""
    return sorted(issues, key=lambda i: (i.path, i.document, i.line))


def run(args: argparse.Namespace) -> int:
    try:
        result = load_paths(args.paths)
    except PolicyValidationError as exc:
        for issue in _by_place(exc.issues + exc.warnings):
            print(issue, file=sys.stderr)
        files = len({i.path for i in exc.issues})
        print(
            f"{_plural(len(exc.issues), 'error')} in {_plural(files, 'file')}; "
            "no policy was loaded",
            file=sys.stderr,
        )
        return 1
    for warning in result.warnings:
        print(warning, file=sys.stderr)
    verb = "is" if len(result.policies) == 1 else "are"
    print(
        f"{_plural(len(result.policies), 'policy', 'policies')} in "
        f"{_plural(len(result.files), 'file')} {verb} valid"
    )
    return 0
