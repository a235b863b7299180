"""Security identities: the numbers the datapath enforces policy on, and the labels behind them.

Number ranges (as in Cilium):

| range                         | kind      | scope                                            |
|-------------------------------|-----------|--------------------------------------------------|
| 1–8                           | reserved  | fixed, the same everywhere                       |
| 256–65535                     | endpoint  | cluster-wide, allocated through the kvstore      |
| `(1 << 24) | n`, n ≥ 1        | CIDR      | node-local, one per prefix                       |
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from garrison.policies.labels import SOURCE_CIDR, SOURCE_RESERVED, Label, Labels

MIN_ENDPOINT_ID = 256
MAX_ENDPOINT_ID = 65535
# Cilium's "local" identity scope: the top byte 0x01 marks identities that never leave the node.
CIDR_ID_FLAG = 1 << 24
MAX_CIDR_ID = CIDR_ID_FLAG | ((1 << 24) - 1)
_SCOPE_SHIFT = 24

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class IdentityError(Exception):
    """Base of the errors identity allocation and lookup raise."""


class IdentityRangeExhaustedError(IdentityError):
    """Every number of an identity range is in use."""


class InvalidIdentityLabelsError(IdentityError, ValueError):
    """Labels (or a prefix) that cannot name an identity: empty, or misusing reserved labels."""


class UnknownReservedIdentityError(IdentityError, LookupError):
    """A reserved identity name that does not exist."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A numeric security identity and the identity-relevant labels it stands for."""

    id: int
    labels: Labels

    @property
    def is_reserved(self) -> bool:
        return 0 < self.id < MIN_ENDPOINT_ID

    @property
    def is_cidr(self) -> bool:
        return self.id >> _SCOPE_SHIFT == CIDR_ID_FLAG >> _SCOPE_SHIFT

    @property
    def is_endpoint(self) -> bool:
        return MIN_ENDPOINT_ID <= self.id < CIDR_ID_FLAG

    def __str__(self) -> str:
        return f"{self.id} ({self.labels})"


def _reserved(id_: int, name: str) -> tuple[str, Identity]:
    return name, Identity(id_, Labels.of([Label(key=name, source=SOURCE_RESERVED)]))


RESERVED: Mapping[str, Identity] = MappingProxyType(
    dict(
        [
            _reserved(1, "host"),
            _reserved(2, "world"),
            _reserved(3, "unmanaged"),
            _reserved(4, "health"),
            _reserved(5, "init"),
            _reserved(6, "remote-node"),
            _reserved(7, "kube-apiserver"),
            _reserved(8, "ingress"),
        ]
    )
)
"""Reserved identities by name (`host`, `world`, ...): labels `reserved:<name>`."""

RESERVED_BY_ID: Mapping[int, Identity] = MappingProxyType(
    {identity.id: identity for identity in RESERVED.values()}
)


def reserved_identity(name: str) -> Identity:
    try:
        return RESERVED[name]
    except KeyError:
        known = ", ".join(RESERVED)
        raise UnknownReservedIdentityError(
            f"no reserved identity {name!r} (known: {known})"
        ) from None


def reserved_identity_for_labels(labels: Labels) -> Identity | None:
    """The reserved identity `labels` name, None when they carry no `reserved:` label.

    As in Cilium, `reserved:host` and `reserved:remote-node` may come with other labels (node
    labels); any other reserved label must stand alone. A reserved label mixed into workload
    labels is refused: it would make the workload match `fromEntities` selectors meant for the
    host or the world.
    """
    reserved = sorted(lab.key for lab in labels.items if lab.source == SOURCE_RESERVED)
    if not reserved:
        return None
    for name in ("host", "remote-node"):
        if name in reserved:
            return RESERVED[name]
    if len(labels) == 1:
        try:
            return reserved_identity(reserved[0])
        except UnknownReservedIdentityError as exc:
            raise InvalidIdentityLabelsError(str(exc)) from None
    raise InvalidIdentityLabelsError(
        f"labels {labels} mix reserved labels with others; a reserved label must stand alone"
    )


def parse_prefix(prefix: str | IPNetwork) -> IPNetwork:
    """The network `prefix` names, host bits cleared (`10.1.2.3/8` → `10.0.0.0/8`); a bare
    address is a host prefix."""
    if isinstance(prefix, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return prefix
    try:
        return ipaddress.ip_network(prefix.strip(), strict=False)
    except ValueError as exc:
        raise InvalidIdentityLabelsError(f"invalid CIDR prefix {prefix!r}: {exc}") from None


def cidr_labels(prefix: str | IPNetwork) -> Labels:
    """`cidr:<prefix>` plus `reserved:world`: the labels of a CIDR identity."""
    network = parse_prefix(prefix)
    return Labels.of(
        [Label(key=str(network), source=SOURCE_CIDR), Label(key="world", source=SOURCE_RESERVED)]
    )


def cidr_prefix(labels: Labels) -> IPNetwork | None:
    """The prefix of CIDR identity labels, None when `labels` carry no `cidr:` label."""
    prefixes = [lab.key for lab in labels.items if lab.source == SOURCE_CIDR]
    if not prefixes:
        return None
    if len(prefixes) > 1:
        raise InvalidIdentityLabelsError(f"labels {labels} name more than one CIDR prefix")
    return parse_prefix(prefixes[0])
