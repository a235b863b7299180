"""The import contract: pure code never imports I/O code (ARCHITECTURE.md, STYLE.md).

Pure modules — the policy pipeline, the identity model, the sans-io parsers, the proxy's
enforcement engines with their deny answers and commands, and the flow-record model with its
queries — take values and return values. Two checks hold that line, and `make lint` runs them:

- dynamic: importing a pure module in a fresh interpreter loads none of garrison's I/O
  modules (kvstore, agent, redirect, bpf, the proxy's server side, the access-log writer, ...);
  a package `__init__` that re-exports an I/O module breaks this, so those stay empty;
- static: no pure module itself imports an I/O library (socket, asyncio, sqlite3, threading,
  grpc, pyroute2, bcc, ...). Third-party codecs may load what they load (kafka-python's
  package imports its network client, the stdlib's `email.utils` imports `socket`): that is
  their business, not a path from garrison's pure code to garrison's I/O.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "garrison"

# Whole packages that are pure, and the single modules of mixed packages.
PURE_PACKAGES = ("garrison.policies", "garrison.parsers")
PURE_MODULES = (
    "garrison.identity.model",
    "garrison.identity.filter",
    "garrison.proxy.commands",
    "garrison.proxy.deny",
    "garrison.proxy.engine",
    "garrison.proxy.engine_http1",
    "garrison.proxy.engine_h2",
    "garrison.proxy.engine_kafka",
    "garrison.proxy.policyview",
    "garrison.flows.record",
    "garrison.flows.build",
    "garrison.flows.codec",
    "garrison.flows.redact",
    "garrison.flows.query",
    "garrison.flows.errors",
    "garrison.flows.flowdict",
    "garrison.flows.selectors",
    "garrison.flows.timebounds",
    "garrison.flows.filterfields",
    "garrison.flows.servicemap",
    "garrison.flows.mapscan",
    "garrison.flows.render",
    "garrison.flows.summary",
)
# The edges of the pure packages: they read files, or build a C extension at set-up.
EDGES = ("garrison.policies.loader", "garrison.parsers.nghttp2_build")

IO_PREFIXES = (
    "garrison.kvstore",
    "garrison.agent",
    "garrison.redirect",
    "garrison.bpf",
    "garrison.cluster",
    "garrison.cni",
    "garrison.ui",
    "garrison.cli",
    "garrison.identity.allocator",
    "garrison.proxy.server",
    "garrison.proxy.upstream",
    "garrison.proxy.sockets",
    "garrison.proxy.reload",
    "garrison.proxy.metrics",
    "garrison.flows.writer",
    "garrison.flows.reader",
    "garrison.flows.store",
    "garrison.tlsfiles",
)
IO_LIBRARIES = {
    "socket", "ssl", "sqlite3", "asyncio", "subprocess", "threading", "multiprocessing",
    "gzip", "selectors", "shutil", "tempfile", "uvloop", "grpc", "pyroute2", "bcc",
    "prometheus_client",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pure_modules() -> list[str]:
    names = set(PURE_MODULES)
    for package in PURE_PACKAGES:
        folder = ROOT / package.replace(".", "/")
        names.update(_module_name(p) for p in folder.glob("*.py"))
    return sorted(n for n in names if n not in EDGES)


PURE = pure_modules()


def test_every_listed_module_exists() -> None:
    for name in PURE:
        path = ROOT / (name.replace(".", "/") + ".py")
        init = ROOT / name.replace(".", "/") / "__init__.py"
        assert path.is_file() or init.is_file(), f"{name} is listed as pure but is gone"


@pytest.mark.parametrize("module", PURE)
def test_pure_module_does_not_import_io_libraries(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in IO_LIBRARIES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {name}")
            if name.startswith(IO_PREFIXES):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {name}")
    assert not found, "pure code imports I/O code:\n" + "\n".join(found)


def test_importing_pure_modules_loads_no_garrison_io_module() -> None:
    """One fresh interpreter per module (the source, not the compiled build: the same
    imports either way), so one module's imports cannot hide another's."""
    program = (
        "import importlib, json, sys\n"
        f"prefixes = {IO_PREFIXES!r}\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module(name)\n"
        "    out[name] = sorted(m for m in set(sys.modules) - before if m.startswith(prefixes))\n"
        "print(json.dumps(out))\n"
    )

    def imports_of(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", program, name], capture_output=True, text=True,
            cwd=ROOT, env={"GARRISON_PURE": "1", "PATH": "/usr/bin:/bin"}, timeout=120,
        )

    leaks: dict[str, list[str]] = {}
    # the interpreters are independent: as many side by side as there are cores
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for proc in pool.map(imports_of, PURE):
            assert proc.returncode == 0, proc.stderr
            leaks.update({k: v for k, v in json.loads(proc.stdout).items() if v})
    assert not leaks, f"pure modules load I/O modules: {leaks}"
