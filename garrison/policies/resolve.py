"""Resolution: policy rules + identities -> the MapState of every endpoint identity.

Incremental by construction. Every rule section contributes to map keys of the endpoints its
subject selector selects; contributions are indexed by rule and by remote identity, so:
- adding or removing a rule touches only the endpoints that rule selects;
- adding an identity computes its own policy and adds only the keys for that identity to the
  endpoints whose rules' peers now select it;
- removing an identity drops only its keys.
A MapState is merged from the contributions on demand and cached until they change.
A bulk add (`add_policies`, `apply`) builds the endpoints no rule selected before once
per class of endpoints with the same rules and port names; the others are copies on write.

ClusterNetworkPolicy rules contribute keys of their tier (Admin, Baseline) with their action
and order; `flatten_tier_bucket` turns the keys of one (direction, tier, identity, protocol)
into the entries the lookup reads: the first rule (lowest order) wins wherever rules overlap.
"""

from __future__ import annotations

import bisect
import gc
import heapq
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from garrison.policies.l7rules import L7Protocol, L7Rule, L7Rules, L7RuleSet
from garrison.policies.labels import SOURCE_RESERVED, Label, Labels
from garrison.policies.mapstate import (
    ACTION_RANK,
    ANY_IDENTITY,
    ANY_PORT,
    ANY_PROTOCOL,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    TIER_ADMIN,
    TIER_BASELINE,
    TIER_NETWORKPOLICY,
    MapState,
    MapStateEntry,
    MapStateKey,
    precedence,
)
from garrison.policies.model import (
    ICMP_TYPES,
    IP_PROTO,
    Direction,
    EndpointPeer,
    EnforcementMode,
    Entity,
    EntityPeer,
    IPNetwork,
    Peer,
    Policy,
    PolicySection,
    Protocol,
    Rule,
    Tier,
    TierAction,
    tier_order,
)
from garrison.policies.refs import RuleRef
from garrison.policies.repository import PolicyChange, rule_prefixes
from garrison.policies.selector import EndpointSelector
from garrison.policies.selectorcache import (
    CIDR_IDENTITY_FLAG,
    RESERVED_IDENTITIES,
    PeerKey,
    SelectorCache,
    is_endpoint,
    is_reserved,
)


def icmp_type_number(family: str, value: int | str) -> int:
    """The loader already turns names into numbers; this accepts either."""
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    return ICMP_TYPES["IPv6" if family.lower() == "ipv6" else "IPv4"][value]


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    """`enforcement`: default | always | never (POLICY-SEMANTICS.md "Selection and default
    deny"); `audit`: verdicts computed and logged as AUDIT, nothing dropped;
    `allow_localhost`: the local host (reserved identity 1) reaches every endpoint in
    ingress even under default deny, as Cilium's `allow-localhost` does, so health checks
    keep working; an explicit deny of the host still wins. False (`policy`): only what
    policy allows."""

    enforcement: EnforcementMode = EnforcementMode.DEFAULT
    audit: bool = False
    allow_localhost: bool = True


@dataclass(frozen=True, slots=True)
class Contribution:
    rule_id: int
    ref: RuleRef | None
    deny: bool
    l7: L7Rules | None  # None = allowed at L4 only
    # ClusterNetworkPolicy rules: their action, order in the tier and tier (TIER_*)
    action: TierAction | None = None
    order: int = 0
    tier: int = TIER_NETWORKPOLICY
    # The merge of a key this is the only contribution to (shared by every such key).
    alone: tuple[MapStateEntry | None, L7RuleSet | None] = field(
        init=False, compare=False, repr=False
    )
    protocol: L7Protocol | None = field(init=False, compare=False, repr=False)
    # a tier contribution: the entry it makes where it is the only rule (`tier_winner`)
    tier_alone: MapStateEntry | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", self.l7.protocol if self.l7 is not None else None)
        if self.action is None:
            object.__setattr__(self, "alone", _merge_key([self]))
            object.__setattr__(self, "tier_alone", None)
        else:
            object.__setattr__(self, "alone", (None, None))
            refs = (self.ref,) if self.ref is not None else ()
            object.__setattr__(self, "tier_alone", MapStateEntry(
                self.action is TierAction.DENY, None, refs, self.action, self.order
            ))


@dataclass(slots=True)
class _Section:
    """A rule section prepared once: the live identity sets of its peers (the selector
    cache keeps them current) and one Contribution per port it names."""

    direction: Direction
    deny: bool
    any_peer: bool  # no peer list: keyed by identity 0
    peer_sets: list[set[int]]  # endpoint selectors
    ports: list[tuple[int, int, int, Contribution]]
    # Entity and CIDR peers (`all` = any_entity, keyed by identity 0). fromRequires /
    # toRequires narrow only endpoint peers and "no peer list", as in Cilium, which folds
    # the requirements into fromEndpoints selectors and leaves entities and CIDRs alone.
    any_entity: bool = False
    fixed_sets: list[set[int]] = field(default_factory=list)
    # named ports: (protocol, name, contribution); resolved per destination endpoint
    named: list[tuple[int, str, Contribution]] = field(default_factory=list)
    tier: int = TIER_NETWORKPOLICY  # a ClusterNetworkPolicy rule's: TIER_ADMIN / BASELINE

    def identities(self, only: int | None = None) -> tuple[set[int], set[int]]:
        """(peers requirements narrow, peers they do not); with `only`, just that identity
        where a peer selects it."""
        if only is not None:
            narrow = {only} if any(only in ids for ids in self.peer_sets) else set()
            fixed = {only} if any(only in ids for ids in self.fixed_sets) else set()
            return narrow, fixed
        narrow = {ANY_IDENTITY} if self.any_peer else set()
        for ids in self.peer_sets:
            narrow |= ids
        fixed = {ANY_IDENTITY} if self.any_entity else set()
        for ids in self.fixed_sets:
            fixed |= ids
        return narrow, fixed


@dataclass(slots=True)
class _RuleEntry:
    rule_id: int
    policy: Policy
    rule: Rule
    subject: EndpointSelector
    peers: tuple[PeerKey, ...]
    sections: list[_Section] = field(default_factory=list)
    # fromRequires / toRequires selectors of its sections, per direction and deny|allow
    # (live sets)
    requires: dict[tuple[Direction, bool], list[set[int]]] = field(default_factory=dict)


@dataclass(slots=True)
class _EndpointPolicy:
    """Contributions for one endpoint identity and their merge, kept current incrementally.

    `base*` hold each key merged on its own; `entries`/`l7` add the cross-key L7 merge of
    `_l7_override`, recorded per redirected (direction, port) in `overrides`.
    """

    identity: int
    rules: set[int] = field(default_factory=set)
    contribs: dict[MapStateKey, list[Contribution]] = field(default_factory=dict)
    # A clone shares the sets of `by_rule` until it changes one: `own_rules` are the rule
    # ids whose set is its own. The sets of `port_keys` and `tier_raw` (small) are frozen
    # and replaced on change. So `_unshare` copies dicts, not the sets in them.
    by_rule: dict[int, set[MapStateKey]] = field(default_factory=dict)
    own_rules: set[int] = field(default_factory=set)
    dirty: set[MapStateKey] = field(default_factory=set)
    base: dict[MapStateKey, MapStateEntry] = field(default_factory=dict)
    base_l7: dict[MapStateKey, L7RuleSet] = field(default_factory=dict)
    l7_ports: dict[tuple[Direction, int], int] = field(default_factory=dict)
    # direction -> identity -> keys of protocol TCP or any (any port included): the entries
    # that cover a redirected TCP port, which the cross-key L7 merge looks at.
    port_keys: dict[Direction, dict[int, frozenset[MapStateKey]]] = field(
        default_factory=lambda: {Direction.INGRESS: {}, Direction.EGRESS: {}}
    )
    # (direction, port) -> identity -> the key whose entry/rule set the L7 merge changed
    overrides: dict[tuple[Direction, int], dict[int, MapStateKey]] = field(default_factory=dict)
    entries: dict[MapStateKey, MapStateEntry] = field(default_factory=dict)
    l7: dict[MapStateKey, L7RuleSet] = field(default_factory=dict)
    cached: MapState | None = None
    touched: set[MapStateKey] = field(default_factory=set)
    # what every allowed (denied) endpoint peer must also match: the requires of the allow
    # (deny) sections of the rules selecting it, per direction
    requires: dict[tuple[Direction, bool], list[set[int]]] = field(default_factory=dict)
    # tier keys (ClusterNetworkPolicy) with contributions, per (direction, tier, identity,
    # protocol) bucket, and the entries `flatten_tier_bucket` made of each bucket
    tier_raw: dict[tuple[Direction, int, int, int], frozenset[MapStateKey]] = field(
        default_factory=dict
    )
    tier_out: dict[tuple[Direction, int, int, int], set[MapStateKey]] = field(
        default_factory=dict
    )
    # keys a shared build (`PolicyResolver._build_shared`) merged already that the next
    # `merge()` still reports as touched
    pending: set[MapStateKey] = field(default_factory=set)
    # the containers above are shared with clones (`clone`): copy them before a change
    shared: bool = False

    def clone(self, identity: int) -> _EndpointPolicy:
        """The same policy for another endpoint identity of the same class (the same rules
        and port names). Copy on write: the two share every container until one of them
        changes (`_unshare`), so a clone costs no per-key work."""
        self.shared = True
        self.own_rules = set()  # its sets of by_rule are the clone's too now
        return replace(
            self,
            identity=identity,
            own_rules=set(),
            rules=set(self.rules),
            requires={kind: list(sets) for kind, sets in self.requires.items()},
            pending=set(self.pending),
            cached=None,
        )

    def _unshare(self) -> None:
        """Own copies of the containers a clone shares, before changing any of them. The
        contribution lists stay shared: nothing changes a list in place (`add_many` and
        `drop_rule` replace it)."""
        if not self.shared:
            return
        self.shared = False
        self.contribs = dict(self.contribs)
        self.by_rule = dict(self.by_rule)
        self.dirty = set(self.dirty)
        self.base = dict(self.base)
        self.base_l7 = dict(self.base_l7)
        self.l7_ports = dict(self.l7_ports)
        self.port_keys = {d: dict(by_ident) for d, by_ident in self.port_keys.items()}
        self.overrides = {port: dict(done) for port, done in self.overrides.items()}
        self.entries = dict(self.entries)
        self.l7 = dict(self.l7)
        self.touched = set(self.touched)
        self.tier_raw = dict(self.tier_raw)
        self.tier_out = dict(self.tier_out)  # its sets are replaced, never changed

    def add_many(self, keys: list[MapStateKey], contribution: Contribution) -> None:
        self._unshare()
        contribs = self.contribs
        rule_id = contribution.rule_id
        for key in keys:
            got = contribs.get(key)
            if got is None:
                contribs[key] = [contribution]
            elif got[-1].rule_id <= rule_id:  # a new list: clones share the old one
                contribs[key] = [*got, contribution]
            else:
                # in rule order whatever the order of arrival (an identity added after the
                # rules contributes rule by rule too), so refs and L7 rule order agree
                # with a fresh build
                got = list(got)
                bisect.insort_right(got, contribution, key=_rule_id)
                contribs[key] = got
        got_keys = self.by_rule.get(rule_id)
        if got_keys is not None and rule_id in self.own_rules:
            got_keys.update(keys)
        else:
            self.by_rule[rule_id] = set(keys) if got_keys is None else got_keys.union(keys)
            self.own_rules.add(rule_id)
        self.dirty.update(keys)
        self.cached = None

    def drop_rule(self, rule_id: int) -> None:
        self._unshare()
        self.own_rules.discard(rule_id)
        for key in self.by_rule.pop(rule_id, ()):
            remaining = [c for c in self.contribs.get(key, []) if c.rule_id != rule_id]
            if remaining:
                self.contribs[key] = remaining
            else:
                self.contribs.pop(key, None)
            self.dirty.add(key)
        self.rules.discard(rule_id)
        self.cached = None

    def drop_identity(self, identity: int) -> bool:
        self._unshare()
        # No per-identity index: removing an identity is rare, adding keys is not.
        keys = [k for k in self.contribs if k.identity == identity]
        for key in keys:
            for c in self.contribs.pop(key, []):
                got = self.by_rule.get(c.rule_id)
                if got is None:
                    continue
                if c.rule_id in self.own_rules:
                    got.discard(key)
                else:
                    self.by_rule[c.rule_id] = got - {key}
                    self.own_rules.add(c.rule_id)
            self.dirty.add(key)
        self.cached = None
        return bool(keys)

    def merge(self) -> set[MapStateKey]:
        """Bring `entries`/`l7` up to date with the dirty keys only; return the keys whose
        final entry or L7 rule set may have changed."""
        if not self.dirty:
            pending, self.pending = self.pending, set()
            return pending
        self._unshare()
        tier_dirty = {k for k in self.dirty if k.tier}
        if tier_dirty:
            self.dirty -= tier_dirty
        self.touched = set(self.dirty)
        # (direction, port) -> identities to redo, or None for every identity on that port
        affected: dict[tuple[Direction, int], set[int] | None] = {}

        def touch(port: tuple[Direction, int], identity: int) -> None:
            if identity == ANY_IDENTITY:
                affected[port] = None
            else:
                got = affected.setdefault(port, set())
                if got is not None:
                    got.add(identity)

        for key in self.dirty:
            was_l7 = key in self.base_l7
            cs = self.contribs.get(key)
            merged = merge_key(cs) if cs else None
            if merged is None:
                self.base.pop(key, None)
                self.base_l7.pop(key, None)
            else:
                if merged[0] is None:  # L7 deny rules only: they grant nothing
                    self.base.pop(key, None)
                else:
                    self.base[key] = merged[0]
                if merged[1] is not None:
                    self.base_l7[key] = merged[1]
                else:
                    self.base_l7.pop(key, None)
            is_l7 = key in self.base_l7
            if was_l7 != is_l7:
                port = (key.direction, key.port)
                self.l7_ports[port] = self.l7_ports.get(port, 0) + (1 if is_l7 else -1)
                if not self.l7_ports[port]:
                    del self.l7_ports[port]
            if was_l7 or is_l7:
                touch((key.direction, key.port), key.identity)
            if key.protocol in (ANY_PROTOCOL, PROTO_TCP):
                by_ident = self.port_keys[key.direction]
                had = by_ident.get(key.identity)
                if key in self.base:
                    if had is None:
                        by_ident[key.identity] = frozenset((key,))
                    elif key not in had:
                        by_ident[key.identity] = had | {key}
                elif had is not None and key in had:
                    if len(had) == 1:
                        del by_ident[key.identity]
                    else:
                        by_ident[key.identity] = had - {key}
                any_port = key.port == ANY_PORT
                for d, p in self.l7_ports:
                    if d is key.direction and (any_port or key.port <= p <= key.end_port):
                        touch((d, p), key.identity)
            self._restore(key)
        for port, identities in affected.items():
            self._propagate(port, identities)
        self.dirty.clear()
        if tier_dirty:
            self._merge_tiers(tier_dirty)
        touched, self.touched = self.touched, set()
        if self.pending:
            touched |= self.pending
            self.pending = set()
        return touched

    def _merge_tiers(self, dirty: set[MapStateKey]) -> None:
        """Recompute the tier buckets the dirty keys are in (their old entries are
        reported as touched, so a sync deletes what is gone)."""
        buckets = set()
        for key in dirty:
            bucket = (key.direction, key.tier, key.identity, key.protocol)
            buckets.add(bucket)
            raw = self.tier_raw.get(bucket)
            if key in self.contribs:
                self.tier_raw[bucket] = frozenset((key,)) if raw is None else raw | {key}
            elif raw is not None:
                self.tier_raw[bucket] = raw - {key}
        self.touched |= dirty
        for bucket in buckets:
            for key in self.tier_out.pop(bucket, ()):
                self.entries.pop(key, None)
                self.touched.add(key)
            raw = self.tier_raw.get(bucket)
            if not raw:
                self.tier_raw.pop(bucket, None)
                continue
            made = flatten_tier_bucket({k: self.contribs[k] for k in raw})
            self.entries.update(made)
            self.touched.update(made)  # not |= a keys view: that copies the set
            self.tier_out[bucket] = set(made)

    def _propagate(self, port: tuple[Direction, int], identities: set[int] | None) -> None:
        done = self.overrides.setdefault(port, {})
        if identities is None:
            for key in done.values():
                self._restore(key)
            done.clear()
        else:
            for ident in identities:
                if ident in done:
                    self._restore(done.pop(ident))
        if port not in self.l7_ports:
            if not done:
                del self.overrides[port]
            return
        direction, number = port
        by_ident = self.port_keys[direction]
        any_keys = by_ident.get(ANY_IDENTITY, ())
        if identities is None:
            identities = {ANY_IDENTITY} | set(by_ident) | _deny_only_identities(
                self.base, self.base_l7, direction, number
            )
        for ident in identities:
            got = _l7_override(
                direction, number, ident, self.base, self.base_l7, self.contribs,
                by_ident.get(ident, ()), any_keys,
            )
            if got is not None:
                key, entry, ruleset = got
                self.entries[key] = entry
                self.l7[key] = ruleset
                self.touched.add(key)
                done[ident] = key

    def _restore(self, key: MapStateKey) -> None:
        self.touched.add(key)
        if key in self.base:
            self.entries[key] = self.base[key]
        else:
            self.entries.pop(key, None)
        if key in self.base_l7 and key in self.base:
            self.l7[key] = self.base_l7[key]
        else:
            self.l7.pop(key, None)


# endpoints with the same rules, own port names and init-ness resolve alike
_EndpointClass = tuple[frozenset[int], frozenset[tuple[str, frozenset[tuple[int, int]]]], bool]

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


def section_named_ports(section: PolicySection) -> list[tuple[int, str, L7Rules | None]]:
    """(protocol, name, l7) for each named port of the section (ANY = the declared one)."""
    out: list[tuple[int, str, L7Rules | None]] = []
    for port_rule in section.to_ports:
        l7 = port_rule.rules if port_rule.rules and port_rule.rules.protocol else None
        for pp in port_rule.ports:
            if pp.name:
                proto = IP_PROTO[pp.protocol]
                if l7 is not None and pp.protocol is Protocol.ANY:
                    proto = PROTO_TCP
                out.append((proto, pp.name, l7))
    return out


def section_ports(section: PolicySection) -> list[tuple[int, int, int, L7Rules | None]]:
    """(protocol, port, end_port, l7) for each numbered port the section names; any = zeros.
    Named ports are in `section_named_ports`."""
    out: list[tuple[int, int, int, L7Rules | None]] = []
    if section.icmps:
        for icmp in section.icmps:
            proto = PROTO_ICMPV6 if icmp.family.lower() == "ipv6" else PROTO_ICMP
            t = icmp_type_number(icmp.family, icmp.type)
            out.append((proto, t, t, None))
        return out
    if not section.to_ports:
        return [(ANY_PROTOCOL, ANY_PORT, ANY_PORT, None)]
    for port_rule in section.to_ports:
        l7 = port_rule.rules if port_rule.rules and port_rule.rules.protocol else None
        if not port_rule.ports:
            out.append((ANY_PROTOCOL, ANY_PORT, ANY_PORT, None))
            continue
        for pp in port_rule.ports:
            if pp.name:
                continue
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
        # identity -> port name -> {(protocol, port)}: the port names the endpoints of that
        # identity declare (`set_named_ports`); rules with named ports, by id
        self._named_ports: dict[int, dict[str, frozenset[tuple[int, int]]]] = {}
        self._named_rules: set[int] = set()
        self._named_ingress: set[int] = set()  # ... in an ingress section
        self._named_egress: set[int] = set()  # ... in an egress section
        self._named_egress_any: set[int] = set()  # ... toward any peer (or entity all)
        # endpoints `add_policies` builds at its end (`add_policy` only records their rules)
        self._deferred: set[int] = set()

    # -- named ports -----------------------------------------------------------------------

    def set_named_ports(
        self, identity: int, ports: dict[str, frozenset[tuple[int, int]]]
    ) -> set[int]:
        """The port names the endpoints of `identity` declare: name -> {(ip protocol,
        port)} (several where endpoints sharing the identity map a name differently). A
        rule's named port selects, on ingress, the ports the selected endpoint's identity
        declares under that name; on egress, those the destination identity declares.
        Returns the endpoint identities whose policy changed. Cheapest before the identity's
        `add_identity` (its policy is then built once, with them)."""
        ports = {name: frozenset(pp) for name, pp in ports.items() if pp}
        if self._named_ports.get(identity, {}) == ports:
            return set()
        if ports:
            self._named_ports[identity] = ports
        else:
            self._named_ports.pop(identity, None)
        return self._rebuild_named(identity)

    def named_ports(self, identity: int) -> dict[str, frozenset[tuple[int, int]]]:
        return dict(self._named_ports.get(identity, {}))

    def _rebuild_named(self, identity: int) -> set[int]:
        """Recompute the endpoints whose policy a change of `identity`'s port names can
        change: the identity itself where a rule selecting it names ports, and the endpoints
        whose egress rules name ports toward a peer list that holds the identity (or any
        peer)."""
        changed: set[int] = set()
        if not self._named_rules:
            return changed
        egress_rules = {
            rule_id
            for rule_id in self._named_egress
            if any(
                s.named and s.direction is Direction.EGRESS and (
                    s.any_peer or s.any_entity
                    or any(identity in ids for ids in s.peer_sets)
                    or any(identity in ids for ids in s.fixed_sets)
                )
                for s in self._rules[rule_id].sections
            )
        }
        own = self._endpoints.get(identity)
        if own is not None and own.rules & self._named_ingress:
            self._rebuild(identity)
            changed.add(identity)
        for ep_id, ep in list(self._endpoints.items()):
            if ep_id not in changed and ep.rules & egress_rules:
                self._rebuild(ep_id)
                changed.add(ep_id)
        return changed

    def _resolve_name(
        self, identity: int, name: str, proto: int, every: bool = False
    ) -> list[tuple[int, int]]:
        """The (protocol, port) pairs `name` means on `identity`: none when it declares no
        such name or only for another protocol (never "any port"), and none for a protocol
        its endpoints map to several numbers (as Cilium's named-port map: which one a
        connection means cannot be told, so the name selects nothing there) — unless
        `every` (a deny rule's name: it denies every number the name means, fail closed)."""
        declared = self._named_ports.get(identity, {}).get(name, ())
        by_proto: dict[int, list[int]] = {}
        for p, port in declared:
            if proto == ANY_PROTOCOL or p == proto:
                by_proto.setdefault(p, []).append(port)
        return sorted(
            (p, port) for p, ports in by_proto.items() if every or len(ports) == 1
            for port in ports
        )

    # -- identities ------------------------------------------------------------------------

    def add_identity(self, identity: int, labels: Labels) -> set[int]:
        """Register an identity; returns the endpoint identities whose policy changed."""
        new_identity = self.cache.labels_of(identity) is None
        matched = self.cache.add_identity(identity, labels)
        changed: set[int] = set()
        if is_endpoint(identity) or identity == RESERVED_IDENTITIES["init"]:
            # init: the identity of an endpoint whose labels are not known yet
            rules: set[int] | None = None
            if new_identity:  # the subjects selecting it are among the peers it matched
                rules = set()
                for peer in matched:
                    if isinstance(peer, EndpointSelector) and peer in self._subject_users:
                        rules |= self._subject_users[peer]
            self._endpoints[identity] = self._build_endpoint(identity, rules)
            changed.add(identity)
        if identity == LOCALHOST_KEY.identity and self.config.allow_localhost:
            # back after a removal of the host identity took its keys away
            for ep in self._endpoints.values():
                if LOCALHOST not in ep.contribs.get(LOCALHOST_KEY, ()):
                    ep.add_many([LOCALHOST_KEY], LOCALHOST)
                    changed.add(ep.identity)
        rebuilt = set()
        for ep in list(self._endpoints.values()):
            if ep.requires and ep.identity != identity and any(
                all(identity in ids for ids in sets) for sets in ep.requires.values()
            ):
                # a peer granted as "any" may now resolve to this identity
                self._rebuild(ep.identity)
                rebuilt.add(ep.identity)
        changed |= rebuilt
        affected_rules: set[int] = set()
        for peer in matched:
            affected_rules |= self._peer_users.get(peer, set())
        for rule_id in affected_rules:
            entry = self._rules[rule_id]
            for ep_id in self.cache.select(entry.subject):
                if ep_id == identity or ep_id in rebuilt or ep_id not in self._endpoints:
                    continue
                self._contribute(self._endpoints[ep_id], entry, only_identity=identity)
                changed.add(ep_id)
        return changed

    def remove_identity(self, identity: int) -> set[int]:
        had_ports = self._named_ports.pop(identity, None) is not None
        lost = self.cache.remove_identity(identity)
        self._endpoints.pop(identity, None)
        candidates: Iterable[_EndpointPolicy]
        if is_reserved(identity):
            candidates = self._endpoints.values()  # e.g. the host: allow-localhost's key
        else:
            # only rules whose peers selected it (requires included) wrote keys for it;
            # looking at those endpoints alone keeps a namespace relabel (many identities
            # replaced at once) from scanning every endpoint's keys per identity
            rules: set[int] = set()
            for peer in lost:
                rules |= self._peer_users.get(peer, set())
            if had_ports:  # any-peer egress rules naming ports wrote keys for it too
                rules |= self._named_egress_any
            candidates = [ep for ep in self._endpoints.values() if ep.rules & rules]
        changed = set()
        for ep in candidates:
            if ep.drop_identity(identity):
                changed.add(ep.identity)
        return changed

    # -- rules -----------------------------------------------------------------------------

    def apply(self, change: PolicyChange) -> set[int]:
        """Apply a repository change; returns the endpoint identities whose policy changed."""
        changed: set[int] = set()
        for policy in change.removed:
            changed |= self.remove_policy(policy)
        changed |= self.add_policies(change.added)
        return changed

    def add_policies(self, policies: Iterable[Policy]) -> set[int]:
        """`add_policy` for each; the endpoints no rule selected before (all of them at a
        start) are built once at the end instead of rule by rule, one build per class of
        endpoints with the same rules and port names (`_build_shared`)."""
        policies = list(policies)
        changed: set[int] = set()
        if len(policies) < 2:
            for policy in policies:
                changed |= self.add_policy(policy)
            return changed
        self._deferred = {i for i, ep in self._endpoints.items() if not ep.rules}
        # The build allocates hundreds of thousands of long-lived objects and frees almost
        # none: the cycle collector, run every 700 allocations, would only walk them (40 %
        # of a full resolve's CPU time in bench/policy.py). Paused for the build; the next
        # collection after it looks at them once.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for policy in policies:
                changed |= self.add_policy(policy)
        finally:
            deferred, self._deferred = self._deferred, set()
            try:
                self._build_shared(deferred & changed)
            finally:
                if collecting:
                    gc.enable()
        return changed

    def add_policy(self, policy: Policy) -> set[int]:
        changed: set[int] = set()
        ids = self._rule_ids.setdefault(policy.key, [])
        for rule in policy.rules:
            rule_id = self._next_rule_id
            self._next_rule_id += 1
            peers = tuple(
                {
                    **{
                        peer_key(p): None
                        for _, _, s in rule_sections(rule)
                        for p in (s.peers or ())
                    },
                    **{sel: None for _, _, s in rule_sections(rule) for sel in s.requires},
                }
            )
            entry = _RuleEntry(rule_id, policy, rule, rule.endpoint_selector, peers)
            self._rules[rule_id] = entry
            ids.append(rule_id)
            self._subject_users[entry.subject].add(rule_id)
            for peer in peers:
                self._peer_users[peer].add(rule_id)
            entry.sections = [self._compile(rule_id, *s) for s in rule_sections(rule)]
            for direction, deny, section in rule_sections(rule):
                for sel in section.requires:
                    entry.requires.setdefault((direction, deny), []).append(
                        self.cache.select(sel)
                    )
            for ep_id in self.cache.select(entry.subject):
                ep = self._endpoints.get(ep_id)
                if ep is None:
                    continue
                if ep_id in self._deferred:  # built at the end of `add_policies`
                    ep.rules.add(rule_id)
                    changed.add(ep_id)
                    continue
                if entry.requires:
                    # narrows what every other rule grants this endpoint: rebuild it
                    ep.rules.add(rule_id)
                    self._rebuild(ep_id)
                else:
                    ep.rules.add(rule_id)
                    self._contribute(ep, entry)
                    ep.cached = None
                changed.add(ep_id)
        return changed

    def _build_shared(self, identities: Iterable[int]) -> None:
        """Rebuild endpoints from scratch (as `_rebuild`), one build and merge per class:
        endpoints whose rules are the same and whose own port names are the same get the
        same contributions and so the same merge (nothing in them depends on the subject's
        own identity but its port names), so the others are clones of the first."""
        templates: dict[_EndpointClass, _EndpointPolicy] = {}
        for identity in sorted(identities):
            old = self._endpoints[identity]
            # what it has and what it had but no sync was told of yet (a rule removed
            # just before, as in `apply`): the next sync rewrites or deletes all of it
            stale = old.merge() | set(old.entries)
            rules = frozenset(old.rules)
            # init (labels not known yet) is enforced both ways: a class of its own
            init = identity == RESERVED_IDENTITIES["init"]
            cls = (rules, frozenset(self._named_ports.get(identity, {}).items()), init)
            template = templates.get(cls)
            if template is None:
                new = self._build_endpoint(identity, rules)
                new.pending = new.merge()
                templates[cls] = new
            else:
                new = template.clone(identity)
            new.pending |= stale
            self._endpoints[identity] = new

    def _rebuild(self, identity: int) -> None:
        """Recompute one endpoint from scratch, reporting every old key as touched."""
        old = self._endpoints[identity]
        # its entries (derived L7 ones too, not only the merged keys), and what changed
        # since the last sync
        stale = old.merge() | set(old.entries)
        new = self._build_endpoint(identity)
        new.dirty |= stale
        self._endpoints[identity] = new

    def remove_policy(self, policy: Policy) -> set[int]:
        changed: set[int] = set()
        for rule_id in self._rule_ids.pop(policy.key, []):
            entry = self._rules.pop(rule_id)
            for named in (self._named_rules, self._named_ingress, self._named_egress,
                          self._named_egress_any):
                named.discard(rule_id)
            subjects = set(self.cache.select(entry.subject))
            self._subject_users[entry.subject].discard(rule_id)
            for ep_id in subjects:
                ep = self._endpoints.get(ep_id)
                if ep is not None and rule_id in ep.rules:
                    ep.drop_rule(rule_id)
                    if entry.requires:
                        self._rebuild(ep_id)
                    changed.add(ep_id)
            unused: list[PeerKey] = []
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

    def updates(self, identities: Iterable[int]) -> dict[int, set[MapStateKey]]:
        """Merge pending changes of `identities`; per endpoint, the keys whose entry or L7
        rule set may have changed (what a datapath sync must rewrite or delete). Read the
        new values with `entry()` / `l7_rules()`; cheaper than a whole `map_state()`."""
        out = {}
        for ident in identities:
            ep = self._endpoints.get(ident)
            if ep is not None:
                out[ident] = ep.merge()
        return out

    def entry(self, identity: int, key: MapStateKey) -> MapStateEntry | None:
        ep = self._endpoints[identity]
        ep.merge()
        return ep.entries.get(key)

    def l7_rules(self, identity: int, key: MapStateKey) -> L7RuleSet | None:
        ep = self._endpoints[identity]
        ep.merge()
        return ep.l7.get(key)

    def map_state(self, identity: int) -> MapState:
        ep = self._endpoints.get(identity)
        if ep is None:
            raise KeyError(f"identity {identity} is not a known endpoint identity")
        if ep.cached is None:
            ep.cached = self._materialize(ep)
        return ep.cached

    # -- internals -------------------------------------------------------------------------

    def _build_endpoint(
        self, identity: int, rules: Iterable[int] | None = None
    ) -> _EndpointPolicy:
        """`rules`: the ids of the rules selecting it, where the caller knows them."""
        ep = _EndpointPolicy(identity)
        if rules is not None:
            ep.rules = set(rules)
        else:
            for subject, rule_ids in self._subject_users.items():
                if identity in self.cache.select(subject):
                    ep.rules |= rule_ids
        for rule_id in ep.rules:
            for kind, sets in self._rules[rule_id].requires.items():
                ep.requires.setdefault(kind, []).extend(sets)
        if self.config.allow_localhost:
            ep.add_many([LOCALHOST_KEY], LOCALHOST)
        for rule_id in sorted(ep.rules):
            self._contribute(ep, self._rules[rule_id])
        return ep

    def _compile(
        self, rule_id: int, direction: Direction, deny: bool, section: PolicySection
    ) -> _Section:
        any_entity = False
        peer_sets = []
        fixed_sets = []
        for peer in section.peers or ():
            if isinstance(peer, EntityPeer) and peer.entity is Entity.ALL:
                any_entity = True
            elif isinstance(peer, EndpointPeer):
                peer_sets.append(self.cache.select(peer_key(peer)))
            else:
                fixed_sets.append(self.cache.select(peer_key(peer)))
        rule = self._rules[rule_id].rule
        tier = TIER_NETWORKPOLICY
        if rule.tier is not None and section.action is not None:
            tier = TIER_ADMIN if rule.tier is Tier.ADMIN else TIER_BASELINE
            assert section.ref is not None
            contribution = Contribution(
                rule_id, section.ref, section.action is TierAction.DENY, None, section.action,
                tier_order(rule.priority, section.ref.rule_index), tier,
            )
            ports = [(p, port, end, contribution) for p, port, end, _ in section_ports(section)]
            named = [(p, name, contribution) for p, name, _ in section_named_ports(section)]
        else:
            ports = [
                (proto, port, end, Contribution(rule_id, section.ref, deny, l7))
                for proto, port, end, l7 in section_ports(section)
            ]
            named = [
                (proto, name, Contribution(rule_id, section.ref, deny, l7))
                for proto, name, l7 in section_named_ports(section)
            ]
        if named:
            self._named_rules.add(rule_id)
            if direction is Direction.INGRESS:
                self._named_ingress.add(rule_id)
            else:
                self._named_egress.add(rule_id)
                if section.peers is None or any_entity:
                    self._named_egress_any.add(rule_id)
        return _Section(
            direction, deny, section.peers is None, peer_sets, ports, any_entity, fixed_sets,
            named, tier,
        )

    def _contribute(
        self, ep: _EndpointPolicy, entry: _RuleEntry, only_identity: int | None = None
    ) -> None:
        for section in entry.sections:
            idents, fixed = section.identities(only_identity)
            # fromRequires / toRequires narrow the rules of their own tier only
            required = ep.requires.get((section.direction, section.deny))
            if required and idents and not section.tier:
                idents = _narrow(idents, required)
            if fixed:
                idents |= fixed
            if not idents:
                continue
            direction = section.direction
            tier = section.tier
            for proto, port, end, contribution in section.ports:
                ep.add_many(
                    [MapStateKey(direction, ident, proto, port, end, tier) for ident in idents],
                    contribution,
                )
            if section.named:
                self._contribute_named(ep, section, idents)

    def _contribute_named(
        self, ep: _EndpointPolicy, section: _Section, idents: set[int]
    ) -> None:
        """Named ports, per destination: on ingress the endpoint's own port names, on egress
        each peer's. An egress "any peer" means every identity that declares the name."""
        direction = section.direction
        tier = section.tier
        for proto, name, contribution in section.named:
            keys = []
            every = contribution.deny or contribution.action is TierAction.DENY
            if direction is Direction.INGRESS:
                for dproto, dport in self._resolve_name(ep.identity, name, proto, every):
                    keys += [
                        MapStateKey(direction, i, dproto, dport, dport, tier) for i in idents
                    ]
            else:
                peers = idents
                if ANY_IDENTITY in idents:
                    peers = (idents - {ANY_IDENTITY}) | {
                        i for i, names in self._named_ports.items() if name in names
                    }
                for peer in peers:
                    keys += [
                        MapStateKey(direction, peer, dproto, dport, dport, tier)
                        for dproto, dport in self._resolve_name(peer, name, proto, every)
                    ]
            if keys:
                ep.add_many(keys, contribution)

    def _materialize(self, ep: _EndpointPolicy) -> MapState:
        mode = self.config.enforcement
        if mode is EnforcementMode.NEVER:
            return MapState(ep.identity, False, False, {}, {}, self.config.audit)
        rules = [self._rules[r].rule for r in ep.rules]
        ingress = mode is EnforcementMode.ALWAYS or any(
            r.enforces(Direction.INGRESS) for r in rules
        )
        egress = mode is EnforcementMode.ALWAYS or any(r.enforces(Direction.EGRESS) for r in rules)
        if ep.identity == RESERVED_IDENTITIES["init"]:
            # an endpoint whose labels are not known yet: default deny both ways (what a
            # policy selecting reserved:init allows, only), never an unpoliced window
            ingress = egress = True
        ep.merge()
        return MapState(
            ep.identity, ingress, egress, dict(ep.entries), dict(ep.l7), self.config.audit,
            bool(ep.tier_out),
        )


def _rule_id(c: Contribution) -> int:
    return c.rule_id


def _narrow(idents: set[int], required: list[set[int]]) -> set[int]:
    """The endpoint peers of a section that also match every requires selector; "any peer"
    becomes exactly the identities that match them all."""
    if ANY_IDENTITY in idents:
        out = set(required[0])
        for ids in required[1:]:
            out &= ids
        return out
    return {i for i in idents if all(i in ids for ids in required)}


def _refs(contribs: Iterable[Contribution]) -> tuple[RuleRef, ...]:
    seen: dict[RuleRef, None] = {}
    for c in contribs:
        if c.ref is not None:
            seen[c.ref] = None
    return tuple(seen)


def merge_contributions(
    contribs: dict[MapStateKey, list[Contribution]],
) -> tuple[dict[MapStateKey, MapStateEntry], dict[MapStateKey, L7RuleSet]]:
    """Merge every key's contributions, then apply Cilium's L7 merge rules across keys.

    The reference (non-incremental) form of `_EndpointPolicy.merge`; tests compare them.
    """
    entries: dict[MapStateKey, MapStateEntry] = {}
    l7: dict[MapStateKey, L7RuleSet] = {}
    buckets: dict[tuple[Direction, int, int, int], dict[MapStateKey, list[Contribution]]] = {}
    for key, cs in contribs.items():
        if key.tier:
            if cs:
                bucket = (key.direction, key.tier, key.identity, key.protocol)
                buckets.setdefault(bucket, {})[key] = cs
            continue
        merged = merge_key(cs) if cs else None
        if merged is None:
            continue
        if merged[0] is not None:
            entries[key] = merged[0]
        if merged[1] is not None:
            l7[key] = merged[1]
    base, base_l7 = dict(entries), dict(l7)
    for key in [k for k in l7 if k not in entries]:
        del l7[key]  # L7 deny rules only: no entry; the cross-key merge below uses them
    for direction, port in {(k.direction, k.port) for k in base_l7}:
        by_ident: dict[int, set[MapStateKey]] = {}
        for k in base:
            if k.direction is direction and k.protocol in (ANY_PROTOCOL, PROTO_TCP):
                by_ident.setdefault(k.identity, set()).add(k)
        any_keys = by_ident.get(ANY_IDENTITY, set())
        deny_only = _deny_only_identities(base, base_l7, direction, port)
        for ident in {ANY_IDENTITY} | set(by_ident) | deny_only:
            got = _l7_override(
                direction, port, ident, base, base_l7, contribs, by_ident.get(ident, ()),
                any_keys,
            )
            if got is not None:
                entries[got[0]] = got[1]
                l7[got[0]] = got[2]
    for raw in buckets.values():
        entries.update(flatten_tier_bucket(raw))
    return entries, l7


def tier_winner(cs: Sequence[Contribution]) -> MapStateEntry:
    """What the first of these ClusterNetworkPolicy rules does: the lowest order; at equal
    order Deny, then Pass, then Accept (`mapstate.ACTION_RANK`). Its refs are those of
    every rule at that rank."""
    if len(cs) == 1 and cs[0].tier_alone is not None:
        return cs[0].tier_alone
    ranked = [((c.order, ACTION_RANK[c.action or TierAction.ACCEPT]), c) for c in cs]
    best = min(rank for rank, _ in ranked)
    at_best = [c for rank, c in ranked if rank == best]
    refs = tuple(sorted(_refs(at_best), key=_ref_order))
    action = at_best[0].action or TierAction.ACCEPT
    return MapStateEntry(action is TierAction.DENY, None, refs, action, best[0])


def flatten_tier_bucket(
    raw: dict[MapStateKey, list[Contribution]],
) -> dict[MapStateKey, MapStateEntry]:
    """The entries of one tier bucket (keys of one direction, tier, identity and protocol):
    the any-port key keeps its own winner; the port ranges are cut into disjoint segments,
    each holding the first rule over every key that covers it, the any-port key included.
    So a longest-prefix match (or any covering entry of lowest order) finds the first rule.
    A sweep over the range bounds: O(k log k) for k keys."""
    if len(raw) == 1:  # the common case: one key, its own segment
        ((key, cs),) = raw.items()
        return {key: tier_winner(cs)}
    any_key = next((k for k in raw if k.port == ANY_PORT), None)
    any_win = tier_winner(raw[any_key]) if any_key is not None else None
    out: dict[MapStateKey, MapStateEntry] = {}
    if any_key is not None and any_win is not None:
        out[any_key] = any_win
    ranged = [(k, tier_winner(cs)) for k, cs in raw.items() if k.port != ANY_PORT]
    if not ranged:
        return out
    first = ranged[0][0]
    events: dict[int, list[tuple[bool, int]]] = defaultdict(list)
    for idx, (k, _) in enumerate(ranged):
        events[k.port].append((True, idx))
        events[k.end_port + 1].append((False, idx))
    points = sorted(events)
    active: dict[tuple[int, int], set[int]] = {}  # rank -> keys covering the segment
    ranks: list[tuple[int, int]] = []  # a heap of the active ranks (stale ones skipped)
    segments: list[tuple[int, int, MapStateEntry]] = []
    for i, point in enumerate(points):
        for opens, idx in events[point]:
            rank = ranged[idx][1].rank
            if opens:
                active.setdefault(rank, set()).add(idx)
                heapq.heappush(ranks, rank)
            else:
                active[rank].discard(idx)
                if not active[rank]:
                    del active[rank]
        while ranks and ranks[0] not in active:
            heapq.heappop(ranks)
        if not ranks or i + 1 == len(points):
            continue
        best = ranks[0]
        wins = [ranged[j][1] for j in active[best]]
        if any_win is not None and any_win.rank <= best:
            wins = [any_win] if any_win.rank < best else [*wins, any_win]
        win = replace(wins[0], derived_from=_refs_of(wins))
        start, end = point, points[i + 1] - 1
        if segments and segments[-1][1] == start - 1 and segments[-1][2] == win:
            segments[-1] = (segments[-1][0], end, win)
        else:
            segments.append((start, end, win))
    for start, end, win in segments:
        out[MapStateKey(first.direction, first.identity, first.protocol, start, end,
                        first.tier)] = win
    return out


def _refs_of(entries: Iterable[MapStateEntry]) -> tuple[RuleRef, ...]:
    seen: dict[RuleRef, None] = {}
    for e in entries:
        for r in e.derived_from:
            seen[r] = None
    return tuple(sorted(seen, key=_ref_order))


def _deny_only_identities(
    base: dict[MapStateKey, MapStateEntry],
    base_l7: dict[MapStateKey, L7RuleSet],
    direction: Direction,
    port: int,
) -> set[int]:
    """The identities with L7 deny rules but no entry of their own on a redirected port."""
    return {
        k.identity
        for k in base_l7
        if k.direction is direction and k.port == port and k not in base
    }


def merge_key(
    cs: list[Contribution],
) -> tuple[MapStateEntry | None, L7RuleSet | None] | None:
    """One key: any L3/L4 deny wins; else allow, redirected if some contribution has L7 rules.

    L7 deny rules (garrison extension) go into the rule set's `deny_rules` and redirect the
    key; a key with L7 deny rules only has no entry (an L7 deny grants nothing) but keeps
    its rule set, which the cross-key merge adds to the allows that cover the peer."""
    if not cs:
        return None
    if len(cs) == 1:
        return cs[0].alone
    return _merge_key(cs)


def _merge_key(cs: list[Contribution]) -> tuple[MapStateEntry | None, L7RuleSet | None]:
    denies = [c for c in cs if c.deny and c.l7 is None]
    if denies:
        return MapStateEntry(True, None, _refs(denies)), None
    l7_denies = [c for c in cs if c.deny]
    if l7_denies:
        cs = [c for c in cs if not c.deny]
        if not cs:
            protocols = sorted({c.protocol for c in l7_denies if c.protocol is not None})
            only = tuple((r, c.ref) for c in l7_denies if c.l7 for r in c.l7.rules)
            if len(protocols) > 1:
                only = ()  # two L7 types: the allows' merge fails closed anyway
            return None, L7RuleSet(protocols[0], (), deny_rules=only)
    l7s = [c for c in cs if c.l7 is not None]
    if not l7s and not l7_denies:
        return MapStateEntry(False, None, _refs(cs)), None
    protocols = sorted({c.protocol for c in l7s + l7_denies if c.protocol is not None})
    protocol = protocols[0] if protocols else L7Protocol.HTTP
    # Two L7 types on one port from different policies: fail closed (no L7 rule allows).
    conflict = len(protocols) > 1
    rules: tuple[tuple[L7Rule, RuleRef | None], ...] = ()
    if not conflict:
        rules = tuple((r, c.ref) for c in l7s if c.l7 is not None for r in c.l7.rules)
    l4_only = [c for c in cs if c.l7 is None]
    deny_rules: tuple[tuple[L7Rule, RuleRef | None], ...] = ()
    if not conflict:
        deny_rules = tuple((r, c.ref) for c in l7_denies if c.l7 for r in c.l7.rules)
    ruleset = L7RuleSet(
        protocol,
        rules,
        allow_all=bool(l4_only) and not conflict,
        allow_all_ref=l4_only[0].ref if l4_only else None,
        deny_rules=deny_rules,
    )
    return MapStateEntry(False, protocol, _refs(cs)), ruleset


def _l7_override(
    direction: Direction,
    port: int,
    identity: int,
    base: dict[MapStateKey, MapStateEntry],
    base_l7: dict[MapStateKey, L7RuleSet],
    contribs: dict[MapStateKey, list[Contribution]],
    identity_tcp_keys: Iterable[MapStateKey],
    any_tcp_keys: Iterable[MapStateKey],
) -> tuple[MapStateKey, MapStateEntry, L7RuleSet] | None:
    """Cilium's union of rules, for one peer on one redirected (direction, TCP port).

    Every allow that covers the peer on that port applies to it: the peer's own entries and
    the any-identity entries, whatever their kind (L3-only, L3 + protocol, a port or a range,
    with L7 rules or without). So on a port where some L7 rule applies to the peer:
    - the L7 rules of the any-identity entry there also apply to the peer's own L7 entry
      (the proxy checks every selector that matches the peer);
    - a covering allow without L7 rules (L3-only, L4-only, any protocol, a range) makes its
      L7 allow-all there — still redirected, so the proxy logs it; adding an allow never
      removes access;
    - two L7 types on the port for one peer fail closed (no rule allows).
    The result is one entry for exactly (peer, TCP, port), the most precedent key there is,
    so the lookup (and the kernel) find it. A covering deny decides alone: no entry.
    Returns the key, entry and rule set when they differ from that key's own merge.
    """
    target = MapStateKey(direction, identity, PROTO_TCP, port, port)
    wildcard_key = MapStateKey(direction, ANY_IDENTITY, PROTO_TCP, port, port)
    l7_keys = [target] if target in base_l7 else []
    if identity != ANY_IDENTITY and wildcard_key in base_l7:
        l7_keys.append(wildcard_key)
    if not l7_keys:
        return None
    own = [k for k in identity_tcp_keys
           if (k.port == ANY_PORT or k.port <= port <= k.end_port) and k in base]
    # L7 deny rules of this very peer with no allow of its own there (garrison extension)
    own_deny_only = target in base_l7 and target not in base
    if identity != ANY_IDENTITY and not own and not own_deny_only:
        return None  # the lookup lands on the any-identity entry, whose merge is the same
    covering = own if identity == ANY_IDENTITY else own + [
        k for k in any_tcp_keys
        if (k.port == ANY_PORT or k.port <= port <= k.end_port) and k in base
    ]
    if not covering:
        return None  # nothing allows the peer there: L7 deny rules alone grant nothing
    if len(covering) == 1 and len(l7_keys) == 1 and covering[0] == l7_keys[0]:
        return None  # only its own L7 entry covers it: that entry's merge stands
    if any(base[k].deny for k in covering):
        return None
    rulesets = [base_l7[k] for k in l7_keys]
    protocols = sorted({c.protocol for k in l7_keys for c in contribs[k] if c.protocol})
    protocol = protocols[0] if protocols else rulesets[0].protocol
    # what makes the rule set allow-all, the most precedent first
    plain = [
        (precedence(k, port), ref)
        for k in covering
        if base[k].redirect is None
        for ref in base[k].derived_from or (None,)
    ] + [
        (precedence(k, port), rs.allow_all_ref)
        for k, rs in zip(l7_keys, rulesets, strict=True)
        if rs.allow_all
    ]
    deny_rules = tuple(r for rs in rulesets for r in rs.deny_rules)
    if len(protocols) > 1:
        merged = L7RuleSet(protocol, ())
    elif plain:
        ref = min(plain, key=lambda pr: (pr[0], pr[1] is None, _ref_key(pr[1])))[1]
        merged = L7RuleSet(
            protocol, tuple(r for rs in rulesets for r in rs.rules), True, ref, deny_rules
        )
    else:
        merged = L7RuleSet(
            protocol, tuple(r for rs in rulesets for r in rs.rules), deny_rules=deny_rules
        )
    existing = base.get(target)
    if existing is not None and target in base_l7:
        entry = existing if existing.redirect is protocol else replace(
            existing, redirect=protocol
        )
    else:
        refs = [r for k in sorted(own, key=lambda k: (precedence(k, port), k))
                for r in base[k].derived_from]
        if wildcard_key in base:
            refs += base[wildcard_key].derived_from
        if not refs:
            refs = [r for k in sorted(covering, key=lambda k: (precedence(k, port), k))
                    for r in base[k].derived_from]
        entry = MapStateEntry(False, protocol, tuple(dict.fromkeys(refs)))
    if existing == entry and base_l7.get(target) == merged:
        return None
    return target, entry, merged


# What allow-localhost contributes to every endpoint: an L3-only ingress allow of the host.
# Rule id 0 belongs to no rule (rules count from 1), so no rule removal takes it away.
LOCALHOST_KEY = MapStateKey(
    Direction.INGRESS, RESERVED_IDENTITIES["host"], ANY_PROTOCOL, ANY_PORT, ANY_PORT
)
LOCALHOST = Contribution(0, None, False, None)


def _ref_key(ref: RuleRef | None) -> tuple[str, str, str, str, int, int]:
    return _ref_order(ref) if ref is not None else ("", "", "", "", 0, 0)


def _ref_order(ref: RuleRef) -> tuple[str, str, str, str, int, int]:
    return (ref.kind.value, ref.namespace or "", ref.name, ref.section, ref.spec_index,
            ref.rule_index)


def prefix_identities(policies: Sequence[Policy]) -> dict[IPNetwork, int]:
    """The CIDR identity `build_resolver` gives each prefix the policies name (excepts
    included), numbered in a stable order."""
    prefixes: set[IPNetwork] = set()
    for policy in policies:
        for rule in policy.rules:
            prefixes |= rule_prefixes(rule)
    ordered = sorted(prefixes, key=lambda p: (p.version, str(p)))
    return {prefix: CIDR_IDENTITY_FLAG | n for n, prefix in enumerate(ordered, start=1)}


def build_resolver(
    policies: Sequence[Policy],
    endpoints: Sequence[tuple[int, Labels]],
    config: ResolverConfig | None = None,
) -> PolicyResolver:
    """A resolver holding `policies`, the reserved identities, a CIDR identity for every
    prefix the policies name, and the given endpoint identities."""
    resolver = PolicyResolver(config)
    for name, number in RESERVED_IDENTITIES.items():
        resolver.add_identity(number, Labels.of([Label(name, "", SOURCE_RESERVED)]))
    for prefix, number in prefix_identities(policies).items():
        resolver.add_identity(
            number,
            Labels.of([Label(str(prefix), "", "cidr"), Label("world", "", SOURCE_RESERVED)]),
        )
    for number, labels in endpoints:
        if resolver.cache.labels_of(number) is None:
            resolver.add_identity(number, labels)
    resolver.add_policies(policies)
    return resolver
