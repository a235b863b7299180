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
"""

from __future__ import annotations

import json
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
from garrison.kvstore.base import KVStore
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
            return cls(id=int(doc["id"]), owners=frozenset(str(o) for o in doc["owners"]))
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

    def __init__(self, store: KVStore, config: AllocatorConfig | None = None) -> None:
        self._store = store
        self._config = config if config is not None else AllocatorConfig()
        self._cidr_root = f"nodes/{self._config.node_name}/identities/cidr/"

    @property
    def config(self) -> AllocatorConfig:
        return self._config

    def relevant_labels(self, labels: Labels) -> Labels:
        """The identity-relevant subset of `labels` under the configured filter."""
        return self._config.label_filter.apply(labels)

    # Endpoint identities ----------------------------------------------------------------------

    def allocate(self, labels: Labels, owner: str) -> Identity:
        """The identity of `labels` (after filtering), with `owner` holding a reference.

        Labels that name a reserved identity return it (not reference-counted). Raises
        `IdentityRangeExhaustedError` when every number of the endpoint range is in use.
        """
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
        canonical = canonical_labels(relevant)
        labels_key = LABELS_PREFIX + canonical
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
                ID_PREFIX,
                self._config.min_endpoint_id,
                self._config.max_endpoint_id,
                canonical.encode(),
                "endpoint",
            )
            record = _IdentityRecord(number, frozenset({owner}))
            if self._store.create(labels_key, record.encode()):
                return Identity(number, relevant)
            # Another process created these labels' identity first: give our number back.
            self._store.compare_and_delete(ID_PREFIX + str(number), canonical.encode())
        raise IdentityError(
            f"no identity for {relevant} after {self._config.max_attempts} attempts:"
            " the store keeps changing under us"
        )

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
        labels_key = LABELS_PREFIX + canonical
        for _ in range(self._config.max_attempts):
            raw = self._store.get(labels_key)
            if raw is None:
                return False
            record = _IdentityRecord.decode(labels_key, raw)
            if owner not in record.owners or expected_id not in (None, record.id):
                return False
            if record.owners == {owner}:
                if self._store.compare_and_delete(labels_key, raw):
                    self._store.compare_and_delete(ID_PREFIX + str(record.id), canonical.encode())
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
        key = LABELS_PREFIX + canonical_labels(relevant)
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
        key = LABELS_PREFIX + canonical_labels(relevant)
        raw = self._store.get(key)
        if raw is None:
            return None
        return Identity(_IdentityRecord.decode(key, raw).id, relevant)

    def lookup_id(self, number: int) -> Identity | None:
        """The identity with this number, None when it is not allocated."""
        if number in RESERVED_BY_ID:
            return RESERVED_BY_ID[number]
        if CIDR_ID_FLAG < number <= MAX_CIDR_ID:
            raw = self._store.get(self._cidr_root + f"id/{number}")
            if raw is None:
                return None
            identity = self._lookup_cidr(parse_prefix(raw.decode()))
            return identity if identity is not None and identity.id == number else None
        if not MIN_ENDPOINT_ID <= number <= MAX_ENDPOINT_ID:
            return None
        raw = self._store.get(ID_PREFIX + str(number))
        if raw is None:
            return None
        canonical = raw.decode()
        # A claim is an identity only once its labels key points back at it.
        key = LABELS_PREFIX + canonical
        ref = self._store.get(key)
        if ref is None or _IdentityRecord.decode(key, ref).id != number:
            return None
        return Identity(number, parse_canonical(canonical))

    def all(self) -> dict[int, Labels]:
        """Every identity in use: reserved, endpoint (cluster-wide) and this node's CIDR ones."""
        out = {identity.id: identity.labels for identity in RESERVED.values()}
        for key, raw in self._store.list_prefix(LABELS_PREFIX).items():
            record = _IdentityRecord.decode(key, raw)
            out[record.id] = parse_canonical(key.removeprefix(LABELS_PREFIX))
        prefix_root = self._cidr_root + "prefix/"
        for key, raw in self._store.list_prefix(prefix_root).items():
            out[_decode_number(key, raw)] = cidr_labels(key.removeprefix(prefix_root))
        return out

    # CIDR identities --------------------------------------------------------------------------

    def cidr_identity(self, prefix: str | IPNetwork) -> Identity:
        """The node-local identity of `prefix` (host bits ignored), allocated on first use and
        kept for the life of the store so the number is stable across restarts."""
        network = parse_prefix(prefix)
        prefix_key = self._cidr_root + f"prefix/{network}"
        for _ in range(self._config.max_attempts):
            raw = self._store.get(prefix_key)
            if raw is not None:
                return Identity(_decode_number(prefix_key, raw), cidr_labels(network))
            number = self._claim_number(
                self._cidr_root + "id/",
                CIDR_ID_FLAG + 1,
                MAX_CIDR_ID,
                str(network).encode(),
                "CIDR",
            )
            if self._store.create(prefix_key, str(number).encode()):
                return Identity(number, cidr_labels(network))
            self._store.compare_and_delete(self._cidr_root + f"id/{number}", str(network).encode())
        raise IdentityError(f"no CIDR identity for {network} after {self._config.max_attempts}")

    def identity_for_prefix(self, prefix: str | IPNetwork) -> Identity:
        """`reserved:world` for a default route (`0.0.0.0/0`, `::/0`), else the CIDR identity."""
        network = parse_prefix(prefix)
        if network.prefixlen == 0:
            return RESERVED["world"]
        return self.cidr_identity(network)

    def _lookup_cidr(self, network: IPNetwork) -> Identity | None:
        key = self._cidr_root + f"prefix/{network}"
        raw = self._store.get(key)
        return None if raw is None else Identity(_decode_number(key, raw), cidr_labels(network))

    # Number claims ----------------------------------------------------------------------------

    def _claim_number(self, key_prefix: str, low: int, high: int, value: bytes, kind: str) -> int:
        """Claim the lowest free number in [low, high] under `key_prefix` (create-if-absent)."""
        used = {
            int(suffix)
            for key in self._store.list_prefix(key_prefix)
            if (suffix := key.removeprefix(key_prefix)).isdecimal()
        }
        for number in range(low, high + 1):
            if number not in used and self._store.create(key_prefix + str(number), value):
                return number
        raise IdentityRangeExhaustedError(
            f"{kind} identity range {low}–{high} is exhausted: all {high - low + 1} numbers are"
            " in use"
        )
