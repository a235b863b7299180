"""`garrison completion bash|zsh`: a shell completion script for every command and option,
generated from the command's own argument parser (shtab), so it never lags behind it.

    source <(garrison completion bash)                       # this shell
    garrison completion bash > /etc/bash_completion.d/garrison
    eval "$(garrison completion zsh)"                        # zsh, this shell
    garrison completion zsh > "${fpath[1]}/_garrison"        # zsh, from the next compinit
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PATH_WORDS = ("PATH", "FILE", "POLICY", "DIR")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh)",
        description="Print a completion script for the garrison command: subcommands, "
        "options and their choices, file names where a path is asked for.",
    )
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shtab

    from garrison.cli.main import build_parser

    parser = build_parser()  # the whole tree, every command's module imported
    _complete_paths(parser, shtab.FILE)
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    sys.stdout.write("\n")
    return 0


def _complete_paths(parser: argparse.ArgumentParser, files: Any) -> None:
    """File names for the options and arguments that take a path."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _complete_paths(child, files)
            continue
        words = f"{action.metavar or ''} {action.dest}".upper()
        if action.type is Path or any(word in words for word in PATH_WORDS):
            action.complete = files  # type: ignore[attr-defined]  # shtab reads it
