"""Which endpoint labels are identity-relevant.

Volatile labels (a ReplicaSet's `pod-template-hash`, a StatefulSet pod's name, ...) would give
every pod its own identity: no sharing, no stable policy, identity churn on every rollout. The
filter drops them before allocation.

A `LabelFilter` is an ordered list of include/exclude patterns, written as in Cilium's
`--labels` option: `[source:][!]regex`, `!` meaning exclude, no source (or `any`) matching
labels of every source. A regex is anchored at the start of the label key, like Cilium's
(`io\\.kubernetes` matches `io.kubernetes.pod.namespace`); write `$` to anchor the end.
Unlike Cilium's longest-match rule, the *first* pattern that matches a label decides, so a
filter reads top to bottom. A label no pattern matches is kept when `keep_unmatched` is true.

Some labels are kept whatever the configuration says (`ALWAYS_KEPT`): the namespace label and
the namespace / policy labels Cilium derives. They are how policies say "this namespace";
dropping them would let two namespaces' workloads share an identity, and a policy that allows
`app=web` in one namespace would allow it in the other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from garrison.policies.labels import (
    NAMESPACE_KEY,
    NAMESPACE_LABELS_PREFIX,
    SOURCE_ANY,
    SOURCE_RESERVED,
    Label,
    Labels,
    split_source,
)

POLICY_LABELS_PREFIX = "io.cilium.k8s.policy."


class LabelFilterError(ValueError):
    """A label pattern that cannot be parsed or compiled."""


@dataclass(frozen=True, slots=True)
class LabelPattern:
    """Include (or exclude) labels whose key matches `regex` at its start, from `source`."""

    regex: str
    include: bool
    source: str = SOURCE_ANY
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.regex)
        except re.error as exc:
            raise LabelFilterError(f"label pattern {self.regex!r}: {exc}") from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def parse(cls, text: str) -> LabelPattern:
        """`[source:][!]regex`, e.g. `k8s:app`, `!pod-template-hash`, `any:!io\\.kubernetes`."""
        text = text.strip()
        source, rest = split_source(text, SOURCE_ANY)
        if text.startswith(":"):  # Cilium's `:regex` means any source
            rest = text[1:]
        include = not rest.startswith("!")
        regex = rest if include else rest[1:]
        if not regex:
            raise LabelFilterError(f"label pattern {text!r} has an empty regex")
        return cls(regex=regex, include=include, source=source)

    def matches(self, label: Label) -> bool:
        if self.source != SOURCE_ANY and self.source != label.source:
            return False
        return self._compiled.match(label.key) is not None

    def __str__(self) -> str:
        return f"{self.source}:{'' if self.include else '!'}{self.regex}"


def _include(regex: str, source: str = SOURCE_ANY) -> LabelPattern:
    return LabelPattern(regex=regex, include=True, source=source)


def _exclude(regex: str) -> LabelPattern:
    return LabelPattern(regex=regex, include=False)


def always_kept() -> tuple[LabelPattern, ...]:
    """Patterns evaluated before any configured ones; not configurable (see module doc)."""
    return (
        _include(re.escape(NAMESPACE_KEY) + "$"),
        _include(re.escape(NAMESPACE_LABELS_PREFIX)),
        _include(re.escape(POLICY_LABELS_PREFIX)),
        _include(".*", source=SOURCE_RESERVED),
    )


def default_patterns() -> tuple[LabelPattern, ...]:
    """The volatile labels dropped by default (after `always_kept`)."""
    return (
        # Kubernetes' recommended labels (app.kubernetes.io/name, /component, ...) are what
        # policies select on; keep them before the broad `*.kubernetes.io/` exclusion below.
        _include(r"app\.kubernetes\.io/"),
        _exclude(r"pod-template-hash$"),
        _exclude(r"controller-revision-hash$"),
        _exclude(r"pod-template-generation$"),
        _exclude(r"controller-uid$"),
        _exclude(r"statefulset\.kubernetes\.io/pod-name$"),
        _exclude(r"apps\.kubernetes\.io/pod-index$"),
        _exclude(r"batch\.kubernetes\.io/"),
        _exclude(r"io\.kubernetes"),
        _exclude(r"kubernetes\.io"),
        _exclude(r".*\.kubernetes\.io/"),
        _exclude(r"k8s\.io"),
        _exclude(r"annotation\."),
        _exclude(r"etcd_node$"),
    )


@dataclass(frozen=True, slots=True)
class LabelFilter:
    """Ordered include/exclude patterns; the first that matches a label decides."""

    patterns: tuple[LabelPattern, ...] = field(default_factory=default_patterns)
    keep_unmatched: bool = True
    _rules: tuple[LabelPattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rules", always_kept() + tuple(self.patterns))

    @classmethod
    def parse(cls, texts: Iterable[str]) -> LabelFilter:
        """A filter from Cilium-style `--labels` patterns.

        As in Cilium, the configured patterns come on top of the defaults, and one include
        pattern turns the filter into an allow-list: labels no pattern includes are dropped.
        Configured patterns are checked first, so they can override a default.
        """
        configured = tuple(LabelPattern.parse(t) for t in texts if t.strip())
        return cls(
            patterns=configured + default_patterns(),
            keep_unmatched=not any(p.include for p in configured),
        )

    def is_relevant(self, label: Label) -> bool:
        for pattern in self._rules:
            if pattern.matches(label):
                return pattern.include
        return self.keep_unmatched

    def apply(self, labels: Labels) -> Labels:
        """The identity-relevant subset of `labels`."""
        return labels.filter(lab for lab in labels.items if self.is_relevant(lab))
