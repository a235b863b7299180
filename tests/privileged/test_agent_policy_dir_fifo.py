"""A FIFO named *.yaml in --policy-dir: a PROBLEM line, never a hung agent.

The policy-directory watcher read every *.yaml file, a FIFO too, holding the agent's lock:
the read blocked until someone wrote to the FIFO, and with it the API (`garrison status`
timed out) and the proxy's admission of new connections. It is now an issue of the
directory like a file that does not validate: the previous policy stays in force.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

GARRISON = str(Path(sys.executable).with_name("garrison"))
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other}
spec:
  endpointSelector: {matchLabels: {app: other}}
  ingress: [{}]
"""
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")


def test_a_fifo_in_the_policy_directory_is_a_problem_not_a_hang(
    ns_agent: NsAgent, tmp_path: Path,
) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    ns_agent.extra = ["--policy-dir", str(policy_dir)]
    ns_agent.start()
    try:
        fifo = policy_dir / "pipe.yaml"
        os.mkfifo(fifo)
        (policy_dir / "other.yaml").write_text(POLICY)  # a change: the directory is read
        time.sleep(2.5)  # polled every second
        try:
            status = subprocess.run([GARRISON, "status", "--socket", str(ns_agent.socket)],
                                    capture_output=True, text=True, timeout=10)
        finally:
            # a blocked reader (the old agent) returns once someone writes: unblock it
            with open(os.open(fifo, os.O_RDWR | os.O_NONBLOCK), "w") as fh:
                fh.write("\n")
        assert status.returncode == 1, status.stdout + status.stderr
        assert (f"PROBLEM: policy directory: {fifo}:0: not a regular file (a FIFO, socket "
                "or device): policy files must be regular files") in status.stdout
    finally:
        ns_agent.remove([], [])
