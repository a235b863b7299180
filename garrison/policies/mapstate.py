"""The desired L3/L4 policy of one endpoint identity, and the lookup that reads it.

`MapState` is what the datapath's policy map must hold for an endpoint: entries keyed by
(direction, remote identity or 0 = any, protocol or 0 = any, port range or 0 = any port),
each an allow, a deny, or an allow that redirects to the proxy with an L7 parser. For
redirected entries `l7` holds the rule set the proxy applies to that remote identity.

ClusterNetworkPolicy rules (the Admin and Baseline tiers) are entries of their own `tier`
(`TIER_ADMIN`, `TIER_BASELINE`; 0 is the NetworkPolicy tier of every other kind), each an
Accept, Deny or Pass with the `order` of its rule (priority, then place in the policy). The
resolver makes the entries of one tier disjoint per (direction, identity, protocol) apart from
the any-port entry, each holding the first rule that covers it (the any-port rule included), so
the first match of the tier is simply the covering entry of lowest order.

`lookup()` is the reference model of the datapath's policy lookup; the BPF program follows the
same numbered precedence and a privileged test proves they agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from garrison.policies.l7rules import L7Protocol, L7RuleSet
from garrison.policies.model import Direction, TierAction
from garrison.policies.refs import RuleRef

ANY_IDENTITY = 0
ANY_PROTOCOL = 0
ANY_PORT = 0

PROTO_TCP = 6
PROTO_UDP = 17
PROTO_SCTP = 132
PROTO_ICMP = 1
PROTO_ICMPV6 = 58
# the protocols a port (and so a port entry of protocol ANY) applies to (Cilium's ANY);
# the datapath: lib/policy.h, gar_any_proto_port
PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})

TIER_NETWORKPOLICY = 0  # NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy
TIER_ADMIN = 1  # ClusterNetworkPolicy tier: Admin, before the NetworkPolicy tier
TIER_BASELINE = 2  # ClusterNetworkPolicy tier: Baseline, where no NetworkPolicy selects

TIER_NAMES = {TIER_ADMIN: "Admin", TIER_NETWORKPOLICY: "NetworkPolicy", TIER_BASELINE: "Baseline"}

# At equal order (two policies of one priority, rules at the same place), the safest action
# decides: Deny, then Pass, then Accept (the API leaves the choice to the implementation).
ACTION_RANK = {TierAction.DENY: 0, TierAction.PASS: 1, TierAction.ACCEPT: 2}


class MatchType(StrEnum):
    """Which kind of entry decided, in Hubble's vocabulary (policy verdict events)."""

    L3_L4 = "L3-L4"  # identity + port
    L4_ONLY = "L4-only"  # any identity + port
    L3_PROTO = "L3-proto"  # identity + protocol, any port
    PROTO_ONLY = "proto-only"  # any identity + protocol, any port
    L3_ONLY = "L3-only"  # identity, any protocol and port
    ALL = "all"  # any identity, anything
    NONE = "none"  # nothing matched


class DropReason(StrEnum):
    POLICY_DENIED = "POLICY_DENIED"  # enforced direction, no allow matched
    POLICY_DENY = "POLICY_DENY"  # an explicit deny rule matched


class MapStateKey(NamedTuple):
    """`end_port` equals `port` for a single port; both 0 for any port.

    A NamedTuple rather than a dataclass: resolution creates and hashes hundreds of
    thousands of these, and tuple hashing runs in C.
    """

    direction: Direction
    identity: int
    protocol: int
    port: int
    end_port: int
    tier: int = TIER_NETWORKPOLICY

    @property
    def port_width(self) -> int:
        return 65536 if self.port == ANY_PORT else self.end_port - self.port + 1

    def covers(self, identity: int, protocol: int, port: int) -> bool:
        if self.identity not in (ANY_IDENTITY, identity):
            return False
        if self.protocol not in (ANY_PROTOCOL, protocol):
            return False
        if self.port == ANY_PORT:
            return True
        if self.protocol == ANY_PROTOCOL and protocol not in PORT_PROTOCOLS:
            return False  # a port is TCP's, UDP's or SCTP's, never an ICMP type
        return self.port <= port <= self.end_port

    def __str__(self) -> str:
        ident = "any" if self.identity == ANY_IDENTITY else str(self.identity)
        proto = "any" if self.protocol == ANY_PROTOCOL else PROTOCOL_NAMES.get(
            self.protocol, str(self.protocol)
        )
        if self.port == ANY_PORT:
            port = "any"
        elif self.end_port != self.port:
            port = f"{self.port}-{self.end_port}"
        else:
            port = str(self.port)
        tier = f" tier={TIER_NAMES[self.tier]}" if self.tier else ""
        return f"{self.direction.value} identity={ident} {proto}/{port}{tier}"


PROTOCOL_NAMES = {
    PROTO_TCP: "TCP",
    PROTO_UDP: "UDP",
    PROTO_SCTP: "SCTP",
    PROTO_ICMP: "ICMP",
    PROTO_ICMPV6: "ICMPv6",
}


@dataclass(frozen=True, slots=True)
class MapStateEntry:
    """NetworkPolicy tier: an allow (maybe redirected) or a deny. Admin/Baseline tier
    (`action` set): what the first rule covering the entry does, and its `order`; `deny`
    repeats action Deny."""

    deny: bool
    redirect: L7Protocol | None = None
    derived_from: tuple[RuleRef, ...] = ()
    action: TierAction | None = None
    order: int = 0

    @property
    def rank(self) -> tuple[int, int]:
        """A tier entry's precedence in its tier, lower first."""
        return (self.order, ACTION_RANK[self.action] if self.action else 3)


@dataclass(frozen=True, slots=True)
class MapState:
    """Desired policy of one endpoint identity. Unenforced directions allow everything."""

    identity: int
    ingress_enforced: bool
    egress_enforced: bool
    entries: Mapping[MapStateKey, MapStateEntry] = field(default_factory=dict)
    l7: Mapping[MapStateKey, L7RuleSet] = field(default_factory=dict)
    audit: bool = False
    # some entry is of the Admin or Baseline tier (the datapath looks tiers up only then)
    tiers: bool = False

    def enforced(self, direction: Direction) -> bool:
        return self.ingress_enforced if direction is Direction.INGRESS else self.egress_enforced


@dataclass(frozen=True, slots=True)
class LookupResult:
    allowed: bool
    match_type: MatchType
    drop_reason: DropReason | None = None
    key: MapStateKey | None = None
    entry: MapStateEntry | None = None
    l7: L7RuleSet | None = None
    enforced: bool = True
    # which tier decided (TIER_*; None: no entry matched, the default decided), and the
    # Pass rules that sent the connection on to the next tier
    tier: int | None = None
    passed: tuple[RuleRef, ...] = ()

    @property
    def decided_by(self) -> str:
        if self.tier is not None:
            return TIER_NAMES[self.tier]
        return "default deny" if not self.allowed else "default allow"

    @property
    def redirect(self) -> L7Protocol | None:
        return self.entry.redirect if self.entry and self.allowed else None

    @property
    def refs(self) -> tuple[RuleRef, ...]:
        return self.entry.derived_from if self.entry else ()


def match_type_of(key: MapStateKey) -> MatchType:
    has_id = key.identity != ANY_IDENTITY
    if key.port != ANY_PORT:
        return MatchType.L3_L4 if has_id else MatchType.L4_ONLY
    if key.protocol != ANY_PROTOCOL:
        return MatchType.L3_PROTO if has_id else MatchType.PROTO_ONLY
    return MatchType.L3_ONLY if has_id else MatchType.ALL


def prefix_block(start: int, end: int, port: int) -> int:
    """The size of the aligned power-of-two port block that holds `port` when the range
    start..end is split into prefixes (how an LPM map stores a range)."""
    s = start
    while s <= end:
        size = 1
        while s % (size * 2) == 0 and s + size * 2 - 1 <= end:
            size *= 2
        if s <= port < s + size:
            return size
        s += size
    return 65536


def precedence(key: MapStateKey, port: int) -> tuple[int, int, int]:
    """Sort key: lower wins. The numbered list of POLICY-SEMANTICS.md, step 2:

    1. identity + protocol + port
    2. any identity + protocol + port
    3. identity + protocol + any port
    4. any identity + protocol + any port
    5. identity + any protocol + any port (L3-only)
    6. any identity + anything (allow-all)

    A port with protocol ANY counts as a port entry (classes 1/2), after the same port with a
    protocol. Among port entries of one class the narrowest match wins, where a range counts
    as the prefix block of it that holds the port — exactly what a longest-prefix match over
    the range's prefixes returns, so the datapath can implement this with LPM lookups.
    """
    has_id = key.identity != ANY_IDENTITY
    if key.port != ANY_PORT:
        cls = 1 if has_id else 2
        width = prefix_block(key.port, key.end_port, port)
        return (cls, width, 0 if key.protocol != ANY_PROTOCOL else 1)
    if key.protocol != ANY_PROTOCOL:
        return (3 if has_id else 4, 0, 0)
    return (5 if has_id else 6, 0, 0)


def lookup(
    state: MapState, direction: Direction, remote_identity: int, protocol: int, port: int
) -> LookupResult:
    """The verdict for a new connection, exactly as the datapath decides it (the numbered
    steps of lib/policy.h):

    0. Admin tier: the covering Admin entry of lowest rank decides: Accept -> allow,
       Deny -> drop (POLICY_DENY), Pass -> on to step 1 (so does no match)
    1. any matching explicit deny of the NetworkPolicy tier -> drop (POLICY_DENY)
    2. otherwise the most specific allow decides (see `precedence`); a redirect entry sends
       the connection to the proxy
    3. nothing matches and the direction is enforced (some NetworkPolicy-tier rule selects the
       endpoint in this direction, or enforcement `always`): drop (POLICY_DENIED)
    4. Baseline tier, as step 0: Accept -> allow, Deny -> drop (POLICY_DENY), Pass or no
       match -> step 5
    5. allow (nothing enforces the direction)
    """
    candidates = [
        (key, entry)
        for key, entry in state.entries.items()
        if key.direction is direction and key.covers(remote_identity, protocol, port)
    ]
    return decide(state, direction, candidates, port)


def _first(
    cands: list[tuple[MapStateKey, MapStateEntry]], tier: int
) -> tuple[MapStateKey, MapStateEntry] | None:
    hits = [(k, e) for k, e in cands if k.tier == tier]
    if not hits:
        return None
    # at equal rank the kernel keeps its first probe (own identity, then own protocol) and a
    # probe finds the longest prefix (a port segment before the any-port entry)
    return min(hits, key=lambda ke: (
        ke[1].rank, ke[0].identity == ANY_IDENTITY, ke[0].protocol == ANY_PROTOCOL,
        ke[0].port == ANY_PORT,
    ))


def _tier_result(
    key: MapStateKey, entry: MapStateEntry, enforced: bool, passed: tuple[RuleRef, ...]
) -> LookupResult:
    if entry.action is TierAction.ACCEPT:
        return LookupResult(
            True, match_type_of(key), None, key, entry, None, enforced, key.tier, passed
        )
    return LookupResult(
        False, match_type_of(key), DropReason.POLICY_DENY, key, entry, None, enforced,
        key.tier, passed,
    )


def decide(
    state: MapState,
    direction: Direction,
    candidates: Iterable[tuple[MapStateKey, MapStateEntry]],
    port: int,
) -> LookupResult:
    """Steps 0-5 of `lookup` over entries already known to cover the packet."""
    cands = list(candidates)
    enforced = state.enforced(direction)
    passed: tuple[RuleRef, ...] = ()
    tiered = any(k.tier for k, _ in cands)
    if tiered:
        admin = _first(cands, TIER_ADMIN)
        if admin is not None:
            if admin[1].action is not TierAction.PASS:
                return _tier_result(*admin, enforced, passed)
            passed = admin[1].derived_from
        cands_np = [(k, e) for k, e in cands if k.tier == TIER_NETWORKPOLICY]
    else:
        cands_np = cands
    denies = [(k, e) for k, e in cands_np if e.deny]
    if denies:
        key, entry = min(denies, key=lambda ke: precedence(ke[0], port))
        return LookupResult(
            False, match_type_of(key), DropReason.POLICY_DENY, key, entry, None, enforced,
            TIER_NETWORKPOLICY, passed,
        )
    allows = [(k, e) for k, e in cands_np if not e.deny]
    if allows:
        # equal precedence (a single-port entry and a one-port block of a range): the
        # redirect wins, as the kernel merges such entries and keeps the redirect
        key, entry = min(
            allows, key=lambda ke: (*precedence(ke[0], port), ke[1].redirect is None)
        )
        return LookupResult(
            True, match_type_of(key), None, key, entry, state.l7.get(key), enforced,
            TIER_NETWORKPOLICY, passed,
        )
    if enforced:
        return LookupResult(
            False, MatchType.NONE, DropReason.POLICY_DENIED, enforced=True, passed=passed
        )
    if tiered:
        baseline = _first(cands, TIER_BASELINE)
        if baseline is not None:
            if baseline[1].action is not TierAction.PASS:
                return _tier_result(*baseline, enforced, passed)
            passed = (*passed, *baseline[1].derived_from)
    return LookupResult(True, MatchType.NONE, None, enforced=False, passed=passed)
