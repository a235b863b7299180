"""The bpffs directory the datapath pins its maps in."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from pathlib import Path

from garrison.bpf.loader import BPFFSError, is_bpffs

BPFFS_MOUNT = Path("/sys/fs/bpf")
KERNEL_ENTRIES = frozenset({"maps.debug", "progs.debug"})  # bpf_preload's, not ours

_libc = ctypes.CDLL(None, use_errno=True)


def ensure_bpffs(mountpoint: Path = BPFFS_MOUNT) -> bool:
    """Mount bpffs at `mountpoint` unless it is one already; True if this call mounted it."""
    if is_bpffs(mountpoint):
        return False
    mountpoint.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"bpf", os.fsencode(mountpoint), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BPFFSError(f"mount -t bpf bpf {mountpoint}: {os.strerror(err)}")
    return True


def unmount_bpffs(mountpoint: Path = BPFFS_MOUNT) -> bool:
    """Unmount a bpffs this process mounted, only when nothing is pinned in it any more."""
    if not is_bpffs(mountpoint) or any(
        p.name not in KERNEL_ENTRIES for p in mountpoint.iterdir()
    ):
        return False
    if _libc.umount2(os.fsencode(mountpoint), 0) != 0:
        err = ctypes.get_errno()
        raise BPFFSError(f"umount {mountpoint}: {os.strerror(err)}")
    return True


def prepare_pin_dir(pin_root: Path) -> Path:
    """Create `pin_root` (inside a mounted bpffs); idempotent."""
    if not is_bpffs(pin_root):
        raise BPFFSError(f"{pin_root} is not inside a bpffs mount (ensure_bpffs() first)")
    pin_root.mkdir(parents=True, exist_ok=True)
    return pin_root


def remove_pin_dir(pin_root: Path) -> None:
    """Unpin everything under `pin_root` and remove it; the maps go once no program or
    process holds them. Only ever inside bpffs."""
    if not pin_root.exists():
        return
    if not is_bpffs(pin_root):
        raise BPFFSError(f"refusing to remove {pin_root}: not inside a bpffs mount")
    for path in sorted(pin_root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with contextlib.suppress(FileNotFoundError):
        pin_root.rmdir()
    if pin_root.exists():  # pragma: no cover - bpffs never refuses rmdir of an empty dir
        shutil.rmtree(pin_root)
