"""`garrison agent` with bad cluster flags: one line naming the flag, exit status 2, no
traceback, before anything is touched (the check runs before the root check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GARRISON = str(Path(sys.executable).with_name("garrison"))
ETCD = ("--kvstore", "etcd", "--kvstore-endpoints", "http://198.19.0.249:2379")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ((*ETCD, "--pod-cidr", "198.18.210.0/26", "--node-name", "a/b"),
         "garrison agent: --node-name 'a/b': give 1-253 characters without '/', spaces or"
         " control characters (e.g. the host name)"),
        ((*ETCD, "--pod-cidr", "198.18.210.0/26", "--node-name", ""),
         "garrison agent: --node-name '': give 1-253 characters without '/', spaces or"
         " control characters (e.g. the host name)"),
        (("--node-name", "a b"),
         "garrison agent: --node-name 'a b': give 1-253 characters without '/', spaces or"
         " control characters (e.g. the host name)"),
        ((*ETCD, "--pod-cidr", "198.18.210.0/33"),
         "garrison agent: --pod-cidr 198.18.210.0/33: '33' is not a valid netmask; give this"
         " node's IPv4 block, e.g. 198.18.1.0/24"),
        ((*ETCD, "--pod-cidr", "fd00::/64"),
         "garrison agent: --pod-cidr fd00::/64: Expected 4 octets in 'fd00::'; give this"
         " node's IPv4 block, e.g. 198.18.1.0/24"),
        ((*ETCD, "--pod-cidr", "198.18.210.0/26", "--node-ip", "nope"),
         "garrison agent: --node-ip nope: Expected 4 octets in 'nope'; give this node's IPv4"
         " address on the network between the nodes"),
        ((*ETCD, "--pod-cidr", "198.18.210.0/26", "--kvstore-lease-ttl", "99999999999"),
         "garrison agent: --kvstore-lease-ttl 99999999999: at most 3600 seconds (the other"
         " nodes keep a dead node's endpoints that long)"),
        ((*ETCD, "--pod-cidr", "198.18.210.0/26", "--identity-gc-grace", "0"),
         "garrison agent: --identity-gc-grace 0: give 1 to 86400 seconds (a node away longer"
         " than its lease TTL gets its identities back within it)"),
    ],
)
def test_bad_cluster_flags_are_one_line_and_exit_2(
    args: tuple[str, ...], line: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [GARRISON, "agent", "--state-dir", str(tmp_path / "state"), "--socket",
         str(tmp_path / "a.sock"), "--bpffs-root", str(tmp_path / "pins"), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, line, "")
    assert list(tmp_path.iterdir()) == []  # nothing made
