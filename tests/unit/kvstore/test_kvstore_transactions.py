"""`transaction` on the embedded store (etcd's is in tests/e2e/test_etcd_kvstore.py), and the
committed etcd API stubs being exactly what protoc makes of the committed .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from garrison.kvstore import SQLiteKVStore
from garrison.kvstore.base import Absent, Delete, KVStoreError, NoneWithPrefix, Op, Put, ValueIs

REPO = Path(__file__).resolve().parents[3]


def test_sqlite_transaction_all_or_nothing() -> None:
    with SQLiteKVStore(":memory:") as kv:
        kv.put("held", b"1")
        ops: list[Op] = [Put("a", b"A"), Put("b", b"B"), Delete("held")]
        assert kv.transaction([Absent("a"), ValueIs("held", b"2")], ops) is False
        assert (kv.get("a"), kv.get("held")) == (None, b"1")
        assert kv.transaction([Absent("a"), ValueIs("held", b"1")], ops) is True
        assert (kv.get("a"), kv.get("b"), kv.get("held")) == (b"A", b"B", None)


def test_sqlite_transaction_none_with_prefix() -> None:
    with SQLiteKVStore(":memory:") as kv:
        kv.put("refs/xy", b"")
        assert kv.transaction([NoneWithPrefix("refs/x/")], [Put("gc", b"1")]) is True
        kv.put("refs/x/n1", b"")
        assert kv.transaction([NoneWithPrefix("refs/x/")], [Put("gc", b"2")]) is False
        assert kv.get("gc") == b"1"


def test_sqlite_refuses_leases_with_the_fix() -> None:
    with SQLiteKVStore(":memory:") as kv, pytest.raises(KVStoreError, match="--kvstore etcd"):
        kv.transaction([], [Put("k", b"v", lease=7)])


def test_committed_etcd_stubs_match_the_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    src = REPO / "garrison" / "kvstore" / "etcdpb"
    work = tmp_path / "garrison" / "kvstore" / "etcdpb"
    work.mkdir(parents=True)
    for proto in ("kv.proto", "rpc.proto"):
        shutil.copy(src / proto, work / proto)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "garrison/kvstore/etcdpb/kv.proto",
            "garrison/kvstore/etcdpb/rpc.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in ("kv_pb2.py", "kv_pb2.pyi", "rpc_pb2.py", "rpc_pb2.pyi"):
        assert (work / name).read_text() == (src / name).read_text(), (
            f"{name} is stale: regenerate as garrison/kvstore/etcdpb/__init__.py says"
        )
