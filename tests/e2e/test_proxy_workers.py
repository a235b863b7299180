"""`garrison proxy --workers 2`, the real CLI process: both workers serve (the kernel spreads
connections over their SO_REUSEPORT listeners), a worker killed with SIGKILL is restarted and
traffic goes on, SIGHUP reaches both, the access log holds only whole JSON lines under
concurrent load from both, /metrics is the sum of both, SIGTERM stops them all."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.flows.record import FlowRecord, Verdict
from tests.e2e.conftest import (
    DEATHSTAR_LABELS,
    STARWARS,
    TIEFIGHTER,
    TIEFIGHTER_PEER,
    Address,
    ProxyHandle,
    start_proxy,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

L7_POLICY = STARWARS / "sw_l3_l4_l7_policy.yaml"
_PIDS = re.compile(r"2 workers \(pids (\d+) (\d+)\)")
_RESTARTED = re.compile(r"worker (\d) restarted \(pid (\d+)\)")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, deathstar: Address) -> Iterator[ProxyHandle]:
    log_dir = tmp_path_factory.mktemp("gw-workers")
    policy = log_dir / "policy.yaml"
    policy.write_text(L7_POLICY.read_text())
    handle = start_proxy(
        log_dir, protocol="http", policy_files=[policy], dst_labels=DEATHSTAR_LABELS,
        upstream=deathstar, peers=[TIEFIGHTER_PEER], dport=80, metrics=True, verbose=False,
        extra_args=["--workers", "2"],
    )
    try:
        yield handle
    finally:
        handle.stop()


def land(proxy: ProxyHandle, path: str = "/v1/request-landing") -> int:
    """One POST on a new connection from the tiefighter: the status."""
    conn = http.client.HTTPConnection(*proxy.address, timeout=10,
                                      source_address=(TIEFIGHTER, 0))
    try:
        conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def metrics(proxy: ProxyHandle) -> dict[str, float]:
    assert proxy.metrics is not None
    url = f"http://{proxy.metrics[0]}:{proxy.metrics[1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def accepted(proxy: ProxyHandle, worker: int) -> float:
    return metrics(proxy).get(
        f'garrison_proxy_accepted_connections_total{{worker="{worker}"}}', 0.0
    )


FORWARDED = ('garrison_policy_l7_total{direction="ingress",proxy_type="http",'
             'rule="forwarded"}')


def worker_pids(proxy: ProxyHandle) -> dict[int, int]:
    """Worker index → its current pid, from what the parent said."""
    stderr = proxy.stderr()
    match = _PIDS.search(stderr)
    assert match, stderr
    pids = {0: int(match.group(1)), 1: int(match.group(2))}
    for index, pid in _RESTARTED.findall(stderr):
        pids[int(index)] = int(pid)
    return pids


def test_both_workers_serve_and_metrics_are_their_sum(proxy: ProxyHandle) -> None:
    before = metrics(proxy)
    assert [land(proxy) for _ in range(40)] == [200] * 40
    after = metrics(proxy)
    took = [
        after[f'garrison_proxy_accepted_connections_total{{worker="{w}"}}']
        - before.get(f'garrison_proxy_accepted_connections_total{{worker="{w}"}}', 0.0)
        for w in (0, 1)
    ]
    assert sum(took) == 40
    assert min(took) > 0, f"the kernel gave every connection to one worker: {took}"
    # Counted by two processes, served as one sum.
    assert after[FORWARDED] - before.get(FORWARDED, 0.0) == 40
    assert after["garrison_proxy_destination_selected"] == 1.0


def test_the_access_log_has_only_whole_lines_under_concurrent_load(proxy: ProxyHandle) -> None:
    start = len(proxy.access_log.read_bytes())
    statuses: list[int] = []

    def client() -> None:
        for n in range(25):
            statuses.append(land(proxy, "/v1/request-landing" if n % 5 else "/v1/exhaust-port"))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [200, 403] and len(statuses) == 200

    def complete() -> bool:  # 160 allowed (request + response), 40 denied (request + answer)
        return proxy.access_log.read_bytes()[start:].count(b"\n") >= 160 * 2 + 40 * 2

    wait_until(complete, "every record in the access log", 10)
    data = proxy.access_log.read_bytes()[start:]
    assert data.endswith(b"\n")
    records = [FlowRecord.from_json(line) for line in data.decode().splitlines()]
    assert all(json.loads(line) for line in data.decode().splitlines())  # whole, each
    assert len(records) == 400
    assert sum(r.verdict is Verdict.DROPPED for r in records) == 80


def test_sighup_reaches_both_workers(proxy: ProxyHandle) -> None:
    def applied() -> list[str]:  # said by the parent once every worker applied it
        return re.findall(r"policy revision (\d+) applied \(2 workers\)", proxy.stderr())

    before = applied()
    os.kill(proxy.pid, signal.SIGHUP)  # the files did not change: only SIGHUP reloads
    wait_until(lambda: len(applied()) == len(before) + 1, "both workers reloading", 10)
    assert int(applied()[-1]) == (int(before[-1]) if before else 1) + 1


def test_a_killed_worker_is_restarted_and_traffic_goes_on(proxy: ProxyHandle) -> None:
    pids = worker_pids(proxy)
    os.kill(pids[1], signal.SIGKILL)
    wait_until(lambda: worker_pids(proxy)[1] != pids[1], "worker 1 restarted", 10)
    assert "was killed by SIGKILL; restarting it in" in proxy.stderr()
    # Connections the kernel gave the dead listener were reset; new ones are all served,
    # and the new worker 1 takes its share.
    before = accepted(proxy, 1)
    deadline = time.monotonic() + 10
    while accepted(proxy, 1) == before and time.monotonic() < deadline:
        assert [land(proxy) for _ in range(10)] == [200] * 10
    assert accepted(proxy, 1) > before
    assert worker_pids(proxy)[0] == pids[0]  # the other one was left alone


def test_a_policy_file_change_reaches_both_workers(proxy: ProxyHandle) -> None:
    policy = Path(proxy.argv[proxy.argv.index("-f") + 1])
    original = policy.read_text()
    try:
        policy.write_text(original.replace('path: "/v1/request-landing"', 'path: "/v1/none"'))
        wait_until(lambda: land(proxy) == 403, "the new policy", 15)
        time.sleep(1.5)  # both workers poll the files every second
        before = (accepted(proxy, 0), accepted(proxy, 1))
        assert [land(proxy) for _ in range(30)] == [403] * 30
        after = (accepted(proxy, 0), accepted(proxy, 1))
        assert after[0] > before[0] and after[1] > before[1]  # denied by both
        # A worker started after the change enforces it too (forked with the policy in force).
        pids = worker_pids(proxy)
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: worker_pids(proxy)[0] != pids[0], "worker 0 restarted", 10)
        time.sleep(0.3)
        before = (accepted(proxy, 0), accepted(proxy, 1))
        assert [land(proxy) for _ in range(30)] == [403] * 30
        assert accepted(proxy, 0) > before[0]
    finally:
        policy.write_text(original)
        wait_until(lambda: all(land(proxy) == 200 for _ in range(20)), "the old policy", 15)


def test_sigterm_stops_every_worker(proxy: ProxyHandle) -> None:
    pids = worker_pids(proxy)
    assert proxy.stop() == 0

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(lambda: all(gone(pid) for pid in pids.values()), "the workers gone", 10)
    assert "stopped" in proxy.stderr()


def test_workers_do_not_outlive_a_killed_parent(
    tmp_path: Path, deathstar: Address
) -> None:
    before = set(Path(tempfile.gettempdir()).glob("garrison-proxy-metrics-*"))
    handle = start_proxy(
        tmp_path, protocol="http", policy_files=[L7_POLICY], dst_labels=DEATHSTAR_LABELS,
        upstream=deathstar, peers=[TIEFIGHTER_PEER], dport=80, verbose=False,
        extra_args=["--workers", "2"], name="gw-orphans",
    )
    try:
        pids = worker_pids(handle)
        made = set(Path(tempfile.gettempdir()).glob("garrison-proxy-metrics-*")) - before
        os.kill(handle.pid, signal.SIGKILL)

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        # Not reaped by us (their parent is gone): init reaps them once they exit.
        wait_until(lambda: all(gone(pid) for pid in pids.values()), "the workers gone", 10)
        # and the last of them removed the run's metrics directory the parent could not
        assert made, "the run made no metrics directory to look for"
        wait_until(lambda: not any(d.exists() for d in made), "the metrics directory removed", 5)
    finally:
        handle.stop()
