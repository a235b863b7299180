"""References from a verdict back to the policy rule that produced it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class PolicyKind(StrEnum):
    CNP = "CiliumNetworkPolicy"
    CCNP = "CiliumClusterwideNetworkPolicy"
    KNP = "NetworkPolicy"
    # policy.networking.k8s.io ClusterNetworkPolicy: the Admin and Baseline tiers
    CLUSTER = "ClusterNetworkPolicy"


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
    # ClusterNetworkPolicy: the rule's `name`, and "Admin 10" (tier and priority)
    rule_name: str = ""
    tier: str = ""

    @property
    def policy(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def __str__(self) -> str:
        spec = f"specs[{self.spec_index}]." if self.has_specs else ""
        out = f"{self.kind.value} {self.policy} {spec}{self.section}[{self.rule_index}]"
        if self.rule_name:
            out += f" ({self.rule_name})"
        if self.tier:
            out += f" [{self.tier}]"
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "namespace": self.namespace,
            "name": self.name,
            "section": self.section,
            "spec_index": self.spec_index,
            "rule_index": self.rule_index,
            **({"rule_name": self.rule_name} if self.rule_name else {}),
            **({"tier": self.tier} if self.tier else {}),
        }
