"""`garrison cni install|uninstall` in directories of the test's own: what install writes, that
the plugin it installs runs, that it never replaces a file it did not write, and that uninstall
removes exactly what install wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GARRISON = str(Path(sys.executable).with_name("garrison"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GARRISON, "cni", *args], capture_output=True, text=True,
                          env={**os.environ, "GARRISON_PURE": "1"}, timeout=60)


def dirs(tmp: Path) -> tuple[Path, Path, list[str]]:
    conf, bindir = tmp / "net.d", tmp / "bin"
    return conf, bindir, ["--cni-conf-dir", str(conf), "--cni-bin-dir", str(bindir)]


def test_install_writes_a_chained_conflist_and_a_plugin_that_runs(tmp_path: Path) -> None:
    conf, bindir, where = dirs(tmp_path)
    done = cli("install", "--network", "gc-unit", "--subnet", "198.18.211.0/24", *where,
               "--socket", "/run/gc/agent.sock", "--state-dir", "/var/lib/gc")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [f"wrote {bindir / 'garrison-cni'}",
                                             f"wrote {conf / 'gc-unit.conflist'}"]
    conflist = json.loads((conf / "gc-unit.conflist").read_text())
    assert conflist["cniVersion"] == "1.0.0" and conflist["name"] == "gc-unit"
    # portmap: `podman run -p` publishes nothing without it (the port silently times out)
    assert [p["type"] for p in conflist["plugins"]] == ["ptp", "portmap", "garrison-cni"]
    assert conflist["plugins"][1] == {"type": "portmap", "capabilities": {"portMappings": True}}
    assert conflist["plugins"][0]["ipam"] == {
        "type": "host-local", "ranges": [[{"subnet": "198.18.211.0/24"}]],
        "routes": [{"dst": "198.18.0.0/15"}]}
    assert conflist["plugins"][-1] == {"type": "garrison-cni",
                                      "agentSocket": "/run/gc/agent.sock",
                                      "stateDir": "/var/lib/gc"}
    plugin = bindir / "garrison-cni"
    assert os.access(plugin, os.X_OK)
    shebang = plugin.read_text().splitlines()[0]
    assert shebang.startswith(f"#!{Path(sys.executable).parent}/python") and shebang.endswith(
        " -IS")
    ran = subprocess.run([str(plugin)], input=b"{}", env={"CNI_COMMAND": "VERSION"},
                         capture_output=True, timeout=30)
    assert ran.returncode == 0 and ran.stderr == b""
    assert "1.0.0" in json.loads(ran.stdout)["supportedVersions"]
    # the plugin runs without importing the package's __init__ (its compiled-module check)
    assert b"RuntimeWarning" not in ran.stderr


def test_install_twice_changes_nothing(tmp_path: Path) -> None:
    _, _, where = dirs(tmp_path)
    assert cli("install", *where).returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = cli("install", *where)
    assert again.returncode == 0 and "wrote" not in again.stdout
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_install_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    conf, bindir, where = dirs(tmp_path)
    conf.mkdir()
    theirs = conf / "garrison.conflist"
    theirs.write_text('{"theirs": true}\n')
    done = cli("install", *where)
    assert done.returncode == 1
    assert "exists with other content" in done.stderr and "Traceback" not in done.stderr
    assert theirs.read_text() == '{"theirs": true}\n'
    assert not (bindir / "garrison-cni").exists()  # what it had written is taken back
    assert sorted(p.name for p in conf.iterdir()) == ["garrison.conflist"]


def test_uninstall_removes_exactly_what_install_wrote(tmp_path: Path) -> None:
    conf, bindir, where = dirs(tmp_path)
    assert cli("install", *where).returncode == 0
    (conf / "other.conflist").write_text("{}")
    (bindir / "bridge").write_text("not ours")
    done = cli("uninstall", "--cni-conf-dir", str(conf))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in conf.iterdir()) == ["other.conflist"]
    assert sorted(p.name for p in bindir.iterdir()) == ["bridge"]
    again = cli("uninstall", "--cni-conf-dir", str(conf))
    assert again.returncode == 1 and "nothing recorded" in again.stderr


def test_uninstall_keeps_a_file_changed_since_install(tmp_path: Path) -> None:
    conf, bindir, where = dirs(tmp_path)
    assert cli("install", *where).returncode == 0
    (conf / "garrison.conflist").write_text('{"edited": true}')
    done = cli("uninstall", "--cni-conf-dir", str(conf))
    assert done.returncode == 1
    assert f"kept {conf / 'garrison.conflist'}: changed since install" in done.stderr
    assert (conf / "garrison.conflist").exists() and not (bindir / "garrison-cni").exists()


def test_a_network_name_that_is_not_a_cni_name_is_refused_and_nothing_written(
    tmp_path: Path,
) -> None:
    """The name is a file name in the configuration directory: `../x` wrote x.conflist beside
    that directory, then failed with a traceback and no record (uninstall could not remove
    it). The CNI spec's network names: a letter or digit, then letters, digits, _ . -."""
    _, _, where = dirs(tmp_path)
    for bad in ("../gc-escape", "gc/unit", "gc unit", "", ".gc-unit"):
        done = cli("install", "--network", bad, *where)
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        assert f"--network {bad!r}" in done.stderr and "Traceback" not in done.stderr
        assert not list(tmp_path.rglob("*")), (bad, list(tmp_path.rglob("*")))
        done = cli("uninstall", "--network", bad, "--cni-conf-dir", str(tmp_path / "net.d"))
        assert done.returncode == 2 and f"--network {bad!r}" in done.stderr


def test_uninstall_with_an_unreadable_record_says_so(tmp_path: Path) -> None:
    conf, _, where = dirs(tmp_path)
    assert cli("install", *where).returncode == 0
    record = conf / ".garrison-cni-garrison.json"
    record.write_text("{")
    done = cli("uninstall", "--cni-conf-dir", str(conf))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(record) in done.stderr and "nothing removed" in done.stderr
    assert (conf / "garrison.conflist").exists()  # nothing removed on a guess


def test_install_replaces_what_it_wrote_before_and_nothing_else(tmp_path: Path) -> None:
    """An upgrade (or new options) changes what install writes. The files an earlier install
    wrote, unchanged since (their digest is in the record), are garrison's: install replaces
    them. It used to refuse them as `exists with other content`, so the only way to the new
    conflist was uninstall + install. A file edited since is still never replaced."""
    conf, bindir, where = dirs(tmp_path)
    assert cli("install", "--subnet", "198.18.212.0/24", *where).returncode == 0
    done = cli("install", "--subnet", "198.18.213.0/24", *where)
    assert done.returncode == 0, done.stderr
    assert f"replaced {conf / 'garrison.conflist'}" in done.stdout
    conflist = json.loads((conf / "garrison.conflist").read_text())
    assert conflist["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "198.18.213.0/24"}]]
    record = json.loads((conf / ".garrison-cni-garrison.json").read_text())
    assert sorted(f["path"] for f in record["files"]) == sorted(
        [str(bindir / "garrison-cni"), str(conf / "garrison.conflist")])
    # uninstall still knows it as garrison's (the record has the new digest)
    assert cli("uninstall", "--cni-conf-dir", str(conf)).returncode == 0
    assert not (conf / "garrison.conflist").exists()

    assert cli("install", *where).returncode == 0
    (conf / "garrison.conflist").write_text('{"edited": true}\n')
    done = cli("install", "--subnet", "198.18.213.0/24", *where)
    assert done.returncode == 1 and "exists with other content" in done.stderr
    assert (conf / "garrison.conflist").read_text() == '{"edited": true}\n'
