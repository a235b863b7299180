"""Namespaces as first-class objects: their labels, stored beside the identities.

A namespace's labels are what NetworkPolicy `namespaceSelector` and Cilium's
`io.cilium.k8s.namespace.labels.<key>` selectors match. `kubernetes.io/metadata.name=<ns>` is
always one of them (Kubernetes sets it on every namespace and so does garrison; it cannot be
changed or removed). Key layout in the store (values JSON):

    namespaces/<namespace>   {"labels": {"team": "blue", ...}}

A namespace nobody labelled has no key and only its name label. Changes use the kubectl
form: `k=v` sets (or overwrites) a label, `k-` removes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from garrison.kvstore.base import KVStore
from garrison.policies.labels import NAMESPACE_NAME_LABEL

PREFIX = "namespaces/"

_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


class NamespaceError(ValueError):
    """A namespace name or label change that cannot be applied; the message says why."""


def check_namespace(name: str) -> str:
    if not _NAMESPACE_RE.match(name):
        raise NamespaceError(
            f"namespace {name!r}: use 1-63 lower-case letters, digits and '-', starting and "
            "ending with a letter or digit (a Kubernetes namespace name)"
        )
    return name


def check_label(key: str, value: str) -> None:
    """Kubernetes' rules for label keys (`[prefix/]name`) and values."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        raise NamespaceError(f"label key {key!r}: the prefix before '/' must be a DNS "
                             "subdomain, e.g. example.com/team")
    if not _NAME_RE.match(name):
        raise NamespaceError(f"label key {key!r}: the name must be 1-63 letters, digits, "
                             "'-', '_' or '.', starting and ending with a letter or digit")
    if value and not _NAME_RE.match(value):
        raise NamespaceError(f"label {key}={value!r}: a value is empty or 1-63 letters, "
                             "digits, '-', '_' or '.', starting and ending with a letter or "
                             "digit")


def parse_changes(changes: Sequence[str]) -> tuple[dict[str, str], set[str]]:
    """`k=v` (set) and `k-` (remove), as `kubectl label` takes them."""
    sets: dict[str, str] = {}
    removes: set[str] = set()
    if not changes:
        raise NamespaceError("give at least one label change: KEY=VALUE sets, KEY- removes")
    for text in changes:
        text = text.strip()
        if "=" in text:
            key, _, value = text.partition("=")
        elif text.endswith("-") and len(text) > 1:
            key, value = text[:-1], ""
        else:
            raise NamespaceError(f"{text!r}: expected KEY=VALUE (set) or KEY- (remove)")
        if key == NAMESPACE_NAME_LABEL:
            raise NamespaceError(f"{NAMESPACE_NAME_LABEL} is always the namespace's own name "
                                 "and cannot be set or removed")
        check_label(key, value)
        if "=" in text:
            sets[key] = value
        else:
            removes.add(key)
    both = removes & set(sets)
    if both:
        raise NamespaceError(f"label {sorted(both)[0]!r} is both set and removed")
    return sets, removes


class NamespaceStore:
    def __init__(self, store: KVStore) -> None:
        self._store = store

    def labels(self, namespace: str) -> dict[str, str]:
        """Every label of the namespace, its name label included."""
        raw = self._store.get(PREFIX + namespace)
        stored: dict[str, str] = json.loads(raw)["labels"] if raw else {}
        return {**stored, NAMESPACE_NAME_LABEL: namespace}

    def all(self) -> dict[str, dict[str, str]]:
        """The labelled namespaces (those never labelled have only their name label)."""
        out = {}
        for key, raw in self._store.list_prefix(PREFIX).items():
            namespace = key.removeprefix(PREFIX)
            out[namespace] = {**json.loads(raw)["labels"], NAMESPACE_NAME_LABEL: namespace}
        return out

    def label(self, namespace: str, changes: Sequence[str]) -> tuple[dict[str, str], bool]:
        """Apply `k=v` / `k-` changes; the labels after them and whether they changed."""
        check_namespace(namespace)
        sets, removes = parse_changes(changes)
        before = self.labels(namespace)
        after = {k: v for k, v in before.items() if k not in removes}
        after.update(sets)
        if after == before:
            return after, False
        self.store(namespace, after)
        return after, True

    def store(self, namespace: str, labels: Mapping[str, str]) -> None:
        own = {k: v for k, v in sorted(labels.items()) if k != NAMESPACE_NAME_LABEL}
        key = PREFIX + namespace
        if own:
            self._store.put(key, json.dumps({"labels": own}, sort_keys=True).encode())
        else:
            self._store.delete(key)
