"""The key-value store interface the identity allocator (and later the agent) is written against.

Keys are `/`-separated text; values are opaque bytes. Every write is conditional or idempotent
so that several processes (one node) or several agents (etcd, many nodes) can share the store
without a lock service: the embedded SQLite backend implements each operation as one
transaction, and an etcd backend maps each one to a single request:

| operation            | etcd v3                                                     |
|----------------------|-------------------------------------------------------------|
| `get`                | Range(key)                                                  |
| `list_prefix`        | Range(prefix, range_end = prefix with last byte + 1)        |
| `create`             | Txn(If CreateRevision(key) == 0 Then Put)                   |
| `put`                | Put                                                         |
| `compare_and_swap`   | Txn(If Value(key) == expected Then Put); None: as `create`  |
| `delete`             | DeleteRange(key), deleted > 0                               |
| `compare_and_delete` | Txn(If Value(key) == expected Then DeleteRange(key))        |
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self


class KVStoreError(Exception):
    """A store operation failed (I/O, lock timeout, closed store)."""


class KVStoreOpenError(KVStoreError):
    """The store at `path` cannot be opened; `reason` says why in words an operator can act on."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot open kvstore {path!r}: {reason}")
        self.path = path
        self.reason = reason


class InvalidKeyError(KVStoreError, ValueError):
    """A key that no backend can store (empty, or containing NUL)."""


def check_key(key: str) -> str:
    """Return `key` if every backend can store it, else raise `InvalidKeyError`."""
    if not key:
        raise InvalidKeyError("empty key")
    if "\x00" in key:
        raise InvalidKeyError(f"key {key!r} contains a NUL character")
    return key


class KVStore(Protocol):
    """A key-value store with atomic conditional writes. Closing it twice is harmless."""

    def get(self, key: str) -> bytes | None:
        """The value at `key`, or None when absent."""
        ...

    def list_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key that starts with `prefix` (plain string prefix, `""` lists all) → value.

        One consistent snapshot.
        """
        ...

    def create(self, key: str, value: bytes) -> bool:
        """Store `value` at `key` only if `key` is absent; True if this call created it."""
        ...

    def put(self, key: str, value: bytes) -> None:
        """Store `value` at `key` unconditionally."""
        ...

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes) -> bool:
        """Replace the value at `key` with `new` if it is exactly `expected`.

        `expected=None` means "only if absent" (same as `create`). True if the write happened.
        """
        ...

    def delete(self, key: str) -> bool:
        """Remove `key`; True if it existed."""
        ...

    def compare_and_delete(self, key: str, expected: bytes) -> bool:
        """Remove `key` if its value is exactly `expected`; True if it was removed."""
        ...

    def close(self) -> None:
        """Release the backend's resources; later operations raise `KVStoreError`."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
