"""The few bpf(2) commands bcc's Python module does not offer: map info and test runs.

Raw syscalls through ctypes; the attribute layouts are the UAPI ones (linux/bpf.h).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}

BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13

TC_ACT_OK = 0
TC_ACT_SHOT = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _sys_bpf() -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(f"bpf(2) syscall number unknown on {platform.machine()}")
    return number


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """bpf(cmd, attr); raises OSError with errno on failure."""
    rc = int(_libc.syscall(_sys_bpf(), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr))))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return rc


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(128)
    attr = ctypes.create_string_buffer(32)
    struct.pack_into("IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    type_, id_, key_size, value_size, max_entries, flags = struct.unpack_from("6I", info, 0)
    name = bytes(info.raw[24:40]).split(b"\0", 1)[0].decode()
    return MapInfo(type_, id_, key_size, value_size, max_entries, flags, name)


def prog_id(fd: int) -> int:
    """The kernel id of the program behind `fd`."""
    info = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(32)
    struct.pack_into("IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return int(struct.unpack_from("I", info, 4)[0])


@dataclass(frozen=True, slots=True)
class ProgStats:
    """Kernel accounting of a program (kept only while kernel.bpf_stats_enabled is 1)."""

    run_time_ns: int
    run_cnt: int


def prog_stats(fd: int) -> ProgStats:
    info = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(32)
    struct.pack_into("IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    run_time, run_cnt = struct.unpack_from("QQ", info, 192)  # struct bpf_prog_info
    return ProgStats(run_time, run_cnt)


def prog_exists(id_: int) -> bool:
    """Whether a program with this id is still loaded (something still holds it)."""
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("I", attr, 0, id_)
    try:
        fd = bpf(BPF_PROG_GET_FD_BY_ID, attr)
    except OSError:
        return False
    os.close(fd)
    return True


def obj_get(path: str) -> int:
    """A new fd for the object pinned at `path` (the caller closes it)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("QII", attr, 0, ctypes.addressof(raw), 0, 0)
    return bpf(BPF_OBJ_GET, attr)


@dataclass(frozen=True, slots=True)
class SkbContext:
    """The writable fields of `struct __sk_buff` a test run may set. ifindex 0 or 1 runs the
    program as if on loopback; another ifindex must name an existing device."""

    mark: int = 0
    ifindex: int = 0
    ingress_ifindex: int = 0

    def pack(self) -> ctypes.Array[ctypes.c_char]:
        buf = ctypes.create_string_buffer(68)  # len .. cb[4]: offsets per linux/bpf.h
        struct.pack_into("I", buf, 8, self.mark)
        struct.pack_into("I", buf, 36, self.ingress_ifindex)
        struct.pack_into("I", buf, 40, self.ifindex)
        return buf


@dataclass(frozen=True, slots=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int


def prog_test_run(
    prog_fd: int, data: bytes, ctx: SkbContext | None = None, repeat: int = 1
) -> TestRunResult:
    """BPF_PROG_TEST_RUN: run a tc program on a crafted frame (Ethernet header first)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(len(data) + 256)
    ctx_in = (ctx or SkbContext()).pack()
    attr = ctypes.create_string_buffer(80)
    struct.pack_into(
        "IIIIQQIIIIQQ",
        attr,
        0,
        prog_fd,
        0,
        len(data),
        len(data_out),
        ctypes.addressof(data_in),
        ctypes.addressof(data_out),
        repeat,
        0,
        len(ctx_in),
        0,
        ctypes.addressof(ctx_in),
        0,
    )
    bpf(BPF_PROG_TEST_RUN, attr)
    _, retval, _, size_out = struct.unpack_from("IIII", attr, 0)
    (duration,) = struct.unpack_from("I", attr, 36)
    return TestRunResult(retval, data_out.raw[:size_out], duration)
