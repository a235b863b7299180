"""The policy repository: every loaded policy, with a revision that increases on each change.

Changes are all-or-nothing: `replace`, `upsert` and `delete` either apply completely (one new
revision) or not at all. Listeners get the policies that were added and removed, so resolution
recomputes only what a change affects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from garrison.policies.model import CIDRPeer, IPNetwork, Policy, Rule

PolicyKey = tuple[str, str | None, str]


@dataclass(frozen=True, slots=True)
class PolicyChange:
    revision: int
    added: tuple[Policy, ...]
    removed: tuple[Policy, ...]


Listener = Callable[[PolicyChange], None]


class PolicyRepository:
    def __init__(self, revision: int = 1) -> None:
        """`revision`: where the count starts (an agent continues from its last one)."""
        self._policies: dict[PolicyKey, Policy] = {}
        self._revision = revision
        self._listeners: list[Listener] = []

    @property
    def revision(self) -> int:
        return self._revision

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._policies)

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._policies.values())

    def get(self, key: PolicyKey) -> Policy | None:
        return self._policies.get(key)

    def find(self, name: str, namespace: str | None = None) -> list[Policy]:
        return [
            p
            for p in self._policies.values()
            if p.name == name and (namespace is None or p.namespace == namespace)
        ]

    def rules(self) -> Iterator[tuple[Policy, Rule]]:
        for policy in self._policies.values():
            for rule in policy.rules:
                yield policy, rule

    def upsert(self, policies: Iterable[Policy]) -> PolicyChange:
        """Add policies, replacing any with the same (kind, namespace, name)."""
        new = list(policies)
        removed = tuple(self._policies[p.key] for p in new if p.key in self._policies)
        for p in new:
            self._policies[p.key] = p
        return self._commit(tuple(new), removed)

    def delete(self, keys: Iterable[PolicyKey]) -> PolicyChange:
        removed = tuple(self._policies.pop(k) for k in list(keys) if k in self._policies)
        return self._commit((), removed)

    def update(self, upserts: Iterable[Policy], deletes: Iterable[PolicyKey]) -> PolicyChange:
        """Upserts and deletes as one change (one revision), so a consumer never sees the
        state between them."""
        new = list(upserts)
        removed = [self._policies.pop(k) for k in list(deletes) if k in self._policies]
        removed += [self._policies[p.key] for p in new if p.key in self._policies]
        for p in new:
            self._policies[p.key] = p
        return self._commit(tuple(new), tuple(removed))

    def replace_all(self, policies: Iterable[Policy]) -> PolicyChange:
        """Make the repository hold exactly `policies` (a policy directory reload)."""
        new = {p.key: p for p in policies}
        removed = tuple(
            p for k, p in self._policies.items() if k not in new or new[k] != p
        )
        added = tuple(p for k, p in new.items() if self._policies.get(k) != p)
        self._policies = new
        return self._commit(added, removed)

    def _commit(self, added: tuple[Policy, ...], removed: tuple[Policy, ...]) -> PolicyChange:
        if added or removed:
            self._revision += 1
        change = PolicyChange(self._revision, added, removed)
        if added or removed:
            for listener in self._listeners:
                listener(change)
        return change

    def prefixes(self) -> set[IPNetwork]:
        """Every CIDR (and `except`) the policies name: each needs a CIDR identity."""
        out: set[IPNetwork] = set()
        for _, rule in self.rules():
            out |= rule_prefixes(rule)
        return out


def rule_prefixes(rule: Rule) -> set[IPNetwork]:
    out: set[IPNetwork] = set()
    for sections in (rule.ingress, rule.ingress_deny, rule.egress, rule.egress_deny):
        for section in sections or ():
            for peer in section.peers or ():
                if isinstance(peer, CIDRPeer):
                    out.add(peer.cidr)
                    out.update(peer.excepts)
    return out
