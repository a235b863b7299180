"""Policies imported through the API, persisted so a restarted agent enforces them again.

Without this, an agent killed and restarted would reconcile the pinned maps against an empty
repository and open every endpoint it had enforced. An imported policy is kept until
`policy delete` removes it (a later import of the same key replaces it). The store keeps each
policy's key and the text of its file (once per distinct text); on start the texts are
loaded again and only the stored keys kept (a file may also hold policies deleted since).
Written atomically (temp file + rename) after every import and delete, under the state
directory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from garrison.policies.errors import PolicyValidationError
from garrison.policies.loader import load_text
from garrison.policies.model import Policy
from garrison.policies.repository import PolicyKey
from garrison.statefile import StateFileError, write_atomically


class PolicyStoreError(ValueError):
    """An imported policy cannot be stored as it was imported."""


class ImportedPolicies:
    def __init__(self, path: Path) -> None:
        self.path = path
        # key -> (the policy as imported, its file's path and text)
        self._entries: dict[PolicyKey, tuple[Policy, str, str]] = {}

    def load(self) -> list[Policy]:
        """The stored policies (empty when nothing was ever imported). A file that does not
        read back as every policy it records is refused (StateFileError): the agent never
        starts enforcing less than was imported."""
        if not self.path.exists():
            return []
        out = []
        try:
            data = json.loads(self.path.read_text())
            texts: dict[str, str] = data["texts"]
            for item in data["policies"]:
                key: PolicyKey = (item["key"][0], item["key"][1], item["key"][2])
                path, text = item["path"], texts[item["text"]]
                found = [p for p in load_text(text, path).policies if p.key == key]
                if not found:
                    name = "/".join(k or "" for k in key)
                    raise ValueError(f"its text of {path} holds no policy {name}")
                self._entries[key] = (found[0], path, text)
                out.append(found[0])
        except (OSError, ValueError, TypeError, KeyError, IndexError,
                PolicyValidationError) as exc:
            detail = "; ".join(map(str, exc.issues)) if isinstance(
                exc, PolicyValidationError) else f"{type(exc).__name__}: {exc}"
            raise StateFileError(
                f"{self.path}: not a record of imported policies ({detail}); repair or restore"
                " it, or move it away and import the policies again (garrison policy import)"
            ) from exc
        return out

    def record(self, policies: Iterable[Policy]) -> None:
        """Remember freshly imported policies with the text of the file each came from
        (read again: refused if it no longer holds the same policy)."""
        texts: dict[str, tuple[str, list[Policy]]] = {}
        for policy in policies:
            path = policy.source.path if policy.source else ""
            if path not in texts:
                try:
                    text = Path(path).read_text(encoding="utf-8")
                    texts[path] = (text, list(load_text(text, path).policies))
                except (OSError, ValueError, PolicyValidationError):  # gone or rewritten
                    raise PolicyStoreError(
                        f"{path} changed while it was imported: import it again") from None
            text, found = texts[path]
            if policy not in found:
                raise PolicyStoreError(f"{path} changed while it was imported: import it again")
            self._entries[policy.key] = (policy, path, text)

    def policy(self, key: PolicyKey) -> Policy | None:
        """The imported policy of `key` (None: not imported)."""
        entry = self._entries.get(key)
        return entry[0] if entry else None

    def snapshot(self) -> dict[PolicyKey, tuple[Policy, str, str]]:
        """What is recorded now, for `restore` when a change cannot be saved."""
        return dict(self._entries)

    def restore(self, entries: dict[PolicyKey, tuple[Policy, str, str]]) -> None:
        self._entries = dict(entries)

    def forget(self, keys: Iterable[PolicyKey]) -> None:
        """Deleted policies (`policy delete`) are not enforced again after a restart."""
        for key in keys:
            self._entries.pop(key, None)

    def save(self) -> None:
        texts: dict[str, str] = {}
        policies = []
        for key, (_, path, text) in self._entries.items():
            digest = hashlib.sha256(text.encode()).hexdigest()
            texts[digest] = text
            policies.append({"key": list(key), "path": path, "text": digest})
        payload = json.dumps({"policies": policies, "texts": texts}, indent=1)
        write_atomically(self.path, payload)


class RevisionRecord:
    """The last policy revision, so a restarted agent counts on from it: a revision number
    in an audit line or a flow record then names one policy state, across restarts too."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved = 0

    def load(self) -> int:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            text = ""
        try:
            self._saved = int(text or 0)
            if self._saved < 0:
                raise ValueError(text)
        except ValueError:
            raise StateFileError(
                f"{self.path}: not a policy revision ({text[:40]!r}); write the last revision "
                "there (a number, e.g. the highest in the audit log), or remove the file to "
                "count from 0 again"
            ) from None
        return self._saved

    def save(self, revision: int) -> None:
        if revision == self._saved:
            return
        write_atomically(self.path, f"{revision}\n")
        self._saved = revision
