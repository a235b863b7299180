"""Cluster identities on a real etcd: several nodes' allocators at once never collide and agree,
references are per node and lease-bound, unreferenced identities are collected, and a node
that lost its lease gets its references (and numbers) back."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator

import pytest

from garrison.identity.allocator import (
    AllocatorConfig,
    ClusterIdentityAllocator,
    canonical_labels,
)
from garrison.identity.model import Identity
from garrison.kvstore.etcd import EtcdKVStore, EtcdSession
from garrison.policies.labels import Labels
from tests.etcd_server import EtcdServer, etcd_skip_reason, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
]


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(name="ge-id") as server:
        yield server


class Node:
    """One agent's view: its own etcd client, session (lease) and allocator."""

    def __init__(self, url: str, root: str, name: str, ttl_s: int = 10) -> None:
        self.store = EtcdKVStore(url, root=root)
        self.session: EtcdSession = self.store.session(ttl_s, name=f"ge-{name}")
        assert self.session.wait_ready(5.0)
        self.allocator = ClusterIdentityAllocator(
            self.store,
            AllocatorConfig(node_name=name),
            lease=self.session.require_lease,
        )
        self.session.on_new_lease(lambda _lease: self.allocator.restore())

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def nodes(etcd: EtcdServer) -> Iterator[list[Node]]:
    root = f"ge-id-{uuid.uuid4().hex[:8]}/"
    made = [Node(etcd.url, root, f"node{i}") for i in range(1, 4)]
    yield made
    for node in made:
        node.close()


def labels(app: str) -> Labels:
    return Labels.parse(f"k8s:app={app},k8s:io.kubernetes.pod.namespace=default")


def test_three_nodes_allocating_at_once_never_collide_and_agree(nodes: list[Node]) -> None:
    shared = [labels(f"shared-{i}") for i in range(25)]
    results: dict[str, dict[Labels, int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(nodes))

    def run(node: Node, seed: int) -> None:
        own = [labels(f"{node.allocator.config.node_name}-only-{i}") for i in range(8)]
        work = shared + own
        random.Random(seed).shuffle(work)
        got: dict[Labels, int] = {}
        try:
            barrier.wait()
            for lab in work:
                got[lab] = node.allocator.allocate(lab, owner="ep-1").id
        except BaseException as exc:
            errors.append(exc)
        results[node.allocator.config.node_name] = got

    threads = [threading.Thread(target=run, args=(n, i)) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # Agree: the same labels have the same number on every node.
    for lab in shared:
        assert len({results[name][lab] for name in results}) == 1, lab
    # Never collide: different labels, different numbers, cluster-wide.
    by_labels: dict[Labels, int] = {}
    for got in results.values():
        by_labels.update(got)
    assert len(set(by_labels.values())) == len(by_labels) == 25 + 3 * 8
    # The store says the same: each number names its labels and back.
    reader = nodes[0].allocator
    for lab, number in by_labels.items():
        looked_up = reader.lookup_id(number)
        assert looked_up is not None and looked_up.labels == reader.relevant_labels(lab)
    # Every node references every shared identity.
    assert reader.owners(labels("shared-0")) == {f"node{i}/ep-1" for i in (1, 2, 3)}


def test_identity_is_freed_when_the_last_node_releases_it(nodes: list[Node]) -> None:
    a, b = nodes[0].allocator, nodes[1].allocator
    lab = labels("web")
    ida = a.allocate(lab, "ep-a1")
    assert a.allocate(lab, "ep-a2") == ida
    assert b.allocate(lab, "ep-b1") == ida
    assert a.owners(lab) == {"node1/ep-a1", "node1/ep-a2", "node2/ep-b1"}
    assert a.release(ida, "ep-a1") is False
    assert a.release(ida, "ep-a2") is False  # node2 still references it
    assert a.lookup_id(ida.id) == ida
    assert b.release(ida, "ep-b1") is True
    assert a.lookup_id(ida.id) is None
    assert a.lookup_labels(lab) is None
    assert nodes[0].store.list_prefix("state/identities/") == {}


def test_a_dead_nodes_references_expire_and_its_identities_are_collected(
    etcd: EtcdServer,
) -> None:
    root = f"ge-id-{uuid.uuid4().hex[:8]}/"
    alive = Node(etcd.url, root, "alive")
    dying = Node(etcd.url, root, "dying", ttl_s=2)
    try:
        both = alive.allocator.allocate(labels("both"), "ep-1")
        assert dying.allocator.allocate(labels("both"), "ep-9") == both
        only_dying = dying.allocator.allocate(labels("only-dying"), "ep-9")
        assert alive.allocator.collect_garbage() == []
        dying.session.close(revoke=False)  # the agent dies: nobody renews its lease
        wait_for(
            lambda: alive.allocator.owners(labels("both")) == {"alive/ep-1"},
            8.0,
            "the dead node's references to expire",
        )
        assert alive.allocator.collect_garbage() == [only_dying.id]
        assert alive.allocator.lookup_id(only_dying.id) is None
        assert alive.allocator.lookup_id(both.id) == both
    finally:
        alive.close()
        dying.close()


def test_with_a_grace_a_dead_nodes_identity_goes_only_after_unbroken_sweeps(
    etcd: EtcdServer,
) -> None:
    """The agents sweep with a grace (`--identity-gc-grace`): an unreferenced identity is
    deleted only once sweeps a grace apart, and every sweep between, found it unreferenced; a
    reference written again in between (its node came back) starts the wait afresh. An
    identity the sweeping node holds itself is never deleted by its sweep."""
    root = f"ge-id-{uuid.uuid4().hex[:8]}/"
    alive = Node(etcd.url, root, "alive")
    dying = Node(etcd.url, root, "dying")
    try:
        gone = dying.allocator.allocate(labels("gone"), "ep-9")
        back = dying.allocator.allocate(labels("back"), "ep-9")
        mine = alive.allocator.allocate(labels("mine"), "ep-1")
        back_ref = dying.allocator._ref_key(canonical_labels(back.labels))
        # etcd forgot the dying node's lease: all its references vanished at once
        lease = dying.session.lease
        assert lease is not None
        dying.session.close(revoke=False)
        dying.store.revoke_lease(lease)
        # this node's own reference missing (say its write waits for etcd): held, so kept
        alive.store.delete(alive.allocator._ref_key(canonical_labels(mine.labels)))
        sweep = alive.allocator.collect_garbage
        assert sweep(60.0, now=1000.0) == []
        alive.store.put(back_ref, b'{"id":%d,"owners":["ep-9"]}' % back.id)  # back
        assert sweep(60.0, now=1030.0) == []
        alive.store.delete(back_ref)  # and away again
        assert sweep(60.0, now=1060.0) == [gone.id]
        assert alive.allocator.lookup_id(gone.id) is None
        assert sweep(60.0, now=1119.0) == []
        assert alive.allocator.lookup_labels(labels("back")) == back
        assert sweep(60.0, now=1120.0) == [back.id]
        assert alive.allocator.lookup_labels(labels("mine")) == mine
    finally:
        alive.close()
        dying.close()


def test_a_node_that_lost_its_lease_gets_its_references_and_numbers_back(
    nodes: list[Node],
) -> None:
    node, other = nodes[0], nodes[1]
    ids = {app: node.allocator.allocate(labels(app), "ep-1") for app in ("db", "cache")}
    lease = node.session.lease
    assert lease is not None
    # etcd forgot the lease (the node was away longer than the TTL): references gone, and
    # another node's collection removes the identities nobody references.
    node.store.revoke_lease(lease)
    other.allocator.collect_garbage()
    assert other.allocator.lookup_labels(labels("db")) is None

    def restored() -> bool:
        return all(
            other.allocator.lookup_labels(labels(app)) == identity
            and other.allocator.owners(identity) == {"node1/ep-1"}
            for app, identity in ids.items()
        )

    wait_for(restored, 10.0, "the node to restore its identities with their numbers")


def test_restore_takes_a_new_number_when_the_old_one_went_to_other_labels(
    nodes: list[Node],
) -> None:
    node, other = nodes[0].allocator, nodes[1].allocator
    old = node.allocate(labels("moved"), "ep-1")
    # Simulate the lost lease by hand: the reference and the identity vanish, and another
    # node takes the freed number for different labels.
    nodes[0].store.delete(node._ref_key(canonical_labels(old.labels)))
    assert other.collect_garbage() == [old.id]
    taken = other.allocate(labels("squatter"), "ep-2")
    assert taken.id == old.id
    changed = node.restore()
    new = node.lookup_labels(labels("moved"))
    assert isinstance(new, Identity) and new.id != old.id
    assert changed == {old.id: new.id}
    assert node.lookup_id(old.id) == taken


def test_known_labels_allocate_while_etcd_is_down_and_catch_up_after() -> None:
    from garrison.kvstore.base import KVStoreUnavailableError

    with EtcdServer(name="ge-id-down") as server:
        node = Node(server.url, "ge-down/", "node1")
        try:
            node.store.timeout_s = 1.0
            web = node.allocator.allocate(labels("web"), "ep-1")
            gone = node.allocator.allocate(labels("gone"), "ep-2")
            server.stop()
            # Known labels: from memory, no round trip.
            assert node.allocator.allocate(labels("web"), "ep-3") == web
            assert node.allocator.release(web, "ep-1") is False
            assert node.allocator.release(gone, "ep-2") is False  # freed once etcd is back
            # New labels wait for etcd, and say so.
            with pytest.raises(KVStoreUnavailableError, match="start etcd"):
                node.allocator.allocate(labels("new"), "ep-4")
            assert node.allocator.flush_pending() == 2
            server.start()
            wait_for(lambda: node.allocator.flush_pending() == 0, 10.0, "pending writes")
            assert node.allocator.owners(web) == {"node1/ep-3"}
            assert node.allocator.lookup_id(gone.id) is None
            assert node.allocator.allocate(labels("new"), "ep-4").id != web.id
        finally:
            node.close()


def test_an_identity_collected_meanwhile_comes_back_with_the_preferred_number(
    nodes: list[Node],
) -> None:
    """An agent restarting after its identities were collected (dead longer than the lease TTL
    and the grace) allocates them preferring the numbers its endpoints had: kept when free,
    a new number when another label set took it meanwhile."""
    node, other = nodes[0].allocator, nodes[1].allocator
    kept = node.allocate(labels("kept"), "ep-1")
    lost = node.allocate(labels("lost"), "ep-2")
    for identity in (kept, lost):
        nodes[0].store.delete(node._ref_key(canonical_labels(identity.labels)))
    assert sorted(other.collect_garbage()) == sorted([kept.id, lost.id])
    squatter = other.allocate(labels("squatter"), "ep-9", prefer=lost.id)
    assert squatter.id == lost.id
    again = nodes[2].allocator  # the restarted agent: nothing held yet
    assert again.allocate(labels("kept"), "ep-1", prefer=kept.id) == kept
    moved = again.allocate(labels("lost"), "ep-2", prefer=lost.id)
    assert moved.id not in (lost.id, kept.id) and moved.labels == lost.labels
    # a preference outside the endpoint range is no preference
    assert again.allocate(labels("fresh"), "ep-3", prefer=1).id >= 256
