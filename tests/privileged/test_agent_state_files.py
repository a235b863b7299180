"""A state directory with a corrupted or hand-edited file: one line naming it and the fix.

`garrison agent` used to end in a Python traceback on a torn endpoints.json, policies.json or
steering.json, to start with a policy missing when policies.json no longer held one it
recorded (less enforcement than was imported), and to count revisions from 0 again over a
policy-revision that was not a number. Each is refused now, before the maps are touched,
with `garrison agent: FILE: ...; FIX` and exit 1; the intact files start it as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")

GARRISON = str(Path(sys.executable).with_name("garrison"))
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: kept
spec:
  endpointSelector:
    matchLabels:
      app: kept
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: peer
"""


def endpoint(ipv4: str) -> str:
    """An endpoints.json of one endpoint garrison made, at `ipv4`."""
    return json.dumps({"endpoints": [{"id": 1, "name": "go-state-x", "namespace": "default",
                                      "labels": [], "ipv4": ipv4}]})


def rename_policy(state: Path) -> None:
    """policies.json edited so that its text no longer holds the policy it records."""
    path = state / "policies.json"
    path.write_text(path.read_text().replace("name: kept", "name: other"))


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("endpoints.json", lambda s: (s / "endpoints.json").write_text("{"),
     "not an endpoint registry"),
    ("endpoints.json", lambda s: (s / "endpoints.json").write_text(
        json.dumps({"endpoints": [{"name": "x", "colour": "red"}]})), "not an endpoint registry"),
    ("endpoints.json", lambda s: (s / "endpoints.json").write_text("[]"),
     "not an endpoint registry"),
    ("endpoints.json", lambda s: (s / "endpoints.json").write_text(endpoint("abc")),
     "not an endpoint registry"),
    # an endpoint garrison makes is routed from the host: never to an address off the pool
    ("endpoints.json", lambda s: (s / "endpoints.json").write_text(endpoint("192.0.2.1")),
     "not an endpoint registry"),
    ("policies.json", lambda s: (s / "policies.json").write_text('{"policies": ['),
     "not a record of imported policies"),
    ("policies.json", lambda s: (s / "policies.json").write_text(
        '{"policies": [{"key": ["x"]}], "texts": {}}'), "not a record of imported policies"),
    ("policies.json", rename_policy, "not a record of imported policies"),
    ("policy-revision", lambda s: (s / "policy-revision").write_text("twelve\n"),
     "not a policy revision"),
    ("steering.json", lambda s: (s / "steering.json").write_text('{"rule":'),
     "not a steering record"),
]


def run_agent(ns_agent: NsAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns_agent.netns}", GARRISON, "agent", *ns_agent.args(),
         *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def test_a_corrupted_state_file_is_named_and_the_agent_refuses_to_start(
    ns_agent: NsAgent, tmp_path: Path,
) -> None:
    state = ns_agent.workdir / "state"
    policy = tmp_path / "kept.yaml"
    policy.write_text(POLICY)
    ns_agent.start()
    try:
        assert ns_agent.cli("policy", "import", str(policy)).returncode == 0
        assert ns_agent.stop() == 0
        intact = tmp_path / "intact"
        shutil.copytree(state, intact)
        for name, corrupt, what in CASES:
            shutil.rmtree(state)
            shutil.copytree(intact, state)
            corrupt(state)
            refused = run_agent(ns_agent)
            assert refused.returncode == 1, (name, refused.stderr)
            assert "Traceback" not in refused.stderr, refused.stderr
            last = refused.stderr.splitlines()[-1]
            assert last.startswith(f"garrison agent: {state / name}: {what} ("), last
            assert "; " in last.split(")", 1)[-1]  # ... and what to do
        # --cleanup cannot know what it added from a torn steering record: it says so
        cleanup = ns_agent.cleanup()
        assert cleanup.returncode == 1
        assert cleanup.stderr.splitlines()[-1].startswith(
            f"garrison agent --cleanup: {state / 'steering.json'}: not a steering record ("
        ), cleanup.stderr
        # the intact files: the agent starts with the policy it had, counting on
        shutil.rmtree(state)
        shutil.copytree(intact, state)
        ns_agent.start()
        status = json.loads(ns_agent.cli("status", "-o", "json").stdout)
        assert status["policies"] == 1
        assert status["policy_revision"] > int((intact / "policy-revision").read_text())
    finally:
        ns_agent.remove([], [])


def fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)
    return filler


def test_a_policy_change_the_full_state_dir_cannot_keep_is_refused_whole(
    ns_agent: NsAgent, tmp_path: Path,
) -> None:
    """An import used to be enforced, reported as `garrison: OSError: [Errno 28] No space
    left on device` and lost at the next restart when the state directory was full."""
    state = ns_agent.workdir / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "go-state", str(state)],
                   check=True)
    kept, new = tmp_path / "kept.yaml", tmp_path / "new.yaml"
    kept.write_text(POLICY)
    new.write_text(POLICY.replace("name: kept", "name: new"))
    try:
        ns_agent.start()
        assert ns_agent.cli("policy", "import", str(kept)).returncode == 0
        filler = fill(state)
        for args, path in ((("policy", "import", str(new)), state / "policies.json"),
                           (("policy", "delete", "kept"), state / "policies.json")):
            refused = ns_agent.cli(*args)
            assert refused.returncode == 1, refused.stdout
            assert refused.stderr.splitlines() == [
                f"garrison: cannot write {path}: No space left on device; free space on its "
                "filesystem or make it writable (the agent keeps its records in --state-dir)"
            ]
        # nothing changed: what is in force is what a restart brings back
        policies = ns_agent.cli("policy", "get", "-o", "json")
        assert [p["name"] for p in json.loads(policies.stdout)["policies"]] == ["kept"]
        filler.unlink()
        assert ns_agent.cli("policy", "import", str(new)).returncode == 0
        assert ns_agent.stop() == 0
        ns_agent.start()
        policies = ns_agent.cli("policy", "get", "-o", "json")
        assert sorted(p["name"] for p in json.loads(policies.stdout)["policies"]) == [
            "kept", "new"]
    finally:
        ns_agent.remove([], [])
        subprocess.run(["umount", str(state)], check=False)


def test_a_refused_first_start_leaves_no_pin_root(ns_agent: NsAgent) -> None:
    state = ns_agent.workdir / "state"
    state.mkdir()
    (state / "endpoints.json").write_text("{")
    assert not ns_agent.pin_root.exists()
    refused = run_agent(ns_agent)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1].startswith(
        f"garrison agent: {state / 'endpoints.json'}: not an endpoint registry (")
    assert not ns_agent.pin_root.exists()
