"""The cluster's records and key layout, and the status lines built from an agent's status."""

from __future__ import annotations

import ipaddress

import pytest

from garrison.cluster.keys import (
    ClusterRecordError,
    IPEntry,
    NodeRecord,
    StoredPolicy,
    parse_policy_key,
    policy_key,
)
from garrison.cluster.status import cluster_lines, cluster_problems
from garrison.kvstore.etcd import parse_endpoints, prefix_range_end


def test_node_and_ip_records_round_trip() -> None:
    node = NodeRecord(
        "n1", ipaddress.IPv4Address("198.19.0.201"), ipaddress.IPv4Network("198.18.201.0/24")
    )
    assert NodeRecord.decode(node.key, node.encode()) == node
    assert node.key == "state/nodes/v1/n1"
    entry = IPEntry(ipaddress.IPv4Address("198.18.201.10"), 300, "k8s:app=a", "n1", "ep")
    assert IPEntry.decode(entry.key, entry.encode()) == entry
    assert entry.key == "state/ip/v1/198.18.201.10"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"ip": "198.18.0.1", "identity": -1, "labels": "", "node": "n"}', "positive"),
        (b'{"ip": "198.18.0.1", "identity": "300", "labels": "", "node": "n"}', "positive"),
        (b'{"ip": "nope", "identity": 300, "labels": "", "node": "n"}', "bad ipcache entry"),
        # this node's host, a CIDR identity (node-local), a bool: never another node's endpoint
        (b'{"ip": "198.18.0.1", "identity": 1, "labels": "reserved:host", "node": "n"}',
         "identity 1 is not an endpoint's"),
        (b'{"ip": "198.18.0.1", "identity": 16777217, "labels": "", "node": "n"}',
         "identity 16777217 is not an endpoint's"),
        (b'{"ip": "198.18.0.1", "identity": true, "labels": "", "node": "n"}', "positive"),
        (b'{"identity": 300}', "bad ipcache entry"),
    ],
)
def test_bad_ip_entries_are_typed_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ClusterRecordError, match=message):
        IPEntry.decode("state/ip/v1/x", raw)


@pytest.mark.parametrize(
    "key",
    [
        ("CiliumNetworkPolicy", "default", "web"),
        ("CiliumClusterwideNetworkPolicy", None, "all"),
        ("NetworkPolicy", "_", "a/b c"),  # a namespace named "_" is not "no namespace"
    ],
)
def test_policy_keys_round_trip(key: tuple[str, str | None, str]) -> None:
    text = policy_key(key)
    assert text.count("/") == 5  # state/policies/v1/<kind>/<ns>/<name>
    assert parse_policy_key(text) == key
    stored = StoredPolicy("/p.yaml", "kind: x\n")
    assert StoredPolicy.decode(text, stored.encode()) == stored


def test_prefix_range_end_and_endpoints() -> None:
    assert prefix_range_end(b"garrison/ip/") == b"garrison/ip0"
    assert prefix_range_end(b"a\xff\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\x00"
    assert parse_endpoints(["http://[::1]:2379"]) == ("[::1]:2379",)


def cluster_status(**overrides: object) -> dict[str, object]:
    cluster: dict[str, object] = {
        "node": "n1",
        "endpoints": ["198.19.0.250:2379"],
        "connected": True,
        "lease": "6a6c",
        "lease_ttl_s": 15,
        "revision": 42,
        "watches": {},
        "nodes": {
            "n1": {
                "ip": "198.19.0.201",
                "pod_cidr": "198.18.201.0/24",
                "healthy": True,
                "heartbeat_age_s": 1.0,
            },
            "n2": {
                "ip": "198.19.0.202",
                "pod_cidr": "198.18.202.0/24",
                "healthy": True,
                "heartbeat_age_s": 2.0,
            },
        },
        "remote_endpoints": 3,
        "routes": {"198.18.202.0/24": "198.19.0.202"},
        "errors": [],
    }
    cluster.update(overrides)
    return {"cluster": cluster}


def test_status_lines_of_a_healthy_cluster() -> None:
    data = cluster_status()
    assert cluster_problems(data) == []
    assert cluster_lines(data) == [
        "Kvstore:         etcd 198.19.0.250:2379, connected, revision 42, lease 6a6c (TTL 15 s)",
        "Cluster:         node n1, 3 remote endpoints",
        "  n1             198.19.0.201    198.18.201.0/24    healthy",
        "  n2             198.19.0.202    198.18.202.0/24    healthy, routed via 198.19.0.202",
    ]
    assert cluster_lines({}) == [] and cluster_problems({}) == []


def test_status_problems_name_the_cause() -> None:
    data = cluster_status(
        connected=False,
        error="etcd lease keepalive: no etcd answers at 198.19.0.250:2379",
        nodes={
            "n2": {
                "ip": "198.19.0.202",
                "pod_cidr": "198.18.202.0/24",
                "healthy": False,
                "heartbeat_age_s": 31.5,
            }
        },
        route_errors={"n3": "a route to 198.18.203.0/24 that garrison did not add exists"},
    )
    assert cluster_problems(data) == [
        "etcd at 198.19.0.250:2379 is not connected: etcd lease keepalive: no etcd answers at"
        " 198.19.0.250:2379; enforcement stays as it is, new identities and policy imports wait"
        " until it answers",
        "node n2: no heartbeat for 31.5 s; its lease ends its endpoints",
        "route to node n3: a route to 198.18.203.0/24 that garrison did not add exists",
    ]
    assert "NOT CONNECTED" in cluster_lines(data)[0]


def test_a_refused_record_is_a_problem_naming_its_key_and_the_fix() -> None:
    data = cluster_status(
        root="garrison/", refused={"state/nodes/v1/x": "state/nodes/v1/x: not JSON: bad"}
    )
    assert cluster_problems(data) == [
        "etcd record refused, this node ignores it: state/nodes/v1/x: not JSON: bad; rewrite"
        " or delete it (etcdctl del garrison/state/nodes/v1/x)"
    ]
    data["cluster"]["refused_count"] = 5001
    assert cluster_problems(data)[-1] == (
        "5000 more etcd records refused (the agent's log names each)"
    )


def test_a_node_record_under_another_node_s_key_is_refused() -> None:
    record = NodeRecord("n1", ipaddress.IPv4Address("198.19.0.201"),
                        ipaddress.IPv4Network("198.18.201.0/24"))
    assert NodeRecord.decode(record.key, record.encode()) == record
    with pytest.raises(ClusterRecordError, match="its name 'n1' is not its key's"):
        NodeRecord.decode("state/nodes/v1/n2", record.encode())


def test_an_ip_entry_under_another_address_s_key_is_refused() -> None:
    """Its deletion would remove the key's address, not the one it set: it would outlive it."""
    entry = IPEntry(ipaddress.IPv4Address("198.18.201.10"), 300, "k8s:app=a", "n1", "ep")
    with pytest.raises(ClusterRecordError, match=r"its address 198\.18\.201\.10 is not its key.s"):
        IPEntry.decode("state/ip/v1/198.18.201.11", entry.encode())


def test_identities_to_learn_adds_new_keeps_known_and_replaces_reused_numbers() -> None:
    from garrison.cluster.keys import identities_to_learn
    from garrison.policies.labels import Labels

    web = "k8s:app=web;k8s:io.kubernetes.pod.namespace=default"
    db = "k8s:app=db;k8s:io.kubernetes.pod.namespace=default"
    known = {
        300: Labels.parse("k8s:app=web,k8s:io.kubernetes.pod.namespace=default"),
        301: Labels.parse("k8s:app=old,k8s:io.kubernetes.pod.namespace=default"),
    }

    def entry(n: int, identity: int, labels: str) -> IPEntry:
        return IPEntry(ipaddress.IPv4Address(f"198.18.201.{n}"), identity, labels, "n1")

    learn, replace, refused = identities_to_learn(
        [
            entry(1, 300, web),  # known with these labels: nothing to do
            entry(2, 301, db),  # 301 was given out again to other labels
            entry(3, 302, db.replace("db", "cache")),  # new
            entry(4, 302, db.replace("db", "cache")),  # the same again: once
            entry(5, 303, "not canonical"),
            entry(6, 302, web),  # one number, two label sets in one batch
        ],
        known.get,
    )
    assert set(learn) == {301, 302} and replace == {301}
    assert learn[301] == Labels.parse("k8s:app=db,k8s:io.kubernetes.pod.namespace=default")
    assert [(e.identity, why.split(":")[0]) for e, why in refused] == [
        (303, "malformed canonical labels 'not canonical'"),
        (302, "identity 302 has two label sets in one batch"),
    ]


def test_a_relist_becomes_only_the_changes_since_what_was_known() -> None:
    from garrison.cluster.node import _diff
    from garrison.kvstore.base import KeyDeleted, KeyPut, Relisted

    view: dict[str, bytes] = {}
    assert _diff(view, Relisted({"a": b"1", "b": b"2"}, 10, "initial list")) == (
        {"a": b"1", "b": b"2"},
        [],
    )
    assert _diff(view, KeyPut("a", b"1", 11)) == ({}, [])  # the same value again: no change
    assert _diff(view, KeyPut("c", b"3", 12)) == ({"c": b"3"}, [])
    assert _diff(view, KeyDeleted("zz", 13)) == ({}, [])  # never known
    # After a compaction: b changed, c went, d came, a stayed — only those are news.
    assert _diff(view, Relisted({"a": b"1", "b": b"20", "d": b"4"}, 20, "compacted")) == (
        {"b": b"20", "d": b"4"},
        ["c"],
    )
    assert view == {"a": b"1", "b": b"20", "d": b"4"}
