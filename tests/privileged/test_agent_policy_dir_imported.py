"""A policy both imported and in --policy-dir: the imported one is in force, as on a restart.

Removing the directory's file of the same name used to delete the imported policy from what
the agent enforced (it stayed in policies.json, so the next restart brought it back), and
editing that file replaced the imported one until the restart; `policy delete` of the
imported one left the directory's unenforced until the next restart. What is in force while
the agent runs is now what a restart gives.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: shared
spec:
  endpointSelector:
    matchLabels:
      app: {app}
  ingress:
  - {{}}
"""


def in_force(ns_agent: NsAgent) -> list[tuple[str, str]]:
    got = ns_agent.cli("policy", "get", "-o", "json")
    assert got.returncode == 0, got.stderr
    return [(p["name"], p["source"]) for p in json.loads(got.stdout)["policies"]]


def settle(ns_agent: NsAgent) -> None:
    """The directory is polled every second: a change is in force after two polls."""
    time.sleep(2.5)


def test_the_policy_directory_never_removes_or_replaces_an_imported_policy(
    ns_agent: NsAgent, tmp_path: Path,
) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    imported = tmp_path / "imported.yaml"
    imported.write_text(POLICY.format(app="imported"))
    ns_agent.extra = ["--policy-dir", str(policy_dir)]
    ns_agent.start()
    try:
        assert ns_agent.cli("policy", "import", str(imported)).returncode == 0
        assert in_force(ns_agent) == [("shared", str(imported))]
        in_dir = policy_dir / "shared.yaml"
        in_dir.write_text(POLICY.format(app="from-dir"))
        settle(ns_agent)
        assert in_force(ns_agent) == [("shared", str(imported))]
        in_dir.unlink()
        settle(ns_agent)
        assert in_force(ns_agent) == [("shared", str(imported))]
        assert ns_agent.stop() == 0
        ns_agent.start()
        assert in_force(ns_agent) == [("shared", str(imported))]
        # deleted, the directory's of the same name is in force again (as a restart has it)
        in_dir.write_text(POLICY.format(app="from-dir"))
        settle(ns_agent)
        assert ns_agent.cli("policy", "delete", "shared").returncode == 0
        assert in_force(ns_agent) == [("shared", str(in_dir))]
        assert ns_agent.stop() == 0
        ns_agent.start()
        assert in_force(ns_agent) == [("shared", str(in_dir))]
    finally:
        ns_agent.remove([], [])
