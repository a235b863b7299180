"""Endpoint labels: `source:key=value`, as Cilium writes them.

A label written without a source prefix on an *endpoint* gets the `k8s` source (what a pod's
labels are in Cilium). In a *selector*, a key without a source prefix matches a label of that
key from any source.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

SOURCE_ANY = "any"
SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
KNOWN_SOURCES = frozenset(
    {SOURCE_ANY, SOURCE_K8S, SOURCE_RESERVED, SOURCE_CIDR, "container", "unspec"}
)

NAMESPACE_KEY = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
# the label Kubernetes sets on every namespace object: its own name
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
POLICY_CLUSTER_KEY = "io.cilium.k8s.policy.cluster"
DEFAULT_NAMESPACE = "default"


class LabelError(ValueError):
    """A label string that cannot be parsed."""


@dataclass(frozen=True, slots=True, order=True)
class Label:
    key: str
    value: str = ""
    source: str = SOURCE_K8S

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}"

    def matches_key(self, source: str, key: str) -> bool:
        return self.key == key and (source == SOURCE_ANY or source == self.source)


def split_source(text: str, default_source: str) -> tuple[str, str]:
    """Split `source:key` into its parts; a key with no known source prefix keeps the default.

    Keys such as `io.kubernetes.pod.namespace` contain dots but no colon; keys that contain a
    colon without a known source (rare) keep the whole text as the key.
    """
    if ":" in text:
        source, _, key = text.partition(":")
        if source in KNOWN_SOURCES:
            return source, key
    return default_source, text


def parse_label(text: str, default_source: str = SOURCE_K8S) -> Label:
    text = text.strip()
    if not text:
        raise LabelError("empty label")
    key_part, sep, value = text.partition("=")
    source, key = split_source(key_part.strip(), default_source)
    if not key:
        raise LabelError(f"label {text!r} has an empty key")
    return Label(key=key, value=value.strip() if sep else "", source=source)


@dataclass(frozen=True, slots=True)
class Labels:
    """An immutable set of labels. Hashable, so it can key identity allocation."""

    items: frozenset[Label] = frozenset()
    # key -> ((source, value), ...): selectors look labels up by key many times over.
    _by_key: dict[str, tuple[tuple[str, str], ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        index: dict[str, list[tuple[str, str]]] = {}
        for label in self.items:
            index.setdefault(label.key, []).append((label.source, label.value))
        object.__setattr__(self, "_by_key", {k: tuple(v) for k, v in index.items()})

    def values_of(self, key: str, source: str = SOURCE_ANY) -> list[str]:
        return [
            v for s, v in self._by_key.get(key, ()) if source == SOURCE_ANY or s == source
        ]

    @classmethod
    def of(cls, labels: Iterable[Label]) -> Labels:
        return cls(frozenset(labels))

    @classmethod
    def parse(cls, text: str | Iterable[str], default_source: str = SOURCE_K8S) -> Labels:
        """Parse `k=v,k2=v2` (or an iterable of `k=v`); whitespace around items is ignored."""
        parts = text.split(",") if isinstance(text, str) else list(text)
        return cls(frozenset(parse_label(p, default_source) for p in parts if p.strip()))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], default_source: str = SOURCE_K8S) -> Labels:
        out = []
        for k, v in mapping.items():
            source, key = split_source(k, default_source)
            out.append(Label(key=key, value=v, source=source))
        return cls(frozenset(out))

    def __iter__(self) -> Iterator[Label]:
        return iter(sorted(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, label: object) -> bool:
        return label in self.items

    def get(self, key: str, source: str = SOURCE_ANY) -> str | None:
        found = self.values_of(key, source)
        return found[0] if found else None

    def has(self, key: str, source: str = SOURCE_ANY) -> bool:
        return bool(self.values_of(key, source))

    def union(self, other: Iterable[Label]) -> Labels:
        return Labels(self.items | frozenset(other))

    def filter(self, keep: Iterable[Label]) -> Labels:
        return Labels(frozenset(keep))

    @property
    def namespace(self) -> str | None:
        return self.get(NAMESPACE_KEY, SOURCE_K8S)

    def __str__(self) -> str:
        return ",".join(str(label) for label in self)

    def short(self) -> str:
        """`k=v,...` without sources, for one-line renderings."""
        return ",".join(
            f"{lab.key}={lab.value}" if lab.source == SOURCE_K8S else str(lab) for lab in self
        )


def namespace_label(namespace: str) -> Label:
    return Label(key=NAMESPACE_KEY, value=namespace, source=SOURCE_K8S)


def namespace_object_labels(namespace_labels: Mapping[str, str]) -> list[Label]:
    """The labels of its namespace object an endpoint carries, as Cilium writes them:
    `io.cilium.k8s.namespace.labels.<key>=<value>`. `kubernetes.io/metadata.name` (always
    the namespace's own name) is not repeated: the namespace label says it, and a
    namespaceSelector on it matches that label."""
    return [
        Label(NAMESPACE_LABELS_PREFIX + key, value, SOURCE_K8S)
        for key, value in namespace_labels.items()
        if key != NAMESPACE_NAME_LABEL
    ]


def endpoint_labels(
    labels: Labels,
    namespace: str = DEFAULT_NAMESPACE,
    namespace_labels: Mapping[str, str] | None = None,
) -> Labels:
    """The labels an endpoint in `namespace` carries: its own, the namespace label, and the
    labels of the namespace object (`namespace_labels`)."""
    extra = namespace_object_labels(namespace_labels) if namespace_labels else []
    return labels.union([namespace_label(namespace), *extra])
