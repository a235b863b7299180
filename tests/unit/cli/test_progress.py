"""Progress while reading a large access log (issue 18, item 17): shown on a terminal, never
when the output is piped or captured — those runs print exactly what they printed before."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from garrison.cli.progress import MIN_BYTES

GARRISON = str(Path(sys.executable).with_name("garrison"))
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"
PROGRESS_MARKS = ("reading ", "\r", "\x1b[", "━")


@pytest.fixture(scope="module", name="big_log")
def fixture_big_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sample = SAMPLE.read_bytes()
    path = tmp_path_factory.mktemp("progress") / "access.log"
    with path.open("wb") as out:
        for _ in range(MIN_BYTES // len(sample) + 1):
            out.write(sample)
    return path


COMMANDS = {
    "summary": ["accesslog", "summary"],
    "export": ["accesslog", "export", "-o", "csv", "--verdict", "DROPPED"],
    "observe": ["observe", "--last", "2", "--verdict", "DROPPED"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_piped_output_has_no_progress(name: str, big_log: Path) -> None:
    done = subprocess.run([GARRISON, *COMMANDS[name], "--input-file", str(big_log)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GARRISON_PURE": "1", "TERM": "xterm"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    for mark in PROGRESS_MARKS:
        assert mark not in done.stdout and mark not in done.stderr, (mark, done.stderr[-300:])


def on_a_terminal(argv: list[str]) -> str:
    """What a terminal shows (standard output and error both on it)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env={**os.environ, "GARRISON_PURE": "1", "TERM": "xterm",
                                 "COLUMNS": "120"})
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.wait(30) == 0, shown.decode(errors="replace")[-2000:]
    return shown.decode(errors="replace")


def test_a_terminal_shows_progress_then_the_result(big_log: Path) -> None:
    shown = on_a_terminal([GARRISON, "accesslog", "summary", "--input-file", str(big_log)])
    assert "reading access.log" in shown and "━" in shown
    assert shown.rindex("reading access.log") < shown.rindex("FORWARDED")  # the table after


def test_records_streaming_to_the_terminal_get_no_bar(big_log: Path) -> None:
    shown = on_a_terminal([GARRISON, "observe", "--input-file", str(big_log), "--first", "3"])
    assert "reading " not in shown and "━" not in shown
