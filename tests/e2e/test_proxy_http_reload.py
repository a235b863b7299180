"""Policy reload without dropping connections (SIGHUP and file changes), refusal of an invalid
policy, access-log rotation and the metrics endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import (
    DEATHSTAR_LABELS,
    STARWARS,
    TIEFIGHTER,
    TIEFIGHTER_PEER,
    Address,
    ProxyRunner,
    Reader,
    connect,
    exchange,
    request,
    wait_until,
)

pytestmark = pytest.mark.e2e

L7_POLICY = STARWARS / "sw_l3_l4_l7_policy.yaml"
WITH_EXHAUST = L7_POLICY.read_text().replace(
    '          path: "/v1/request-landing"\n',
    '          path: "/v1/request-landing"\n        - method: "PUT"\n'
    '          path: "/v1/exhaust-port"\n',
)


def test_reload_swaps_policy_without_dropping_a_keep_alive_connection(
    proxy_runner: ProxyRunner, deathstar: Address, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(L7_POLICY.read_text())
    proxy = proxy_runner(protocol="http", policy_files=[policy], dst_labels=DEATHSTAR_LABELS,
                         peers=[TIEFIGHTER_PEER], upstream=deathstar, dport=80)
    with connect(proxy.address, TIEFIGHTER) as sock:
        reader = Reader(sock)
        local = sock.getsockname()

        def ask(method: str, path: str) -> int:
            sock.sendall(request(method, path))
            [answer] = reader.read([method])
            return answer.status

        assert ask("PUT", "/v1/exhaust-port") == 403
        assert ask("POST", "/v1/request-landing") == 200

        # SIGHUP: the same connection's next request is matched against the new policy.
        policy.write_text(WITH_EXHAUST)
        proxy.reload()
        wait_until(lambda: "policy revision 2 applied" in proxy.stderr(), "reload", 10,
                   proxy.process)
        assert ask("PUT", "/v1/exhaust-port") == 503  # the app's own answer
        assert sock.getsockname() == local and not reader.closed

        # An invalid policy, noticed by polling (no signal): refused, revision 2 stays.
        policy.write_text(WITH_EXHAUST.replace('path: "/v1/exhaust-port"', 'path: "(["'))
        wait_until(lambda: "policy reload refused" in proxy.stderr(), "refusal", 10,
                   proxy.process)
        assert f"{policy}:" in proxy.stderr()  # file:line of the problem
        assert ask("PUT", "/v1/exhaust-port") == 503
        assert ask("POST", "/v1/request-landing") == 200

        # Back to the original by a file change: tightened again for this connection too.
        policy.write_text(L7_POLICY.read_text())
        os.utime(policy, ns=(1, 1))  # a different mtime even within the same clock tick
        wait_until(lambda: "policy revision 3 applied" in proxy.stderr(), "reload", 10,
                   proxy.process)
        assert ask("PUT", "/v1/exhaust-port") == 403
        assert sock.getsockname() == local and not reader.at_eof(timeout=0.1)
    [fresh] = exchange(proxy.address, TIEFIGHTER, request("PUT", "/v1/exhaust-port"), ["PUT"])
    assert fresh.status == 403


def test_metrics_and_access_log_rotation(
    proxy_runner: ProxyRunner, deathstar: Address
) -> None:
    proxy = proxy_runner(
        protocol="http", policy_files=[L7_POLICY], dst_labels=DEATHSTAR_LABELS,
        peers=[TIEFIGHTER_PEER], upstream=deathstar, dport=80, metrics=True, verbose=False,
        extra_args=["--access-log-max-bytes", "20000", "--access-log-backups", "2"],
    )
    raw = (request("POST", "/v1/request-landing") + request("PUT", "/v1/exhaust-port")) * 20
    answers = exchange(proxy.address, TIEFIGHTER, raw, ["POST", "PUT"] * 20)
    assert [a.status for a in answers] == [200, 403] * 20

    # 80 records (request + response each) of ~1 KB: rotated into backups, no line lost.
    def lines() -> list[str]:
        out = []
        for path in (proxy.access_log, Path(f"{proxy.access_log}.1"),
                     Path(f"{proxy.access_log}.2")):
            # a rotation renames the files one after the other: a name can be missing for a
            # moment (the count is then short, and wait_until asks again)
            with contextlib.suppress(FileNotFoundError):
                out += path.read_text().splitlines()
        return out

    wait_until(lambda: Path(f"{proxy.access_log}.1").exists(), "rotation", 5, proxy.process)
    wait_until(lambda: len(lines()) >= 40, "records", 5, proxy.process)
    for line in lines():
        assert json.loads(line)["Type"] == "L7"  # whole lines only

    assert proxy.metrics is not None
    url = f"http://{proxy.metrics[0]}:{proxy.metrics[1]}/metrics"

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def key(rule: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return ("garrison_policy_l7_total",
                (("direction", "ingress"), ("proxy_type", "http"), ("rule", rule)))

    wait_until(lambda: samples().get(key("denied")) == 20, "metrics", 5, proxy.process)
    values = samples()
    assert values[key("received")] == 40
    assert values[key("forwarded")] == 20
    assert values[key("parse_errors")] == 0
    assert values[("garrison_proxy_upstream_reply_seconds_count",
                   (("protocol", "http"), ("scope", "headers")))] == 20
    assert values[("garrison_proxy_flows_total", (("verdict", "DROPPED"),))] == 40
    assert values[("garrison_proxy_connections", (("proxy_type", "http"),))] == 0
