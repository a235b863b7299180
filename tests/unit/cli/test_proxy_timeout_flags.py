"""`garrison proxy`'s timeout flags: Kafka keeps its own idle and upstream defaults unless a
flag says otherwise, and a timeout that is not a positive number of seconds is a usage error."""

from __future__ import annotations

import pytest

from garrison.cli import proxy
from garrison.cli.main import build_parser
from garrison.policies.l7rules import L7Protocol

PROXY_ARGS = ["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
              "--dst-labels", "app=x", "-f", "/dev/null"]


def _timeouts(*flags: str) -> tuple[float, float, float, float]:
    argv = [*PROXY_ARGS, *flags]
    timeouts = proxy._Options(build_parser(argv).parse_args(argv)).config.timeouts
    kafka = timeouts.for_protocol(L7Protocol.KAFKA)
    return timeouts.idle, timeouts.upstream_reply, kafka.idle, kafka.upstream_reply


def test_kafka_keeps_its_defaults_when_no_flag_is_given() -> None:
    assert _timeouts() == (60.0, 60.0, 600.0, 330.0)


def test_a_given_idle_or_upstream_timeout_applies_to_every_protocol() -> None:
    assert _timeouts("--idle-timeout", "30", "--upstream-timeout", "900") == (
        30.0, 900.0, 30.0, 900.0)


@pytest.mark.parametrize("flag", ["--idle-timeout", "--upstream-timeout", "--connect-timeout",
                                  "--header-timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_a_timeout_that_is_no_positive_number_of_seconds_is_refused(flag: str, value: str) -> None:
    argv = [*PROXY_ARGS, flag, value]
    with pytest.raises(proxy.UsageError, match=f"^{flag} .*: a number of seconds above 0 and"):
        proxy._Options(build_parser(argv).parse_args(argv))
