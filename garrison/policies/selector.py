"""Label selectors (Kubernetes `matchLabels` + `matchExpressions`), matched against `Labels`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from garrison.policies.labels import (
    NAMESPACE_KEY,
    SOURCE_ANY,
    SOURCE_K8S,
    SOURCE_RESERVED,
    Labels,
)


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True, order=True)
class Requirement:
    """One condition on a label key. `source` is `any` unless the key carried a prefix."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()
    source: str = SOURCE_ANY

    def matches(self, labels: Labels) -> bool:
        found = labels.values_of(self.key, self.source)
        if self.operator is Operator.IN:
            return any(v in self.values for v in found)
        if self.operator is Operator.NOT_IN:
            return not any(v in self.values for v in found)
        if self.operator is Operator.EXISTS:
            return bool(found)
        return not found

    def __str__(self) -> str:
        key = self.key if self.source == SOURCE_ANY else f"{self.source}:{self.key}"
        if self.operator is Operator.IN and len(self.values) == 1:
            return f"{key}={self.values[0]}"
        if self.operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST):
            return f"{key} {self.operator.value}"
        return f"{key} {self.operator.value} ({','.join(self.values)})"


@dataclass(frozen=True, slots=True)
class EndpointSelector:
    """All requirements must hold. No requirements (`{}`) selects every endpoint in scope.

    `requirements` is kept sorted so equal selectors compare and hash equal, which lets the
    selector cache share work between rules that repeat a selector.
    """

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def of(cls, requirements: list[Requirement] | tuple[Requirement, ...]) -> EndpointSelector:
        return cls(tuple(sorted(set(requirements))))

    @classmethod
    def match_labels(cls, labels: dict[str, str]) -> EndpointSelector:
        from garrison.policies.labels import split_source

        reqs = []
        for k, v in labels.items():
            source, key = split_source(k, SOURCE_ANY)
            reqs.append(Requirement(key=key, operator=Operator.IN, values=(v,), source=source))
        return cls.of(reqs)

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Labels) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def names_key(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)

    def names_reserved(self) -> bool:
        return any(r.source == SOURCE_RESERVED for r in self.requirements)

    def with_requirement(self, requirement: Requirement) -> EndpointSelector:
        return EndpointSelector.of((*self.requirements, requirement))

    def in_namespace(self, namespace: str) -> EndpointSelector:
        """Limit to `namespace` unless the selector already names the namespace label."""
        if self.names_key(NAMESPACE_KEY):
            return self
        return self.with_requirement(
            Requirement(NAMESPACE_KEY, Operator.IN, (namespace,), SOURCE_K8S)
        )

    def __str__(self) -> str:
        if not self.requirements:
            return "{}"
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"
