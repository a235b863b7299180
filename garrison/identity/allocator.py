"""Allocation of identity numbers over a `KVStore`, safe between processes and agents.

Key layout (values in brackets):

    identities/id/<n>                     [canonical labels]  claim on number n
    identities/labels/<canonical labels>  [{"id": n, "owners": [...]}]  the identity itself
    nodes/<node>/identities/cidr/id/<n>          [prefix]  claim on CIDR number n
    nodes/<node>/identities/cidr/prefix/<prefix> [n]       the CIDR identity of a prefix

The labels key is the truth: labels L have identity n exactly while `identities/labels/L`
holds n. Allocating for new labels claims the lowest free number with a create-if-absent on
`identities/id/<n>`, then creates the labels key; a process that loses the labels key to
another one gives its number back and joins the winner's identity. Owners are recorded in the
labels key and changed with compare-and-swap, so the last owner's release and a new owner's
allocation cannot both succeed: either the new owner joins before the release (which then sees
two owners) or the release deletes the key first (and the new owner allocates afresh). A number
is released only after the labels key pointing at it is gone, so a labels key always points at
a claimed number and one number never serves two label sets.

`ClusterIdentityAllocator` is the same idea for several nodes on etcd, after Cilium's kvstore
allocator: per-node references bound to the node's lease instead of an owner list, and
multi-key transactions (its docstring has the key layout).
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from garrison.identity.filter import LabelFilter
from garrison.identity.model import (
    CIDR_ID_FLAG,
    MAX_CIDR_ID,
    MAX_ENDPOINT_ID,
    MIN_ENDPOINT_ID,
    RESERVED,
    RESERVED_BY_ID,
    Identity,
    IdentityError,
    IdentityRangeExhaustedError,
    InvalidIdentityLabelsError,
    IPNetwork,
    cidr_labels,
    cidr_prefix,
    parse_prefix,
    reserved_identity_for_labels,
)
from garrison.kvstore.base import (
    Absent,
    Delete,
    KVStore,
    KVStoreUnavailableError,
    NoneWithPrefix,
    Put,
    TransactionalKVStore,
    ValueIs,
)
from garrison.policies.labels import SOURCE_CIDR, Label, Labels

ID_PREFIX = "identities/id/"
LABELS_PREFIX = "identities/labels/"


@dataclass(frozen=True, slots=True)
class AllocatorConfig:
    """`node_name` names this node's key space for node-local (CIDR) identities; the endpoint
    range is configurable so tests can exhaust a small one."""

    node_name: str = "local"
    min_endpoint_id: int = MIN_ENDPOINT_ID
    max_endpoint_id: int = MAX_ENDPOINT_ID
    label_filter: LabelFilter = field(default_factory=LabelFilter)
    # Bound on read-compare-write rounds lost to other writers before giving up.
    max_attempts: int = 100

    def __post_init__(self) -> None:
        if not self.node_name or "/" in self.node_name:
            raise ValueError(f"node name {self.node_name!r} must be non-empty and contain no '/'")
        if not MIN_ENDPOINT_ID <= self.min_endpoint_id <= self.max_endpoint_id <= MAX_ENDPOINT_ID:
            raise ValueError(
                f"endpoint identity range {self.min_endpoint_id}–{self.max_endpoint_id} must lie"
                f" within {MIN_ENDPOINT_ID}–{MAX_ENDPOINT_ID}"
            )
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


def canonical_labels(labels: Labels) -> str:
    """An injective text form of `labels`, sorted, readable for ordinary labels:
    `k8s:app=web;k8s:io.kubernetes.pod.namespace=prod`. Separators inside a source, key or
    value are percent-encoded."""
    return ";".join(f"{quote(lab.source)}:{quote(lab.key)}={quote(lab.value)}" for lab in labels)


def parse_canonical(text: str) -> Labels:
    out = []
    for item in text.split(";") if text else []:
        source, colon, rest = item.partition(":")
        key, equals, value = rest.partition("=")
        if not (colon and equals):
            raise IdentityError(f"malformed canonical labels {text!r}")
        out.append(Label(key=unquote(key), value=unquote(value), source=unquote(source)))
    return Labels.of(out)


@dataclass(frozen=True, slots=True)
class _IdentityRecord:
    """The value of a labels key: the number and who holds a reference to it."""

    id: int
    owners: frozenset[str]

    def encode(self) -> bytes:
        doc = {"id": self.id, "owners": sorted(self.owners)}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, key: str, raw: bytes) -> _IdentityRecord:
        try:
            doc = json.loads(raw)
            number = doc["id"]
            if type(number) is not int or not MIN_ENDPOINT_ID <= number <= MAX_ENDPOINT_ID:
                # a reserved number (host, world) or a CIDR one would give an endpoint its
                # meaning in every policy
                raise ValueError(
                    f"id {number!r} is not an endpoint identity"
                    f" ({MIN_ENDPOINT_ID}-{MAX_ENDPOINT_ID})"
                )
            return cls(id=number, owners=frozenset(str(o) for o in doc.get("owners", ())))
        except (ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"corrupt identity record at {key!r}: {exc}") from None


def _decode_number(key: str, raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        raise IdentityError(f"corrupt identity number at {key!r}: {raw!r}") from None


class IdentityAllocator:
    """Endpoint and CIDR identities over a shared `KVStore`; reserved identities are fixed.

    Endpoint identities are reference-counted by owner (an endpoint id, say): `allocate` adds
    the owner, `release` removes it, and the identity is freed when its last owner is gone.
    Owners are a set: allocating twice for one owner holds one reference.
    """

    # Where endpoint identities live in the store (the cluster allocator uses its own layout).
    id_prefix = ID_PREFIX
    labels_prefix = LABELS_PREFIX

    def __init__(
        self,
        store: KVStore,
        config: AllocatorConfig | None = None,
        *,
        local_store: KVStore | None = None,
    ) -> None:
        self._store = store
        # CIDR identities never leave the node: a cluster keeps them in the node's own store.
        self._local = local_store if local_store is not None else store
        self._config = config if config is not None else AllocatorConfig()
        self._cidr_root = f"nodes/{self._config.node_name}/identities/cidr/"

    @property
    def config(self) -> AllocatorConfig:
        return self._config

    def relevant_labels(self, labels: Labels) -> Labels:
        """The identity-relevant subset of `labels` under the configured filter."""
        return self._config.label_filter.apply(labels)

    # Endpoint identities ----------------------------------------------------------------------

    def allocate(self, labels: Labels, owner: str, prefer: int | None = None) -> Identity:
        """The identity of `labels` (after filtering), with `owner` holding a reference.

        Labels that name a reserved identity return it (not reference-counted). Raises
        `IdentityRangeExhaustedError` when every number of the endpoint range is in use.
        `prefer`: the number to create the identity with when it has none and that number
        is free (the cluster allocator's; here identities live as long as their owners).
        """
        relevant = self._allocatable(labels, owner)
        if isinstance(relevant, Identity):
            return relevant
        canonical = canonical_labels(relevant)
        labels_key = self.labels_prefix + canonical
        for _ in range(self._config.max_attempts):
            raw = self._store.get(labels_key)
            if raw is not None:
                record = _IdentityRecord.decode(labels_key, raw)
                if owner in record.owners:
                    return Identity(record.id, relevant)
                joined = _IdentityRecord(record.id, record.owners | {owner})
                if self._store.compare_and_swap(labels_key, raw, joined.encode()):
                    return Identity(record.id, relevant)
                continue  # another owner came or went meanwhile: read again
            number = self._claim_number(
                self._store,
                self.id_prefix,
                self._config.min_endpoint_id,
                self._config.max_endpoint_id,
                canonical.encode(),
                "endpoint",
            )
            record = _IdentityRecord(number, frozenset({owner}))
            if self._store.create(labels_key, record.encode()):
                return Identity(number, relevant)
            # Another process created these labels' identity first: give our number back.
            self._store.compare_and_delete(self.id_prefix + str(number), canonical.encode())
        raise IdentityError(
            f"no identity for {relevant} after {self._config.max_attempts} attempts:"
            " the store keeps changing under us"
        )

    def _allocatable(self, labels: Labels, owner: str) -> Labels | Identity:
        """The filtered labels to allocate for, or the reserved identity they name."""
        if not owner:
            raise ValueError("owner must be a non-empty string")
        if cidr_prefix(labels) is not None:
            raise InvalidIdentityLabelsError(
                f"labels {labels} are CIDR labels: use cidr_identity() for prefixes"
            )
        relevant = self.relevant_labels(labels)
        reserved = reserved_identity_for_labels(relevant)
        if reserved is not None:
            return reserved
        if not relevant:
            raise InvalidIdentityLabelsError(f"labels {labels} hold no identity-relevant label")
        return relevant

    def release(self, identity_or_labels: Identity | Labels, owner: str) -> bool:
        """Drop `owner`'s reference; True when that freed the identity (it was the last owner).

        Unknown identities, owners that hold no reference, reserved and CIDR identities: False.
        A freed number may later be given to other labels.
        """
        if isinstance(identity_or_labels, Identity):
            if not identity_or_labels.is_endpoint:
                return False
            expected_id: int | None = identity_or_labels.id
            labels = identity_or_labels.labels
        else:
            expected_id, labels = None, identity_or_labels
        relevant = self._endpoint_labels(labels)
        if relevant is None:
            return False
        canonical = canonical_labels(relevant)
        labels_key = self.labels_prefix + canonical
        for _ in range(self._config.max_attempts):
            raw = self._store.get(labels_key)
            if raw is None:
                return False
            record = _IdentityRecord.decode(labels_key, raw)
            if owner not in record.owners or expected_id not in (None, record.id):
                return False
            if record.owners == {owner}:
                if self._store.compare_and_delete(labels_key, raw):
                    id_key = self.id_prefix + str(record.id)
                    self._store.compare_and_delete(id_key, canonical.encode())
                    return True
            else:
                remaining = _IdentityRecord(record.id, record.owners - {owner})
                if self._store.compare_and_swap(labels_key, raw, remaining.encode()):
                    return False
        raise IdentityError(
            f"could not release {relevant} for {owner!r} after {self._config.max_attempts}"
            " attempts: the store keeps changing under us"
        )

    def owners(self, identity_or_labels: Identity | Labels) -> frozenset[str]:
        """Who holds a reference to an endpoint identity (empty when it is not allocated)."""
        labels = (
            identity_or_labels.labels
            if isinstance(identity_or_labels, Identity)
            else identity_or_labels
        )
        relevant = self._endpoint_labels(labels)
        if relevant is None:
            return frozenset()
        key = self.labels_prefix + canonical_labels(relevant)
        raw = self._store.get(key)
        if raw is None:
            return frozenset()
        record = _IdentityRecord.decode(key, raw)
        if isinstance(identity_or_labels, Identity) and record.id != identity_or_labels.id:
            return frozenset()
        return record.owners

    def _endpoint_labels(self, labels: Labels) -> Labels | None:
        """The filtered labels if they name an endpoint identity, else None."""
        if any(lab.source == SOURCE_CIDR for lab in labels.items):
            return None
        relevant = self.relevant_labels(labels)
        try:
            if reserved_identity_for_labels(relevant) is not None:
                return None
        except InvalidIdentityLabelsError:
            return None
        return relevant or None

    # Lookups ----------------------------------------------------------------------------------

    def lookup_labels(self, labels: Labels) -> Identity | None:
        """The identity `labels` have now (after filtering), without allocating one."""
        prefix = cidr_prefix(labels)
        if prefix is not None:
            return self._lookup_cidr(prefix)
        relevant = self.relevant_labels(labels)
        reserved = reserved_identity_for_labels(relevant)
        if reserved is not None:
            return reserved
        if not relevant:
            return None
        key = self.labels_prefix + canonical_labels(relevant)
        raw = self._store.get(key)
        if raw is None:
            return None
        return Identity(_IdentityRecord.decode(key, raw).id, relevant)

    def lookup_id(self, number: int) -> Identity | None:
        """The identity with this number, None when it is not allocated."""
        if number in RESERVED_BY_ID:
            return RESERVED_BY_ID[number]
        if CIDR_ID_FLAG < number <= MAX_CIDR_ID:
            raw = self._local.get(self._cidr_root + f"id/{number}")
            if raw is None:
                return None
            identity = self._lookup_cidr(parse_prefix(raw.decode()))
            return identity if identity is not None and identity.id == number else None
        if not MIN_ENDPOINT_ID <= number <= MAX_ENDPOINT_ID:
            return None
        raw = self._store.get(self.id_prefix + str(number))
        if raw is None:
            return None
        canonical = raw.decode()
        # A claim is an identity only once its labels key points back at it.
        key = self.labels_prefix + canonical
        ref = self._store.get(key)
        if ref is None or _IdentityRecord.decode(key, ref).id != number:
            return None
        return Identity(number, parse_canonical(canonical))

    def all(self) -> dict[int, Labels]:
        """Every identity in use: reserved, endpoint (cluster-wide) and this node's CIDR ones."""
        out = {identity.id: identity.labels for identity in RESERVED.values()}
        for key, raw in self._store.list_prefix(self.labels_prefix).items():
            record = _IdentityRecord.decode(key, raw)
            out[record.id] = parse_canonical(key.removeprefix(self.labels_prefix))
        prefix_root = self._cidr_root + "prefix/"
        for key, raw in self._local.list_prefix(prefix_root).items():
            out[_decode_number(key, raw)] = cidr_labels(key.removeprefix(prefix_root))
        return out

    # CIDR identities --------------------------------------------------------------------------

    def cidr_identity(self, prefix: str | IPNetwork) -> Identity:
        """The node-local identity of `prefix` (host bits ignored), allocated on first use and
        kept for the life of the store so the number is stable across restarts."""
        network = parse_prefix(prefix)
        prefix_key = self._cidr_root + f"prefix/{network}"
        for _ in range(self._config.max_attempts):
            raw = self._local.get(prefix_key)
            if raw is not None:
                return Identity(_decode_number(prefix_key, raw), cidr_labels(network))
            number = self._claim_number(
                self._local,
                self._cidr_root + "id/",
                CIDR_ID_FLAG + 1,
                MAX_CIDR_ID,
                str(network).encode(),
                "CIDR",
            )
            if self._local.create(prefix_key, str(number).encode()):
                return Identity(number, cidr_labels(network))
            self._local.compare_and_delete(self._cidr_root + f"id/{number}", str(network).encode())
        raise IdentityError(f"no CIDR identity for {network} after {self._config.max_attempts}")

    def identity_for_prefix(self, prefix: str | IPNetwork) -> Identity:
        """`reserved:world` for a default route (`0.0.0.0/0`, `::/0`), else the CIDR identity."""
        network = parse_prefix(prefix)
        if network.prefixlen == 0:
            return RESERVED["world"]
        return self.cidr_identity(network)

    def _lookup_cidr(self, network: IPNetwork) -> Identity | None:
        key = self._cidr_root + f"prefix/{network}"
        raw = self._local.get(key)
        return None if raw is None else Identity(_decode_number(key, raw), cidr_labels(network))

    # Number claims ----------------------------------------------------------------------------

    def _claim_number(
        self, store: KVStore, key_prefix: str, low: int, high: int, value: bytes, kind: str
    ) -> int:
        """Claim the lowest free number in [low, high] under `key_prefix` (create-if-absent)."""
        used = {
            int(suffix)
            for key in store.list_prefix(key_prefix)
            if (suffix := key.removeprefix(key_prefix)).isdecimal()
        }
        for number in range(low, high + 1):
            if number not in used and store.create(key_prefix + str(number), value):
                return number
        raise IdentityRangeExhaustedError(
            f"{kind} identity range {low}–{high} is exhausted: all {high - low + 1} numbers are"
            " in use"
        )


# Cluster ------------------------------------------------------------------------------------

CLUSTER_IDENTITIES_PREFIX = "state/identities/v1/"
# How many free numbers after the lowest a node tries in its own random order.
_CONTENDED_WINDOW = 32


@dataclass(slots=True)
class _HeldIdentity:
    """An identity this node references, and the local owners (endpoints) behind the reference."""

    id: int
    labels: Labels
    owners: set[str]


def _master_value(number: int) -> bytes:
    return json.dumps({"id": number}, separators=(",", ":")).encode()


class ClusterIdentityAllocator(IdentityAllocator):
    """Endpoint identities shared by every node of a cluster, after Cilium's kvstore allocator.

    Key layout (under the store's root, `garrison/` on etcd):

        state/identities/v1/id/<n>                     [canonical labels]  claim on number n
        state/identities/v1/labels/<canonical labels>  [{"id": n}]         the identity itself
        state/identities/v1/refs/<quoted labels>/<node>  [{"id": n, "owners": [...]}]
                                                        this node's reference, bound to its lease

    A new identity is one transaction: "neither the number nor the labels exist" → write the
    number's claim, the labels key and this node's reference together. Joining an existing
    identity is "the labels key still names n" → write this node's reference. Two nodes
    allocating the same new labels at once: one transaction wins, the other fails on the labels
    key, reads it and joins, so both get the same number; two nodes allocating different labels
    fail on the number and take the next one. Nothing collides without a lock service.

    References are per node (owners are the node's endpoints, kept in memory and mirrored in the
    reference's value) and vanish with the node's lease when it dies. An identity without any
    reference is deleted by `collect` ("the labels key still names n and no reference exists"
    → delete both master keys) — on release by its last holder, and by `collect_garbage` sweeps
    for the identities of nodes that died. Because joining requires the labels key and
    collecting requires no reference, a join and a collection cannot both succeed.

    CIDR identities stay node-local in `local_store` (the node's SQLite file).
    """

    id_prefix = CLUSTER_IDENTITIES_PREFIX + "id/"
    labels_prefix = CLUSTER_IDENTITIES_PREFIX + "labels/"
    refs_prefix = CLUSTER_IDENTITIES_PREFIX + "refs/"

    def __init__(
        self,
        store: TransactionalKVStore,
        config: AllocatorConfig | None = None,
        *,
        local_store: KVStore | None = None,
        lease: Callable[[], int | None] = lambda: None,
    ) -> None:
        super().__init__(store, config, local_store=local_store)
        self._tx = store
        self._lease = lease
        self._lock = threading.RLock()
        self._held: dict[str, _HeldIdentity] = {}
        # Writes of this node's references that found the store away: canonical labels → the
        # identity to reference again, or the number whose reference to drop. `flush_pending`
        # retries them (the agent calls it periodically).
        self._pending: dict[str, _HeldIdentity | int] = {}
        self._rng = random.Random()
        # Identities whose number changed when a reference was written again (old → new).
        self.changed: dict[int, int] = {}
        # Identities the last `collect_garbage` found without references: labels → (number,
        # when first found so by an unbroken run of sweeps).
        self._unreferenced: dict[str, tuple[int, float]] = {}

    def _refs_of(self, canonical: str) -> str:
        # Quoted without a safe "/", so one label set's references are never a prefix of
        # another's (canonical labels may contain "/").
        return self.refs_prefix + quote(canonical, safe="") + "/"

    def _ref_key(self, canonical: str) -> str:
        return self._refs_of(canonical) + self._config.node_name

    def _ref_value(self, held: _HeldIdentity) -> bytes:
        doc = {"id": held.id, "owners": sorted(held.owners)}
        return json.dumps(doc, separators=(",", ":")).encode()

    def held(self) -> dict[int, frozenset[str]]:
        """The identities this node references → its owners of each."""
        with self._lock:
            return {h.id: frozenset(h.owners) for h in self._held.values()}

    def allocate(self, labels: Labels, owner: str, prefer: int | None = None) -> Identity:
        """As `IdentityAllocator.allocate`; `prefer` (the number an endpoint had before the
        agent restarted) is taken when the identity was collected meanwhile and the number
        is still free, so endpoints keep their numbers."""
        relevant = self._allocatable(labels, owner)
        if isinstance(relevant, Identity):
            return relevant
        canonical = canonical_labels(relevant)
        if prefer is not None and not (
            self._config.min_endpoint_id <= prefer <= self._config.max_endpoint_id
        ):
            prefer = None
        with self._lock:
            held = self._held.get(canonical)
            if held is not None:
                # Known here: no round trip needed, so it works while etcd is away.
                if owner not in held.owners:
                    held.owners.add(owner)
                    self._write_ref(canonical, held)
                return Identity(held.id, relevant)
            held = _HeldIdentity(0, relevant, {owner})
            held.id = self._reference(canonical, held, keep_id=prefer)
            self._held[canonical] = held
            return Identity(held.id, relevant)

    def adopt(self, labels: Labels, owner: str, number: int) -> Identity:
        """Hold `number` for `labels` on this node's word alone (its endpoint registry), while
        the store is away at start: endpoints keep their identities. The reference is written,
        conditionally like `restore`, once the store answers (`flush_pending`)."""
        relevant = self.relevant_labels(labels)
        canonical = canonical_labels(relevant)
        with self._lock:
            held = self._held.get(canonical)
            if held is None:
                held = _HeldIdentity(number, relevant, set())
                self._held[canonical] = held
            held.owners.add(owner)
            self._pending[canonical] = held
            return Identity(held.id, relevant)

    def _ref_put(self, canonical: str, held: _HeldIdentity) -> Put:
        return Put(self._ref_key(canonical), self._ref_value(held), lease=self._lease())

    def _reference(self, canonical: str, held: _HeldIdentity, *, keep_id: int | None) -> int:
        """Join the identity of `canonical` or create it; the number it has. With `keep_id`,
        recreate a vanished identity with that number when it is still free (after a lost
        lease, so endpoints keep their identity)."""
        labels_key = self.labels_prefix + canonical
        for _ in range(self._config.max_attempts):
            raw = self._store.get(labels_key)
            if raw is not None:
                number = _IdentityRecord.decode(labels_key, raw).id
                held.id = number
                if self._tx.transaction(
                    [ValueIs(labels_key, raw)], [self._ref_put(canonical, held)]
                ):
                    return number
                continue  # collected meanwhile: create it again
            for number in self._candidates(keep_id):
                held.id = number
                id_key = self.id_prefix + str(number)
                created = self._tx.transaction(
                    [Absent(labels_key), Absent(id_key)],
                    [
                        Put(id_key, canonical.encode()),
                        Put(labels_key, _master_value(number)),
                        self._ref_put(canonical, held),
                    ],
                )
                if created:
                    return number
                if self._store.get(labels_key) is not None:
                    break  # another node created these labels' identity: join it
            else:
                if keep_id is None:
                    self._raise_exhausted()
                keep_id = None  # the old number went to other labels: take a new one
        raise IdentityError(
            f"no identity for {held.labels} after {self._config.max_attempts} attempts:"
            " the store keeps changing under us"
        )

    def _candidates(self, keep_id: int | None) -> Iterator[int]:
        if keep_id is not None:
            yield keep_id
            return
        used = {
            int(suffix)
            for key in self._store.list_prefix(self.id_prefix)
            if (suffix := key.removeprefix(self.id_prefix)).isdecimal()
        }
        low, high = self._config.min_endpoint_id, self._config.max_endpoint_id
        free = (n for n in range(low, high + 1) if n not in used)
        first = next(free, None)
        if first is None:
            return
        yield first
        # Lost the lowest number to another node: nodes racing on together would keep
        # colliding on each next one, so try the next few free numbers in an order of our own.
        window = list(itertools.islice(free, _CONTENDED_WINDOW))
        self._rng.shuffle(window)
        yield from window
        yield from free

    def _raise_exhausted(self) -> None:
        low, high = self._config.min_endpoint_id, self._config.max_endpoint_id
        raise IdentityRangeExhaustedError(
            f"endpoint identity range {low}–{high} is exhausted: all {high - low + 1} numbers"
            " are in use"
        )

    def release(self, identity_or_labels: Identity | Labels, owner: str) -> bool:
        """Drop `owner`'s reference; True when that freed the identity cluster-wide (no node
        references it any more)."""
        labels = (
            identity_or_labels.labels
            if isinstance(identity_or_labels, Identity)
            else identity_or_labels
        )
        relevant = self._endpoint_labels(labels)
        if relevant is None:
            return False
        canonical = canonical_labels(relevant)
        with self._lock:
            held = self._held.get(canonical)
            if held is None or owner not in held.owners:
                return False
            if isinstance(identity_or_labels, Identity) and identity_or_labels.id != held.id:
                return False
            held.owners.discard(owner)
            if held.owners:
                self._write_ref(canonical, held)
                return False
            del self._held[canonical]
            try:
                self._store.delete(self._ref_key(canonical))
                return self.collect(canonical, held.id)
            except KVStoreUnavailableError:
                self._pending[canonical] = held.id
                return False

    def _write_ref(self, canonical: str, held: _HeldIdentity) -> None:
        """Update this node's reference (its owner list); later when the store is away."""
        try:
            self._tx.transaction([], [self._ref_put(canonical, held)])
            self._pending.pop(canonical, None)
        except KVStoreUnavailableError:
            self._pending[canonical] = held

    def flush_pending(self) -> int:
        """Retry the reference writes that found the store away; how many are still waiting."""
        with self._lock:
            for canonical, what in list(self._pending.items()):
                try:
                    if isinstance(what, _HeldIdentity):
                        if self._held.get(canonical) is what:
                            # conditional: the identity may have been collected meanwhile
                            old = what.id
                            new = self._reference(canonical, what, keep_id=old)
                            if new != old:
                                self.changed[old] = new
                    elif canonical not in self._held:
                        self._store.delete(self._ref_key(canonical))
                        self.collect(canonical, what)
                except KVStoreUnavailableError:
                    break
                del self._pending[canonical]
            return len(self._pending)

    def collect(self, canonical: str, number: int) -> bool:
        """Delete the identity `number` of `canonical` if no node references it; True if so."""
        labels_key = self.labels_prefix + canonical
        return self._tx.transaction(
            [ValueIs(labels_key, _master_value(number)), NoneWithPrefix(self._refs_of(canonical))],
            [Delete(labels_key), Delete(self.id_prefix + str(number))],
        )

    def collect_garbage(self, grace_s: float = 0.0, now: float | None = None) -> list[int]:
        """Delete the identities that no node references (their nodes died); the numbers
        freed. Any node may run it at any time. With `grace_s`, an identity goes only once it
        was found unreferenced by sweeps `grace_s` apart and by every sweep between (`now`:
        monotonic seconds): a node away longer than its lease TTL writes its references again
        when it is back, and within the grace its identities stay. Identities this node holds
        are never collected here (their references may be waiting for etcd)."""
        now = time.monotonic() if now is None else now
        referenced = {
            key.removeprefix(self.refs_prefix).partition("/")[0]
            for key in self._store.list_prefix(self.refs_prefix)
        }
        with self._lock:
            held = set(self._held)
        unreferenced: dict[str, tuple[int, float]] = {}
        freed = []
        for key, raw in self._store.list_prefix(self.labels_prefix).items():
            canonical = key.removeprefix(self.labels_prefix)
            if quote(canonical, safe="") in referenced or canonical in held:
                continue
            try:
                number = _IdentityRecord.decode(key, raw).id
            except IdentityError:
                continue  # corrupt: left as it is, never deleted on a guess
            seen = self._unreferenced.get(canonical)
            since = seen[1] if seen is not None and seen[0] == number else now
            if now - since >= grace_s and self.collect(canonical, number):
                freed.append(number)
            else:
                unreferenced[canonical] = (number, since)
        self._unreferenced = unreferenced
        return freed

    def restore(self) -> dict[int, int]:
        """Write this node's references again after its lease was lost (each with the new
        lease), recreating identities that were collected meanwhile with their old numbers
        when those are free. Returns old → new numbers for identities that had to change."""
        changed = {}
        with self._lock:
            for canonical, held in self._held.items():
                old = held.id
                new = self._reference(canonical, held, keep_id=old)
                if new != old:
                    changed[old] = new
        return changed

    def owners(self, identity_or_labels: Identity | Labels) -> frozenset[str]:
        """`<node>/<owner>` for every owner on every node referencing the identity."""
        labels = (
            identity_or_labels.labels
            if isinstance(identity_or_labels, Identity)
            else identity_or_labels
        )
        relevant = self._endpoint_labels(labels)
        if relevant is None:
            return frozenset()
        refs = self._refs_of(canonical_labels(relevant))
        out: set[str] = set()
        for key, raw in self._store.list_prefix(refs).items():
            record = _IdentityRecord.decode(key, raw)
            if isinstance(identity_or_labels, Identity) and record.id != identity_or_labels.id:
                continue
            node = key.removeprefix(refs)
            out.update(f"{node}/{owner}" for owner in record.owners)
        return frozenset(out)
