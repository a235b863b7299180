"""The modules garrison runs compiled (mypyc), and the guard that never runs a stale build.

`make setup` compiles the proxy's per-request path (`COMPILED`) with mypyc into extension
modules beside their sources (`scripts/compile.py`) and writes `garrison/native-build.json`:
the SHA-256 of every source it compiled and the shared library the build made. The same
source, compiled, runs the allowed HTTP request in about two thirds of the CPU time
(BENCHMARKS.md, "Proxy: HTTP").

Python imports an extension module in preference to the `.py` beside it, so an edited source
would silently keep running its old compiled code — a policy fix that does not apply. And
compiled modules call each other directly in C, so one of them cannot fall back to source
alone. So at `import garrison`, `select()` reads the record: when a source differs from what
was compiled, a compiled file is missing, or the record is unreadable, every module in
`COMPILED` loads from source, with a warning that says how to rebuild. `GARRISON_PURE=1`
asks for the source on purpose (no warning). With no compiled files at all (an install that
never ran the compile step) the source runs, as it always can.

Initialisers. A dataclass's `__init__` is made by the `dataclasses` module when the class is
created, so it runs interpreted even in a compiled module; for a frozen class it sets every
field through `object.__setattr__` from Python: ~3 µs for a `FlowRecord`, ~0.8 µs for a small
part of one, paid several times per request. The dataclasses made on the per-request path
therefore write their `__init__` out (the decorator keeps an `__init__` the class defines),
setting each field with a literal `object.__setattr__(self, "name", value)`, which mypyc
compiles to a direct store (~0.03 µs) and which is also what the generated one does when
the source runs. Everything else of the dataclass (frozen, eq, hash, repr, `replace`) is
unchanged; `tests/unit/test_native.py` checks each written `__init__` against its fields.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

# The per-request path of the proxies: parsers, engines, record building and encoding,
# redaction, rule matching, commands, and the server around them (connections, the record
# sink, ring, access-log writer, metrics). Each must type-check under mypy --strict and must
# not be monkeypatched by tests (compiled callers bind other compiled functions directly).
# Not here: `garrison.proxy.upstream` (mypyc cannot compile its OSError subclass) and
# `garrison.parsers.nghttp2`, which does not compile unchanged: its connection objects are
# weakly referenced from the callbacks' map, tests replace their methods, and its
# `type(header) is NeverIndexed` checks on values typed as pairs would see them unboxed (mypyc
# stores a fixed-length tuple unboxed: a credential would lose its never-indexed mark).
# `garrison.proxy.engine_h2` only passes pairs on and keeps the mark (test_engine_h2).
COMPILED: tuple[str, ...] = (
    "garrison.parsers.pathnorm",
    "garrison.parsers.http1",
    "garrison.policies.match_http",
    "garrison.flows.record",
    "garrison.flows.redact",
    "garrison.flows.build",
    "garrison.flows.codec",
    "garrison.proxy.commands",
    "garrison.proxy.engine",
    "garrison.proxy.engine_http1",
    "garrison.parsers.kafka_lengths",
    "garrison.parsers.kafka",
    "garrison.parsers.kafka_topics",
    "garrison.policies.match_kafka",
    "garrison.proxy.engine_kafka",
    "garrison.proxy.engine_h2",
    "garrison.flows.store",
    "garrison.flows.writer",
    "garrison.proxy.metrics",
    "garrison.proxy.server",
)

PURE_ENV = "GARRISON_PURE"
PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parent  # the directory holding the package (and mypyc's shared library)
RECORD = PACKAGE_DIR / "native-build.json"
REBUILD_HINT = "run `make setup` (scripts/compile.py) to compile them again"


def source_path(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def extension_path(module: str) -> Path:
    source = source_path(module)
    return source.with_name(source.stem + importlib.machinery.EXTENSION_SUFFIXES[0])


# Extension modules that are not mypyc's: the cffi binding of nghttp2, built and checked by
# garrison/parsers/nghttp2_build.py (`make setup`).
NOT_MYPYC = frozenset({"garrison.parsers._nghttp2"})


def leftover_extensions() -> list[str]:
    """Modules with an extension file beside their source that `COMPILED` does not list (any
    more): Python would import that old compiled code in preference to the source."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    found = []
    for path in PACKAGE_DIR.rglob("*" + suffix):
        module = ".".join(path.relative_to(ROOT).parts)[: -len(suffix)]
        if module in NOT_MYPYC or path.name.startswith("compiled__mypyc"):
            continue
        if module not in COMPILED:
            found.append(module)
    return sorted(found)


def source_digest(module: str) -> str:
    return hashlib.sha256(source_path(module).read_bytes()).hexdigest()


@dataclass(frozen=True, slots=True)
class BuildState:
    """What `check()` found: `fresh` means the compiled modules may be imported."""

    fresh: bool
    compiled_files: int  # how many extension modules are beside their sources
    problem: str = ""  # why the build may not be used, for the warning


def check() -> BuildState:
    present = sum(1 for module in COMPILED if extension_path(module).exists())
    leftovers = leftover_extensions()
    if leftovers:  # a module no longer compiled: its old build must not run
        problem = f"old compiled files remain for {', '.join(leftovers)}"
        return BuildState(False, present + len(leftovers), problem)
    if present == 0:
        return BuildState(fresh=False, compiled_files=0, problem="not compiled")
    try:
        record = json.loads(RECORD.read_text())
        digests: dict[str, str] = record["sources"]
        shared: str = record["shared_library"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return BuildState(False, present, f"{RECORD} is missing or unreadable ({exc})")
    if present < len(COMPILED):
        missing = [m for m in COMPILED if not extension_path(m).exists()]
        return BuildState(False, present, f"compiled files are missing for {', '.join(missing)}")
    if not (ROOT / shared).exists():
        return BuildState(False, present, f"the shared library {ROOT / shared} is missing")
    changed = [
        str(source_path(m).relative_to(ROOT))
        for m in COMPILED
        if digests.get(m) != source_digest(m)
    ]
    if changed:
        return BuildState(False, present, f"changed since they were compiled: {', '.join(changed)}")
    return BuildState(fresh=True, compiled_files=present)


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of COMPILED (and any left over from an older build) as their `.py`
    sources, ahead of the extension modules."""

    def __init__(self) -> None:
        self.modules = frozenset(COMPILED) | frozenset(leftover_extensions())

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def select() -> bool:
    """Decide, once per process, whether the compiled modules run; True if they do."""
    if any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        return False
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        sys.meta_path.insert(0, _SourceFinder())
        return False
    state = check()
    if state.fresh:
        return True
    if state.compiled_files:
        warnings.warn(
            f"garrison: not using the compiled modules, {state.problem}; running them all "
            f"from source (slower) — {REBUILD_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )
        sys.meta_path.insert(0, _SourceFinder())
    return False
