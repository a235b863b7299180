"""A policy that does not select the proxied destination must never pass silently: a typo in
`--dst-labels` would otherwise turn the proxy into an allow-all (issue 18, item 1)."""

from __future__ import annotations

import subprocess
import sys
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
    exchange,
    request,
    wait_until,
)

pytestmark = pytest.mark.e2e

L7_POLICY = STARWARS / "sw_l3_l4_l7_policy.yaml"
TYPO = "org=empire,class=deathstr"


def _selected_gauge(address: Address) -> float | None:
    url = f"http://{address[0]}:{address[1]}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "garrison_proxy_destination_selected":
                return sample.value
    return None


def test_unselected_destination_refuses_to_start(deathstar: Address) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "garrison.cli.main", "proxy", "--listen", "127.0.0.1:0",
         "--upstream", f"{deathstar[0]}:{deathstar[1]}", "--dport", "80",
         "-f", str(L7_POLICY), "--dst-labels", TYPO, "--peer", TIEFIGHTER_PEER],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    [line] = lines
    assert line.startswith("garrison proxy: not started: ")
    assert TYPO in line and str(L7_POLICY) in line  # the labels and the policy files
    assert "--allow-unselected" in line and "--dst-labels" in line  # the fix


def test_allow_unselected_warns_and_shows_in_metrics(
    proxy_runner: ProxyRunner, deathstar: Address
) -> None:
    proxy = proxy_runner(protocol="http", policy_files=[L7_POLICY], dst_labels=TYPO,
                         peers=[TIEFIGHTER_PEER], upstream=deathstar, dport=80, metrics=True,
                         extra_args=["--allow-unselected"])
    warning = [line for line in proxy.stderr().splitlines() if "WARNING" in line]
    assert len(warning) == 1 and TYPO in warning[0] and str(L7_POLICY) in warning[0]
    assert "every request would be forwarded" in warning[0]
    assert proxy.metrics is not None
    assert _selected_gauge(proxy.metrics) == 0
    # what the user asked for: nothing enforced (the deathstar app answers the PUT itself)
    [answer] = exchange(proxy.address, TIEFIGHTER, request("PUT", "/v1/exhaust-port"), ["PUT"])
    assert answer.status == 503


def test_reload_to_an_unselecting_policy_is_refused_and_said(
    proxy_runner: ProxyRunner, deathstar: Address, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(L7_POLICY.read_text())
    proxy = proxy_runner(protocol="http", policy_files=[policy], dst_labels=DEATHSTAR_LABELS,
                         peers=[TIEFIGHTER_PEER], upstream=deathstar, dport=80, metrics=True)
    assert proxy.metrics is not None
    assert _selected_gauge(proxy.metrics) == 1
    # An edit that makes the policy select something else: refused, the old one stays.
    policy.write_text(L7_POLICY.read_text().replace("class: deathstar", "class: deathstr"))
    proxy.reload()
    wait_until(lambda: "policy reload refused" in proxy.stderr(), "refusal", 10, proxy.process)
    assert f"no policy in {policy} selects the destination" in proxy.stderr()
    [answer] = exchange(proxy.address, TIEFIGHTER, request("PUT", "/v1/exhaust-port"), ["PUT"])
    assert answer.status == 403
    assert _selected_gauge(proxy.metrics) == 1


def test_access_log_directory_is_created(
    proxy_runner: ProxyRunner, deathstar: Address, tmp_path: Path
) -> None:
    """A --access-log in a directory that does not exist yet: made, said, and written to."""
    log_dir = tmp_path / "new" / "logs"
    access_log = log_dir / "access.log"
    proxy = proxy_runner(protocol="http", policy_files=[L7_POLICY], dst_labels=DEATHSTAR_LABELS,
                         peers=[TIEFIGHTER_PEER], upstream=deathstar, dport=80,
                         extra_args=["--access-log", str(access_log)])
    assert f"created the access log's directory {log_dir}" in proxy.stderr()
    [answer] = exchange(proxy.address, TIEFIGHTER, request("PUT", "/v1/exhaust-port"), ["PUT"])
    assert answer.status == 403
    wait_until(lambda: access_log.exists() and access_log.stat().st_size > 0, "access log", 5,
               proxy.process)
