"""The `garrison` command. Each subcommand lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from garrison import __version__
from garrison.cli import agent_cmd, agentctl, policy_trace, policy_validate
from garrison.cli import proxy as proxy_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="garrison",
        description="Identity-aware L7 security sidecar: policy, datapath, proxy, flows.",
    )
    parser.add_argument("--version", action="version", version=f"garrison {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    policy = sub.add_parser("policy", help="validate, trace and manage policies")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    policy_sub.required = True
    policy_validate.register(policy_sub)
    policy_trace.register(policy_sub)
    proxy_command.register(sub)
    agentctl.register_policy(policy_sub)
    agentctl.register_endpoint(sub)
    agentctl.register_others(sub)
    agent_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
