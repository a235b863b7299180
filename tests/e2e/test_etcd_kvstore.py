"""The etcd backend against a real etcd 3.4: the KVStore contract, transactions, leases that
expire, sessions and watches that survive an etcd restart, and compaction re-lists.

One etcd per module (its root prefix differs per test); the restart tests use their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from garrison.kvstore.base import (
    Absent,
    Delete,
    InvalidKeyError,
    KeyDeleted,
    KeyPut,
    KVStoreError,
    KVStoreUnavailableError,
    NoneWithPrefix,
    Op,
    Put,
    Relisted,
    ValueIs,
    WatchEvent,
)
from garrison.kvstore.etcd import EtcdKVStore, EtcdWatch, EventQueue, apply_event, parse_endpoints
from tests.etcd_server import EtcdServer, etcd_skip_reason, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
]


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(name="ge-kv") as server:
        yield server


@pytest.fixture
def store(etcd: EtcdServer) -> Iterator[EtcdKVStore]:
    with EtcdKVStore(etcd.url, root=f"ge-test-{uuid.uuid4().hex[:8]}/") as kv:
        yield kv


# The KVStore contract (as tests/unit/kvstore/test_kvstore_sqlite.py checks it for SQLite) ------


def test_get_put_delete(store: EtcdKVStore) -> None:
    assert store.get("a/b") is None
    store.put("a/b", b"1")
    assert store.get("a/b") == b"1"
    store.put("a/b", b"2")
    assert store.get("a/b") == b"2"
    assert store.delete("a/b") is True
    assert store.delete("a/b") is False
    assert store.get("a/b") is None


def test_create_only_if_absent(store: EtcdKVStore) -> None:
    assert store.create("k", b"first") is True
    assert store.create("k", b"second") is False
    assert store.get("k") == b"first"


@pytest.mark.parametrize(
    ("initial", "expected", "new", "swapped", "after"),
    [
        (None, None, b"v1", True, b"v1"),
        (b"v0", None, b"v1", False, b"v0"),
        (b"v0", b"v0", b"v1", True, b"v1"),
        (b"v0", b"other", b"v1", False, b"v0"),
        (None, b"v0", b"v1", False, None),
        (b"", b"", b"x", True, b"x"),
    ],
)
def test_compare_and_swap(
    store: EtcdKVStore,
    initial: bytes | None,
    expected: bytes | None,
    new: bytes,
    swapped: bool,
    after: bytes | None,
) -> None:
    if initial is not None:
        store.put("k", initial)
    assert store.compare_and_swap("k", expected, new) is swapped
    assert store.get("k") == after


def test_compare_and_delete(store: EtcdKVStore) -> None:
    store.put("k", b"v")
    assert store.compare_and_delete("k", b"other") is False
    assert store.get("k") == b"v"
    assert store.compare_and_delete("k", b"v") is True
    assert store.get("k") is None
    assert store.compare_and_delete("k", b"v") is False


def test_list_prefix_is_a_plain_string_prefix_under_the_root(
    store: EtcdKVStore, etcd: EtcdServer
) -> None:
    for key in ("ids/1", "ids/2", "ids/10", "idsx", "other/1", "ids/é/\xff"):
        store.put(key, key.encode())
    assert store.list_prefix("ids/") == {
        "ids/1": b"ids/1",
        "ids/10": b"ids/10",
        "ids/2": b"ids/2",
        "ids/é/\xff": "ids/é/\xff".encode(),
    }
    assert set(store.list_prefix("")) == {
        "ids/1",
        "ids/2",
        "ids/10",
        "idsx",
        "other/1",
        "ids/é/\xff",
    }
    # Another root in the same etcd sees none of it.
    with EtcdKVStore(etcd.url, root=store.root.rstrip("/") + "-other/") as other:
        assert other.list_prefix("") == {}


def test_invalid_keys_are_refused(store: EtcdKVStore) -> None:
    with pytest.raises(InvalidKeyError):
        store.put("", b"v")
    with pytest.raises(InvalidKeyError):
        store.get("a\x00b")


def test_transaction_applies_all_or_nothing(store: EtcdKVStore) -> None:
    store.put("held", b"1")
    ops: list[Op] = [Put("a", b"A"), Put("b", b"B"), Delete("held")]
    assert store.transaction([Absent("a"), ValueIs("held", b"2")], ops) is False
    assert store.get("a") is None and store.get("held") == b"1"
    assert store.transaction([Absent("a"), ValueIs("held", b"1")], ops) is True
    assert (store.get("a"), store.get("b"), store.get("held")) == (b"A", b"B", None)


def test_transaction_none_with_prefix(store: EtcdKVStore) -> None:
    assert store.transaction([NoneWithPrefix("refs/x/")], [Put("gc", b"1")]) is True
    store.put("refs/x/node1", b"")
    store.put("refs/xy", b"")  # shares the string prefix "refs/x" but not "refs/x/"
    assert store.transaction([NoneWithPrefix("refs/x/")], [Put("gc", b"2")]) is False
    assert store.get("gc") == b"1"
    store.delete("refs/x/node1")
    assert store.transaction([NoneWithPrefix("refs/x/")], [Put("gc", b"3")]) is True


def test_concurrent_creates_have_one_winner(store: EtcdKVStore) -> None:
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def contend(n: int) -> None:
        barrier.wait()
        if store.create("contended", str(n).encode()):
            wins.append(n)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get("contended") == str(wins[0]).encode()


def test_endpoints_are_parsed_and_bad_ones_named() -> None:
    assert parse_endpoints("http://127.0.0.1:2379, 127.0.0.1:22379") == (
        "127.0.0.1:2379",
        "127.0.0.1:22379",
    )
    with pytest.raises(KVStoreError, match="no port"):
        parse_endpoints("http://127.0.0.1")
    with pytest.raises(KVStoreError, match="mix http:// and https://"):
        parse_endpoints("https://127.0.0.1:2379,http://127.0.0.1:2380")
    with pytest.raises(KVStoreError, match="no etcd endpoint"):
        parse_endpoints(" , ")


def test_unreachable_etcd_is_a_typed_error_naming_the_fix() -> None:
    from tests.etcd_server import _free_port

    with (
        EtcdKVStore(f"http://127.0.0.1:{_free_port()}", timeout_s=1.0) as kv,
        pytest.raises(KVStoreUnavailableError, match="start etcd or fix --kvstore-endpoints"),
    ):
        kv.get("k")


def test_closed_store_refuses_operations(etcd: EtcdServer) -> None:
    kv = EtcdKVStore(etcd.url, root="ge-closed/")
    kv.close()
    kv.close()
    with pytest.raises(KVStoreError, match="closed"):
        kv.get("k")


# Leases and sessions ------------------------------------------------------------------------


def test_leased_key_vanishes_when_nobody_renews(store: EtcdKVStore) -> None:
    lease = store.grant_lease(2)
    store.put("nodes/n1", b"up", lease=lease)
    assert store.get("nodes/n1") == b"up"
    wait_for(lambda: store.get("nodes/n1") is None, 6.0, "the lease to expire")
    assert store.lease_ttl(lease) == -1


def test_session_keeps_its_keys_alive_past_the_ttl_and_revokes_on_close(
    store: EtcdKVStore,
) -> None:
    session = store.session(2, name="ge-keep")
    assert session.wait_ready(5.0)
    session.put("nodes/n1", b"up")
    time.sleep(4.5)  # more than twice the TTL
    assert store.get("nodes/n1") == b"up"
    session.delete("nodes/n1")
    assert session.wait_flushed(5.0)
    assert store.get("nodes/n1") is None
    session.put("nodes/n1", b"again")
    assert session.wait_flushed(5.0)
    assert store.get("nodes/n1") == b"again"
    lease = session.lease
    assert lease is not None
    session.close()
    assert store.get("nodes/n1") is None
    assert store.lease_ttl(lease) == -1


def test_session_rewrites_its_keys_after_its_lease_was_lost(store: EtcdKVStore) -> None:
    session = store.session(10, name="ge-lost")
    assert session.wait_ready(5.0)
    new_leases: list[int] = []
    session.on_new_lease(new_leases.append)
    session.put("nodes/n1", b"up")
    assert session.wait_flushed(5.0)
    first = session.lease
    assert first is not None
    store.revoke_lease(first)  # what etcd does when the agent was away for longer than the TTL
    assert store.get("nodes/n1") is None
    wait_for(lambda: store.get("nodes/n1") == b"up", 10.0, "the session to rewrite its key")
    assert session.lease not in (None, first)
    assert new_leases == [session.lease]
    session.close()


# Watches ------------------------------------------------------------------------------------


def collect_until(events: EventQueue, predicate: Callable[[WatchEvent], bool]) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    while True:
        event = events.get(10.0)
        out.append(event)
        if predicate(event):
            return out


def test_watch_lists_then_follows_a_prefix(store: EtcdKVStore) -> None:
    store.put("ip/a", b"1")
    store.put("other", b"x")
    events = EventQueue()
    watch = store.watch("ip/", events)
    first = events.get(10.0)
    assert isinstance(first, Relisted)
    assert dict(first.items) == {"ip/a": b"1"}
    store.put("ip/b", b"2")
    store.put("other", b"y")
    store.delete("ip/a")
    lease = store.grant_lease(2)
    store.put("ip/c", b"3", lease=lease)
    got = collect_until(events, lambda e: isinstance(e, KeyDeleted) and e.key == "ip/c")
    assert [(type(e).__name__, e.key) for e in got if not isinstance(e, Relisted)] == [
        ("KeyPut", "ip/b"),
        ("KeyDeleted", "ip/a"),
        ("KeyPut", "ip/c"),
        ("KeyDeleted", "ip/c"),  # the lease expired
    ]
    revisions = [e.revision for e in got]
    assert revisions == sorted(revisions) and revisions[0] > first.revision
    watch.close()


def test_watch_delivers_a_transaction_as_one_revision(store: EtcdKVStore) -> None:
    events = EventQueue()
    watch = store.watch("t/", events)
    assert isinstance(events.get(10.0), Relisted)
    assert store.transaction([], [Put("t/1", b"a"), Put("t/2", b"b"), Put("t/3", b"c")])
    got = [events.get(10.0) for _ in range(3)]
    assert [e.key for e in got if isinstance(e, KeyPut)] == ["t/1", "t/2", "t/3"]
    assert len({e.revision for e in got}) == 1
    watch.close()


def test_watch_relists_when_its_history_was_compacted(store: EtcdKVStore) -> None:
    events = EventQueue()
    watch = store.watch("c/", events)
    assert isinstance(events.get(10.0), Relisted)
    store.put("c/1", b"1")
    assert isinstance(events.get(10.0), KeyPut)
    # The watch is behind (as after a long disconnect) and etcd compacted past it.
    watch.close()
    resume_at = watch.next_revision
    assert resume_at is not None
    store.put("c/2", b"2")
    store.delete("c/1")
    store.put("c/3", b"3")
    store.compact(store.revision())
    again = EtcdWatchFrom(store, "c/", events, resume_at)
    relisted = events.get(10.0)
    assert isinstance(relisted, Relisted)
    assert "compacted" in relisted.reason
    assert not relisted.restored
    assert dict(relisted.items) == {"c/2": b"2", "c/3": b"3"}
    store.put("c/4", b"4")
    after = events.get(10.0)
    assert isinstance(after, KeyPut) and after.key == "c/4"
    again.close()


def EtcdWatchFrom(store: EtcdKVStore, prefix: str, events: EventQueue, revision: int) -> EtcdWatch:
    """A watch that resumes at `revision` (as one that was disconnected would)."""
    watch = EtcdWatch(store, prefix, events, name="ge-resume")
    watch.next_revision = revision
    watch.start()
    return watch


# Surviving an etcd restart -------------------------------------------------------------------


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    with EtcdServer(name="ge-restart") as server:
        yield server


def test_watch_and_session_survive_an_etcd_restart_missing_and_repeating_nothing(
    own_etcd: EtcdServer,
) -> None:
    writer = EtcdKVStore(own_etcd.url, root="ge-r/", timeout_s=2.0)
    agent = EtcdKVStore(own_etcd.url, root="ge-r/", timeout_s=2.0)
    try:
        session = agent.session(10, name="ge-agent")
        assert session.wait_ready(5.0)
        session.put("nodes/agent", b"up")
        view: dict[str, bytes] = {}
        seen: list[WatchEvent] = []
        lock = threading.Lock()

        def on_event(event: WatchEvent) -> None:
            with lock:
                seen.append(event)
                apply_event(view, event)

        watch = agent.watch("ip/", on_event, name="ge-watch")
        wait_for(lambda: bool(seen), 10.0, "the initial list")
        stop = threading.Event()
        written: list[str] = []

        def write_forever() -> None:
            n = 0
            while not stop.is_set():
                key = f"ip/{n}"
                try:
                    writer.put(key, str(n).encode())
                except KVStoreUnavailableError:
                    time.sleep(0.05)
                    continue
                written.append(key)
                n += 1
                if n % 5 == 0:
                    try:
                        writer.delete(f"ip/{n - 5}")
                        written.append(f"-ip/{n - 5}")
                    except KVStoreUnavailableError:
                        pass
                time.sleep(0.01)

        thread = threading.Thread(target=write_forever)
        thread.start()
        time.sleep(0.5)
        own_etcd.restart(down_s=1.0)
        time.sleep(1.0)
        stop.set()
        thread.join()
        truth = writer.list_prefix("ip/")
        wait_for(lambda: view == truth, 15.0, "the watcher's view to equal etcd's content")
        with lock:
            followed = [e for e in seen if not isinstance(e, Relisted)]
            relists = [e for e in seen if isinstance(e, Relisted)]
        assert len(relists) == 1, "the restart must resume the watch, not re-list"
        assert watch.reconnects >= 1
        assert len(written) > 20
        # etcd's own history of the prefix since the initial list, read afresh after the
        # restart, is exactly what the watcher delivered: nothing missed, nothing repeated.
        history = EventQueue()
        replay = EtcdWatchFrom(writer, "ip/", history, relists[0].revision + 1)
        last = followed[-1].revision
        replayed = collect_until(history, lambda e: e.revision >= last)
        replay.close()
        assert replayed == followed
        # The session's key is still there (its lease survived the restart) and renewed.
        wait_for(lambda: session.connected, 10.0, "the session to reconnect")
        assert writer.get("nodes/agent") == b"up"
        assert session.leases_granted == 1
    finally:
        agent.close()
        writer.close()


@pytest.mark.parametrize("dead_first", [True, False])
def test_a_dead_endpoint_in_the_list_is_failed_over(etcd: EtcdServer, dead_first: bool) -> None:
    from tests.etcd_server import _free_port

    dead = f"http://127.0.0.1:{_free_port()}"
    urls = [dead, etcd.url] if dead_first else [etcd.url, dead]
    with EtcdKVStore(",".join(urls), root=f"ge-fo-{uuid.uuid4().hex[:8]}/", timeout_s=3.0) as kv:
        kv.put("k", b"v")
        assert kv.get("k") == b"v"


def test_session_writes_never_block_the_caller_while_etcd_is_away(own_etcd: EtcdServer) -> None:
    with EtcdKVStore(own_etcd.url, root="ge-away/", timeout_s=5.0) as kv:
        session = kv.session(10, name="ge-away")
        assert session.wait_ready(5.0)
        assert own_etcd.proc is not None
        os.kill(own_etcd.proc.pid, signal.SIGSTOP)  # a partition: requests hang, no reset
        t0 = time.monotonic()
        for n in range(20):
            session.put(f"ip/{n}", b"x")
        session.delete("ip/0")
        assert time.monotonic() - t0 < 0.5  # no round trip to a dead etcd on the caller
        assert not session.wait_flushed(0.5)
        os.kill(own_etcd.proc.pid, signal.SIGCONT)
        assert session.wait_flushed(15.0)
        assert sorted(kv.list_prefix("ip/")) == sorted(f"ip/{n}" for n in range(1, 20))


def test_a_watch_relists_when_etcd_comes_back_behind_what_it_saw(own_etcd: EtcdServer) -> None:
    with EtcdKVStore(own_etcd.url, root="ge-back/", timeout_s=2.0) as kv:
        for n in range(20):
            kv.put(f"ip/{n}", b"old")
        events = EventQueue()
        watch = kv.watch("ip/", events, name="ge-back")
        assert isinstance(events.get(10.0), Relisted)
        own_etcd.stop()
        shutil.rmtree(own_etcd.data_dir / "data")  # a fresh etcd at the same address
        own_etcd.start()
        kv.put("ip/new", b"1")
        again = events.get(15.0)
        assert isinstance(again, Relisted), again
        assert "went back" in again.reason
        assert again.restored  # keys missing may have been lost, not deleted
        # The put may land before or after the re-list: either way the view ends right.
        view = dict(again.items)
        while view != {"ip/new": b"1"}:
            apply_event(view, events.get(10.0))
        watch.close()
