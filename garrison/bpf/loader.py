"""Compile and load the endpoint programs with bcc, over maps pinned in bpffs.

`Datapath.load(config)` compiles `bpf_lxc.c`, loads `from_container`, `to_container` and
`from_netdev` (for a cluster node's underlay device),
and opens the maps pinned under `config.pin_root` — creating them only when they are not
there yet. A restarted loader therefore keeps every entry (policy, ipcache, conntrack,
queued events): enforcement has no gap and no flush. Attach the new programs with
`garrison.redirect.attach_endpoint_programs` (tc replace swaps them atomically), then bring
the maps to the desired state with `PolicyMap.reconcile`.

Failures are typed and say what to install or which privilege is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from garrison.bpf import abi
from garrison.bpf.maps import CTTimeouts, DatapathMaps
from garrison.bpf.syscall import SkbContext, TestRunResult, map_info, prog_test_run

BPF_DIR = Path(__file__).resolve().parent
PROGRAM_SOURCE = BPF_DIR / "bpf_lxc.c"
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/garrison")
BPF_FS_MAGIC = 0xCAFE4A11
PINNED_MAPS = (*abi.MAPS, abi.RINGBUF)
PROGRAMS = ("from_container", "to_container", "from_netdev")

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


class DatapathError(Exception):
    """Base of everything loading the datapath can raise."""


class BCCMissingError(DatapathError):
    """bcc's Python module is not importable."""


class KernelHeadersMissingError(DatapathError):
    """bcc needs the kernel headers under /lib/modules/<release>/build."""


class PrivilegeError(DatapathError):
    """Loading programs and pinning maps needs root (CAP_BPF, CAP_NET_ADMIN)."""


class BPFFSError(DatapathError):
    """The pin root is not inside a mounted bpffs."""


class ProgramCompileError(DatapathError):
    """clang rejected the C; the message holds its diagnostics."""


class ProgramLoadError(DatapathError):
    """The verifier rejected a program; the message holds its log."""


class PinnedMapMismatchError(DatapathError):
    """A pinned map has another layout than this build's ABI (left by another version)."""


@dataclass(frozen=True, slots=True)
class DatapathConfig:
    """`pin_root`: the bpffs directory holding the maps (one per agent; tests use their own).
    Map sizes only take effect when a map is created; a pinned map keeps its size."""

    pin_root: Path = DEFAULT_PIN_ROOT
    max_endpoints: int = 4096
    ipcache_max: int = 131072
    policy_max: int = 262144
    ct_max: int = 131072
    events_pages: int = 256
    ct_timeouts: CTTimeouts = field(default_factory=CTTimeouts)

    def cflags(self) -> list[str]:
        root = str(self.pin_root)
        if '"' in root or "\\" in root:
            raise ValueError(f"pin root {root!r} may not contain quotes or backslashes")
        return [
            f'-DGARRISON_PIN_ROOT="{root}"',
            f"-DGAR_MAX_ENDPOINTS={self.max_endpoints}",
            f"-DGAR_IPCACHE_MAX={self.ipcache_max}",
            f"-DGAR_POLICY_MAX={self.policy_max}",
            f"-DGAR_CT_MAX={self.ct_max}",
            f"-DGAR_EVENTS_PAGES={self.events_pages}",
        ]


@dataclass(frozen=True, slots=True)
class EndpointPrograms:
    """File descriptors of the loaded programs (valid while the Datapath is open)."""

    from_container: int
    to_container: int
    # on a node's underlay device when it is one of a cluster (garrison/cluster/)
    from_netdev: int


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def flatten_source(path: Path, _seen: set[Path] | None = None) -> str:
    """The program with its local `#include "..."` files inlined (each once), keeping file
    and line numbers for diagnostics. bcc rewrites map calls (`map.lookup()`) only in the
    main file, so the headers must become part of it."""
    seen = set() if _seen is None else _seen
    path = path.resolve()
    if path in seen:
        return ""
    seen.add(path)
    out = [f'#line 1 "{path}"\n']
    for number, line in enumerate(path.read_text().splitlines(keepends=True), start=1):
        match = _INCLUDE.match(line)
        if match:
            out.append(flatten_source(path.parent / match.group(1), seen))
            out.append(f'#line {number + 1} "{path}"\n')
        else:
            out.append(line)
    return "".join(out)


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _capabilities()
    missing = [
        name
        for name, bit in (("CAP_BPF", CAP_BPF), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
        if not caps & (1 << bit) and not caps & (1 << CAP_SYS_ADMIN)
    ]
    if missing:
        raise PrivilegeError(
            f"loading the datapath needs {' and '.join(missing)}: run as root (sudo)"
        )


def check_kernel_headers() -> None:
    release = os.uname().release
    build = Path("/lib/modules") / release / "build"
    if not (build / "include").is_dir():
        raise KernelHeadersMissingError(
            f"bcc needs kernel headers at {build}: apt-get install linux-headers-amd64, then "
            f"run ./scripts/setup.sh (it links {build} to the installed headers)"
        )


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError:
        raise BCCMissingError(
            "bcc's Python module is missing: apt-get install python3-bpfcc, then run "
            "./scripts/setup.sh so the virtualenv sees Debian's bcc (the PyPI 'bcc' is "
            "unrelated)"
        ) from None
    return bcc


def mount_point(path: Path) -> tuple[Path, str] | None:
    """The mount point holding `path` and its filesystem type (from /proc/self/mounts)."""
    best: tuple[Path, str] | None = None
    target = path.resolve()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = Path(parts[1].replace("\\040", " "))
        if (target == mnt or mnt in target.parents) and (
            best is None or len(mnt.parts) >= len(best[0].parts)
        ):
            best = (mnt, parts[2])
    return best


def is_bpffs(path: Path) -> bool:
    found = mount_point(path)
    return found is not None and found[1] == "bpf"


def check_pin_root(pin_root: Path) -> None:
    if not is_bpffs(pin_root):
        raise BPFFSError(
            f"{pin_root} is not on a bpffs mount: mount -t bpf bpf /sys/fs/bpf (or call "
            "garrison.redirect.ensure_bpffs())"
        )
    pin_root.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what libbcc/clang/the verifier print on fd 2 (they bypass sys.stderr)."""
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                yield out
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


# the maps that fill up (arrays are always full, the ring buffer is not a map of entries)
PRESSURE_MAPS = ("gar_ipcache", "gar_policy", "gar_policy_audit", "gar_endpoints", "gar_ct")


class Datapath:
    """The loaded endpoint programs and their pinned maps."""

    def __init__(self, config: DatapathConfig, bpf: Any, programs: EndpointPrograms) -> None:
        self.config = config
        self._bpf = bpf
        self.programs = programs
        self.maps = DatapathMaps(bpf)

    @classmethod
    def load(cls, config: DatapathConfig | None = None) -> Datapath:
        config = config or DatapathConfig()
        bcc = import_bcc()
        check_privileges()
        check_kernel_headers()
        check_pin_root(config.pin_root)
        bpf = _compile(bcc, flatten_source(PROGRAM_SOURCE), config.cflags())
        try:
            # before loading: the verifier would reject programs over a foreign map, with
            # a message that does not say why
            check_pinned_layout(bpf, config.pin_root)
            fns = _load_programs(bcc, bpf)
            dp = cls(config, bpf, EndpointPrograms(fns[0].fd, fns[1].fd, fns[2].fd))
            dp.maps.settings.write(config.ct_timeouts)
            return dp
        except BaseException:
            bpf.cleanup()
            raise

    def check_pinned_layout(self) -> None:
        check_pinned_layout(self._bpf, self.config.pin_root)

    def map_ids(self) -> dict[str, int]:
        """Kernel ids of the maps this loader opened: equal across a restart over the same
        pins (the maps were reused, not recreated)."""
        return {name: map_info(self._bpf[name.encode()].map_fd).id for name in abi.MAPS}

    def map_usage(self) -> dict[str, tuple[int, int]]:
        """(entries, max_entries) of the hash and trie maps, whose fill is map pressure.
        Counting walks the keys, one bpf(2) call each: about a second for a full
        131072-entry map, so read it at scrape intervals, not per packet."""
        usage = {}
        for name in PRESSURE_MAPS:
            table = self._bpf[name.encode()]
            size = map_info(table.map_fd).max_entries
            usage[name] = (sum(1 for _ in table), size)
        return usage

    def test_run(
        self, program: str, frame: bytes, ctx: SkbContext | None = None
    ) -> TestRunResult:
        """Run `from_container` or `to_container` on a crafted frame (BPF_PROG_TEST_RUN)."""
        fd = getattr(self.programs, program)
        return prog_test_run(fd, frame, ctx)

    def close(self) -> None:
        """Release this process's handles. Attached programs and pinned maps stay."""
        if self._bpf is not None:
            self.maps.events.close()
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> Datapath:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def check_pinned_layout(bpf: Any, pin_root: Path) -> None:
    """Refuse maps pinned by a build with another ABI (their sizes differ)."""
    for name, (key, value) in abi.MAPS.items():
        info = map_info(bpf[name.encode()].map_fd)
        if info.key_size != ctypes.sizeof(key) or info.value_size != ctypes.sizeof(value):
            raise PinnedMapMismatchError(
                f"map {name} pinned at {pin_root}/{name} has key/value sizes "
                f"{info.key_size}/{info.value_size}, this build expects "
                f"{ctypes.sizeof(key)}/{ctypes.sizeof(value)}: remove the stale pins "
                f"(garrison.redirect.remove_pin_dir) and load again"
            )


def _compile(bcc: Any, text: str, cflags: list[str]) -> Any:
    failure: Exception | None = None
    with _stderr_captured() as log:
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=cflags)
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise ProgramCompileError(f"{failure}\n{log[0].strip()}") from failure
    return bpf


def _load_programs(bcc: Any, bpf: Any) -> list[Any]:
    failure: Exception | None = None
    with _stderr_captured() as log:
        try:
            fns = [bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS) for name in PROGRAMS]
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise ProgramLoadError(f"{failure}\n{log[0].strip()}") from failure
    return fns
