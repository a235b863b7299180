"""The `garrison` command. Each subcommand lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from garrison import __version__

# Commands and the modules that define them. Only the modules of the command being run are
# imported: the agent and proxy stacks take most of a second to import, and commands such as
# `garrison endpoint exec` run many times in scripts.
AGENT_CLIENT = "garrison.cli.agentctl"
TOP_LEVEL = {
    "proxy": "garrison.cli.proxy",
    "agent": "garrison.cli.agent_cmd",
    "endpoint": AGENT_CLIENT,
    "identity": AGENT_CLIENT,
    "bpf": AGENT_CLIENT,
    "status": AGENT_CLIENT,
    "observe": "garrison.cli.observe",
    "accesslog": "garrison.cli.observe",
    "ui": "garrison.cli.ui_cmd",
    "cni": "garrison.cli.cni_cmd",
    "completion": "garrison.cli.completion",
}
POLICY_OFFLINE = {"validate": "garrison.cli.policy_validate", "trace": "garrison.cli.policy_trace"}


def _wanted(argv: Sequence[str]) -> tuple[str | None, str | None]:
    words = [a for a in argv if not a.startswith("-")]
    command = words[0] if words else None
    sub = words[1] if len(words) > 1 else None
    return command, sub


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (given argv) just what the command in argv needs."""
    command, sub = _wanted(argv) if argv is not None else (None, None)
    known = command in TOP_LEVEL or command == "policy"
    everything = not known

    parser = argparse.ArgumentParser(
        prog="garrison",
        description="Identity-aware L7 security sidecar: policy, datapath, proxy, flows. "
        "`garrison COMMAND --help` describes each command; docs/ holds the manual.",
    )
    parser.add_argument("--version", action="version", version=f"garrison {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs.required = True

    if everything or command == "policy":
        policy = subs.add_parser("policy", help="validate, trace and manage policies")
        policy_sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
        policy_sub.required = True
        offline = sub in POLICY_OFFLINE
        if everything or offline or sub is None or sub not in ("import", "delete", "get"):
            _module("garrison.cli.policy_validate").register(policy_sub)
            _module("garrison.cli.policy_trace").register(policy_sub)
        if everything or not offline:
            _module(AGENT_CLIENT).register_policy(policy_sub)
    if everything or command == "proxy":
        _module("garrison.cli.proxy").register(subs)
    if everything or TOP_LEVEL.get(command or "") == AGENT_CLIENT:
        client = _module(AGENT_CLIENT)
        client.register_endpoint(subs)
        client.register_others(subs)
    if everything or TOP_LEVEL.get(command or "") == "garrison.cli.observe":
        _module("garrison.cli.observe").register(subs)
    if everything or command == "agent":
        _module("garrison.cli.agent_cmd").register(subs)
    if everything or command == "ui":
        _module("garrison.cli.ui_cmd").register(subs)
    if everything or command == "cni":
        _module("garrison.cli.cni_cmd").register(subs)
    if everything or command == "completion":
        _module("garrison.cli.completion").register(subs)
    _finish(parser, "")
    return parser


# a help text that already gives the default: "(default: X)", "(default 15)", "text (default)",
# "0: never; default 100 MiB" (a choice named "default" is not one)
_NAMES_DEFAULT = re.compile(r"\(default\b|[;,]\s*default\b|%\(default\)")


class HelpFormatter(argparse.HelpFormatter):
    """Prose is wrapped to the terminal; a block with indented lines (the examples) keeps its
    lines. Each option's default follows its meaning unless the help names it already or there
    is none worth saying (unset, off, empty)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith(" ") for line in lines[1:]):
                blocks.append("\n".join(indent + line for line in lines))
            else:
                blocks.append(super()._fill_text(block, width, indent))
        return "\n\n".join(blocks)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or _NAMES_DEFAULT.search(text)
            or default is None
            or default is False
            or default == ""
            or default is argparse.SUPPRESS
            or default == []
            or isinstance(action, argparse._VersionAction | argparse._HelpAction)
        ):
            return text
        return f"{text} (default: %(default)s)"


def _finish(parser: argparse.ArgumentParser, path: str) -> None:
    """Every parser of the tree: the help formatter, and the command's examples as epilog."""
    from garrison.cli.examples import epilog

    parser.formatter_class = HelpFormatter
    if parser.epilog is None:
        parser.epilog = epilog(path)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                _finish(child, f"{path} {name}".strip())


def _module(name: str) -> Any:
    return importlib.import_module(name)


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_in)
    args = parser.parse_args(args_in)
    try:
        rc: int = args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
