"""`garrison policy import` of a file that holds no policy (empty, truncated by an editor,
only `---`) used to answer `revision N` and exit 0, as if something was imported; it is
refused now, naming the file, and nothing changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")


def test_importing_a_file_without_a_policy_is_refused(ns_agent: NsAgent, tmp_path: Path) -> None:
    ns_agent.start()
    try:
        before = json.loads(ns_agent.cli("policy", "get", "-o", "json").stdout)["revision"]
        for name, text in (("empty.yaml", ""), ("dashes.yaml", "---\n---\n")):
            path = tmp_path / name
            path.write_text(text)
            refused = ns_agent.cli("policy", "import", str(path))
            assert refused.returncode == 1, refused.stdout
            assert refused.stderr.splitlines() == [
                f"garrison: {path}: no policy in it (empty?); nothing imported, the previous "
                "policy stays in force"
            ]
        after = json.loads(ns_agent.cli("policy", "get", "-o", "json").stdout)
        assert (after["revision"], after["policies"]) == (before, [])
    finally:
        ns_agent.remove([], [])
