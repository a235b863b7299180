"""The agent's Prometheus metrics for the datapath and the agent (issue 18, item 12), scraped
with curl from `garrison agent --metrics` after real traffic: a datagram the policy drops, a
connection it allows, a policy that does not validate.

The agent runs in a network namespace of its own (`gm-metrics-<pid>`), so its metrics port,
proxy ports and steering rule are the test's alone; its endpoints are `gm-web` and
`gm-client` (198.18.77.0/24), made by the agent and removed by `garrison agent --cleanup`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from garrison.redirect import ensure_bpffs, remove_pin_dir
from garrison.redirect.bpffs import BPFFS_MOUNT
from tests.privileged.agent_harness import NsAgent, ip, ns_socket

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")

METRICS_PORT = 9963  # inside the agent's own namespace: nobody else listens there
WEB, CLIENT = "gm-web", "gm-client"
WEB_IP, CLIENT_IP = "198.18.77.10", "198.18.77.11"

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: gm-web
spec:
  endpointSelector:
    matchLabels:
      app: gm-web
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: gm-client
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"""


@pytest.fixture(name="agent")
def fixture_agent(tmp_path: Path) -> Iterator[NsAgent]:
    if subprocess.run(["which", "nsenter"], capture_output=True).returncode != 0:
        pytest.skip("needs nsenter (util-linux)")
    ensure_bpffs()
    name = f"gm-metrics-{os.getpid()}"
    for ns in (name, WEB, CLIENT):
        assert not Path(f"/run/netns/{ns}").exists(), f"{ns} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", name], check=True)
    agent = NsAgent(name, tmp_path, BPFFS_MOUNT / f"gm-metrics-{os.getpid()}")
    agent.extra = ["--metrics", f"127.0.0.1:{METRICS_PORT}"]
    try:
        ip(name, "link", "set", "lo", "up")
        agent.start()
        yield agent
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            assert agent.stop() == 0, agent.log()
        agent.cleanup()
        for ns in (WEB, CLIENT):  # made by the agent for this test, if cleanup left them
            if Path(f"/run/netns/{ns}").exists():
                subprocess.run(["ip", "netns", "delete", ns], check=False)
        if agent.pin_root.exists():
            remove_pin_dir(agent.pin_root)
        subprocess.run(["ip", "netns", "delete", name], check=True)  # ours: made above


def scrape(agent: NsAgent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the agent's /metrics, as curl in the agent's namespace fetched it."""
    text = subprocess.run(
        ["nsenter", f"--net=/run/netns/{agent.netns}", "curl", "-sf",
         f"http://127.0.0.1:{METRICS_PORT}/metrics"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_sample(agent: NsAgent, name: str, value: float, **labels: str) -> dict[
        tuple[str, tuple[tuple[str, str], ...]], float]:
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(agent)
        if sample(samples, name, **labels) == value:
            return samples
        assert time.monotonic() < deadline, (name, labels, sample(samples, name, **labels),
                                             sorted(k for k in samples if k[0] == name))
        time.sleep(0.2)


def test_drops_verdicts_endpoints_policy_and_map_pressure(agent: NsAgent,
                                                          tmp_path: Path) -> None:
    before = scrape(agent)
    assert sample(before, "garrison_endpoint_count") == 0
    assert sample(before, "garrison_policy") == 0
    assert sample(before, "garrison_identity_count", type="reserved") is not None
    assert not [k for k in before if k[0] == "garrison_drop_count_total"]
    for web_or_client, addr, labels in ((WEB, WEB_IP, "app=gm-web"),
                                        (CLIENT, CLIENT_IP, "app=gm-client")):
        done = agent.cli("endpoint", "add", web_or_client, "--labels", labels, "--ip", addr)
        assert done.returncode == 0, done.stderr
    policy = tmp_path / "gm-web.yaml"
    policy.write_text(POLICY)
    done = agent.cli("policy", "import", str(policy))
    assert done.returncode == 0, done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace('port: "8080"', 'port: "web_api"'))  # not a port name
    assert agent.cli("policy", "import", str(bad)).returncode != 0

    # one UDP datagram the web's ingress policy does not allow: one drop, one verdict
    with contextlib.closing(ns_socket(CLIENT, socket.SOCK_DGRAM)) as udp:
        udp.sendto(b"x" * 100, (WEB_IP, 5353))
    samples = wait_sample(agent, "garrison_drop_count_total", 1,
                          reason="POLICY_DENIED", direction="INGRESS")
    assert sample(samples, "garrison_drop_bytes_total",
                  reason="POLICY_DENIED", direction="INGRESS") == 142  # Ethernet + IPv4 + UDP + 100
    assert sample(samples, "garrison_policy_verdict_total",
                  direction="INGRESS", match="none", action="denied") == 1

    # a TCP connection it allows: one allowed verdict (its first packet), nothing dropped
    with contextlib.closing(ns_socket(WEB)) as listener:
        listener.bind((WEB_IP, 8080))  # the socket lives in the web namespace
        listener.listen()
        with contextlib.closing(ns_socket(CLIENT)) as conn:
            conn.settimeout(5)
            conn.connect((WEB_IP, 8080))
            conn.sendall(b"hello")
            accepted, _ = listener.accept()
            accepted.close()
    samples = wait_sample(agent, "garrison_policy_verdict_total", 1,
                          direction="INGRESS", match="L3-L4", action="allowed")
    assert sample(samples, "garrison_drop_count_total",
                  reason="POLICY_DENIED", direction="INGRESS") == 1
    forwarded = sample(samples, "garrison_forward_count_total", direction="EGRESS")
    assert forwarded is not None and forwarded >= 3  # SYN, ACK, data at least

    assert sample(samples, "garrison_endpoint_count") == 2
    assert sample(samples, "garrison_endpoint_state", endpoint_state="ready") == 2
    assert sample(samples, "garrison_policy") == 1
    assert sample(samples, "garrison_policy_change_total", outcome="success") == 1
    assert sample(samples, "garrison_policy_change_total", outcome="failure") == 1
    status = agent.cli("status", "-o", "json")
    revision = json.loads(status.stdout)["policy_revision"]
    assert sample(samples, "garrison_policy_max_revision") == revision
    assert sample(samples, "garrison_identity_count", type="cluster_local") == 2
    for name in ("gar_endpoints", "gar_ipcache", "gar_policy", "gar_ct"):
        value = sample(samples, "garrison_bpf_map_pressure", map_name=name)
        assert value is not None and 0 < value < 0.01, (name, value)
    # the proxy's metrics are still served beside them
    assert sample(samples, "garrison_proxy_connections", proxy_type="http") == 0
    assert agent.stop(signal.SIGTERM) == 0
    assert "Traceback" not in agent.log(), agent.log()
