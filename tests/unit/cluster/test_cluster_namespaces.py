"""Namespace labels in the cluster's key layout: the key, the record, and a change applied
over the labels etcd holds (the encoding `garrison namespace label` writes in etcd mode)."""

from __future__ import annotations

import pytest

from garrison.cluster.keys import (
    NAMESPACES_PREFIX,
    ClusterRecordError,
    decode_namespace_labels,
    encode_namespace_labels,
    namespace_key,
    parse_namespace_key,
    relabelled,
)
from garrison.identity.namespaces import NamespaceError

NAME = "kubernetes.io/metadata.name"


def test_key_and_record_round_trip_without_the_name_label() -> None:
    key = namespace_key("shop")
    assert key == "state/namespaces/v1/shop" and key.startswith(NAMESPACES_PREFIX)
    assert parse_namespace_key(key) == "shop"
    raw = encode_namespace_labels({"team": "blue", NAME: "shop", "example.com/tier": "1"})
    # the local store's form, sorted: the same labels are the same bytes on every node
    assert raw == b'{"labels":{"example.com/tier":"1","team":"blue"}}'
    assert decode_namespace_labels(key, raw) == {"team": "blue", "example.com/tier": "1"}
    assert decode_namespace_labels(key, b'{"labels":{}}') == {}


@pytest.mark.parametrize("name", ["", "Shop", "a/b", "-a", "a" * 64, "../x", "a b"])
def test_a_name_that_is_no_namespace_makes_no_key(name: str) -> None:
    with pytest.raises(NamespaceError):
        namespace_key(name)
    with pytest.raises(ClusterRecordError, match="not a namespace key"):
        parse_namespace_key(NAMESPACES_PREFIX + name)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "expected a JSON object"),
        (b"{}", "'labels' is not an object"),
        (b'{"labels": ["team=blue"]}', "'labels' is not an object"),
        (b'{"labels": {"team": 1}}', "label 'team' is not a string"),
        (b'{"labels": {"team": "blue green"}}', "a value is empty or 1-63"),
        (b'{"labels": {"-team": "blue"}}', "the name must be"),
        (b'{"labels": {"Bad_Prefix/team": "blue"}}', "must be a DNS subdomain"),
    ],
)
def test_a_record_written_by_something_else_is_refused_by_name(raw: bytes, message: str) -> None:
    with pytest.raises(ClusterRecordError, match=message) as caught:
        decode_namespace_labels("state/namespaces/v1/shop", raw)
    assert str(caught.value).startswith("state/namespaces/v1/shop: ")


def test_a_stored_name_label_is_ignored_never_believed() -> None:
    raw = b'{"labels": {"kubernetes.io/metadata.name": "other", "team": "blue"}}'
    assert decode_namespace_labels("state/namespaces/v1/shop", raw) == {"team": "blue"}


def test_changes_apply_over_the_clusters_labels() -> None:
    current = {"team": "blue", "tier": "web", NAME: "shop"}
    assert relabelled("shop", current, ["team=red", "env=prod"]) == {
        "team": "red", "tier": "web", "env": "prod"
    }
    assert relabelled("shop", current, ["tier-"]) == {"team": "blue"}
    assert relabelled("shop", {}, ["gone-"]) == {}  # removing an absent label: no change
    with pytest.raises(NamespaceError, match="cannot be set or removed"):
        relabelled("shop", current, [f"{NAME}=x"])
    with pytest.raises(NamespaceError, match="both set and removed"):
        relabelled("shop", current, ["team=red", "team-"])
    with pytest.raises(NamespaceError, match="namespace 'Shop'"):
        relabelled("Shop", current, ["team=red"])


def test_a_namespace_whose_endpoints_wait_for_etcd_is_a_status_problem() -> None:
    from garrison.cluster.status import cluster_problems

    status = {"cluster": {"connected": True, "endpoints": ["198.19.0.242:2379"],
                          "namespaces_not_applied": ["shop"]}}
    assert cluster_problems(status) == [
        "namespace shop: its new labels are stored here but some of its endpoints keep their"
        " old identity until etcd answers (retried on each heartbeat)"
    ]
