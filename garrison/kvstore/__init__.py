"""Key-value backends: the embedded SQLite store (single node) now, etcd (multi-node) later."""

from garrison.kvstore.base import InvalidKeyError, KVStore, KVStoreError, KVStoreOpenError
from garrison.kvstore.sqlite import SQLiteKVStore

__all__ = ["InvalidKeyError", "KVStore", "KVStoreError", "KVStoreOpenError", "SQLiteKVStore"]
