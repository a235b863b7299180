"""The identity-relevant label filter: defaults, Cilium-style patterns, the always-kept set."""

from __future__ import annotations

import pytest

from garrison.identity.filter import LabelFilter, LabelFilterError, LabelPattern
from garrison.policies.labels import Label, Labels, parse_label

DEFAULT_CASES = [
    # stable workload labels
    ("k8s:app=web", True),
    ("k8s:tier=frontend", True),
    ("k8s:app.kubernetes.io/name=web", True),
    ("k8s:app.kubernetes.io/component=api", True),
    ("container:role=db", True),
    # the namespace and what Cilium derives from it
    ("k8s:io.kubernetes.pod.namespace=prod", True),
    ("k8s:io.cilium.k8s.namespace.labels.team=a", True),
    ("k8s:io.cilium.k8s.policy.cluster=default", True),
    ("k8s:io.cilium.k8s.policy.serviceaccount=web", True),
    ("reserved:host", True),
    # volatile labels
    ("k8s:pod-template-hash=5d8f7c", False),
    ("k8s:controller-revision-hash=web-6b9", False),
    ("k8s:pod-template-generation=3", False),
    ("k8s:controller-uid=1b2c", False),
    ("k8s:io.kubernetes.pod.name=web-1", False),
    ("k8s:io.kubernetes.container.name=web", False),
    ("k8s:kubernetes.io/hostname=node1", False),
    ("k8s:topology.kubernetes.io/zone=a", False),
    ("k8s:node-role.kubernetes.io/worker=", False),
    ("k8s:statefulset.kubernetes.io/pod-name=db-0", False),
    ("k8s:apps.kubernetes.io/pod-index=0", False),
    ("k8s:batch.kubernetes.io/job-name=nightly-2871", False),
    ("k8s:batch.kubernetes.io/controller-uid=1b2c", False),
    ("k8s:k8s.io/cluster-service=true", False),
    ("k8s:annotation.kubectl.kubernetes.io/last-applied=x", False),
    ("k8s:etcd_node=etcd-1", False),
    # near misses the defaults must not catch
    ("k8s:pod-template=x", True),
    ("k8s:my-pod-template-hash=x", True),
    ("k8s:annotations=x", True),
    ("k8s:etcd_node_role=x", True),
]


@pytest.mark.parametrize(("text", "kept"), DEFAULT_CASES)
def test_default_filter(text: str, kept: bool) -> None:
    assert LabelFilter().is_relevant(parse_label(text)) is kept


def test_apply_keeps_exactly_the_relevant_labels() -> None:
    labels = Labels.parse(
        "app=web,pod-template-hash=abc,io.kubernetes.pod.namespace=prod,"
        "io.kubernetes.pod.name=web-1"
    )
    assert LabelFilter().apply(labels) == Labels.parse("app=web,io.kubernetes.pod.namespace=prod")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("k8s:app", LabelPattern(regex="app", include=True, source="k8s")),
        ("!pod-template-hash", LabelPattern(regex="pod-template-hash", include=False)),
        ("any:!io\\.kubernetes", LabelPattern(regex="io\\.kubernetes", include=False)),
        ("k8s:!job-name", LabelPattern(regex="job-name", include=False, source="k8s")),
        (":io\\.kubernetes\\.pod", LabelPattern(regex="io\\.kubernetes\\.pod", include=True)),
        ("reserved:.*", LabelPattern(regex=".*", include=True, source="reserved")),
        ("  team  ", LabelPattern(regex="team", include=True)),
    ],
)
def test_pattern_parse(text: str, pattern: LabelPattern) -> None:
    assert LabelPattern.parse(text) == pattern


@pytest.mark.parametrize("text", ["!", "k8s:", "k8s:!", "[unclosed"])
def test_bad_patterns_are_refused(text: str) -> None:
    with pytest.raises(LabelFilterError):
        LabelPattern.parse(text)


# (configured patterns, label, kept)
CUSTOM_CASES = [
    # exclusions only: everything else is still kept
    (["!job-name"], "k8s:job-name=nightly", False),
    (["!job-name"], "k8s:team=a", True),
    (["k8s:!team"], "k8s:team=a", False),
    (["k8s:!team"], "container:team=a", True),  # the source restricts the pattern
    # one inclusion turns the filter into an allow-list
    (["k8s:app$"], "k8s:app=web", True),
    (["k8s:app$"], "k8s:application=x", False),
    (["k8s:app"], "k8s:application=x", True),  # anchored at the start only, like Cilium
    (["k8s:app$"], "k8s:team=a", False),
    (["k8s:app$"], "k8s:app.kubernetes.io/name=web", True),  # a default inclusion
    # the always-kept labels survive an allow-list and explicit exclusions
    (["k8s:app$"], "k8s:io.kubernetes.pod.namespace=prod", True),
    (["!io\\.kubernetes\\.pod\\.namespace"], "k8s:io.kubernetes.pod.namespace=prod", True),
    (["!io\\.cilium"], "k8s:io.cilium.k8s.namespace.labels.team=a", True),
    (["k8s:app$"], "reserved:host", True),
    # configured patterns come first: they can re-admit a default exclusion
    (["pod-template-hash"], "k8s:pod-template-hash=abc", True),
    # first match decides
    (["!team-secret", "team"], "k8s:team-secret=x", False),
    (["team", "!team-secret"], "k8s:team-secret=x", True),
]


@pytest.mark.parametrize(("configured", "text", "kept"), CUSTOM_CASES)
def test_custom_patterns(configured: list[str], text: str, kept: bool) -> None:
    assert LabelFilter.parse(configured).is_relevant(parse_label(text)) is kept


def test_explicit_filter_without_defaults() -> None:
    only_app = LabelFilter(patterns=(LabelPattern("app$", include=True),), keep_unmatched=False)
    labels = Labels.parse("app=web,pod-template-hash=abc,team=a,io.kubernetes.pod.namespace=ns")
    assert only_app.apply(labels) == Labels.parse("app=web,io.kubernetes.pod.namespace=ns")
    keep_all = LabelFilter(patterns=())
    assert keep_all.apply(labels) == labels


def test_filters_compare_by_patterns() -> None:
    assert LabelFilter() == LabelFilter()
    assert LabelFilter.parse([]) == LabelFilter()
    assert LabelFilter.parse(["k8s:app"]) != LabelFilter()
    assert Label("x") not in LabelFilter().apply(Labels())
