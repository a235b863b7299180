"""Endpoint and CIDR identity allocation over the SQLite kvstore."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.identity.allocator import AllocatorConfig, IdentityAllocator
from garrison.identity.filter import LabelFilter
from garrison.identity.model import (
    CIDR_ID_FLAG,
    RESERVED,
    Identity,
    IdentityRangeExhaustedError,
    InvalidIdentityLabelsError,
    cidr_labels,
)
from garrison.kvstore import SQLiteKVStore
from garrison.policies.labels import Labels, endpoint_labels


def pod(text: str, namespace: str = "default") -> Labels:
    return endpoint_labels(Labels.parse(text), namespace)


@pytest.fixture
def store() -> Iterator[SQLiteKVStore]:
    with SQLiteKVStore(":memory:") as kv:
        yield kv


@pytest.fixture
def allocator(store: SQLiteKVStore) -> IdentityAllocator:
    return IdentityAllocator(store)


def test_first_identity_is_256_with_filtered_labels(allocator: IdentityAllocator) -> None:
    identity = allocator.allocate(pod("app=web,pod-template-hash=abc"), "ep-1")
    assert identity == Identity(256, pod("app=web"))
    assert identity.is_endpoint


def test_same_labels_share_one_identity(allocator: IdentityAllocator) -> None:
    a = allocator.allocate(pod("app=web,tier=fe"), "ep-1")
    b = allocator.allocate(pod("tier=fe,app=web"), "ep-2")
    assert a == b


def test_namespace_is_part_of_the_identity(allocator: IdentityAllocator) -> None:
    prod = allocator.allocate(pod("app=web", "prod"), "ep-1")
    dev = allocator.allocate(pod("app=web", "dev"), "ep-2")
    assert prod.id != dev.id
    assert prod.labels.namespace == "prod" and dev.labels.namespace == "dev"


@pytest.mark.parametrize(
    "volatile",
    [
        "pod-template-hash=5d8f7c",
        "controller-revision-hash=web-6b9",
        "pod-template-generation=7",
        "io.kubernetes.pod.name=web-abc",
        "statefulset.kubernetes.io/pod-name=web-0",
        "apps.kubernetes.io/pod-index=0",
        "batch.kubernetes.io/job-name=nightly",
        "annotation.note=x",
    ],
)
def test_volatile_labels_do_not_split_identities(
    allocator: IdentityAllocator, volatile: str
) -> None:
    plain = allocator.allocate(pod("app=web"), "ep-1")
    assert allocator.allocate(pod(f"app=web,{volatile}"), "ep-2") == plain


def test_different_labels_get_ascending_numbers(allocator: IdentityAllocator) -> None:
    numbers = [allocator.allocate(pod(f"app=a{i}"), "ep").id for i in range(5)]
    assert numbers == [256, 257, 258, 259, 260]


def test_lookups(allocator: IdentityAllocator) -> None:
    assert allocator.lookup_labels(pod("app=web")) is None
    assert allocator.lookup_id(256) is None
    identity = allocator.allocate(pod("app=web"), "ep-1")
    assert allocator.lookup_labels(pod("app=web,pod-template-hash=zz")) == identity
    assert allocator.lookup_id(identity.id) == identity
    assert allocator.lookup_id(257) is None
    assert allocator.lookup_id(0) is None
    assert allocator.lookup_id(70000) is None
    assert allocator.lookup_id(2) == RESERVED["world"]


def test_all_lists_reserved_endpoint_and_cidr(allocator: IdentityAllocator) -> None:
    web = allocator.allocate(pod("app=web"), "ep-1")
    net = allocator.cidr_identity("198.18.0.0/15")
    everything = allocator.all()
    assert everything == {
        **{i.id: i.labels for i in RESERVED.values()},
        web.id: web.labels,
        net.id: net.labels,
    }


def test_reserved_labels_return_reserved_identities(allocator: IdentityAllocator) -> None:
    assert (
        allocator.allocate(Labels.parse("reserved:host,k8s:node=n1"), "agent") == RESERVED["host"]
    )
    assert allocator.allocate(Labels.parse("reserved:health"), "agent") == RESERVED["health"]
    assert allocator.lookup_labels(Labels.parse("reserved:world")) == RESERVED["world"]
    assert allocator.release(RESERVED["host"], "agent") is False
    assert allocator.all().keys() == {i.id for i in RESERVED.values()}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (Labels.parse("pod-template-hash=abc"), "no identity-relevant label"),
        (Labels(), "no identity-relevant label"),
        (Labels.parse("reserved:world,app=web"), "mix reserved labels"),
        (cidr_labels("10.0.0.0/8"), "use cidr_identity"),
    ],
)
def test_labels_that_name_no_endpoint_identity(
    allocator: IdentityAllocator, labels: Labels, message: str
) -> None:
    with pytest.raises(InvalidIdentityLabelsError, match=message):
        allocator.allocate(labels, "ep-1")


def test_stable_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "state" / "kv.sqlite"
    sets = [pod("app=web", "prod"), pod("app=db", "prod"), pod("app=web", "dev")]
    with SQLiteKVStore(path) as kv:
        allocator = IdentityAllocator(kv)
        before = [allocator.allocate(labels, "ep-1").id for labels in sets]
        cidr_before = allocator.cidr_identity("203.0.113.0/24").id
    with SQLiteKVStore(path) as kv:
        allocator = IdentityAllocator(kv)
        # reversed order: a fresh allocator would hand out 256 first
        after = [allocator.allocate(labels, "ep-2").id for labels in reversed(sets)]
        assert list(reversed(after)) == before
        assert allocator.cidr_identity("203.0.113.0/24").id == cidr_before
        assert allocator.owners(sets[0]) == {"ep-1", "ep-2"}


def test_refcount_with_two_owners(allocator: IdentityAllocator) -> None:
    labels = pod("app=web")
    identity = allocator.allocate(labels, "ep-1")
    assert allocator.allocate(labels, "ep-2") == identity
    assert allocator.owners(identity) == {"ep-1", "ep-2"}
    assert allocator.release(identity, "ep-1") is False  # ep-2 still holds it
    assert allocator.lookup_id(identity.id) == identity
    assert allocator.release(identity, "ep-1") is False  # no longer an owner: nothing to do
    assert allocator.release(labels, "ep-2") is True  # the last owner frees it
    assert allocator.lookup_id(identity.id) is None
    assert allocator.lookup_labels(labels) is None
    assert allocator.owners(identity) == frozenset()
    assert allocator.release(identity, "ep-2") is False


def test_allocating_twice_for_one_owner_holds_one_reference(
    allocator: IdentityAllocator,
) -> None:
    labels = pod("app=web")
    first = allocator.allocate(labels, "ep-1")
    assert allocator.allocate(labels, "ep-1") == first
    assert allocator.release(labels, "ep-1") is True


def test_released_numbers_are_reused_lowest_first(allocator: IdentityAllocator) -> None:
    web = allocator.allocate(pod("app=web"), "ep-1")
    db = allocator.allocate(pod("app=db"), "ep-2")
    assert (web.id, db.id) == (256, 257)
    assert allocator.release(web, "ep-1") is True
    cache = allocator.allocate(pod("app=cache"), "ep-3")
    assert cache.id == 256
    assert allocator.lookup_id(256) == cache
    # the old labels come back with a new number
    assert allocator.allocate(pod("app=web"), "ep-1").id == 258


def test_release_with_a_stale_identity_does_not_touch_its_successor(
    allocator: IdentityAllocator,
) -> None:
    web = allocator.allocate(pod("app=web"), "ep-1")
    assert allocator.release(web, "ep-1") is True
    other = allocator.allocate(pod("app=db"), "ep-1")
    assert other.id == web.id
    assert allocator.release(web, "ep-1") is False
    assert allocator.lookup_id(other.id) == other


def test_unknown_release_is_false(allocator: IdentityAllocator) -> None:
    assert allocator.release(pod("app=ghost"), "ep-1") is False
    assert allocator.release(Identity(300, pod("app=ghost")), "ep-1") is False
    assert allocator.release(cidr_labels("10.0.0.0/8"), "ep-1") is False


def test_exhausted_range_says_so(store: SQLiteKVStore) -> None:
    allocator = IdentityAllocator(store, AllocatorConfig(min_endpoint_id=256, max_endpoint_id=258))
    for i in range(3):
        allocator.allocate(pod(f"app=a{i}"), "ep")
    with pytest.raises(IdentityRangeExhaustedError, match=r"256–258 is exhausted: all 3"):
        allocator.allocate(pod("app=one-too-many"), "ep")
    # existing label sets still resolve, and a release makes room again
    assert allocator.allocate(pod("app=a1"), "ep-2").id == 257
    assert allocator.release(pod("app=a0"), "ep") is True
    assert allocator.allocate(pod("app=one-too-many"), "ep").id == 256


@pytest.mark.parametrize(
    "config",
    [
        {"min_endpoint_id": 255},
        {"max_endpoint_id": 65536},
        {"min_endpoint_id": 300, "max_endpoint_id": 299},
        {"node_name": ""},
        {"node_name": "a/b"},
        {"max_attempts": 0},
    ],
)
def test_bad_config(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AllocatorConfig(**config)  # type: ignore[arg-type]


def test_custom_label_filter(store: SQLiteKVStore) -> None:
    config = AllocatorConfig(label_filter=LabelFilter.parse(["k8s:app$"]))
    allocator = IdentityAllocator(store, config)
    a = allocator.allocate(pod("app=web,team=a"), "ep-1")
    b = allocator.allocate(pod("app=web,team=b"), "ep-2")
    assert a == b
    assert a.labels == pod("app=web")


# CIDR identities ------------------------------------------------------------------------------


def test_cidr_identities(allocator: IdentityAllocator) -> None:
    a = allocator.cidr_identity("10.0.0.0/8")
    b = allocator.cidr_identity("2001:db8::/32")
    assert (a.id, b.id) == (CIDR_ID_FLAG | 1, CIDR_ID_FLAG | 2)
    for identity in (a, b):
        assert identity.id & CIDR_ID_FLAG
        assert identity.is_cidr and not identity.is_endpoint and not identity.is_reserved
    assert a.labels == cidr_labels("10.0.0.0/8")
    assert allocator.cidr_identity("10.9.9.9/8") == a  # same prefix after normalising
    assert allocator.lookup_labels(cidr_labels("10.0.0.0/8")) == a
    assert allocator.lookup_labels(cidr_labels("11.0.0.0/8")) is None
    assert allocator.lookup_id(a.id) == a
    assert allocator.lookup_id(CIDR_ID_FLAG | 3) is None


def test_cidr_identities_are_node_local(store: SQLiteKVStore) -> None:
    one = IdentityAllocator(store, AllocatorConfig(node_name="node-1"))
    two = IdentityAllocator(store, AllocatorConfig(node_name="node-2"))
    one.cidr_identity("10.0.0.0/8")
    assert two.lookup_labels(cidr_labels("10.0.0.0/8")) is None
    assert two.cidr_identity("192.0.2.0/24").id == CIDR_ID_FLAG | 1
    # endpoint identities are shared by every node
    assert one.allocate(pod("app=web"), "n1") == two.allocate(pod("app=web"), "n2")


@pytest.mark.parametrize("prefix", ["0.0.0.0/0", "::/0"])
def test_default_route_is_world(allocator: IdentityAllocator, prefix: str) -> None:
    assert allocator.identity_for_prefix(prefix) == RESERVED["world"]


def test_identity_for_prefix(allocator: IdentityAllocator) -> None:
    assert allocator.identity_for_prefix("192.0.2.0/24") == allocator.cidr_identity("192.0.2.0/24")


# Races decided inside one process: another writer acts between our read and our write ---------


def test_losing_the_labels_key_gives_the_number_back(store: SQLiteKVStore) -> None:
    allocator = IdentityAllocator(store)
    rival = IdentityAllocator(store)
    labels = pod("app=web")
    real_create = store.create
    raced = False

    def create(key: str, value: bytes) -> bool:
        nonlocal raced
        if key.startswith("identities/labels/") and not raced:
            raced = True
            # the rival claims 257 and publishes the labels first
            rival.allocate(labels, "rival")
        return real_create(key, value)

    store.create = create  # type: ignore[method-assign]
    identity = allocator.allocate(labels, "ep-1")
    store.create = real_create  # type: ignore[method-assign]
    assert identity.id == 257
    assert allocator.owners(identity) == {"ep-1", "rival"}
    assert store.get("identities/id/256") is None  # our claim went back
    assert allocator.allocate(pod("app=db"), "ep-2").id == 256


def test_release_racing_a_new_owner(store: SQLiteKVStore) -> None:
    allocator = IdentityAllocator(store)
    labels = pod("app=web")
    identity = allocator.allocate(labels, "ep-1")
    real_cad = store.compare_and_delete
    raced = False

    def compare_and_delete(key: str, expected: bytes) -> bool:
        nonlocal raced
        if key.startswith("identities/labels/") and not raced:
            raced = True
            allocator.allocate(labels, "ep-2")  # joins between our read and our delete
        return real_cad(key, expected)

    store.compare_and_delete = compare_and_delete  # type: ignore[method-assign]
    assert allocator.release(identity, "ep-1") is False
    store.compare_and_delete = real_cad  # type: ignore[method-assign]
    assert allocator.owners(identity) == {"ep-2"}
    assert allocator.lookup_id(identity.id) == identity
