"""`--redact-query-param` reaches the records' redaction on both commands that run a proxy."""

from __future__ import annotations

from garrison.cli import agent_cmd, proxy
from garrison.cli.main import build_parser

PROXY_ARGS = ["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
              "--dst-labels", "app=x", "-f", "/dev/null"]


def test_proxy_flag_is_repeatable() -> None:
    argv = [*PROXY_ARGS, "--redact-query-param", "token", "--redact-query-param", "sig"]
    args = build_parser(argv).parse_args(argv)
    assert proxy._Options(args).config.redact_query_params == ("token", "sig")


def test_proxy_default_redacts_no_parameter() -> None:
    args = build_parser(PROXY_ARGS).parse_args(PROXY_ARGS)
    assert proxy._Options(args).config.redact_query_params == ()


def test_agent_flag_reaches_its_config() -> None:
    argv = ["agent", "--redact-query-param", "token"]
    args = build_parser(argv).parse_args(argv)
    assert agent_cmd._config(args).redact_query_params == ("token",)
