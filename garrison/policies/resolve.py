"""Resolution: policy rules + identities -> the MapState of every endpoint identity.

Incremental by construction. Every rule section contributes to map keys of the endpoints its
subject selector selects; contributions are indexed by rule and by remote identity, so:
- adding or removing a rule touches only the endpoints that rule selects;
- adding an identity computes its own policy and adds only the keys for that identity to the
  endpoints whose rules' peers now select it;
- removing an identity drops only its keys.
A MapState is merged from the contributions on demand and cached until they change.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from garrison.policies.l7rules import L7Protocol, L7Rule, L7Rules, L7RuleSet
from garrison.policies.labels import Labels
from garrison.policies.mapstate import (
    ANY_IDENTITY,
    ANY_PORT,
    ANY_PROTOCOL,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    MapState,
    MapStateEntry,
    MapStateKey,
)
from garrison.policies.model import (
    IP_PROTO,
    CIDRPeer,
    Direction,
    EndpointPeer,
    EnforcementMode,
    Entity,
    EntityPeer,
    Peer,
    Policy,
    PolicySection,
    Protocol,
    Rule,
)
from garrison.policies.refs import RuleRef
from garrison.policies.repository import PolicyChange
from garrison.policies.selector import EndpointSelector
from garrison.policies.selectorcache import PeerKey, SelectorCache, is_endpoint

ICMP_TYPES: dict[str, int] = {
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "EchoRequest": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMPV6_TYPES: dict[str, int] = {
    "DestinationUnreachable": 1,
    "PacketTooBig": 2,
    "TimeExceeded": 3,
    "ParameterProblem": 4,
    "EchoRequest": 128,
    "EchoReply": 129,
    "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131,
    "MulticastListenerDone": 132,
    "RouterSolicitation": 133,
    "RouterAdvertisement": 134,
    "NeighborSolicitation": 135,
    "NeighborAdvertisement": 136,
    "RedirectMessage": 137,
}


def icmp_type_number(family: str, value: int | str) -> int:
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    table = ICMPV6_TYPES if family.lower() == "ipv6" else ICMP_TYPES
    return table[value]


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    """`enforcement`: default | always | never (POLICY-SEMANTICS.md "Selection and default
    deny"); `audit`: verdicts computed and logged as AUDIT, nothing dropped."""

    enforcement: EnforcementMode = EnforcementMode.DEFAULT
    audit: bool = False


@dataclass(frozen=True, slots=True)
class Contribution:
    rule_id: int
    ref: RuleRef | None
    deny: bool
    l7: L7Rules | None  # None = allowed at L4 only


@dataclass(slots=True)
class _RuleEntry:
    rule_id: int
    policy: Policy
    rule: Rule
    subject: EndpointSelector
    peers: tuple[PeerKey, ...]


@dataclass(slots=True)
class _EndpointPolicy:
    identity: int
    rules: set[int] = field(default_factory=set)
    contribs: dict[MapStateKey, list[Contribution]] = field(default_factory=dict)
    by_rule: dict[int, set[MapStateKey]] = field(default_factory=lambda: defaultdict(set))
    by_identity: dict[int, set[MapStateKey]] = field(default_factory=lambda: defaultdict(set))
    cached: MapState | None = None

    def add(self, key: MapStateKey, contribution: Contribution) -> None:
        self.contribs.setdefault(key, []).append(contribution)
        self.by_rule[contribution.rule_id].add(key)
        self.by_identity[key.identity].add(key)
        self.cached = None

    def drop_rule(self, rule_id: int) -> None:
        for key in self.by_rule.pop(rule_id, set()):
            remaining = [c for c in self.contribs.get(key, []) if c.rule_id != rule_id]
            if remaining:
                self.contribs[key] = remaining
            else:
                self.contribs.pop(key, None)
                self.by_identity[key.identity].discard(key)
        self.rules.discard(rule_id)
        self.cached = None

    def drop_identity(self, identity: int) -> None:
        for key in self.by_identity.pop(identity, set()):
            for c in self.contribs.pop(key, []):
                self.by_rule[c.rule_id].discard(key)
        self.cached = None


SECTION_KINDS: tuple[tuple[Direction, bool], ...] = (
    (Direction.INGRESS, False),
    (Direction.INGRESS, True),
    (Direction.EGRESS, False),
    (Direction.EGRESS, True),
)


def rule_sections(rule: Rule) -> Iterator[tuple[Direction, bool, PolicySection]]:
    lists = (rule.ingress, rule.ingress_deny, rule.egress, rule.egress_deny)
    for (direction, deny), sections in zip(SECTION_KINDS, lists, strict=True):
        for section in sections or ():
            yield direction, deny, section


def peer_key(peer: Peer) -> PeerKey:
    if isinstance(peer, EndpointPeer):
        return peer.selector
    if isinstance(peer, EntityPeer):
        return peer.entity
    return peer


def section_ports(section: PolicySection) -> list[tuple[int, int, int, L7Rules | None]]:
    """(protocol, port, end_port, l7) for each port the section names; any = zeros."""
    if section.icmps:
        out = []
        for icmp in section.icmps:
            proto = PROTO_ICMPV6 if icmp.family.lower() == "ipv6" else PROTO_ICMP
            t = icmp_type_number(icmp.family, icmp.type)
            out.append((proto, t, t, None))
        return out
    if not section.to_ports:
        return [(ANY_PROTOCOL, ANY_PORT, ANY_PORT, None)]
    out = []
    for port_rule in section.to_ports:
        l7 = port_rule.rules if port_rule.rules and port_rule.rules.protocol else None
        if not port_rule.ports:
            out.append((ANY_PROTOCOL, ANY_PORT, ANY_PORT, None))
            continue
        for pp in port_rule.ports:
            proto = IP_PROTO[pp.protocol]
            if l7 is not None and pp.protocol is Protocol.ANY:
                proto = PROTO_TCP  # L7 rules apply to TCP only
            end = pp.last if pp.port else ANY_PORT
            out.append((proto, pp.port, end, l7))
    return out


class PolicyResolver:
    def __init__(self, config: ResolverConfig | None = None) -> None:
        self.config = config or ResolverConfig()
        self.cache = SelectorCache()
        self._rules: dict[int, _RuleEntry] = {}
        self._rule_ids: dict[tuple[str, str | None, str], list[int]] = {}
        self._peer_users: dict[PeerKey, set[int]] = defaultdict(set)
        self._subject_users: dict[EndpointSelector, set[int]] = defaultdict(set)
        self._endpoints: dict[int, _EndpointPolicy] = {}
        self._next_rule_id = 1

    # -- identities ------------------------------------------------------------------------

    def add_identity(self, identity: int, labels: Labels) -> set[int]:
        """Register an identity; returns the endpoint identities whose policy changed."""
        matched = self.cache.add_identity(identity, labels)
        changed: set[int] = set()
        if is_endpoint(identity):
            self._endpoints[identity] = self._build_endpoint(identity)
            changed.add(identity)
        affected_rules: set[int] = set()
        for peer in matched:
            affected_rules |= self._peer_users.get(peer, set())
        for rule_id in affected_rules:
            entry = self._rules[rule_id]
            for ep_id in self.cache.select(entry.subject):
                if ep_id == identity or ep_id not in self._endpoints:
                    continue
                self._contribute(self._endpoints[ep_id], entry, only_identity=identity)
                changed.add(ep_id)
        return changed

    def remove_identity(self, identity: int) -> set[int]:
        self.cache.remove_identity(identity)
        self._endpoints.pop(identity, None)
        changed = set()
        for ep in self._endpoints.values():
            if ep.by_identity.get(identity):
                ep.drop_identity(identity)
                changed.add(ep.identity)
        return changed

    # -- rules -----------------------------------------------------------------------------

    def apply(self, change: PolicyChange) -> set[int]:
        """Apply a repository change; returns the endpoint identities whose policy changed."""
        changed: set[int] = set()
        for policy in change.removed:
            changed |= self.remove_policy(policy)
        for policy in change.added:
            changed |= self.add_policy(policy)
        return changed

    def add_policies(self, policies: Iterable[Policy]) -> set[int]:
        changed: set[int] = set()
        for policy in policies:
            changed |= self.add_policy(policy)
        return changed

    def add_policy(self, policy: Policy) -> set[int]:
        changed: set[int] = set()
        ids = self._rule_ids.setdefault(policy.key, [])
        for rule in policy.rules:
            rule_id = self._next_rule_id
            self._next_rule_id += 1
            peers = tuple(
                {
                    peer_key(p): None
                    for _, _, s in rule_sections(rule)
                    for p in (s.peers or ())
                }
            )
            entry = _RuleEntry(rule_id, policy, rule, rule.endpoint_selector, peers)
            self._rules[rule_id] = entry
            ids.append(rule_id)
            self._subject_users[entry.subject].add(rule_id)
            for peer in peers:
                self._peer_users[peer].add(rule_id)
                self.cache.select(peer)
            for ep_id in self.cache.select(entry.subject):
                ep = self._endpoints.get(ep_id)
                if ep is None:
                    continue
                ep.rules.add(rule_id)
                self._contribute(ep, entry)
                ep.cached = None
                changed.add(ep_id)
        return changed

    def remove_policy(self, policy: Policy) -> set[int]:
        changed: set[int] = set()
        for rule_id in self._rule_ids.pop(policy.key, []):
            entry = self._rules.pop(rule_id)
            for ep_id in self.cache.select(entry.subject):
                ep = self._endpoints.get(ep_id)
                if ep is not None and rule_id in ep.rules:
                    ep.drop_rule(rule_id)
                    changed.add(ep_id)
            unused: list[PeerKey] = []
            self._subject_users[entry.subject].discard(rule_id)
            if not self._subject_users[entry.subject]:
                del self._subject_users[entry.subject]
                if entry.subject not in self._peer_users:
                    unused.append(entry.subject)
            for peer in entry.peers:
                users = self._peer_users.get(peer)
                if users is not None:
                    users.discard(rule_id)
                    if not users:
                        del self._peer_users[peer]
                        if peer not in self._subject_users:
                            unused.append(peer)
            self.cache.release(unused)
        return changed

    # -- queries ---------------------------------------------------------------------------

    def endpoint_identities(self) -> list[int]:
        return list(self._endpoints)

    def rules_selecting(self, identity: int) -> list[tuple[Policy, Rule]]:
        ep = self._endpoints.get(identity)
        if ep is None:
            return []
        return [(self._rules[r].policy, self._rules[r].rule) for r in sorted(ep.rules)]

    def enforcing_rules(self, identity: int, direction: Direction) -> list[tuple[Policy, Rule]]:
        return [(p, r) for p, r in self.rules_selecting(identity) if r.enforces(direction)]

    def map_state(self, identity: int) -> MapState:
        ep = self._endpoints.get(identity)
        if ep is None:
            raise KeyError(f"identity {identity} is not a known endpoint identity")
        if ep.cached is None:
            ep.cached = self._materialize(ep)
        return ep.cached

    # -- internals -------------------------------------------------------------------------

    def _build_endpoint(self, identity: int) -> _EndpointPolicy:
        ep = _EndpointPolicy(identity)
        for subject, rule_ids in self._subject_users.items():
            if identity in self.cache.select(subject):
                for rule_id in rule_ids:
                    ep.rules.add(rule_id)
                    self._contribute(ep, self._rules[rule_id])
        return ep

    def _contribute(
        self, ep: _EndpointPolicy, entry: _RuleEntry, only_identity: int | None = None
    ) -> None:
        for direction, deny, section in rule_sections(entry.rule):
            if only_identity is not None:
                if not self._section_has(section, only_identity):
                    continue
                idents = {only_identity}
            else:
                idents = self._section_identities(section)
            if not idents:
                continue
            for proto, port, end, l7 in section_ports(section):
                contribution = Contribution(entry.rule_id, section.ref, deny, l7)
                for ident in idents:
                    ep.add(MapStateKey(direction, ident, proto, port, end), contribution)

    def _section_identities(self, section: PolicySection) -> set[int]:
        if section.peers is None:
            return {ANY_IDENTITY}
        out: set[int] = set()
        for peer in section.peers:
            if isinstance(peer, EntityPeer) and peer.entity is Entity.ALL:
                out.add(ANY_IDENTITY)
            elif isinstance(peer, CIDRPeer | EndpointPeer | EntityPeer):
                out |= self.cache.select(peer_key(peer))
        return out

    def _section_has(self, section: PolicySection, identity: int) -> bool:
        if section.peers is None:
            return identity == ANY_IDENTITY
        return any(identity in self.cache.select(peer_key(p)) for p in section.peers)

    def _materialize(self, ep: _EndpointPolicy) -> MapState:
        mode = self.config.enforcement
        if mode is EnforcementMode.NEVER:
            return MapState(ep.identity, False, False, {}, {}, self.config.audit)
        rules = [self._rules[r].rule for r in ep.rules]
        ingress = mode is EnforcementMode.ALWAYS or any(
            r.enforces(Direction.INGRESS) for r in rules
        )
        egress = mode is EnforcementMode.ALWAYS or any(r.enforces(Direction.EGRESS) for r in rules)
        entries, l7 = merge_contributions(ep.contribs)
        return MapState(ep.identity, ingress, egress, entries, l7, self.config.audit)


def _refs(contribs: Iterable[Contribution]) -> tuple[RuleRef, ...]:
    seen: dict[RuleRef, None] = {}
    for c in contribs:
        if c.ref is not None:
            seen[c.ref] = None
    return tuple(seen)


def merge_contributions(
    contribs: dict[MapStateKey, list[Contribution]],
) -> tuple[dict[MapStateKey, MapStateEntry], dict[MapStateKey, L7RuleSet]]:
    """Merge every key's contributions, then apply Cilium's L7 merge rules across keys."""
    entries: dict[MapStateKey, MapStateEntry] = {}
    l7: dict[MapStateKey, L7RuleSet] = {}
    for key, cs in contribs.items():
        if not cs:
            continue
        denies = [c for c in cs if c.deny]
        if denies:
            entries[key] = MapStateEntry(True, None, _refs(denies))
            continue
        l7s = [c for c in cs if c.l7 is not None]
        if not l7s:
            entries[key] = MapStateEntry(False, None, _refs(cs))
            continue
        entries[key], l7[key] = _merge_l7(cs, l7s)
    _propagate_l7(entries, l7)
    return entries, l7


def _merge_l7(
    cs: list[Contribution], l7s: list[Contribution]
) -> tuple[MapStateEntry, L7RuleSet]:
    protocols = sorted({c.l7.protocol for c in l7s if c.l7 is not None and c.l7.protocol})
    protocol = protocols[0] if protocols else L7Protocol.HTTP
    # Two L7 types on one port from different policies: fail closed (no L7 rule allows).
    conflict = len(protocols) > 1
    rules: tuple[tuple[L7Rule, RuleRef | None], ...] = ()
    if not conflict:
        rules = tuple((r, c.ref) for c in l7s if c.l7 is not None for r in c.l7.rules)
    l4_only = [c for c in cs if c.l7 is None]
    ruleset = L7RuleSet(
        protocol,
        rules,
        allow_all=bool(l4_only) and not conflict,
        allow_all_ref=l4_only[0].ref if l4_only else None,
    )
    return MapStateEntry(False, protocol, _refs(cs)), ruleset


def _propagate_l7(
    entries: dict[MapStateKey, MapStateEntry], l7: dict[MapStateKey, L7RuleSet]
) -> None:
    """Cilium's merge across keys, for each redirected (direction, port):

    - a specific identity's L7 rules add to the rules that apply to any identity there;
    - a peer also allowed on that port at L4 only (by its own entry or an any-identity
      entry, single port or range) gets allow-all L7 there — still redirected, so the
      proxy logs it; where its L4 entry would win the lookup, a derived redirect entry for
      exactly that TCP port is added.
    """
    if not l7:
        return
    l7_ports = {(k.direction, k.port) for k in l7}
    plain = [
        k
        for k, e in entries.items()
        if not e.deny
        and e.redirect is None
        and k.port != ANY_PORT
        and k.protocol in (ANY_PROTOCOL, PROTO_TCP)
    ]
    for direction, port in l7_ports:
        wildcard_key = MapStateKey(direction, ANY_IDENTITY, PROTO_TCP, port, port)
        wildcard = l7.get(wildcard_key)
        port_l7_keys = [k for k in l7 if k.direction is direction and k.port == port]
        if wildcard is not None:
            for key in port_l7_keys:
                if key.identity != ANY_IDENTITY and l7[key].protocol == wildcard.protocol:
                    l7[key] = replace(l7[key], rules=l7[key].rules + wildcard.rules)
        for pk in plain:
            if pk.direction is not direction or not pk.port <= port <= pk.end_port:
                continue
            ref = entries[pk].derived_from[0] if entries[pk].derived_from else None
            if pk.identity == ANY_IDENTITY:
                for key in port_l7_keys:
                    l7[key] = replace(l7[key], allow_all=True, allow_all_ref=ref)
                continue
            target = MapStateKey(direction, pk.identity, PROTO_TCP, port, port)
            if target in l7:
                l7[target] = replace(l7[target], allow_all=True, allow_all_ref=ref)
            elif wildcard is not None:
                entries[target] = MapStateEntry(
                    False,
                    wildcard.protocol,
                    entries[pk].derived_from + entries[wildcard_key].derived_from,
                )
                l7[target] = replace(wildcard, allow_all=True, allow_all_ref=ref)
