"""`garrison agent` refuses a bad --metrics or --proxy-ports in one line naming the option,
before it touches anything (a port over 65535 used to end in an OverflowError traceback, the
state directory made; `http=abc` in "invalid literal for int() with base 10")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--metrics", "127.0.0.1:99999",
     "--metrics 127.0.0.1:99999: port 99999 is not 1-65535; give HOST:PORT, e.g. "
     "127.0.0.1:9962"),
    ("--metrics", "localhost",
     "--metrics localhost: 'localhost' is not a port number; give HOST:PORT, e.g. "
     "127.0.0.1:9962"),
    ("--proxy-ports", "http=abc",
     "--proxy-ports http=abc: 'abc' is not a port number; give http=N,grpc=N,kafka=N"),
    ("--proxy-ports", "http=15001,ftp=21",
     "--proxy-ports http=15001,ftp=21: 'ftp' is no L7 parser; give http=N,grpc=N,kafka=N"),
])
def test_a_bad_port_option_is_named_before_anything_starts(
    tmp_path: Path, flag: str, value: str, message: str,
) -> None:
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "garrison.cli.main", "agent", "--state-dir",
         str(state), "--socket", str(tmp_path / "sock"), "--bpffs-root",
         "/sys/fs/bpf/never-made-by-this-test", flag, value],
        capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stderr.splitlines()) == (2, [f"garrison agent: {message}"])
    assert not state.exists()
