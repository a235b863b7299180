"""Policies in audit mode (`garrison.io/audit`, "try before enforce") in the agent.

`AuditingResolver` is the agent's policy resolver: what it resolves itself is the enforced
policy, every policy but the audited ones. While some audited policy is loaded it carries a
second resolver, `what_if`, holding every policy (the audited ones enforced too); the kernel
gets that state for the identities an audited policy selects (garrison.bpf.sync) and records
AUDIT where it denies what the enforced policy allows. Nothing the what-if state adds is
enforced.

The what-if resolver exists only while an audited policy does (it doubles the resolve work):
it is built from the identities, port names and policies this resolver was given, then kept
current by the same calls. Every call returns the endpoint identities whose enforced or
what-if policy changed, so one kernel sync covers both.
"""

from __future__ import annotations

from garrison.policies.labels import Labels
from garrison.policies.model import Policy
from garrison.policies.repository import PolicyKey
from garrison.policies.resolve import PolicyResolver, ResolverConfig


class AuditingResolver(PolicyResolver):
    def __init__(self, config: ResolverConfig | None = None) -> None:
        super().__init__(config)
        self.what_if: PolicyResolver | None = None
        self._identities: dict[int, Labels] = {}
        self._policies: dict[PolicyKey, Policy] = {}  # every policy, audited or not

    def audited_policies(self) -> list[Policy]:
        return [p for p in self._policies.values() if p.audit]

    # -- the calls the agent makes, to both resolvers ----------------------------------------

    def add_identity(self, identity: int, labels: Labels) -> set[int]:
        self._identities[identity] = labels
        changed = super().add_identity(identity, labels)
        if self.what_if is not None:
            changed |= self.what_if.add_identity(identity, labels)
        return changed

    def remove_identity(self, identity: int) -> set[int]:
        self._identities.pop(identity, None)
        changed = super().remove_identity(identity)
        if self.what_if is not None:
            changed |= self.what_if.remove_identity(identity)
        return changed

    def set_named_ports(
        self, identity: int, ports: dict[str, frozenset[tuple[int, int]]]
    ) -> set[int]:
        changed = super().set_named_ports(identity, ports)
        if self.what_if is not None:
            changed |= self.what_if.set_named_ports(identity, ports)
        return changed

    def add_policy(self, policy: Policy) -> set[int]:
        self._policies[policy.key] = policy
        changed = set() if policy.audit else super().add_policy(policy)
        if self.what_if is not None:
            changed |= self.what_if.add_policy(policy)
        elif policy.audit:
            changed |= self._build_what_if()
        return changed

    def remove_policy(self, policy: Policy) -> set[int]:
        self._policies.pop(policy.key, None)
        changed = set() if policy.audit else super().remove_policy(policy)
        if self.what_if is None:
            return changed
        if not self.audited_policies():
            # no audited policy left: every what-if state goes (the sync deletes what the
            # kernel has of the identities this policy selected)
            changed |= self._selected_by(policy)
            self.what_if = None
            return changed
        return changed | self.what_if.remove_policy(policy)

    def _build_what_if(self) -> set[int]:
        what_if = PolicyResolver(self.config)
        for identity, labels in self._identities.items():
            ports = self.named_ports(identity)
            if ports:
                what_if.set_named_ports(identity, ports)
            what_if.add_identity(identity, labels)
        what_if.add_policies(self._policies.values())
        self.what_if = what_if
        # only the identities an audited policy selects have a what-if state in the kernel
        return {
            identity for identity in what_if.endpoint_identities()
            if any(p.audit for p, _ in what_if.rules_selecting(identity))
        }

    def _selected_by(self, policy: Policy) -> set[int]:
        assert self.what_if is not None
        return {
            identity for identity in self.what_if.endpoint_identities()
            if any(p.key == policy.key for p, _ in self.what_if.rules_selecting(identity))
        }
