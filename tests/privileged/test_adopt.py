"""Adopting network namespaces garrison did not create: `garrison endpoint add NAME --netns
PATH|--pid PID [--interface IF]`.

A hand-made namespace with its own veth to the host, a second veth pair inside, addresses and
routes (and a host route of its own) is snapshotted with `ip -d link/addr/route` inside and on
the host side before and after each step: adopting its veth and deleting the endpoint, adopting
by PID, adding garrison's own veth beside it, and two failed adoptions (an interface that is not
a veth to the host — the `File exists` case that used to delete the namespace — and a failure
after garrison had created its veth) must all leave it exactly as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentProcess,
    fixture_agent,
    tc_filters,
)

pytestmark = pytest.mark.privileged


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# proxy ports of this module's own (the harness's last --proxy-ports wins): suites of other
# modules may run at the same time
_PORTS = _free_ports(3)
AGENT_ARGS = ("--proxy-ports", f"http={_PORTS[0]},grpc={_PORTS[1]},kafka={_PORTS[2]}")

NS = f"gc-adp{os.getpid() % 100000}"
HOST_IF = f"gcah{os.getpid() % 100000}"
NS_PATH = f"/run/netns/{NS}"
ADDR = "198.18.77.10"
LONG_NAME = "gc-adopted-endpoint-with-a-long-name"  # > 15: interface names come from a hash

# IPv6 off on both sides: its link-local addresses and routes appear (and lose "tentative")
# on their own timer, which would make two snapshots differ with nothing done
SETUP = [
    f"ip netns add {NS}",
    f"ip netns exec {NS} sysctl -qw net.ipv6.conf.all.disable_ipv6=1",
    f"ip netns exec {NS} sysctl -qw net.ipv6.conf.default.disable_ipv6=1",
    f"ip -n {NS} link add eth0 type veth peer name {HOST_IF} netns 1",
    f"sysctl -qw net.ipv6.conf.{HOST_IF}.disable_ipv6=1",
    f"ip -n {NS} link add in0 type veth peer name in1",
    f"ip -n {NS} link set lo up",
    f"ip -n {NS} link set eth0 up",
    f"ip -n {NS} link set in0 up",
    f"ip -n {NS} addr add {ADDR}/24 dev eth0",
    f"ip -n {NS} addr add 198.18.78.1/24 dev in0",
    f"ip -n {NS} route add 198.18.90.0/24 via 198.18.77.1 dev eth0",
    f"ip link set {HOST_IF} up",
    f"ip route add 198.19.100.50/32 dev {HOST_IF}",
]


def sh(cmd: str) -> str:
    return subprocess.run(cmd.split(), capture_output=True, text=True, check=True).stdout


def snapshot() -> dict[str, str]:
    return {
        "ns link": sh(f"ip -n {NS} -d link show"),
        "ns addr": sh(f"ip -n {NS} addr show"),
        "ns route": sh(f"ip -n {NS} route show table all"),
        "host link": sh(f"ip -d link show dev {HOST_IF}"),
        "host addr": sh(f"ip addr show dev {HOST_IF}"),
        "host routes": sh(f"ip route show dev {HOST_IF}"),
        "host qdisc": sh(f"tc qdisc show dev {HOST_IF}"),
    }


@pytest.fixture(name="handmade")
def fixture_handmade() -> Iterator[dict[str, str]]:
    assert not os.path.exists(NS_PATH), f"{NS} is left from an earlier run: ip netns del {NS}"
    try:
        for cmd in SETUP:
            sh(cmd)
        # eth0's carrier comes up a moment after its host peer does: snapshot once settled
        deadline = time.monotonic() + 5
        while "state UP" not in sh(f"ip -n {NS} link show dev eth0"):
            assert time.monotonic() < deadline, "eth0 of the hand-made namespace never came up"
            time.sleep(0.02)
        yield snapshot()
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)


def changes(before: dict[str, str], after: dict[str, str]) -> str:
    """The lines that differ, per snapshot part (for assertion messages)."""
    import difflib

    return "\n".join(
        f"{k}:\n" + "\n".join(difflib.unified_diff(before[k].splitlines(),
                                                   after[k].splitlines(), lineterm=""))
        for k in before if before[k] != after.get(k)
    )


def assert_unchanged(before: dict[str, str], what: str = "") -> None:
    after = snapshot()
    assert after == before, f"{what or 'the namespace changed'}:\n{changes(before, after)}"


def endpoint_names(agent: AgentProcess) -> list[str]:
    return [e["name"] for e in agent.cli_json("endpoint", "list")["endpoints"]]


def add(agent: AgentProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    agent.created.add(args[0])
    return agent.cli("endpoint", "add", *args, "--labels", "app=adopted", "-o", "json",
                     check=check)


def test_adopting_an_existing_veth_changes_nothing_and_delete_leaves_it(
    agent: AgentProcess, handmade: dict[str, str]
) -> None:
    import json

    data = json.loads(add(agent, LONG_NAME, "--netns", NS_PATH).stdout)
    assert data["name"] == LONG_NAME and data["ipv4"] == ADDR
    assert data["host_veth"] == HOST_IF and data["adopted"] is True
    assert data["netns"] == NS_PATH
    # enforced: both programs on the host side, the address in the ipcache
    assert [f.split()[0] for f in tc_filters(HOST_IF)["ingress"]] == ["from_container"]
    assert [f.split()[0] for f in tc_filters(HOST_IF)["egress"]] == ["to_container"]
    ipcache = {e["prefix"]: e for e in agent.call("BpfIpcacheList")["entries"]}
    assert ipcache[f"{ADDR}/32"]["identity"] == data["identity"]
    during = snapshot()
    assert {k: v for k, v in during.items() if k != "host qdisc"} == {
        k: v for k, v in handmade.items() if k != "host qdisc"
    }, "adoption changed the namespace or its veth:\n" + changes(handmade, during)

    out = agent.cli("endpoint", "delete", LONG_NAME)
    assert f"endpoint {LONG_NAME} deleted" in out.stdout
    assert_unchanged(handmade, "delete changed what garrison did not create")
    assert os.path.exists(NS_PATH)
    assert f"{ADDR}/32" not in {e["prefix"] for e in agent.call("BpfIpcacheList")["entries"]}
    assert LONG_NAME not in endpoint_names(agent)


def test_adopting_by_pid(agent: AgentProcess, handmade: dict[str, str]) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c",
                             "import time; time.sleep(60)"])
    try:
        add(agent, "gc-by-pid", "--pid", str(proc.pid))
        assert tc_filters(HOST_IF)["ingress"]
        agent.cli("endpoint", "delete", "gc-by-pid")
    finally:
        proc.kill()
        proc.wait()
    assert_unchanged(handmade)


def test_a_new_veth_beside_the_namespaces_own_goes_with_delete(
    agent: AgentProcess, handmade: dict[str, str]
) -> None:
    import json

    data = json.loads(add(agent, "gc-own-veth", "--netns", NS, "--interface", "eth1",
                          "--ip", "198.19.100.51").stdout)
    assert data["host_veth"].startswith("gar") and len(data["host_veth"]) <= 15
    inside = sh(f"ip -n {NS} -4 addr show dev eth1")
    assert "198.19.100.51/32" in inside
    agent.cli("endpoint", "delete", "gc-own-veth")
    assert_unchanged(handmade)


def test_failed_adoptions_roll_back_only_their_own_changes(
    agent: AgentProcess, handmade: dict[str, str]
) -> None:
    # in0 exists and is not a veth to the host: refused, the namespace stays
    done = add(agent, "gc-not-host-veth", "--netns", NS_PATH, "--interface", "in0",
               check=False)
    assert done.returncode == 1
    assert "in0 exists and is not a veth to the host" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert_unchanged(handmade)
    assert os.path.exists(NS_PATH)
    # a failure after garrison made its veth: the host already routes this address elsewhere
    done = add(agent, "gc-route-clash", "--netns", NS_PATH, "--interface", "eth1",
               "--ip", "198.19.100.50", check=False)
    assert done.returncode == 1, done.stdout
    assert "198.19.100.50/32" in done.stderr
    assert_unchanged(handmade)
    assert os.path.exists(NS_PATH)
    assert not {"gc-not-host-veth", "gc-route-clash"} & set(endpoint_names(agent))


def test_a_veth_on_a_bridge_is_refused(agent: AgentProcess, handmade: dict[str, str]) -> None:
    """Measured with podman's bridge plugin: L3/L4 held but an L7-denied PUT reached the app.
    So a bridge port is refused (fail closed), and nothing is changed."""
    bridge = f"gcab{os.getpid() % 100000}"
    sh(f"ip link add {bridge} type bridge")
    try:
        sh(f"ip link set {HOST_IF} master {bridge}")
        before = snapshot()
        done = add(agent, "gc-bridged", "--netns", NS_PATH, check=False)
        assert done.returncode == 1
        assert f"{HOST_IF}, is a bridge port" in done.stderr
        assert "L7 rules would not hold" in done.stderr
        assert_unchanged(before)
        assert "gc-bridged" not in endpoint_names(agent)
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_endpoint_add_without_netns_refuses_an_existing_namespace(
    agent: AgentProcess, handmade: dict[str, str]
) -> None:
    """The issue's case: `endpoint add NAME` where NAME is a hand-made namespace with an eth0
    used to fail with `File exists` and delete that namespace in its rollback."""
    done = agent.cli("endpoint", "add", NS, "--labels", "app=x", check=False)
    assert done.returncode == 1
    assert f"a network namespace named {NS!r} exists and garrison did not create it" in (
        done.stderr)
    assert f"--netns {NS}" in done.stderr
    assert os.path.exists(NS_PATH)
    assert_unchanged(handmade)


def test_a_long_name_for_a_namespace_garrison_makes(agent: AgentProcess) -> None:
    """Interface names are at most 15 bytes: the host veth's name derives from a hash."""
    import json

    name = f"gc-a-rather-long-endpoint-name-{os.getpid() % 100000}"
    agent.created.add(name)
    data = json.loads(agent.cli("endpoint", "add", name, "--labels", "app=long", "--ip",
                                "198.19.100.61", "-o", "json").stdout)
    try:
        assert data["name"] == name and data["adopted"] is False
        assert data["host_veth"].startswith("gar") and len(data["host_veth"]) == 13
        assert os.path.exists(f"/run/netns/{name}")
        assert tc_filters(data["host_veth"])["ingress"]
    finally:
        agent.cli("endpoint", "delete", name)
    assert not os.path.exists(f"/run/netns/{name}")
    assert subprocess.run(["ip", "link", "show", data["host_veth"]],
                          capture_output=True).returncode != 0


def test_a_namespace_kubernetes_would_refuse_is_refused_before_anything_is_made(
    agent: AgentProcess,
) -> None:
    name = f"gc-badns-{os.getpid() % 100000}"
    agent.created.add(name)
    done = agent.cli("endpoint", "add", name, "--labels", "app=x", "--namespace",
                     "default,org=empire", "--ip", "198.19.100.62", check=False)
    assert done.returncode == 1
    assert ("--namespace: namespace 'default,org=empire': use 1-63 lower-case letters, digits "
            "and '-'") in done.stderr
    assert not os.path.exists(f"/run/netns/{name}")
    assert name not in endpoint_names(agent)
