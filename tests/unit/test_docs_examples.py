"""The examples in README.md and docs/*.md print what the docs say they print.

Every fenced `sh`/`console` block is read as a terminal session: `$ COMMAND` (with `\\`
continuation lines) followed by its output. The `garrison` commands that need neither root
nor a running agent — `policy validate`, `policy trace`, and `observe` / `accesslog` over a
log file in this repository — are run here, from the repository's root, and their output must
be exactly the lines the docs show. Examples that need an agent or root are run by the
privileged and end-to-end tests; this test checks that each of them at least parses.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from garrison.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(sh|console|shell)\s*$")


@dataclass(frozen=True)
class Example:
    where: str  # file:line
    argv: list[str]
    output: list[str]

    @property
    def offline(self) -> bool:
        words = self.argv[1:3]
        if words[:2] in (["policy", "validate"], ["policy", "trace"]):
            return True
        if words[:1] in (["observe"], ["accesslog"]):
            files = [self.argv[i + 1] for i, a in enumerate(self.argv[:-1])
                     if a == "--input-file"]
            return bool(files) and all((ROOT / f).is_file() for f in files)
        return False


def examples() -> list[Example]:
    found: list[Example] = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        in_block = False
        current: Example | None = None
        i = 0
        while i < len(lines):
            line = lines[i]
            if FENCE.match(line) and not in_block:
                in_block, current = True, None
            elif line.startswith("```") and in_block:
                in_block, current = False, None
            elif in_block and line.startswith("$ "):
                start = i
                command = line[2:]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                current = None
                argv = _argv(command)
                if argv is not None:
                    current = Example(f"{doc.name}:{start + 1}", argv, [])
                    found.append(current)
            elif in_block and current is not None:
                current.output.append(line)
            i += 1
    return found


def _argv(command: str) -> list[str] | None:
    command = command.split(" #", 1)[0].strip()  # a trailing comment
    if any(token in command for token in ("|", "&", ">", "<", "$(")):
        return None  # a pipeline or a background job: read, not run, here
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    return argv if argv and argv[0] == "garrison" else None


ALL = examples()
OFFLINE = [e for e in ALL if e.offline and e.output]


def test_the_docs_have_examples_to_run() -> None:
    assert len(OFFLINE) >= 3, [e.where for e in OFFLINE]


@pytest.mark.parametrize("example", OFFLINE, ids=[e.where for e in OFFLINE])
def test_offline_example_prints_what_the_docs_show(
    example: Example, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TZ", os.environ.get("GARRISON_DOCS_TZ", "UTC"))
    main(example.argv[1:])
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert [line.rstrip() for line in out] == [line.rstrip() for line in example.output]


@pytest.mark.parametrize("example", ALL, ids=[e.where for e in ALL])
def test_every_example_parses(example: Example) -> None:
    build_parser(example.argv[1:]).parse_args(example.argv[1:])
