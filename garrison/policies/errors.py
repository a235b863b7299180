"""Policy errors: every one names the file, the YAML line, the field path and the reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy file, rendered `PATH:LINE: field.path: reason`.

    `field` uses the YAML's own names with list indexes, e.g.
    `spec.ingress[0].toPorts[0].ports[0].port`; `document` is the 0-based YAML document.
    """

    path: str
    line: int
    field: str
    reason: str
    document: int = 0
    warning: bool = False

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        prefix = "warning: " if self.warning else ""
        return f"{where}: {prefix}{self.field}: {self.reason}" if self.field else (
            f"{where}: {prefix}{self.reason}"
        )


class PolicyValidationError(Exception):
    """Raised when one or more policy files are invalid; carries every issue found."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues = tuple(i for i in issues if not i.warning)
        self.warnings = tuple(i for i in issues if i.warning)
        super().__init__("\n".join(str(i) for i in self.issues))
