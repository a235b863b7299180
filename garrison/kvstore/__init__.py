"""Key-value backends: the embedded SQLite store (one node) and etcd (`kvstore.etcd`, a cluster)."""

from garrison.kvstore.base import (
    InvalidKeyError,
    KVStore,
    KVStoreError,
    KVStoreOpenError,
    KVStoreUnavailableError,
    TransactionalKVStore,
)
from garrison.kvstore.sqlite import SQLiteKVStore

__all__ = [
    "InvalidKeyError",
    "KVStore",
    "KVStoreError",
    "KVStoreOpenError",
    "KVStoreUnavailableError",
    "SQLiteKVStore",
    "TransactionalKVStore",
]
