"""The embedded key-value store: one SQLite file under the state directory, safe to share.

Several processes on one node (the agent, CLI commands, tests) may open the same file at the
same time. WAL mode lets readers proceed while one writer commits; every write runs in a
`BEGIN IMMEDIATE` transaction, which takes the write lock up front, so a busy store makes the
writer wait (up to the busy timeout) at BEGIN instead of failing half way through with
SQLITE_BUSY on a lock upgrade, which the busy handler cannot resolve.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Self

from garrison.kvstore.base import (
    Absent,
    Condition,
    Delete,
    KVStoreError,
    KVStoreOpenError,
    NoneWithPrefix,
    Op,
    Put,
    ValueIs,
    check_key,
)

MEMORY = ":memory:"
FILENAME = "kvstore.sqlite"
DEFAULT_BUSY_TIMEOUT_S = 10.0

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"

_OS_ERROR_HINTS: Mapping[int, str] = MappingProxyType(
    {
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.EISDIR: "the path is a directory",
        errno.ENOTDIR: "a parent of the path is not a directory",
        errno.ENOSPC: "no space left on device",
        errno.ENOENT: "no such file or directory",
    }
)


def describe_os_error(exc: OSError) -> str:
    """A short reason for `exc` that names the cause (`permission denied`, `read-only ...`)."""
    hint = _OS_ERROR_HINTS.get(exc.errno or 0) or exc.strerror or str(exc)
    return f"{hint} (uid {os.geteuid()})" if exc.errno in (errno.EACCES, errno.EPERM) else hint


def _make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700 (os.makedirs only applies the
    mode to the last component)."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        # Another process may create it between our check and mkdir.
        with suppress(FileExistsError):
            path.mkdir(mode=0o700)


def _prepare_file(path: str) -> None:
    """Create the parent directories and the database file (mode 0600) and check that the file
    is writable, so a failure names its cause instead of SQLite's `unable to open database file`.
    SQLite gives the -wal and -shm files the database file's mode."""
    file = Path(path)
    try:
        _make_private_dirs(file.parent)
    except OSError as exc:
        where = exc.filename or file.parent
        raise KVStoreOpenError(
            path, f"cannot create directory {where}: {describe_os_error(exc)}"
        ) from exc
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KVStoreOpenError(path, describe_os_error(exc)) from exc
    os.close(fd)


class SQLiteKVStore:
    """`KVStore` over a SQLite file (or `":memory:"` for tests: private to this object).

    The object is safe to share between threads; each process opens its own.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    ) -> None:
        self.path = os.fspath(path)
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = self._open()

    @classmethod
    def in_state_dir(
        cls, state_dir: str | os.PathLike[str], *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    ) -> SQLiteKVStore:
        """The node's store: `<state_dir>/kvstore.sqlite`."""
        return cls(Path(state_dir) / FILENAME, busy_timeout_s=busy_timeout_s)

    def _open(self) -> sqlite3.Connection:
        if self.path != MEMORY:
            _prepare_file(self.path)
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock
            )
        except sqlite3.Error as exc:
            raise KVStoreOpenError(self.path, str(exc)) from exc
        try:
            self._set_up(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL and create the table. Changing the journal mode does not wait on the
        busy handler: processes opening a new file together retry until the busy timeout."""
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                if self.path != MEMORY:
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    if str(mode).lower() != "wal":
                        raise KVStoreOpenError(self.path, f"cannot enable WAL mode (got {mode})")
                conn.execute(_SCHEMA)
                return
            except sqlite3.Error as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                busy = code is not None and code & 0xFF in (
                    sqlite3.SQLITE_BUSY,
                    sqlite3.SQLITE_LOCKED,
                )
                if not busy or time.monotonic() >= deadline:
                    raise KVStoreOpenError(self.path, str(exc)) from exc
                time.sleep(0.01)

    def __repr__(self) -> str:
        return f"SQLiteKVStore({self.path!r})"

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise KVStoreError(f"kvstore {self.path!r} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise KVStoreError(f"kvstore {self.path!r}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._connection() as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def list_prefix(self, prefix: str) -> dict[str, bytes]:
        if "\x00" in prefix:
            check_key(prefix)
        # `key >= prefix` walks the primary key from the first candidate; substr() (which counts
        # characters, like length()) keeps the test exact whatever characters the prefix holds.
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT key, value FROM kv WHERE key >= ?1 AND substr(key, 1, length(?1)) = ?1"
                " ORDER BY key",
                (prefix,),
            ).fetchall()
        return {str(key): bytes(value) for key, value in rows}

    def create(self, key: str, value: bytes) -> bool:
        check_key(key)
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (key, value),
            )
            return cur.rowcount == 1

    def put(self, key: str, value: bytes) -> None:
        check_key(key)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes) -> bool:
        if expected is None:
            return self.create(key, new)
        check_key(key)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE kv SET value = ? WHERE key = ? AND value = ?", (new, key, expected)
            )
            return cur.rowcount == 1

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._write() as conn:
            return conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount == 1

    def compare_and_delete(self, key: str, expected: bytes) -> bool:
        check_key(key)
        with self._write() as conn:
            cur = conn.execute("DELETE FROM kv WHERE key = ? AND value = ?", (key, expected))
            return cur.rowcount == 1

    def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> bool:
        for op in ops:
            check_key(op.key)
            if isinstance(op, Put) and op.lease is not None:
                raise KVStoreError(
                    "the embedded SQLite kvstore has no leases: use --kvstore etcd for a cluster"
                )
        with self._write() as conn:
            for cond in conditions:
                if isinstance(cond, NoneWithPrefix):
                    if not cond.prefix:
                        raise KVStoreError("NoneWithPrefix needs a non-empty prefix")
                    row = conn.execute(
                        "SELECT 1 FROM kv WHERE key >= ?1 AND substr(key, 1, length(?1)) = ?1"
                        " LIMIT 1",
                        (cond.prefix,),
                    ).fetchone()
                    if row is not None:
                        return False
                    continue
                found = conn.execute(
                    "SELECT value FROM kv WHERE key = ?", (check_key(cond.key),)
                ).fetchone()
                if isinstance(cond, Absent) and found is not None:
                    return False
                if isinstance(cond, ValueIs) and (found is None or bytes(found[0]) != cond.value):
                    return False
            for op in ops:
                if isinstance(op, Put):
                    conn.execute(
                        "INSERT INTO kv (key, value) VALUES (?, ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (op.key, op.value),
                    )
                elif isinstance(op, Delete):
                    conn.execute("DELETE FROM kv WHERE key = ?", (op.key,))
            return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
