"""`garrison policy validate PATH...`: check policy files and directories offline.

Exit 0 with a one-line summary on stdout when every file is valid (warnings go to stderr);
exit 1 with every problem on stderr, one `PATH:LINE: field: reason` line each, and a count.
`-o json` prints one object on stdout instead, with the same exit codes:
`{"valid", "files", "policies": [{kind, namespace, name, path, rules}], "errors": [...],
"warnings": [...]}`, each problem `{path, line, document, field, reason}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from garrison.policies.errors import PolicyIssue, PolicyValidationError
from garrison.policies.loader import load_paths
from garrison.policies.model import Policy


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        help="validate policy files or directories",
        description="Validate CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, "
        "NetworkPolicy and ClusterNetworkPolicy files. Directories are searched for *.yaml, "
        "*.yml and *.json.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="policy file or directory")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text",
                   help="text (default) or one JSON object on stdout")
    p.set_defaults(func=run)


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _by_place(issues: tuple[PolicyIssue, ...]) -> list[PolicyIssue]:
    """Errors and warnings together, by file, document and line."""
    return sorted(issues, key=lambda i: (i.path, i.document, i.line))


def _issue(issue: PolicyIssue) -> dict[str, Any]:
    return {"path": issue.path, "line": issue.line, "document": issue.document,
            "field": issue.field, "reason": issue.reason}


def _policy(policy: Policy) -> dict[str, Any]:
    return {"kind": policy.kind.value, "namespace": policy.namespace, "name": policy.name,
            "path": policy.source.path if policy.source else None, "rules": len(policy.rules)}


def _json(args: argparse.Namespace) -> int:
    try:
        result = load_paths(args.paths)
    except PolicyValidationError as exc:
        out: dict[str, Any] = {
            "valid": False,
            "files": sorted({i.path for i in exc.issues + exc.warnings}),
            "policies": [],
            "errors": [_issue(i) for i in _by_place(exc.issues)],
            "warnings": [_issue(i) for i in _by_place(exc.warnings)],
        }
        print(json.dumps(out, indent=2))
        return 1
    print(json.dumps({
        "valid": True,
        "files": list(result.files),
        "policies": [_policy(p) for p in result.policies],
        "errors": [],
        "warnings": [_issue(i) for i in _by_place(result.warnings)],
    }, indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.output == "json":
        return _json(args)
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
