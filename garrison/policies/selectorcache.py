"""Which identities each selector, entity and CIDR peer selects — computed once, kept current.

Rules repeat selectors; the cache evaluates each distinct one once and updates the answer
incrementally when an identity appears or goes. A label index keeps both directions cheap:
a new selector only checks identities that carry one of its required labels, and a new
identity only checks selectors that require one of its labels.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable

from garrison.policies.labels import NAMESPACE_KEY, SOURCE_CIDR, Labels
from garrison.policies.model import CIDRPeer, Entity, IPNetwork
from garrison.policies.selector import EndpointSelector, Operator

# Identity number space (POLICY-SEMANTICS.md, "Identities").
RESERVED_IDENTITIES: dict[str, int] = {
    "host": 1,
    "world": 2,
    "unmanaged": 3,
    "health": 4,
    "init": 5,
    "remote-node": 6,
    "kube-apiserver": 7,
    "ingress": 8,
}
WORLD_IDENTITY = 2
MIN_ENDPOINT_IDENTITY = 256
MAX_ENDPOINT_IDENTITY = 65535
CIDR_IDENTITY_FLAG = 1 << 24

_ENTITY_RESERVED: dict[Entity, tuple[int, ...]] = {
    Entity.HOST: (1,),
    Entity.WORLD: (2,),
    Entity.WORLD_IPV4: (2,),
    Entity.WORLD_IPV6: (2,),
    Entity.UNMANAGED: (3,),
    Entity.HEALTH: (4,),
    Entity.INIT: (5,),
    Entity.REMOTE_NODE: (6,),
    Entity.KUBE_APISERVER: (7,),
    Entity.INGRESS: (8,),
    Entity.CLUSTER: (1, 3, 4, 5, 6, 7, 8),
    Entity.NONE: (),
}

PeerKey = EndpointSelector | Entity | CIDRPeer


def is_reserved(identity: int) -> bool:
    return 0 < identity < MIN_ENDPOINT_IDENTITY


def is_cidr(identity: int) -> bool:
    return bool(identity & CIDR_IDENTITY_FLAG)


def is_endpoint(identity: int) -> bool:
    return MIN_ENDPOINT_IDENTITY <= identity <= MAX_ENDPOINT_IDENTITY


def cidr_of(labels: Labels) -> IPNetwork | None:
    """The prefix a CIDR identity stands for: its most specific `cidr:` label."""
    best: IPNetwork | None = None
    for label in labels.items:
        if label.source != SOURCE_CIDR:
            continue
        try:
            net = ipaddress.ip_network(label.key or label.value, strict=False)
        except ValueError:
            continue
        if best is None or net.prefixlen > best.prefixlen:
            best = net
    return best


class SelectorCache:
    def __init__(self) -> None:
        self._labels: dict[int, Labels] = {}
        self._prefixes: dict[int, IPNetwork] = {}
        # (key, value) -> endpoint/reserved identities carrying it (any source)
        self._label_index: dict[tuple[str, str], set[int]] = defaultdict(set)
        self._selected: dict[PeerKey, set[int]] = {}
        # selector index: (key, value) of one In-requirement -> selectors requiring it
        self._selector_index: dict[tuple[str, str], set[EndpointSelector]] = defaultdict(set)
        self._unindexed: set[PeerKey] = set()

    # -- identities ------------------------------------------------------------------------

    def identities(self) -> dict[int, Labels]:
        return dict(self._labels)

    def labels_of(self, identity: int) -> Labels | None:
        return self._labels.get(identity)

    def endpoint_identities(self) -> list[int]:
        return [i for i in self._labels if is_endpoint(i)]

    def add_identity(self, identity: int, labels: Labels) -> list[PeerKey]:
        """Register an identity; return every cached peer that now selects it."""
        if identity in self._labels:
            if self._labels[identity] == labels:
                return []
            self.remove_identity(identity)
        self._labels[identity] = labels
        if is_cidr(identity):
            prefix = cidr_of(labels)
            if prefix is not None:
                self._prefixes[identity] = prefix
        for label in labels.items:
            self._label_index[(label.key, label.value)].add(identity)
        candidates: set[PeerKey] = set(self._unindexed)
        for label in labels.items:
            candidates |= self._selector_index.get((label.key, label.value), set())
        matched = [p for p in candidates if self._matches(p, identity)]
        for peer in matched:
            self._selected[peer].add(identity)
        return matched

    def remove_identity(self, identity: int) -> list[PeerKey]:
        labels = self._labels.pop(identity, None)
        self._prefixes.pop(identity, None)
        if labels is None:
            return []
        for label in labels.items:
            ids = self._label_index.get((label.key, label.value))
            if ids is not None:
                ids.discard(identity)
        lost = []
        for peer, ids in self._selected.items():
            if identity in ids:
                ids.discard(identity)
                lost.append(peer)
        return lost

    # -- peers -----------------------------------------------------------------------------

    def select(self, peer: PeerKey) -> set[int]:
        """The identities `peer` selects (registering it on first use). Do not mutate."""
        got = self._selected.get(peer)
        if got is not None:
            return got
        ids = {i for i in self._candidates(peer) if self._matches(peer, i)}
        self._selected[peer] = ids
        index_key = _index_key(peer)
        if index_key is None:
            self._unindexed.add(peer)
        else:
            assert isinstance(peer, EndpointSelector)
            self._selector_index[index_key].add(peer)
        return ids

    def release(self, peers: Iterable[PeerKey]) -> None:
        """Forget peers no rule uses any more (keeps the cache from growing forever)."""
        for peer in peers:
            if self._selected.pop(peer, None) is None:
                continue
            self._unindexed.discard(peer)
            key = _index_key(peer)
            if key is not None and isinstance(peer, EndpointSelector):
                self._selector_index[key].discard(peer)

    def _candidates(self, peer: PeerKey) -> Iterable[int]:
        """Identities that carry a value of every In-requirement (a superset of matches)."""
        if isinstance(peer, EndpointSelector):
            sets = []
            for req in peer.requirements:
                if req.operator is Operator.IN:
                    ids: set[int] = set()
                    for value in req.values:
                        ids |= self._label_index.get((req.key, value), set())
                    sets.append(ids)
            if sets:
                sets.sort(key=len)
                return sets[0].intersection(*sets[1:])
        return list(self._labels)

    def _matches(self, peer: PeerKey, identity: int) -> bool:
        if isinstance(peer, EndpointSelector):
            if is_cidr(identity):
                # a CIDR identity carries `reserved:world`: a selector naming it is the world
                # entity written as a selector (Cilium's), and selects every CIDR identity too
                # (else a deny of `reserved:world` stopped matching an address the moment any
                # policy named a prefix holding it)
                return peer.names_reserved() and peer.matches(self._labels[identity])
            if is_reserved(identity) and not peer.names_reserved():
                return False
            return peer.matches(self._labels[identity])
        if isinstance(peer, Entity):
            if peer is Entity.ALL:
                return True
            if peer is Entity.CLUSTER and is_endpoint(identity):
                return True
            if peer in (Entity.WORLD, Entity.WORLD_IPV4, Entity.WORLD_IPV6) and is_cidr(
                identity
            ):
                return True
            return identity in _ENTITY_RESERVED.get(peer, ())
        # CIDR peers select CIDR identities inside the prefix (minus excepts); the whole
        # address space also selects the world identity (addresses no other prefix covers).
        prefix = self._prefixes.get(identity)
        if prefix is not None:
            return peer.contains(prefix)
        return identity == WORLD_IDENTITY and peer.cidr.prefixlen == 0


def _index_key(peer: PeerKey) -> tuple[str, str] | None:
    """An In-requirement with one value whose label every selected identity must carry."""
    if not isinstance(peer, EndpointSelector):
        return None
    best: tuple[str, str] | None = None
    for req in peer.requirements:
        if req.operator is Operator.IN and len(req.values) == 1:
            # Prefer any label over the namespace label: it narrows the candidates far more.
            if req.key != NAMESPACE_KEY:
                return (req.key, req.values[0])
            best = best or (req.key, req.values[0])
    return best
