"""One agent per state directory, API socket and pin root (garrison/agent/claim.py).

A second agent started on a running one's socket used to take the socket over (the first ran
on, unreachable); on its pin root it reconciled the maps against its own empty policy and
deleted the first one's entries; `--cleanup` with the right state directory but another
--socket removed a running agent's endpoints. Each is refused now, before anything is
touched, with one line naming the path and the process that holds it, and the running agent
is left exactly as it was. The locks go with the process: after SIGKILL the next agent starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")

GARRISON = str(Path(sys.executable).with_name("garrison"))
ENDPOINT = f"go-inst-{os.getpid()}"
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: inst
spec:
  endpointSelector:
    matchLabels:
      app: inst
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: peer
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"""


def other_agent(ns_agent: NsAgent, *args: str) -> subprocess.CompletedProcess[str]:
    """`garrison agent ARGS` (a second one) in the first one's namespace, until it exits."""
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns_agent.netns}", GARRISON, "agent", *args,
         "--proxy-ports", "http=15341,grpc=15342,kafka=15343"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def test_a_second_agent_or_cleanup_on_a_running_agents_paths_is_refused(
    ns_agent: NsAgent, tmp_path: Path,
) -> None:
    ns_agent.start()
    try:
        assert ns_agent.proc is not None
        pid = ns_agent.proc.pid
        added = ns_agent.cli("endpoint", "add", ENDPOINT, "--labels", "app=inst",
                             "--ip", "198.18.250.20")
        assert added.returncode == 0, added.stderr
        policy = tmp_path / "inst.yaml"
        policy.write_text(POLICY)
        assert ns_agent.cli("policy", "import", str(policy)).returncode == 0
        enforced = ns_agent.cli("bpf", "policy", "get", ENDPOINT).stdout
        assert "ingress" in enforced  # the policy selects it: entries in the maps

        other = tmp_path / "other"
        state, sock = ns_agent.workdir / "state", ns_agent.socket
        pins = ns_agent.pin_root
        for flag, clash, args in (
            ("--socket", sock, ["--state-dir", str(other / "state"), "--socket", str(sock),
                                "--bpffs-root", f"{pins}-other"]),
            ("--bpffs-root", pins, ["--state-dir", str(other / "state"),
                                    "--socket", str(other / "sock"),
                                    "--bpffs-root", str(pins)]),
            ("--state-dir", state, ["--state-dir", str(state), "--socket", str(other / "sock"),
                                    "--bpffs-root", f"{pins}-other"]),
        ):
            refused = other_agent(ns_agent, *args)
            assert refused.returncode == 1, refused.stderr
            assert refused.stderr.splitlines() == [
                f"garrison agent: {flag} {clash} is in use by a running agent (pid {pid}); "
                "stop it first, or give this agent its own --state-dir, --socket and "
                "--bpffs-root"
            ]
            assert not Path(f"{pins}-other").exists()  # it made no pin root either
            # the first agent still answers on its socket, enforcing what it did
            status = ns_agent.cli("status")
            assert status.returncode == 0, status.stdout + status.stderr
            assert ns_agent.cli("bpf", "policy", "get", ENDPOINT).stdout == enforced

        # --cleanup with the running agent's state dir and another socket removes nothing
        cleanup = other_agent(ns_agent, "--cleanup", "--state-dir", str(state), "--socket",
                              str(other / "sock"), "--bpffs-root", str(pins))
        assert cleanup.returncode == 1
        assert cleanup.stderr.splitlines() == [
            f"garrison agent --cleanup: the agent with --state-dir {state} (pid {pid}) is "
            "running; stop it first (SIGTERM)"
        ]
        assert Path(f"/run/netns/{ENDPOINT}").exists()
        assert ENDPOINT in ns_agent.cli("endpoint", "list").stdout
        assert ns_agent.cli("bpf", "policy", "get", ENDPOINT).stdout == enforced

        # the locks go with the process: killed, the next agent on the same paths starts
        ns_agent.stop(signal.SIGKILL)
        ns_agent.start()
        assert ns_agent.cli("bpf", "policy", "get", ENDPOINT).stdout == enforced
    finally:
        ns_agent.remove([ENDPOINT], [ENDPOINT])


def test_cleanup_with_paths_no_agent_used_says_so(ns_agent: NsAgent) -> None:
    """A mistyped --state-dir / --bpffs-root used to print `removed the pinned maps under
    ...` (exit 0) though there was nothing: the operator believed the node clean while the
    real agent's endpoints and pins stayed."""
    state, pins = ns_agent.workdir / "state", ns_agent.pin_root
    assert not state.exists() and not pins.exists()
    done = ns_agent.cleanup()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [
        f"no state directory at {state}: no endpoints or steering of an agent recorded there"
        " (give the --state-dir the agent ran with)",
        f"no pinned maps under {pins}",
    ]
    assert not state.exists()  # it made nothing either
