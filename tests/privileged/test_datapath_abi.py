"""abi.py against what bcc compiles from abi.h: struct sizes and field offsets, every
constant as the C compiler sees it; and the loader's typed refusals."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from garrison.bpf import abi
from garrison.bpf.loader import (
    BPF_DIR,
    BPFFSError,
    Datapath,
    DatapathConfig,
    PinnedMapMismatchError,
    import_bcc,
)
from garrison.bpf.syscall import SkbContext, prog_test_run
from garrison.redirect import prepare_pin_dir, remove_pin_dir

from .test_datapath_harness import (  # noqa: F401 (fixtures)
    fixture_bpffs,
    fixture_no_leftovers,
    pin_root_for,
)

pytestmark = pytest.mark.privileged

DEFINES = re.findall(r"^#define (GAR_\w+)\s+(?:0x[0-9a-fA-F]+|\d+)\b",
                     abi.ABI_HEADER.read_text(), re.M)


def layout_program() -> str:
    tables = "\n".join(
        f"BPF_ARRAY(l_{name.removeprefix('gar_')}, struct {name}, 1);" for name in abi.STRUCTS
    )
    stores = "\n".join(
        f"\tk = {i}; v = (u64)({name}); vals.update(&k, &v);" for i, name in enumerate(DEFINES)
    )
    extra = len(DEFINES)
    return f"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "abi.h"
{tables}
BPF_ARRAY(vals, u64, {extra + 4});
int constants(struct __sk_buff *skb)
{{
	u32 k; u64 v;
{stores}
	k = {extra}; v = GAR_COUNTER_INDEX(GAR_OBS_FROM_CONTAINER, GAR_DROP_POLICY_DENY);
	vals.update(&k, &v);
	k = {extra + 1}; v = GAR_COUNTER_INDEX(GAR_OBS_TO_CONTAINER, GAR_COUNT_AUDITED);
	vals.update(&k, &v);
	return TC_ACT_OK;
}}
"""


@pytest.fixture(name="compiled", scope="module")
def fixture_compiled() -> Iterator[Any]:
    bcc = import_bcc()
    bpf = bcc.BPF(text=layout_program().encode(), cflags=[f"-I{BPF_DIR}"])
    try:
        yield bpf
    finally:
        bpf.cleanup()


@pytest.mark.parametrize("name", sorted(abi.STRUCTS))
def test_struct_layout_equals_bcc(compiled: Any, no_leftovers: None, name: str) -> None:
    theirs = compiled[f"l_{name.removeprefix('gar_')}".encode()].Leaf
    ours = abi.STRUCTS[name]
    assert ctypes.sizeof(theirs) == ctypes.sizeof(ours)
    their_fields = [f[0] for f in theirs._fields_ if not f[0].startswith("__pad")]
    assert their_fields == [f[0] for f in ours._fields_]
    for field, _ in ours._fields_:
        t, o = getattr(theirs, field), getattr(ours, field)
        assert (t.offset, t.size) == (o.offset, o.size), field


def test_constants_as_the_compiler_sees_them(compiled: Any, no_leftovers: None) -> None:
    fn = compiled.load_func(b"constants", compiled.SCHED_CLS)
    frame = bytes(14) + bytes(20)
    assert prog_test_run(fn.fd, frame, SkbContext()).retval == 0
    vals = compiled[b"vals"]
    seen = {name: int(vals[ctypes.c_int(i)].value) for i, name in enumerate(DEFINES)}
    from tests.unit.bpf.test_abi import mirror

    for name, value in seen.items():
        assert mirror(name.removeprefix("GAR_")) == value, name
    n = len(DEFINES)
    assert int(vals[ctypes.c_int(n)].value) == abi.counter_index(
        abi.ObservationPoint.FROM_CONTAINER, abi.DropReason.POLICY_DENY
    )
    assert int(vals[ctypes.c_int(n + 1)].value) == abi.counter_index(
        abi.ObservationPoint.TO_CONTAINER, abi.CounterCode.AUDITED
    )


def test_loaded_maps_have_the_abi_sizes(bpffs: Path, no_leftovers: None) -> None:
    root = pin_root_for(bpffs, "abi-sizes")
    prepare_pin_dir(root)
    try:
        with Datapath.load(DatapathConfig(pin_root=root, ct_max=1024, events_pages=8)) as dp:
            dp.check_pinned_layout()
            assert sorted(p.name for p in root.iterdir()) == sorted([*abi.MAPS, abi.RINGBUF])
    finally:
        remove_pin_dir(root)


def test_a_map_pinned_with_another_layout_is_refused(bpffs: Path, no_leftovers: None) -> None:
    root = pin_root_for(bpffs, "abi-mismatch")
    prepare_pin_dir(root)
    bcc = import_bcc()
    stale = bcc.BPF(text=(
        f'BPF_TABLE_PINNED("lru_hash", u32, u32, gar_ct, 16, "{root}/gar_ct");'
    ).encode())
    try:
        with pytest.raises(PinnedMapMismatchError, match="gar_ct"):
            Datapath.load(DatapathConfig(pin_root=root, ct_max=1024, events_pages=8))
    finally:
        stale.cleanup()
        remove_pin_dir(root)


def test_a_pin_root_outside_bpffs_is_refused(tmp_path: Path, no_leftovers: None) -> None:
    with pytest.raises(BPFFSError, match="mount -t bpf"):
        Datapath.load(DatapathConfig(pin_root=tmp_path / "pins"))
