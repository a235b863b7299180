"""Security identities: labels → numbers, reserved and CIDR identities, the label filter."""

from garrison.identity.allocator import AllocatorConfig, IdentityAllocator
from garrison.identity.filter import LabelFilter, LabelFilterError, LabelPattern
from garrison.identity.model import (
    RESERVED,
    Identity,
    IdentityError,
    IdentityRangeExhaustedError,
    InvalidIdentityLabelsError,
    UnknownReservedIdentityError,
    cidr_labels,
    reserved_identity,
)

__all__ = [
    "RESERVED",
    "AllocatorConfig",
    "Identity",
    "IdentityAllocator",
    "IdentityError",
    "IdentityRangeExhaustedError",
    "InvalidIdentityLabelsError",
    "LabelFilter",
    "LabelFilterError",
    "LabelPattern",
    "UnknownReservedIdentityError",
    "cidr_labels",
    "reserved_identity",
]
