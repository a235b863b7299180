"""The docs name only what the code has: commands, flags, metrics, runnable examples.

`test_docs_examples.py` runs the docs' `$ garrison ...` sessions; these hold the rest of what a
reader copies from README.md, docs/*.md and `--help`:

- every `garrison ...` command the docs show — in prose (`...`), in code blocks with or
  without `$ ` — names subcommands that exist and only flags that subcommand takes;
- every flag in the first column of a flag table (observe.md, ui.md) is a flag of garrison's;
- the Hubble flags observe.md says garrison does not take are refused by `observe`;
- the examples at the end of `--help` that need neither root nor an agent run and exit 0;
- operating.md's metrics table names every metric the agent and the proxy serve, and only
  those;
- every relative link between the pages reaches its file and heading;
- limits that cannot work (a negative timeout, a negative access-log size) are refused in one
  line before anything starts.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from garrison.agent.metrics import AgentMetrics
from garrison.cli.examples import EXAMPLES
from garrison.cli.main import build_parser, main
from garrison.proxy.metrics import ProxyMetrics

if TYPE_CHECKING:
    from garrison.agent.daemon import Agent

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSER = build_parser()


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def _commands() -> list[tuple[str, str]]:
    """(file:line, command text) of every `garrison ...` the docs show."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        in_block = False
        i = 0
        while i < len(lines):
            line, where = lines[i], f"{doc.name}:{i + 1}"
            if line.lstrip().startswith("```"):
                in_block = not in_block
            elif in_block:
                text = line.strip().removeprefix("$ ")
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i].strip()
                if text.startswith("garrison "):
                    found.append((where, text))
            else:
                found += [(where, m) for m in re.findall(r"`(garrison [^`]*)`", line)]
            i += 1
    return found


COMMANDS = _commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) > 100


@pytest.mark.parametrize(("where", "text"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_command_the_docs_show_exists_with_its_flags(where: str, text: str) -> None:
    text = re.split(r"\s+#|\s[|&>]|\s2>|\$\(", text)[0]  # a comment, a pipe or redirection
    words = text.replace("[", " ").replace("]", " ").split()
    parser, path = PARSER, ["garrison"]
    for word in words[1:]:
        children = _children(parser)
        if not children or word.startswith("-"):
            break
        names = word.split("|")  # `garrison endpoint list|get|labels|delete`
        if all(name in children for name in names):
            parser = children[names[0]]
            path.append(word)
            continue
        if word.isupper() or "..." in word:  # a placeholder: `garrison COMMAND --help`
            return
        pytest.fail(f"{where}: `{text}`: {' '.join(path)} has no subcommand {word!r} "
                    f"(it has {', '.join(sorted(children))})")
    known = _options(parser)
    for word in words[1:]:
        if word == "--":
            break  # `endpoint exec NAME -- CMD...`
        flag = word.split("=")[0].rstrip(",.;:)")
        if re.fullmatch(r"--?[a-zA-Z][\w-]*", flag) and not flag.endswith("-"):
            assert flag in known, f"{where}: `{text}`: {' '.join(path)} takes no {flag}"


def _table_flags(doc: str) -> list[str]:
    flags: list[str] = []
    for line in (ROOT / "docs" / doc).read_text().splitlines():
        if line.startswith("| `-"):
            first = line.split("|")[1]
            flags += re.findall(r"`(--?[a-z0-9][\w-]*)", first)
    return flags


@pytest.mark.parametrize("doc", ["observe.md", "ui.md"])
def test_every_flag_of_a_flag_table_exists(doc: str) -> None:
    flags = _table_flags(doc)
    assert len(flags) > 5
    command = "observe" if doc == "observe.md" else "ui"
    known = _options(_children(PARSER)[command])
    assert [f for f in flags if f not in known] == []


def test_observe_refuses_the_hubble_flags_observe_md_says_it_does_not_take() -> None:
    text = " ".join((ROOT / "docs" / "observe.md").read_text().split())
    said = re.search(r"Hubble's flags for what garrison does not record \(([^)]*)\)", text)
    assert said is not None
    flags = re.findall(r"`(--[a-z-]+)`", said.group(1))
    assert len(flags) >= 5
    observe = _options(_children(PARSER)["observe"])
    assert [f for f in flags if f in observe] == []


def _help_examples() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for path, lines in EXAMPLES.items():
        for line in lines:
            command = line.replace("\\\n", " ").split("  #")[0].strip().removesuffix("&")
            argv = shlex.split(command)
            if argv[0] != "garrison":
                continue
            words = argv[1:3]
            inputs: list[str] = []
            if words in (["policy", "validate"], ["policy", "trace"]):
                inputs = [a for a in argv[3:] if "/" in a and not a.startswith("-")]
            elif words[:1] in (["observe"], ["accesslog"]):
                inputs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--input-file"]
            if inputs and all((ROOT / p).exists() for p in inputs):
                found.append((f"{path or 'garrison'}: {command}", argv[1:]))
    return found


HELP_EXAMPLES = _help_examples()


def test_some_help_examples_run_offline() -> None:
    assert len(HELP_EXAMPLES) >= 3, HELP_EXAMPLES


@pytest.mark.parametrize(("what", "argv"), HELP_EXAMPLES, ids=[w for w, _ in HELP_EXAMPLES])
def test_help_example_runs(what: str, argv: list[str], monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 0, f"{what}: exit {rc}: {err}"


def _served_metrics() -> set[str]:
    """The metric families the agent's collector and the proxy's registry define."""
    agent = AgentMetrics(cast("Agent", None))  # describe() names them without reading the agent
    names = {(f.name, f.type) for f in agent.describe()}
    proxy = ProxyMetrics()
    proxy.set_destination_selected(True)
    names |= {(f.name, f.type) for f in proxy.registry.collect()}
    return {f"{name}_total" if kind == "counter" else name for name, kind in names}


def test_the_metrics_table_names_every_metric_served_and_only_those() -> None:
    text = (ROOT / "docs" / "operating.md").read_text()
    table = text[text.index("| metric | what |"):]
    table = table[:table.index("\n\n")]
    named = {m for row in table.splitlines()[2:]
             for m in re.findall(r"`(garrison_[a-z0-9_]+)", row.split(" | ")[0])}
    served = _served_metrics()
    assert sorted(served - named) == [], "served, not in docs/operating.md#metrics"
    assert sorted(named - served) == [], "in docs/operating.md#metrics, not served"


def _parsers(parser: argparse.ArgumentParser, path: str = "garrison") -> list[
        tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for name, child in _children(parser).items():
        found += _parsers(child, f"{path} {name}")
    return found


def test_every_option_says_what_it_is_not_only_its_default() -> None:
    bare = []
    for path, parser in _parsers(PARSER):
        for action in parser._actions:
            meaning = re.sub(r"\(?default:? %\(default\)s\)?|\(?default:? [^)]*\)?", "",
                             action.help or "").strip(" ;,.")
            if action.option_strings and action.help != argparse.SUPPRESS and not meaning:
                bare.append(f"{path} {'/'.join(action.option_strings)}: {action.help!r}")
    assert bare == []


@pytest.mark.parametrize("option", [
    ("--upstream-timeout", "-1"), ("--idle-timeout", "nan"), ("--header-timeout", "inf"),
    ("--connect-timeout", "0"), ("--max-connections", "0"),
    ("--access-log-backups", "-1"), ("--access-log-max-bytes", "-1")])
def test_the_proxy_refuses_a_limit_that_never_waits(option: tuple[str, str]) -> None:
    """`--upstream-timeout -1` started a proxy that spun a core on its first request, never
    answered it and ignored SIGTERM: a bad limit is a one-line usage error before listening."""
    done = subprocess.run(
        [sys.executable, "-m", "garrison.cli.main", "proxy", "--listen", "127.0.0.1:0",
         "--upstream", "127.0.0.1:1", "-f", "examples/starwars/sw_l3_l4_l7_policy.yaml",
         "--dst-labels", "org=empire,class=deathstar", "--workers", "1", *option],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith(f"garrison proxy: {option[0]} ")
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("option", [("--access-log-backups", "-1"),
                                    ("--access-log-max-bytes", "-5")])
def test_the_agent_refuses_a_negative_access_log_limit(option: tuple[str, str]) -> None:
    """`garrison agent --access-log-backups -1` started and died with a traceback
    (`max_bytes and backups must not be negative`); it is a usage error naming the flag."""
    from garrison.cli.agent_cmd import _config

    argv = ["agent", "--state-dir", "/nonexistent/hq", "--access-log", "/nonexistent/hq/a.log",
            *option]
    with pytest.raises(ValueError, match=f"^{option[0]} {option[1]}: give 0 "):
        _config(build_parser(argv).parse_args(argv))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_docs_reaches_its_file_and_heading() -> None:
    headings: dict[Path, set[str]] = {}
    for doc in DOCS:
        in_block, found = False, set()
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_block = not in_block
            elif not in_block and line.startswith("#"):
                found.add(_slug(line.lstrip("#")))
        headings[doc.resolve()] = found
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc.resolve()
            if not file.exists():
                broken.append(f"{doc.name}: {target}: no such file")
            elif anchor and file in headings and anchor not in headings[file]:
                broken.append(f"{doc.name}: {target}: no such heading")
    assert broken == []


def test_drop_reasons_read_in_the_docs_as_observe_prints_them() -> None:
    """troubleshooting.md said a deny rule's drop reads `Policy deny`; it reads as Hubble's
    `Policy denied by denylist`. Every "`Text` (`REASON`)" pair of the docs is checked."""
    from garrison.flows.record import DropReasonDesc

    pairs = {(text, name) for doc in DOCS for text, name in re.findall(
        r"`([A-Z][a-z][^`]*)` \(`([A-Z][A-Z_0-9]+)`\)", doc.read_text())}
    pairs = {(t, n) for t, n in pairs if n in DropReasonDesc.__members__}
    assert len(pairs) >= 2
    assert {(t, n) for t, n in pairs if DropReasonDesc[n].text != t} == set()
