"""Several processes allocating on one SQLite file agree on every number."""

from __future__ import annotations

import multiprocessing
import random
import threading
from pathlib import Path
from typing import cast

from garrison.identity.allocator import IdentityAllocator, canonical_labels
from garrison.kvstore import SQLiteKVStore
from garrison.policies.labels import Labels, endpoint_labels

WORKERS = 4
LABEL_SETS = 60
ROUNDS = 3


def label_set(i: int) -> Labels:
    # Volatile labels differ per worker; the identity must not.
    return endpoint_labels(Labels.parse(f"app=svc{i % 20}"), f"ns{i // 20}")


def _worker(
    path: str,
    worker: int,
    start: threading.Barrier,
    results: multiprocessing.Queue[object],
) -> None:
    rng = random.Random(worker)
    owner = f"worker-{worker}"
    # Overlapping halves: every label set is wanted by two workers.
    wanted = [i for i in range(LABEL_SETS) if (i + worker) % 4 < 2]
    kept: dict[int, int] = {}
    with SQLiteKVStore(path) as kv:
        allocator = IdentityAllocator(kv)
        start.wait()
        for _ in range(ROUNDS):
            rng.shuffle(wanted)
            for i in wanted:
                labels = label_set(i).union(Labels.parse(f"pod-template-hash=w{worker}"))
                kept[i] = allocator.allocate(labels, owner).id
                # Churn: numbers get freed and reused while others allocate.
                if rng.random() < 0.3:
                    allocator.release(label_set(i), owner)
                    del kept[i]
        for i, number in kept.items():
            current = allocator.lookup_labels(label_set(i))
            assert current is not None and current.id == number, (i, number, current)
    results.put((worker, kept))


def test_processes_agree_on_every_identity(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.sqlite")
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[object] = ctx.Queue()
    start = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_worker, args=(path, w, start, results)) for w in range(WORKERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0, f"worker exited with {proc.exitcode}"
    held: dict[int, set[int]] = {}
    for _ in procs:
        _worker_id, kept = cast(tuple[int, dict[int, int]], results.get(timeout=5))
        for i, number in kept.items():
            held.setdefault(i, set()).add(number)

    # Every label set still held maps to one number, and no number serves two label sets.
    assert all(len(numbers) == 1 for numbers in held.values()), held
    numbers = [next(iter(n)) for n in held.values()]
    assert len(numbers) == len(set(numbers))

    with SQLiteKVStore(path) as kv:
        allocator = IdentityAllocator(kv)
        endpoint = {n: labels for n, labels in allocator.all().items() if n >= 256}
        assert len({canonical_labels(labels) for labels in endpoint.values()}) == len(endpoint)
        for i, (number,) in ((i, tuple(n)) for i, n in held.items()):
            assert endpoint[number] == label_set(i)
            assert allocator.lookup_id(number) is not None
        # No number claim is left without its identity (claims given back on lost races).
        claims = kv.list_prefix("identities/id/")
        assert {int(k.rsplit("/", 1)[1]) for k in claims} == set(endpoint)
