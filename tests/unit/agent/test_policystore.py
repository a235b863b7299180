"""Imported policies survive an agent restart; the repository applies a mixed change at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from garrison.agent.policystore import ImportedPolicies, PolicyStoreError
from garrison.policies.loader import load_paths
from garrison.policies.repository import PolicyChange, PolicyRepository

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress: [{{}}]
"""


def write(tmp: Path, name: str, *names: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text("---\n".join(POLICY.format(name=n) for n in names))
    return path


def test_imported_policies_load_again_after_a_restart(tmp_path: Path) -> None:
    f = write(tmp_path, "two", "a", "b")
    store = ImportedPolicies(tmp_path / "state" / "policies.json")
    store.record(load_paths([f]).policies)
    store.forget([("CiliumNetworkPolicy", "default", "b")])
    store.save()
    f.unlink()  # the source file is gone: the stored text is what counts
    again = ImportedPolicies(tmp_path / "state" / "policies.json").load()
    assert [p.name for p in again] == ["a"]


def test_a_file_changed_during_import_is_refused(tmp_path: Path) -> None:
    f = write(tmp_path, "one", "a")
    policies = load_paths([f]).policies
    f.write_text(POLICY.format(name="other"))
    with pytest.raises(PolicyStoreError, match="changed while it was imported"):
        ImportedPolicies(tmp_path / "policies.json").record(policies)


def test_repository_update_is_one_revision_and_one_change(tmp_path: Path) -> None:
    repo = PolicyRepository()
    seen: list[PolicyChange] = []
    repo.subscribe(seen.append)
    first = load_paths([write(tmp_path, "x", "a", "b")]).policies
    repo.upsert(first)
    rev = repo.revision
    newer = load_paths([write(tmp_path, "y", "c")]).policies
    change = repo.update(newer, [first[1].key])
    assert repo.revision == rev + 1 and len(seen) == 2
    assert [p.name for p in change.added] == ["c"]
    assert [p.name for p in change.removed] == ["b"]
    assert sorted(p.name for p in repo) == ["a", "c"]


@pytest.mark.parametrize("change", ["removed", "broken"])
def test_a_file_removed_or_broken_during_import_is_refused(tmp_path: Path, change: str) -> None:
    """It used to reach the CLI as `garrison: FileNotFoundError: ...` (or a validation error
    of a file that had validated)."""
    f = write(tmp_path, "one", "a")
    policies = load_paths([f]).policies
    if change == "removed":
        f.unlink()
    else:
        f.write_text("kind: [\n")
    with pytest.raises(PolicyStoreError, match="changed while it was imported"):
        ImportedPolicies(tmp_path / "policies.json").record(policies)
