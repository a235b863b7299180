"""`--help` of every command (issue 18, item 15): each option with its meaning and, where it
has one worth saying, its default; an example that parses; `garrison --version`."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison import __version__
from garrison.cli.main import build_parser

GARRISON = str(Path(sys.executable).with_name("garrison"))
SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def tree(parser: argparse.ArgumentParser, path: str = "garrison") -> Iterator[
        tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from tree(child, f"{path} {name}")


PARSERS = dict(tree(build_parser()))


def flat(text: str) -> str:
    return " ".join(text.split())


def shown_default(action: argparse.Action) -> bool:
    d = action.default
    return bool(action.option_strings) and d not in (None, False, argparse.SUPPRESS, [], "")


def test_every_command_is_covered() -> None:
    assert len(PARSERS) >= 35
    for name in ("garrison agent", "garrison proxy", "garrison observe", "garrison cni install",
                 "garrison completion", "garrison bpf ct list", "garrison policy trace"):
        assert name in PARSERS


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_every_option_has_its_meaning_and_default(path: str) -> None:
    parser = PARSERS[path]
    text = flat(parser.format_help())
    for action in parser._actions:
        if isinstance(action, SKIP):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{path}: {name} has no help text"
        shown = action.option_strings[-1] if action.option_strings else (
            action.metavar or action.dest)
        assert str(shown).split()[0] in text, f"{path}: {name} not in --help"
        if shown_default(action):
            formatter = parser._get_formatter()
            line = flat(formatter._expand_help(action))
            assert "default" in line.lower(), f"{path}: {name} does not say its default"
            assert line in text


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_every_command_shows_an_example_that_parses(path: str) -> None:
    parser = PARSERS[path]
    assert parser.epilog and parser.epilog.startswith("example"), f"{path}: no example"
    assert parser.epilog in parser.format_help()  # as written, lines kept
    commands = [line.strip() for line in parser.epilog.replace("\\\n", " ").splitlines()
                if line.strip().startswith("garrison")]
    assert commands, f"{path}: no garrison command among its examples"
    for command in commands:
        argv = []
        for token in shlex.split(command.split(" #", 1)[0]):
            if token in (">", "|", "&", "<") or token.startswith(">"):
                break
            argv.append(token)
        build_parser(argv[1:]).parse_args(argv[1:])  # SystemExit (exit 2) if it does not


def test_help_and_version_from_the_command_line() -> None:
    done = subprocess.run([GARRISON, "agent", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    text = flat(done.stdout)
    assert "--state-dir STATE_DIR where the agent keeps its endpoints, identities" in text
    assert "(default: /var/lib/garrison)" in text
    assert "example" in done.stdout and "garrison agent --cleanup" in done.stdout
    # a choice named "default" does not hide the default; a text that gives it is not repeated
    proxy = flat(PARSERS["garrison proxy"].format_help())
    assert "never: allow all (default: default)" in proxy
    assert "(0: never; default 100 MiB) --access-log-backups" in proxy
    done = subprocess.run([GARRISON, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"garrison {__version__}"
