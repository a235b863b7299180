"""abi.py mirrors abi.h: every constant, every struct's fields, explicit padding."""

from __future__ import annotations

import ctypes
import re
from enum import Enum

import pytest

from garrison.bpf import abi

HEADER = abi.ABI_HEADER.read_text()
DEFINES = {
    m.group(1): int(m.group(2), 0)
    for m in re.finditer(r"^#define GAR_(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", HEADER, re.M)
}
ENUM_PREFIXES: list[tuple[str, type[Enum]]] = [
    ("DROP_", abi.DropReason),
    ("MATCH_", abi.MatchType),
    ("DIR_", abi.TrafficDirection),
    ("OBS_", abi.ObservationPoint),
    ("EP_", abi.EndpointFlags),
    ("EVENT_F_", abi.EventFlags),
    ("EVENT_", abi.EventType),
    ("COUNT_", abi.CounterCode),
]


def mirror(name: str) -> int:
    if name.startswith("CT_") and not name.startswith("CT_TIMEOUT_"):
        return int(abi.CTFlags[name.removeprefix("CT_")])
    if name.startswith("IPCACHE_"):
        return int(abi.IPCacheFlags[name.removeprefix("IPCACHE_")])
    for prefix, enum in ENUM_PREFIXES:
        if name.startswith(prefix):
            return int(enum[name.removeprefix(prefix)].value)
    value = getattr(abi, name)
    assert isinstance(value, int)
    return value


def test_header_has_constants() -> None:
    assert len(DEFINES) > 50


@pytest.mark.parametrize("name", sorted(DEFINES))
def test_constant_is_mirrored(name: str) -> None:
    assert mirror(name) == DEFINES[name], name


@pytest.mark.parametrize(
    ("prefix", "enum"), [*ENUM_PREFIXES, ("CT_", abi.CTFlags), ("IPCACHE_", abi.IPCacheFlags)]
)
def test_enums_have_nothing_the_header_lacks(prefix: str, enum: type[Enum]) -> None:
    for member in enum:
        if member.value == 0 and member.name == "NONE" and f"{prefix}NONE" not in DEFINES:
            continue
        assert f"{prefix}{member.name}" in DEFINES, f"{enum.__name__}.{member.name}"


def c_fields(struct: str) -> list[tuple[str, int]]:
    """(name, array length or 1) of the fields of `struct <name> { ... };` in abi.h."""
    body = re.search(rf"struct {struct} \{{(.*?)\n\}};", HEADER, re.S)
    assert body, struct
    out = []
    for line in body.group(1).splitlines():
        line = re.sub(r"/\*.*?\*/", "", line).strip()
        m = re.match(r"[\w ]+?\s+(\w+)(?:\[(\d+)\])?;$", line)
        if m:
            out.append((m.group(1), int(m.group(2) or 1)))
    return out


@pytest.mark.parametrize("struct", sorted(abi.STRUCTS))
def test_struct_fields_match_header(struct: str) -> None:
    mirror_type = abi.STRUCTS[struct]
    py = []
    for name, ctype in mirror_type._fields_:
        length = getattr(ctype, "_length_", 1)
        py.append((name, length))
    assert py == c_fields(struct)


@pytest.mark.parametrize("struct", sorted(abi.STRUCTS))
def test_struct_padding_is_explicit(struct: str) -> None:
    mirror_type = abi.STRUCTS[struct]
    total = sum(ctypes.sizeof(ctype) for _, ctype in mirror_type._fields_)
    assert total == ctypes.sizeof(mirror_type), f"{struct} has implicit padding"


def test_every_struct_of_the_header_is_mirrored() -> None:
    declared = set(re.findall(r"^struct (gar_\w+) \{", HEADER, re.M))
    assert declared == set(abi.STRUCTS)


def test_upstream_mark_is_not_steered_to_the_proxy() -> None:
    assert abi.MARK_PROXY_UPSTREAM & abi.MARK_MASK != abi.MARK_TO_PROXY
    assert abi.MARK_PROXY_UPSTREAM & ~abi.MARK_MASK == 0


def test_counter_index_matches_header_macro() -> None:
    # GAR_COUNTER_INDEX(obs, code) ((((obs) - 1) & 0x1) << 8) | ((code) & 0xff)
    assert abi.counter_index(abi.ObservationPoint.FROM_CONTAINER, 133) == 133
    assert abi.counter_index(abi.ObservationPoint.TO_CONTAINER, 0) == 256
    assert abi.counter_index(abi.ObservationPoint.TO_CONTAINER, 255) < abi.COUNTERS_MAX


def test_drop_reasons_map_to_the_model() -> None:
    from garrison.policies.mapstate import DropReason

    assert abi.DropReason.POLICY_DENIED.model is DropReason.POLICY_DENIED
    assert abi.DropReason.POLICY_DENY.model is DropReason.POLICY_DENY
    assert abi.DropReason.PROXY_NOT_LISTENING.model is None
    assert all(r.description for r in abi.DropReason)


def test_match_types_map_to_the_model_both_ways() -> None:
    from garrison.policies.mapstate import MatchType

    assert {m.model for m in abi.MatchType} == set(MatchType)
    for m in MatchType:
        assert abi.MatchType.of(m).model is m
