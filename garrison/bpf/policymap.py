"""MapState -> the entries of the kernel's policy map, and the diff against what it holds.

Pure: no bcc, no syscalls. `garrison.bpf.maps.PolicyMap` applies what this computes.

The kernel map (lib/policy.h) is an LPM trie keyed by (endpoint identity, direction,
deny|allow, remote identity or 0, protocol or 0, destination port prefix). A MapStateKey
becomes one kernel entry per aligned power-of-two block of its port range (`port_blocks`),
which is how `mapstate.prefix_block` counts a range's width, so the kernel's longest-prefix
lookups rank entries exactly as `mapstate.precedence` does. Deny entries are kept apart from
allow entries (the `deny` field) and looked up first, so a deny covering an allow's traffic
drops it whatever their specificity — no propagation of denies into allow entries is needed.

ClusterNetworkPolicy entries (MapStateKey.tier: Admin, Baseline) are kernel entries of that
tier (the key's `tier` byte, `deny` 0) whose value holds the rule's action and order. The
resolver made each tier bucket's port ranges disjoint apart from the any-port entry and put
the first rule over both into each, so one LPM lookup per (remote, protocol) pair returns the
first rule there, and the lowest order of the four lookups is the tier's first match.

Several MapStateKeys can produce the same kernel key (overlapping ranges share a block; a
single-port L7 entry and a range whose block at that port is a single port). Such allow
entries merge into one: redirect wins (the L7 merge of the resolver already made the rule
set allow-all for a peer also allowed at L4 only, so the proxy still lets it through and
logs it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from garrison.bpf.abi import (
    POLICY_ACCEPT,
    POLICY_DENY,
    POLICY_PASS,
    EndpointFlags,
)
from garrison.policies.l7rules import L7Protocol
from garrison.policies.mapstate import (
    ANY_IDENTITY,
    ANY_PORT,
    ANY_PROTOCOL,
    PORT_PROTOCOLS,
    DropReason,
    MapState,
    MapStateEntry,
    MapStateKey,
    MatchType,
)
from garrison.policies.model import Direction, TierAction

PORT_BITS = 16


class PolicyKey(NamedTuple):
    """One kernel policy entry's key. `port` is the block start; `port_prefixlen` 0 means any
    port (then `port` is 0), 16 a single port."""

    endpoint_identity: int
    direction: Direction
    deny: bool
    remote_identity: int
    protocol: int
    port: int
    port_prefixlen: int
    tier: int = 0  # mapstate.TIER_*: 0 NetworkPolicy, 1 Admin, 2 Baseline

    @property
    def port_end(self) -> int:
        if self.port_prefixlen == 0:
            return 65535
        return self.port + (1 << (PORT_BITS - self.port_prefixlen)) - 1


class PolicyValue(NamedTuple):
    """`port_prefixlen` repeats the key's: the kernel ranks the entry it found by it."""

    redirect: bool
    proxy_port: int
    port_prefixlen: int
    # tier entries: the rule's order in its tier and its action (POLICY_ACCEPT / DENY / PASS)
    order: int = 0
    action: int = 0

    @property
    def tier_rank(self) -> int:
        """lib/policy.h's rank of a tier entry: order, then Deny before Pass before Accept."""
        return (self.order << 2) | _ACTION_RANK[self.action]


ALLOW = PolicyValue(False, 0, 0)
ACTION_FLAGS = {
    TierAction.ACCEPT: POLICY_ACCEPT,
    TierAction.DENY: POLICY_DENY,
    TierAction.PASS: POLICY_PASS,
}
_ACTION_RANK = {POLICY_DENY: 0, POLICY_PASS: 1, POLICY_ACCEPT: 2}


def port_blocks(port: int, end_port: int) -> list[tuple[int, int]]:
    """(block start, prefix length) of the aligned power-of-two blocks `port..end_port`
    splits into, the same greedy split as `mapstate.prefix_block`; any port is [(0, 0)]."""
    if port == ANY_PORT:
        return [(0, 0)]
    if not 1 <= port <= end_port <= 65535:
        raise ValueError(f"invalid port range {port}-{end_port}")
    out = []
    start = port
    while start <= end_port:
        size = 1
        while start % (size * 2) == 0 and start + size * 2 - 1 <= end_port:
            size *= 2
        out.append((start, PORT_BITS + 1 - size.bit_length()))
        start += size
    return out


def specificity(key: PolicyKey) -> tuple[int, int, int]:
    """The precedence of lib/policy.h step 2 for an entry; lower is more specific. Entries
    are exact blocks, so this rank is the one every packet they cover sees."""
    has_id = key.remote_identity != ANY_IDENTITY
    has_proto = key.protocol != ANY_PROTOCOL
    if key.port_prefixlen:
        return (1 if has_id else 2, PORT_BITS - key.port_prefixlen, 0 if has_proto else 1)
    if has_proto:
        return (3 if has_id else 4, 0, 0)
    return (5 if has_id else 6, 0, 0)


_CLASS_MATCH = {
    1: MatchType.L3_L4,
    2: MatchType.L4_ONLY,
    3: MatchType.L3_PROTO,
    4: MatchType.PROTO_ONLY,
    5: MatchType.L3_ONLY,
    6: MatchType.ALL,
}


@dataclass(frozen=True, slots=True)
class KernelVerdict:
    allowed: bool
    match_type: MatchType
    drop_reason: DropReason | None = None
    redirect: bool = False
    proxy_port: int = 0


def _lpm(
    entries: Mapping[PolicyKey, PolicyValue],
    endpoint: int,
    direction: Direction,
    deny: bool,
    remote: int,
    protocol: int,
    port: int,
    tier: int = 0,
) -> tuple[PolicyKey, PolicyValue] | None:
    for plen in range(PORT_BITS, -1, -1):
        start = port & ~((1 << (PORT_BITS - plen)) - 1) & 0xFFFF if plen else 0
        key = PolicyKey(endpoint, direction, deny, remote, protocol, start, plen, tier)
        value = entries.get(key)
        if value is not None:
            return key, value
    return None


def lookup_entries(
    entries: Mapping[PolicyKey, PolicyValue],
    endpoint_identity: int,
    direction: Direction,
    remote_identity: int,
    protocol: int,
    port: int,
    enforced: bool,
    tiers: bool = True,
) -> KernelVerdict:
    """lib/policy.h's lookup over kernel entries, step for step (its numbered comment):
    0. Admin tier: the four LPM lookups below in the Admin entries; the lowest `tier_rank`
       decides: Accept -> allow, Deny -> drop POLICY_DENY, Pass (or no hit) -> step 1;
    1. deny: four LPM lookups, (remote, proto), (remote, any), (any, proto), (any, any);
       those of protocol any with port 0 unless the protocol is TCP, UDP or SCTP (a port
       entry of protocol any is no ICMP type);
    2. allow: the same four, the most precedent hit (`specificity`) decides;
    3. nothing: drop POLICY_DENIED if enforced;
    4. Baseline tier as step 0 (Pass or no hit -> step 5);
    5. allow.
    `tiers`: the endpoint's TIERS flag; without it steps 0 and 4 are skipped."""
    if remote_identity == ANY_IDENTITY:
        remote_identity = 2  # the world: what the datapath uses for an unknown address
    any_port = port if protocol in PORT_PROTOCOLS else ANY_PORT
    probes = (
        (remote_identity, protocol, port),
        (remote_identity, ANY_PROTOCOL, any_port),
        (ANY_IDENTITY, protocol, port),
        (ANY_IDENTITY, ANY_PROTOCOL, any_port),
    )

    def tier_first(tier: int) -> KernelVerdict | None:
        best: tuple[int, PolicyKey, PolicyValue] | None = None
        for rid, proto, p in probes:
            hit = _lpm(entries, endpoint_identity, direction, False, rid, proto, p, tier)
            if hit is not None and (best is None or hit[1].tier_rank < best[0]):
                best = (hit[1].tier_rank, *hit)
        if best is None or best[2].action == POLICY_PASS:
            return None
        match = _CLASS_MATCH[specificity(best[1])[0]]
        if best[2].action == POLICY_ACCEPT:
            return KernelVerdict(True, match)
        return KernelVerdict(False, match, DropReason.POLICY_DENY)

    admin = tier_first(1) if tiers else None
    if admin is not None:
        return admin
    for deny in (True, False):
        hits = [
            hit
            for rid, proto, p in probes
            if (hit := _lpm(entries, endpoint_identity, direction, deny, rid, proto, p))
        ]
        if not hits:
            continue
        key, value = min(hits, key=lambda kv: specificity(kv[0]))
        match = _CLASS_MATCH[specificity(key)[0]]
        if deny:
            return KernelVerdict(False, match, DropReason.POLICY_DENY)
        return KernelVerdict(True, match, None, value.redirect, value.proxy_port)
    if enforced:
        return KernelVerdict(False, MatchType.NONE, DropReason.POLICY_DENIED)
    baseline = tier_first(2) if tiers else None
    if baseline is not None:
        return baseline
    return KernelVerdict(True, MatchType.NONE)


class MissingProxyPortError(LookupError):
    """A redirected entry names an L7 protocol no proxy port was given for."""


def _value(
    key: MapStateKey, entry: MapStateEntry, prefixlen: int, proxy_ports: Mapping[L7Protocol, int]
) -> PolicyValue:
    if entry.action is not None:
        return PolicyValue(False, 0, prefixlen, entry.order, ACTION_FLAGS[entry.action])
    if entry.deny or entry.redirect is None:
        return PolicyValue(False, 0, prefixlen)
    port = proxy_ports.get(entry.redirect)
    if port is None:
        raise MissingProxyPortError(
            f"{key}: redirect to the {entry.redirect.value} proxy, but no proxy port is "
            f"configured for it (known: {', '.join(p.value for p in proxy_ports) or 'none'})"
        )
    return PolicyValue(True, port, prefixlen)


def kernel_entries(
    identity: int,
    key: MapStateKey,
    entry: MapStateEntry,
    proxy_ports: Mapping[L7Protocol, int],
) -> list[tuple[PolicyKey, PolicyValue]]:
    """The kernel entries one MapState entry of endpoint `identity` becomes."""
    return [
        (
            PolicyKey(
                identity, key.direction, entry.deny and not key.tier, key.identity,
                key.protocol, start, plen, key.tier,
            ),
            _value(key, entry, plen, proxy_ports),
        )
        for start, plen in port_blocks(key.port, key.end_port)
    ]


def merge_values(values: Iterable[PolicyValue]) -> PolicyValue:
    """Several MapState entries on one kernel key: a redirect wins over a plain allow."""
    best: PolicyValue | None = None
    for value in values:
        if best is None or (value.redirect and not best.redirect):
            best = value
    if best is None:
        raise ValueError("no values to merge")
    return best


def state_entries(
    state: MapState, proxy_ports: Mapping[L7Protocol, int]
) -> dict[PolicyKey, PolicyValue]:
    """Every kernel entry of one endpoint identity's MapState."""
    sources: dict[PolicyKey, list[PolicyValue]] = {}
    for key, entry in state.entries.items():
        for pkey, value in kernel_entries(state.identity, key, entry, proxy_ports):
            sources.setdefault(pkey, []).append(value)
    return {k: v[0] if len(v) == 1 else merge_values(v) for k, v in sources.items()}


def endpoint_flags(state: MapState) -> EndpointFlags:
    """The per-endpoint configuration bits a MapState implies."""
    flags = EndpointFlags.NONE
    if state.ingress_enforced:
        flags |= EndpointFlags.INGRESS_ENFORCED
    if state.egress_enforced:
        flags |= EndpointFlags.EGRESS_ENFORCED
    if state.audit:
        flags |= EndpointFlags.AUDIT
    if state.tiers:
        flags |= EndpointFlags.TIERS
    return flags


PolicyOp = tuple[PolicyKey, PolicyValue | None]
"""Write (value) or delete (None) one kernel entry."""


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    """What to write and delete to turn the kernel's entries into the desired ones."""

    upserts: Mapping[PolicyKey, PolicyValue] = field(default_factory=dict)
    deletes: frozenset[PolicyKey] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.upserts) or bool(self.deletes)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)

    def ops(self, room_first: bool = False) -> list[PolicyOp]:
        """The writes in an order where every intermediate state of the map gives each
        packet the old verdict, the new one, or a drop — never wider access:

        1. write deny entries (the deny set only grows until step 4);
        2. write allow entries, most specific first (a new entry never takes effect while a
           more specific new entry that should win over it is still missing);
        3. delete stale allow entries, least specific first (a stale entry never decides
           while a more specific stale entry it used to lose to is already gone);
        4. delete stale deny entries.

        `room_first` (a full map: the new entries find no room while the stale ones stay)
        does 3 first: stale allow entries go before any new one is written, so for a
        moment a packet may be dropped that both states allow — still never wider access.
        """
        # ClusterNetworkPolicy entries: a Deny is written with the denies, the others with
        # the allows (each tier bucket's entries are disjoint, so their order matters less)
        deny_up = [
            (k, v) for k, v in self.upserts.items() if k.deny or v.action == POLICY_DENY
        ]
        allow_up = sorted(
            ((k, v) for k, v in self.upserts.items()
             if not k.deny and v.action != POLICY_DENY),
            key=lambda kv: specificity(kv[0]),
        )
        allow_del = sorted(
            (k for k in self.deletes if not k.deny), key=specificity, reverse=True
        )
        deny_del = [k for k in self.deletes if k.deny]
        ops: list[PolicyOp] = []
        if room_first:
            ops.extend((k, None) for k in allow_del)
        ops.extend((k, v) for k, v in deny_up)
        ops.extend((k, v) for k, v in allow_up)
        if not room_first:
            ops.extend((k, None) for k in allow_del)
        ops.extend((k, None) for k in deny_del)
        return ops

    def then(self, later: PolicyDiff) -> PolicyDiff:
        """This diff followed by `later`, as one diff."""
        upserts = {k: v for k, v in self.upserts.items() if k not in later.deletes}
        upserts.update(later.upserts)
        deletes = (self.deletes - later.upserts.keys()) | later.deletes
        return PolicyDiff(upserts, frozenset(deletes))


def diff_entries(
    desired: Mapping[PolicyKey, PolicyValue], actual: Mapping[PolicyKey, PolicyValue]
) -> PolicyDiff:
    """The pure diff: entries to write (new or changed) and entries to delete."""
    upserts = {k: v for k, v in desired.items() if actual.get(k) != v}
    deletes = frozenset(k for k in actual if k not in desired)
    return PolicyDiff(upserts, deletes)


class DesiredPolicy:
    """The kernel entries of every endpoint identity, kept current incrementally.

    Feed it whole MapStates (`replace`) or the keys `PolicyResolver.updates()` reports
    (`update`); each call returns the PolicyDiff to apply to the kernel. `entries()` is the
    whole desired content, for reconciling a map found pinned after a restart.
    """

    def __init__(self, proxy_ports: Mapping[L7Protocol, int]) -> None:
        self._proxy_ports = dict(proxy_ports)
        # kernel key -> contributing MapState key -> value
        self._sources: dict[PolicyKey, dict[MapStateKey, PolicyValue]] = {}
        self._entries: dict[PolicyKey, PolicyValue] = {}
        # identity -> MapState key -> its kernel keys
        self._keys: dict[int, dict[MapStateKey, tuple[PolicyKey, ...]]] = {}

    @property
    def proxy_ports(self) -> Mapping[L7Protocol, int]:
        return self._proxy_ports

    def identities(self) -> list[int]:
        return list(self._keys)

    def entries(self, identity: int | None = None) -> dict[PolicyKey, PolicyValue]:
        if identity is None:
            return dict(self._entries)
        out: dict[PolicyKey, PolicyValue] = {}
        for pkeys in self._keys.get(identity, {}).values():
            for pkey in pkeys:
                out[pkey] = self._entries[pkey]
        return out

    def replace(self, state: MapState) -> PolicyDiff:
        """Make `state` the whole policy of its identity."""
        current = self._keys.get(state.identity, {})
        changes: dict[MapStateKey, MapStateEntry | None] = {
            k: None for k in current if k not in state.entries
        }
        changes.update(state.entries)
        return self.update(state.identity, changes)

    def update(
        self, identity: int, changes: Mapping[MapStateKey, MapStateEntry | None]
    ) -> PolicyDiff:
        """Apply changed MapState entries of `identity` (None: the key is gone)."""
        own = self._keys.setdefault(identity, {})
        touched: set[PolicyKey] = set()
        for skey, entry in changes.items():
            for pkey in own.pop(skey, ()):
                del self._sources[pkey][skey]
                touched.add(pkey)
            if entry is None:
                continue
            made = kernel_entries(identity, skey, entry, self._proxy_ports)
            own[skey] = tuple(pkey for pkey, _ in made)
            for pkey, value in made:
                self._sources.setdefault(pkey, {})[skey] = value
                touched.add(pkey)
        if not own:
            del self._keys[identity]
        upserts: dict[PolicyKey, PolicyValue] = {}
        deletes: set[PolicyKey] = set()
        for pkey in touched:
            srcs = self._sources.get(pkey)
            old = self._entries.get(pkey)
            if not srcs:
                self._sources.pop(pkey, None)
                if old is not None:
                    del self._entries[pkey]
                    deletes.add(pkey)
                continue
            new = next(iter(srcs.values())) if len(srcs) == 1 else merge_values(srcs.values())
            if new != old:
                self._entries[pkey] = new
                upserts[pkey] = new
        return PolicyDiff(upserts, frozenset(deletes))

    def remove(self, identity: int) -> PolicyDiff:
        """Forget every entry of `identity` (its last endpoint is gone)."""
        current = self._keys.get(identity, {})
        return self.update(identity, dict.fromkeys(current))
