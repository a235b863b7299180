"""`garrison ui` on the command line: refusals are one line with the fix, and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def garrison(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "garrison.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "GARRISON_PURE": "1"})


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--listen", "0.0.0.0:12000", "--input-file", "x.log"], 2, "needs --allow-remote"),
    (["--listen", "127.0.0.1:0", "--input-file", "/nonexistent/access.log"], 1,
     "access log /nonexistent/access.log: cannot open: No such file or directory"),
    (["--listen", "127.0.0.1:0", "--input-file", "-"], 1, "reads files, not standard input"),
    (["--listen", "127.0.0.1:0", "--socket", "/nonexistent/agent.sock"], 3,
     "no agent socket at /nonexistent/agent.sock"),
])
def test_refusals(args: list[str], code: int, message: str) -> None:
    done = garrison("ui", *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_listed_in_help() -> None:
    assert "the review web page" in garrison("--help").stdout
