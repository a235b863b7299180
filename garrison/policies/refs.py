"""References from a verdict back to the policy rule that produced it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class PolicyKind(StrEnum):
    CNP = "CiliumNetworkPolicy"
    CCNP = "CiliumClusterwideNetworkPolicy"
    KNP = "NetworkPolicy"


@dataclass(frozen=True, slots=True)
class RuleRef:
    """Where a verdict came from: policy kind/namespace/name, the spec and section index.

    Rendered `CiliumNetworkPolicy default/rule1 specs[0].ingress[1]`; Hubble's
    `ingress_allowed_by` carries `{name, namespace, kind}`.
    """

    kind: PolicyKind
    namespace: str | None
    name: str
    section: str  # ingress | ingressDeny | egress | egressDeny
    spec_index: int = 0
    rule_index: int = 0
    has_specs: bool = False  # the policy used `specs:` (affects rendering only)

    @property
    def policy(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def __str__(self) -> str:
        spec = f"specs[{self.spec_index}]." if self.has_specs else ""
        return f"{self.kind.value} {self.policy} {spec}{self.section}[{self.rule_index}]"

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "namespace": self.namespace,
            "name": self.name,
            "section": self.section,
            "spec_index": self.spec_index,
            "rule_index": self.rule_index,
        }
