"""What loading a log found, kept between runs (`garrison.ui.mapcache`): reopening reads
nothing, an appended log reads only what is new, and any other change, a damaged or foreign
cache entry, or other code reads the log again — with the same map every time."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from garrison.ui import mapcache
from garrison.ui import store as store_mod
from garrison.ui.mapcache import MapCache
from garrison.ui.store import FileSource, FlowStore
from tests.unit.ui.test_mapscan import DEMO_LINES, with_time


def body(copies: int) -> bytes:
    return (b"\n".join(DEMO_LINES) + b"\n") * copies + b"not json\n"


class Scans:
    """The byte ranges the store read from the file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ranges: list[tuple[int, int]] = []
        real = store_mod._scan

        def scan(path: str, begin: int, end: int) -> Any:
            self.ranges.append((begin, end))
            return real(path, begin, end)

        monkeypatch.setattr(store_mod, "_scan", scan)
        monkeypatch.setattr(store_mod, "CHUNK_BYTES", 20_000)  # several parts a file


def opened(log: Path, cache: MapCache | None) -> tuple[Any, ...]:
    source = FileSource([str(log)], workers=1, backups=False, cache=cache)
    store = FlowStore()
    source.load(store)
    try:
        return (store.builder.result(), store.lines(0, len(store)), store.stats.samples,
                len(store))
    finally:
        source.close()


@pytest.fixture
def cache(tmp_path: Path) -> MapCache:
    return MapCache(tmp_path / "cache" / "garrison" / "ui", min_bytes=1)


def test_a_log_opened_again_is_not_read_again(tmp_path: Path, cache: MapCache,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(body(3))
    scans = Scans(monkeypatch)
    first = opened(log, cache)
    assert scans.ranges and scans.ranges[0][0] == 0
    assert oct(cache.directory.stat().st_mode & 0o777) == "0o700"
    scans.ranges.clear()
    again = opened(log, cache)
    assert scans.ranges == []  # the kept parts: nothing read
    assert again == first == opened(log, None)


def later(copy: int) -> bytes:
    """The demo's records again, `copy` x 100 s later: no SYN retransmitted across copies
    (a retransmission split from its SYN at a part's end counts once more, and the parts
    of a log read in two runs end elsewhere than those of one read)."""
    return b"".join(with_time(line, copy * 100_000_000_000 + i * 1_000_000) + b"\n"
                    for i, line in enumerate(DEMO_LINES))


def test_an_appended_log_reads_only_what_is_new(tmp_path: Path, cache: MapCache,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "access.log"
    start = later(0) + later(1)
    new = later(2)
    log.write_bytes(start + new[:50])  # a last line still being written
    scans = Scans(monkeypatch)
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 1 << 30)
    opened(log, cache)
    assert scans.ranges == [(0, len(start))]
    with log.open("ab") as f:
        f.write(new[50:] + later(3))
    scans.ranges.clear()
    grown = opened(log, cache)
    assert scans.ranges == [(len(start), len(start) + len(new) + len(later(3)))]
    assert grown == opened(log, None)
    assert grown[3] == 4 * len(DEMO_LINES)


@pytest.mark.parametrize("change", ["rewritten", "rewritten and grown", "shorter", "replaced"])
def test_a_changed_log_is_read_again(tmp_path: Path, cache: MapCache,
                                     monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(body(3))
    scans = Scans(monkeypatch)
    opened(log, cache)
    if change.startswith("rewritten"):  # the same inode, other records
        with log.open("r+b") as f:
            f.seek(len(body(3)) - len(body(1)))
            f.write(b"\n".join(reversed(DEMO_LINES)) + b"\n")
            if change.endswith("grown"):
                f.write(body(1))
        os.utime(log, ns=(1, 1))
    elif change == "shorter":
        log.write_bytes(body(2))
    else:
        (tmp_path / "new.log").write_bytes(body(3))
        os.replace(tmp_path / "new.log", log)
    scans.ranges.clear()
    again = opened(log, cache)
    assert scans.ranges[0][0] == 0
    assert again == opened(log, None)


def test_a_damaged_or_foreign_entry_is_not_used(tmp_path: Path, cache: MapCache,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(body(2))
    scans = Scans(monkeypatch)
    expected = opened(log, None)
    opened(log, cache)
    (entry,) = cache.directory.glob("*.map")
    for damage in ("group-writable", "other owner", "garbage", "a damaged part", "other code"):
        opened(log, cache)  # written again, trusted
        if damage == "group-writable":
            entry.chmod(0o660)
        elif damage == "other owner":
            if os.geteuid() != 0:
                continue
            os.chown(entry, 65534, 65534)
        elif damage == "garbage":
            entry.write_bytes(b"\x80\x05not a pickle")
        elif damage == "a damaged part":
            kept = pickle.loads(entry.read_bytes())
            kept["parts"][-1] = (*kept["parts"][-1][:2], b"\x80\x05damaged")
            entry.write_bytes(pickle.dumps(kept))
        else:
            monkeypatch.setattr(cache, "_code", "another version")
        scans.ranges.clear()
        assert opened(log, cache) == expected, damage
        assert scans.ranges[0][0] == 0, damage
        monkeypatch.undo()
        scans = Scans(monkeypatch)
        entry.unlink(missing_ok=True)


def test_a_small_log_is_not_kept_and_old_entries_go(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = MapCache(tmp_path / "cache", keep=2, min_bytes=len(body(2)))
    small = tmp_path / "small.log"
    small.write_bytes(body(1))
    opened(small, cache)
    assert not cache.directory.exists() or not list(cache.directory.glob("*.map"))
    for i in range(3):
        log = tmp_path / f"big{i}.log"
        log.write_bytes(body(2))
        opened(log, cache)
        os.utime(next(iter(sorted(cache.directory.glob("*.map"),
                                  key=lambda p: p.stat().st_mtime_ns, reverse=True))),
                 ns=(10**18 + i, 10**18 + i))
    assert len(list(cache.directory.glob("*.map"))) == 2


def test_the_default_place_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mapcache.default_directory() == tmp_path / "garrison" / "ui"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mapcache.default_directory() == tmp_path / "home" / ".cache" / "garrison" / "ui"


def test_garrison_ui_keeps_maps_unless_told_not_to(tmp_path: Path) -> None:
    from garrison.ui.app import file_source

    kept = file_source([str(tmp_path / "access.log")])
    assert isinstance(kept.cache, MapCache)
    assert file_source([str(tmp_path / "access.log")], cache=False).cache is None
    done = subprocess.run(
        [sys.executable, "-m", "garrison.cli.main", "ui", "--no-cache", "--listen",
         "0.0.0.0:12000", "--input-file", "x.log"], capture_output=True, text=True, timeout=30,
        cwd=Path(__file__).resolve().parents[3], env={**os.environ, "GARRISON_PURE": "1"})
    assert done.returncode == 2
    assert "needs --allow-remote" in done.stderr  # the flag itself was understood
