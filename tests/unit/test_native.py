"""The mypyc build: the suite runs what users run, and a stale build never runs."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import garrison
from garrison import native

PURE = os.environ.get(native.PURE_ENV, "") not in ("", "0")
EXTENSION = importlib.machinery.EXTENSION_SUFFIXES[0]
PROBE = (
    "import garrison, garrison.parsers.http1 as a, garrison.proxy.engine_http1 as b; "
    "print(garrison.COMPILED_IN_USE, a.__file__, b.__file__)"
)


@pytest.mark.skipif(PURE, reason="this run asked for the source (GARRISON_PURE=1)")
def test_the_suite_runs_the_compiled_modules() -> None:
    state = native.check()
    assert state.fresh, f"the mypyc build is not in use ({state.problem}): {native.REBUILD_HINT}"
    assert garrison.COMPILED_IN_USE
    for name in native.COMPILED:
        assert str(importlib.import_module(name).__file__).endswith(EXTENSION), name


@pytest.fixture
def built_copy(tmp_path: Path) -> Path:
    """A copy of the package with its build, to edit without touching the checkout."""
    if not native.check().fresh:
        pytest.fail(f"no fresh mypyc build to copy: {native.REBUILD_HINT}")
    shutil.copytree(native.PACKAGE_DIR, tmp_path / "garrison",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def probe(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    environment.update(env, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-c", PROBE], cwd=root, env=environment,
                          capture_output=True, text=True, check=True, timeout=60)


def test_a_fresh_build_is_used(built_copy: Path) -> None:
    done = probe(built_copy)
    used, first, second = done.stdout.split()
    assert used == "True"
    assert first == str(built_copy / "garrison/parsers" / f"http1{EXTENSION}")
    assert second == str(built_copy / "garrison/proxy" / f"engine_http1{EXTENSION}")
    assert "RuntimeWarning" not in done.stderr


def test_an_edited_source_sends_every_compiled_module_back_to_source(built_copy: Path) -> None:
    edited = built_copy / "garrison/parsers/http1.py"
    edited.write_text(edited.read_text() + "\nEDITED = True\n")
    done = probe(built_copy)
    used, first, second = done.stdout.split()
    assert used == "False"
    # the unedited engine falls back too: compiled modules call each other directly
    assert (first, second) == (str(edited), str(built_copy / "garrison/proxy/engine_http1.py"))
    assert "changed since they were compiled: garrison/parsers/http1.py" in done.stderr
    assert native.REBUILD_HINT in done.stderr


def test_a_missing_compiled_module_sends_every_one_back_to_source(built_copy: Path) -> None:
    (built_copy / "garrison/flows" / f"codec{EXTENSION}").unlink()
    done = probe(built_copy)
    assert done.stdout.split()[0] == "False"
    assert done.stdout.split()[1].endswith("http1.py")
    assert "compiled files are missing for garrison.flows.codec" in done.stderr


def test_a_missing_build_record_sends_every_one_back_to_source(built_copy: Path) -> None:
    (built_copy / "garrison/native-build.json").unlink()
    done = probe(built_copy)
    assert done.stdout.split()[0] == "False"
    assert "native-build.json is missing or unreadable" in done.stderr


def test_garrison_pure_asks_for_the_source_without_a_warning(built_copy: Path) -> None:
    done = probe(built_copy, **{native.PURE_ENV: "1"})
    used, first, _ = done.stdout.split()
    assert (used, first) == ("False", str(built_copy / "garrison/parsers/http1.py"))
    assert done.stderr == ""
