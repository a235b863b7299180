"""An agent (re)started on a --policy-dir that does not validate refuses to start.

It used to start with none of the directory's policies — `garrison status` saying "the
previous policy stays in force" over `0 policies` — so an endpoint the directory's policy
put under default deny was open to everyone after a restart (a file broken while the agent
ran, or edited while it was down). Now the start is refused in one line naming the file,
and the kernel keeps enforcing what it did until the file is fixed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")

GARRISON = str(Path(sys.executable).with_name("garrison"))
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: guarded}
spec:
  endpointSelector: {matchLabels: {app: guarded}}
  ingress: [{fromEndpoints: [{matchLabels: {app: friend}}]}]
"""


def test_a_restart_on_a_policy_dir_that_does_not_validate_is_refused(
    ns_agent: NsAgent, tmp_path: Path,
) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    policy = policy_dir / "guarded.yaml"
    policy.write_text(POLICY)
    ns_agent.extra = ["--policy-dir", str(policy_dir)]
    ns_agent.start()
    try:
        assert ns_agent.stop() == 0
        policy.write_text(POLICY + "  egress: [\n")  # broken while the agent was down
        refused = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns_agent.netns}", GARRISON, "agent",
             *ns_agent.args(), *ns_agent.extra],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
        assert refused.returncode == 1
        last = refused.stderr.splitlines()[-1]
        assert last.startswith(
            f"garrison agent: --policy-dir {policy_dir} does not validate: {policy}:"), last
        assert last.endswith("; fix it and start again (without its policies the agent would "
                             "enforce less than before; until then the kernel enforces what "
                             "it did)"), last
        policy.write_text(POLICY)
        ns_agent.start()
        status = json.loads(ns_agent.cli("status", "-o", "json").stdout)
        assert (status["policies"], status["policy_dir"]["errors"]) == (1, [])
    finally:
        ns_agent.remove([], [])
