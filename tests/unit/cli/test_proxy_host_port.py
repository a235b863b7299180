"""`garrison proxy` logs where it listens and its upstream as a URL writes them: an IPv6
address in brackets, so `[::1]:8080` is not read as host `::1:8080`."""

from __future__ import annotations

from garrison.cli.proxy import _host_port


def test_ipv4_and_names_are_host_colon_port() -> None:
    assert _host_port("127.0.0.1", 8080) == "127.0.0.1:8080"
    assert _host_port("deathstar", 80) == "deathstar:80"


def test_ipv6_is_bracketed() -> None:
    assert _host_port("::1", 8080) == "[::1]:8080"
    assert _host_port("fd00::1", 9092) == "[fd00::1]:9092"
