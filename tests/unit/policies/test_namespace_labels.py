"""Namespace labels (issue 20 §1): a namespace's labels become part of its endpoints'
identities as Cilium writes them (`io.cilium.k8s.namespace.labels.<k>=<v>`), so
NetworkPolicy `namespaceSelector` and Cilium selectors on them match; relabelling the
namespace changes the identity."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.cli.main import main
from garrison.identity.allocator import IdentityAllocator
from garrison.identity.namespaces import NamespaceError, NamespaceStore, parse_changes
from garrison.kvstore.sqlite import SQLiteKVStore
from garrison.policies.labels import Label, Labels, endpoint_labels
from garrison.policies.trace import TraceEndpoint, trace

from .helpers import policies

KNP = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-blue, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: blue}}
      podSelector: {matchLabels: {app: web}}
"""

CNP = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-blue, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints:
    - matchLabels:
        io.cilium.k8s.namespace.labels.team: blue
        app: web
      matchExpressions:
      - {key: io.kubernetes.pod.namespace, operator: Exists}
"""

BY_NAME = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-shop, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}}]
"""


@pytest.fixture(name="store")
def fixture_store() -> Iterator[NamespaceStore]:
    with SQLiteKVStore(":memory:") as kv:
        yield NamespaceStore(kv)


def ep(labels: str, namespace: str, ns_labels: dict[str, str] | None = None) -> TraceEndpoint:
    return TraceEndpoint(endpoint_labels(Labels.parse(labels), namespace, ns_labels), namespace)


def test_namespace_labels_are_endpoint_labels_with_ciliums_prefix() -> None:
    labels = endpoint_labels(Labels.parse("app=web"), "shop",
                             {"team": "blue", "kubernetes.io/metadata.name": "shop"})
    assert {str(lab) for lab in labels} == {
        "k8s:app=web",
        "k8s:io.kubernetes.pod.namespace=shop",
        "k8s:io.cilium.k8s.namespace.labels.team=blue",
    }
    # no namespace labels: what an endpoint always had
    assert endpoint_labels(Labels.parse("app=web"), "shop") == Labels.of(
        [Label("app", "web"), Label("io.kubernetes.pod.namespace", "shop")])


def test_a_relabelled_namespace_gives_its_endpoints_another_identity() -> None:
    with SQLiteKVStore(":memory:") as kv:
        alloc = IdentityAllocator(kv)
        plain = alloc.allocate(endpoint_labels(Labels.parse("app=web"), "shop"), "ep:a")
        blue = alloc.allocate(
            endpoint_labels(Labels.parse("app=web"), "shop", {"team": "blue"}), "ep:a")
        again = alloc.allocate(
            endpoint_labels(Labels.parse("app=web"), "shop", {"team": "blue"}), "ep:b")
        assert plain.id != blue.id and blue.id == again.id
        assert Label("io.cilium.k8s.namespace.labels.team", "blue") in blue.labels


@pytest.mark.parametrize("text", [KNP, CNP], ids=["knp-namespaceSelector", "cnp-ns-labels"])
def test_namespace_selectors_match_the_namespace_labels(text: str) -> None:
    pols = policies(text)
    db = ep("app=db", "prod")
    assert trace(pols, ep("app=web", "shop", {"team": "blue"}), db, 5432).allowed
    assert not trace(pols, ep("app=web", "shop", {"team": "red"}), db, 5432).allowed
    assert not trace(pols, ep("app=web", "shop"), db, 5432).allowed
    assert not trace(pols, ep("app=api", "shop", {"team": "blue"}), db, 5432).allowed


def test_namespace_name_label_matches_the_namespace_itself() -> None:
    pols = policies(BY_NAME)
    db = ep("app=db", "prod")
    assert trace(pols, ep("app=web", "shop"), db, 80).allowed
    assert not trace(pols, ep("app=web", "other"), db, 80).allowed


def test_store_always_has_the_name_label_and_takes_kubectl_changes(
    store: NamespaceStore,
) -> None:
    assert store.labels("shop") == {"kubernetes.io/metadata.name": "shop"}
    labels, changed = store.label("shop", ["team=blue", "tier=front"])
    assert changed and labels == {"kubernetes.io/metadata.name": "shop", "team": "blue",
                                  "tier": "front"}
    assert store.label("shop", ["team=blue"]) == (labels, False)
    labels, changed = store.label("shop", ["tier-", "team=red"])
    assert changed and labels == {"kubernetes.io/metadata.name": "shop", "team": "red"}
    assert store.all() == {"shop": labels}
    store.label("shop", ["team-"])
    assert store.all() == {}


@pytest.mark.parametrize(("changes", "says"), [
    ([], "give at least one label change"),
    (["team"], "expected KEY=VALUE (set) or KEY- (remove)"),
    (["kubernetes.io/metadata.name=x"], "always the namespace's own name"),
    (["kubernetes.io/metadata.name-"], "always the namespace's own name"),
    (["team=a b"], "a value is empty or 1-63 letters"),
    (["-team=a"], "the name must be 1-63 letters"),
    (["Example.COM/team=a"], "the prefix before '/' must be a DNS subdomain"),
    (["team=a", "team-"], "is both set and removed"),
])
def test_bad_label_changes_are_refused(changes: list[str], says: str) -> None:
    with pytest.raises(NamespaceError, match=None) as info:
        parse_changes(changes)
    assert says in str(info.value)


def test_bad_namespace_name_is_refused(store: NamespaceStore) -> None:
    with pytest.raises(NamespaceError) as info:
        store.label("Prod_1", ["team=blue"])
    assert "a Kubernetes namespace name" in str(info.value)


def test_trace_cli_takes_namespace_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(KNP))
    base = ["policy", "trace", "-f", str(path), "--src-labels", "app=web",
            "--src-namespace", "shop", "--dst-labels", "app=db", "--dst-namespace", "prod",
            "--dport", "5432", "-o", "json"]
    assert main([*base, "--src-namespace-labels", "team=blue,tier=front"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "allowed"
    assert "k8s:io.cilium.k8s.namespace.labels.team=blue" in out["source"]["labels"]
    assert main([*base, "--src-namespace-labels", "team=red"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "denied"
    assert main([*base]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "denied"
    assert main([*base, "--dst-namespace-labels", "team"]) == 2
    assert capsys.readouterr().err == (
        "garrison policy trace: --dst-namespace-labels: 'team': expected KEY=VALUE, e.g. "
        "--dst-namespace-labels team=blue\n")
