"""A cluster of `garrison agent --kvstore etcd` nodes for the privileged cluster tests.

    netns <prefix>-ul-<pid>:  bridge <prefix>-br, etcd on <etcd_ip>:2379
        │ 198.19.0.0/24 underlay
    netns <prefix>-n<n>-<pid> (198.19.0.<node_base + n>): agent <prefix>-n<n>,
        pod CIDR 198.18.<pod_base + n>.0/24, its leg <prefix>-u<n> (peer <prefix>-p<n>)

Each test module gives its own prefix and addresses, so modules (and two runs of one, by the
pid) never meet. `running_cluster` removes exactly what it made, also on failure: the
agents' endpoints, the agents (stopped, cleaned up), their pins, etcd, the namespaces, and
the endpoint namespaces claimed through `Node.claim` that an agent left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from garrison.redirect import remove_pin_dir
from garrison.redirect.bpffs import BPFFS_MOUNT
from tests.etcd_server import EtcdServer, etcd_skip_reason
from tests.etcd_server import wait_for as wait_for  # the cluster tests take it from here
from tests.privileged.agent_harness import GARRISON, AgentEndpoint, NsAgent, ip

PID = os.getpid()
# Every cluster test module's `pytestmark`.
CLUSTER_MARKS = [
    pytest.mark.privileged,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
    pytest.mark.skipif(shutil.which("nsenter") is None, reason="needs nsenter (util-linux)"),
]


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    agent: NsAgent
    etcd: EtcdServer
    claimed: list[str] = field(default_factory=list)  # shared by the cluster's nodes

    def api(self, method: str, **params: Any) -> dict[str, Any]:
        from garrison.agent.api import AgentClient

        with AgentClient(self.agent.socket, timeout=30) as client:
            return client.call(method, **params)

    def cli_json(self, *args: str) -> Any:
        done = self.agent.cli(*args, "-o", "json")
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}\n{self.agent.log()}"
        return json.loads(done.stdout)

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`garrison ARGS` on this node (its network namespace), beside its agent."""
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", GARRISON, *args,
             "--socket", str(self.agent.socket)],
            capture_output=True, text=True, timeout=timeout,
        )

    def ipcache(self) -> dict[str, int]:
        return {e["prefix"]: int(e["identity"]) for e in self.api("BpfIpcacheList")["entries"]}

    def flows(self, *having: str, limit: int = 2000) -> list[dict[str, Any]]:
        """The agent's flow records whose JSON holds every one of `having`."""
        return [
            json.loads(f) for f in self.api("Flows", filter={}, limit=limit)["flows"]
            if all(h in f for h in having)
        ]

    def identity(self, endpoint: str) -> int:
        from garrison.agent.api import APIError

        for _ in range(50):
            try:
                return int(self.api("EndpointGet", name=endpoint)["identity"])
            except APIError as exc:
                # EndpointGet reads the record outside the agent's lock: in the middle of a
                # relabel it can meet the new identity before the resolver has it (a known
                # race of the handler, reported); asked again, it answers
                if "is not a known endpoint identity" not in str(exc):
                    raise
                time.sleep(0.02)
        raise AssertionError(f"EndpointGet {endpoint} kept failing")

    def namespace_labels(self, namespace: str) -> list[str]:
        return list(self.cli_json("namespace", "get", namespace)["labels"])

    def claim(self, endpoint: str) -> None:
        """Asserts no network namespace is named `endpoint` (host-wide) and notes it as the
        cluster's: if a failed test leaves it, the cluster's cleanup deletes it."""
        assert not Path(f"/run/netns/{endpoint}").exists(), f"{endpoint} exists: not ours"
        self.claimed.append(endpoint)


def add_endpoint(node: Node, name: str, labels: str, ip_: str, *args: str) -> AgentEndpoint:
    """`garrison endpoint add NAME --labels LABELS --ip IP ARGS` on `node`."""
    node.claim(name)
    data = node.cli_json("endpoint", "add", name, "--labels", labels, "--ip", ip_, *args)
    return AgentEndpoint(name, ip_, tuple(data["labels"]), int(data["identity"]),
                         str(data["host_veth"]))


def _netns_add(name: str, made: list[str]) -> None:
    assert not Path(f"/run/netns/{name}").exists(), f"{name} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", name], check=True)
    made.append(name)
    ip(name, "link", "set", "lo", "up")


@contextlib.contextmanager
def running_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    prefix: str,
    nodes: int,
    node_base: int,
    etcd_ip: str,
    lease_ttl_s: int,
    pod_base: int | None = None,
    extra_args: Sequence[str] = (),
    pod_cidrs: Sequence[str] = (),
) -> Iterator[dict[str, Node]]:
    """`nodes` agents on one etcd, by name (<prefix>-n1 ...), each started; see the module.
    `pod_cidrs`: node n's pod CIDR is the n-th (default: 198.18.<pod_base + n>.0/24)."""
    pod_base = node_base if pod_base is None else pod_base
    underlay = f"{prefix}-ul-{PID}"
    bridge = f"{prefix}-br"
    made: list[str] = []
    claimed: list[str] = []
    built: dict[str, Node] = {}
    etcd: EtcdServer | None = None
    pins: list[Path] = []
    try:
        _netns_add(underlay, made)
        ip(underlay, "link", "add", bridge, "type", "bridge")
        ip(underlay, "addr", "add", f"{etcd_ip}/24", "dev", bridge)
        ip(underlay, "link", "set", bridge, "up")
        etcd = EtcdServer(name=f"{prefix}-cluster", netns=underlay, host=etcd_ip,
                          data_prefix=f"{prefix}-etcd-")
        etcd.start()
        for n in range(1, nodes + 1):
            netns = f"{prefix}-n{n}-{PID}"
            _netns_add(netns, made)
            node_ip = f"198.19.0.{node_base + n}"
            pod_cidr = pod_cidrs[n - 1] if pod_cidrs else f"198.18.{pod_base + n}.0/24"
            leg = f"{prefix}-u{n}"
            # the node's leg on the underlay: in the node, its peer on the bridge
            ip(netns, "link", "add", leg, "type", "veth", "peer", "name", f"{prefix}-p{n}",
               "netns", underlay)
            ip(netns, "addr", "add", f"{node_ip}/24", "dev", leg)
            ip(netns, "link", "set", leg, "up")
            ip(underlay, "link", "set", f"{prefix}-p{n}", "master", bridge, "up")
            subprocess.run(
                ["ip", "netns", "exec", netns, "sysctl", "-qw",
                 "net.ipv4.ip_forward=1", f"net.ipv4.conf.{leg}.forwarding=1"],
                check=True,
            )
            pin = BPFFS_MOUNT / f"{prefix}-cluster-{n}-{PID}"
            pins.append(pin)
            agent = NsAgent(netns, tmp_path_factory.mktemp(f"{prefix}-n{n}"), pin)
            agent.extra = [
                "--kvstore", "etcd", "--kvstore-endpoints", etcd.url,
                "--node-name", f"{prefix}-n{n}", "--pod-cidr", pod_cidr,
                "--node-ip", node_ip, "--kvstore-lease-ttl", str(lease_ttl_s), *extra_args,
            ]
            node = Node(f"{prefix}-n{n}", netns, node_ip, pod_cidr, agent, etcd, claimed)
            built[node.name] = node
            agent.start()
        yield built
    finally:
        for node in built.values():
            if node.agent.proc is not None and node.agent.proc.poll() is None:
                with contextlib.suppress(Exception):
                    for endpoint in node.api("EndpointList")["endpoints"]:
                        node.api("EndpointDelete", name=endpoint["name"])
                node.agent.stop()
            node.agent.cleanup()
        for pin in pins:
            if pin.exists():
                remove_pin_dir(pin)
        if etcd is not None:
            etcd.close()
        for name in reversed(made):  # ours: made above
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["ip", "netns", "delete", name], check=True)
        for name in claimed:
            # endpoint namespaces the agents made and did not remove (a failed test)
            if Path(f"/run/netns/{name}").exists():
                subprocess.run(["ip", "netns", "delete", name], check=False)
