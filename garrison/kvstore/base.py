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
| `transaction`        | Txn(If every condition Then every op)                       |

A `TransactionalKVStore` also writes several keys at once under several conditions (the
cluster identity allocator needs "claim a number, name its labels and add this node's
reference" as one step). Only the etcd backend has leases: a `Put` bound to a lease vanishes
when its owner stops renewing the lease; `garrison/kvstore/etcd.py` has sessions and watches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


class KVStoreUnavailableError(KVStoreError):
    """The store did not answer (down, partitioned, or too slow); the operation may be retried."""


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


# Transactions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValueIs:
    """Condition: `key` exists and holds exactly `value`."""

    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Absent:
    """Condition: `key` does not exist."""

    key: str


@dataclass(frozen=True, slots=True)
class NoneWithPrefix:
    """Condition: no key starts with `prefix` (which must be non-empty)."""

    prefix: str


Condition = ValueIs | Absent | NoneWithPrefix


@dataclass(frozen=True, slots=True)
class Put:
    """Op: store `value` at `key`; `lease` binds the key to a lease (etcd only; None: no lease)."""

    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Op: remove `key` if present."""

    key: str


Op = Put | Delete


class TransactionalKVStore(KVStore, Protocol):
    """A `KVStore` that applies several writes atomically when several conditions hold."""

    def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> bool:
        """Apply every op if every condition holds, all at once; True if they were applied."""
        ...


# Watches ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPut:
    """A key under a watched prefix was created or changed at store revision `revision`."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class KeyDeleted:
    """A key under a watched prefix was deleted (or its lease expired) at `revision`."""

    key: str
    revision: int


@dataclass(frozen=True, slots=True)
class Relisted:
    """The whole content of a watched prefix at `revision`: the first event of every watch,
    and again when the store compacted away the history the watch needed to resume (`reason`
    says so). A consumer replaces its view with `items`; later events follow `revision`.
    `restored`: the store came back behind what the watch had seen (restored from a backup,
    wiped, replaced): keys missing from `items` may have been lost, not deleted."""

    items: Mapping[str, bytes]
    revision: int
    reason: str
    restored: bool = False


WatchEvent = KeyPut | KeyDeleted | Relisted
