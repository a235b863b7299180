"""What an operator sees of the agent's policy directory and paths (issue 18, items 4 and 6):
a bad file in `--policy-dir` shows in `garrison status` (text and JSON) and makes it exit 1;
a `--policy-dir` or `--access-log` directory that does not exist is created and said so; a path
that cannot be one is refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")

GARRISON = str(Path(sys.executable).with_name("garrison"))
L7_POLICY = Path(__file__).resolve().parents[2] / "examples/starwars/sw_l3_l4_l7_policy.yaml"


def wait_status(agent: NsAgent, returncode: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        done = agent.cli("status")
        if done.returncode == returncode:
            return done.stdout
        assert time.monotonic() < deadline, (done.returncode, done.stdout, done.stderr)
        time.sleep(0.1)


def test_policy_dir_problems_show_in_status(ns_agent: NsAgent, tmp_path: Path) -> None:
    policy_dir = tmp_path / "etc" / "policies"
    access_log = tmp_path / "log" / "garrison" / "access.log"
    ns_agent.extra = ["--policy-dir", str(policy_dir), "--access-log", str(access_log)]
    ns_agent.start()
    # missing directories were made, and the log says so
    assert policy_dir.is_dir() and access_log.parent.is_dir()
    assert f"created the policy directory {policy_dir}" in ns_agent.log()
    assert f"created the access log's directory {access_log.parent}" in ns_agent.log()
    text = wait_status(ns_agent, 0)
    assert f"Policy dir:      {policy_dir}: in force" in text
    assert "{" not in text  # human text, no raw JSON in it

    bad = policy_dir / "deathstar.yaml"
    bad.write_text(L7_POLICY.read_text().replace('path: "/v1/request-landing"',
                                                 'path: "/v1/(unclosed"'))
    text = wait_status(ns_agent, 1)
    assert f"Policy dir:      {policy_dir}: 1 problem, the previous policy stays in force" in text
    assert f"PROBLEM: policy directory: {bad}:" in text  # file:line of the problem
    assert "{" not in text
    done = ns_agent.cli("status", "-o", "json")
    assert done.returncode == 1
    errors = json.loads(done.stdout)["policy_dir"]["errors"]
    assert len(errors) == 1 and errors[0].startswith(f"{bad}:")

    bad.write_text(L7_POLICY.read_text())  # fixed: in force, exit 0 again
    text = wait_status(ns_agent, 0)
    assert "(1 policy)" in text and "PROBLEM" not in text
    assert ns_agent.stop() == 0
    assert "Traceback" not in ns_agent.log()


def test_paths_that_cannot_be_directories_are_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "policies.yaml"
    a_file.write_text(L7_POLICY.read_text())
    common = ["--state-dir", str(tmp_path / "state"), "--socket", str(tmp_path / "s.sock")]
    done = subprocess.run([GARRISON, "agent", *common, "--policy-dir", str(a_file)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"garrison agent: --policy-dir {a_file}: not a directory; give a directory")
    done = subprocess.run([GARRISON, "agent", *common, "--access-log", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"garrison agent: --access-log {tmp_path}: a directory; give a file path in it")
