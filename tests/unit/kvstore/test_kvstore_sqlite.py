"""The embedded SQLite store: the KVStore contract, open errors, and sharing between processes."""

from __future__ import annotations

import errno
import multiprocessing
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from garrison.kvstore import (
    InvalidKeyError,
    KVStore,
    KVStoreError,
    KVStoreOpenError,
    SQLiteKVStore,
)
from garrison.kvstore.sqlite import describe_os_error


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KVStore]:
    path = ":memory:" if request.param == "memory" else str(tmp_path / "state" / "kv.sqlite")
    with SQLiteKVStore(path) as kv:
        yield kv


def test_get_put_delete(store: KVStore) -> None:
    assert store.get("a/b") is None
    store.put("a/b", b"1")
    assert store.get("a/b") == b"1"
    store.put("a/b", b"2")
    assert store.get("a/b") == b"2"
    assert store.delete("a/b") is True
    assert store.delete("a/b") is False
    assert store.get("a/b") is None


def test_create_only_if_absent(store: KVStore) -> None:
    assert store.create("k", b"first") is True
    assert store.create("k", b"second") is False
    assert store.get("k") == b"first"


@pytest.mark.parametrize(
    ("initial", "expected", "new", "swapped", "after"),
    [
        (None, None, b"v1", True, b"v1"),  # expected=None: create
        (b"v0", None, b"v1", False, b"v0"),  # expected=None on an existing key: no write
        (b"v0", b"v0", b"v1", True, b"v1"),
        (b"v0", b"other", b"v1", False, b"v0"),
        (None, b"v0", b"v1", False, None),  # expected a value, key absent
        (b"", b"", b"x", True, b"x"),  # an empty value is a value, not absence
    ],
)
def test_compare_and_swap(
    store: KVStore,
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


@pytest.mark.parametrize(
    ("initial", "expected", "deleted"),
    [(b"v", b"v", True), (b"v", b"w", False), (None, b"v", False)],
)
def test_compare_and_delete(
    store: KVStore, initial: bytes | None, expected: bytes, deleted: bool
) -> None:
    if initial is not None:
        store.put("k", initial)
    assert store.compare_and_delete("k", expected) is deleted
    assert (store.get("k") is None) is (deleted or initial is None)


def test_list_prefix_is_a_plain_string_prefix(store: KVStore) -> None:
    keys = [
        "ids/1",
        "ids/10",
        "ids/2",
        "ids",  # shorter than the prefix
        "idsx/1",
        "id%/1",  # LIKE wildcards must not act as wildcards
        "id_/1",
        "ids/ünï/çødé",
        "ids/\U0010ffff",
        "other/ids/1",
    ]
    for key in keys:
        store.put(key, key.encode())
    assert store.list_prefix("ids/") == {
        k: k.encode() for k in ["ids/1", "ids/10", "ids/2", "ids/ünï/çødé", "ids/\U0010ffff"]
    }
    assert set(store.list_prefix("id%")) == {"id%/1"}
    assert set(store.list_prefix("id_")) == {"id_/1"}
    assert set(store.list_prefix("")) == set(keys)
    assert store.list_prefix("nothing/") == {}


@pytest.mark.parametrize("key", ["", "a\x00b"])
def test_invalid_keys_are_refused(store: KVStore, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.put(key, b"v")


def test_binary_values_round_trip(store: KVStore) -> None:
    value = bytes(range(256))
    store.put("bin", value)
    assert store.get("bin") == value


def test_closed_store_says_so(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite"
    kv = SQLiteKVStore(path)
    kv.close()
    kv.close()  # harmless
    with pytest.raises(KVStoreError, match=r"kv\.sqlite.* is closed"):
        kv.get("k")


def test_file_persists_across_reopen_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite"
    with SQLiteKVStore(path) as kv:
        kv.put("k", b"v")
    with SQLiteKVStore(path) as kv:
        assert kv.get("k") == b"v"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_store_in_state_dir(tmp_path: Path) -> None:
    with SQLiteKVStore.in_state_dir(tmp_path / "state") as kv:
        kv.put("k", b"v")
        assert kv.path == str(tmp_path / "state" / "kvstore.sqlite")
    assert (tmp_path / "state" / "kvstore.sqlite").is_file()


def test_creates_private_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "garrison" / "kv.sqlite"
    old_umask = os.umask(0o022)
    try:
        SQLiteKVStore(path).close()
    finally:
        os.umask(old_umask)
    for directory in (tmp_path / "var", tmp_path / "var" / "lib", path.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_open_error_when_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(KVStoreOpenError, match="is a directory") as info:
        SQLiteKVStore(tmp_path)
    assert info.value.path == str(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_open_error_when_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    with pytest.raises(KVStoreOpenError, match="not a directory"):
        SQLiteKVStore(blocker / "kv.sqlite")


def test_open_error_when_file_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(KVStoreOpenError, match="not a database"):
        SQLiteKVStore(path)


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
        (errno.EISDIR, "the path is a directory"),
        (errno.ENOSPC, "no space left on device"),
    ],
)
def test_os_errors_are_described(err: int, reason: str) -> None:
    assert describe_os_error(OSError(err, os.strerror(err))).startswith(reason)


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses permission bits")
def test_open_error_names_permission_problem(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "kv.sqlite").touch(mode=0o400)
    with pytest.raises(KVStoreOpenError, match="permission denied") as info:
        SQLiteKVStore(locked / "kv.sqlite")
    assert str(locked / "kv.sqlite") in str(info.value)
    locked.chmod(0o500)
    try:
        with pytest.raises(KVStoreOpenError, match=r"cannot create directory .*permission denied"):
            SQLiteKVStore(locked / "sub" / "kv.sqlite")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("err", "reason"), [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")]
)
@pytest.mark.parametrize("failing", ["mkdir", "open"])
def test_open_errors_name_path_and_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, reason: str, failing: str
) -> None:
    """Root cannot provoke EACCES and tests cannot mount a read-only file system, so the
    system calls fail on demand."""
    path = tmp_path / "state" / "kv.sqlite"

    def refuse(target: object, *args: object, **kwargs: object) -> int:
        raise OSError(err, os.strerror(err), str(target))

    if failing == "mkdir":
        monkeypatch.setattr(Path, "mkdir", refuse)
    else:
        monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(KVStoreOpenError) as info:
        SQLiteKVStore(path)
    message = str(info.value)
    assert str(path) in message
    assert reason in message
    if failing == "mkdir":
        assert f"cannot create directory {path.parent}" in message


def _create_race(path: str, worker: int, keys: int, results: multiprocessing.Queue[object]) -> None:
    with SQLiteKVStore(path) as kv:
        won = [i for i in range(keys) if kv.create(f"race/{i}", str(worker).encode())]
        # Read-modify-write under contention: every increment must land exactly once.
        for _ in range(25):
            while True:
                raw = kv.get("counter")
                new = str(int(raw or b"0") + 1).encode()
                if kv.compare_and_swap("counter", raw, new):
                    break
    results.put((worker, won))


def test_processes_sharing_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared" / "kv.sqlite")
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[object] = ctx.Queue()
    workers = [ctx.Process(target=_create_race, args=(path, w, 50, results)) for w in range(4)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in workers]
    winners: dict[int, int] = {}
    for worker, won in cast(list[tuple[int, list[int]]], outcomes):
        for key in won:
            assert key not in winners, f"race/{key} created by {winners[key]} and {worker}"
            winners[key] = worker
    assert sorted(winners) == list(range(50))
    with SQLiteKVStore(path) as kv:
        stored = kv.list_prefix("race/")
        assert {int(k.removeprefix("race/")): int(v) for k, v in stored.items()} == winners
        assert kv.get("counter") == b"100"
