"""etcd users (`etcdctl auth enable`) against a real etcd 3.4: the store logs in with a name
and password, sends the token on every call and stream, logs in again when etcd forgets the
token (its TTL passed, or etcd restarted), and says in one line what is wrong when it cannot:
no user given, a wrong password, a prefix the user's role may not write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.kvstore.base import Absent, KeyPut, KVStoreError, Put, Relisted
from garrison.kvstore.etcd import EtcdAuth, EtcdKVStore, EventQueue
from tests.etcd_server import EtcdServer, etcd_skip_reason

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
    pytest.mark.skipif(shutil.which("etcdctl") is None, reason="needs etcdctl (etcd-client)"),
]

AUTH_PORT = 23794  # this module's loopback port (23790-23799)
TOKEN_TTL_S = 2
NODE = EtcdAuth("ge-node", "ge-node-pw")
PREFIX = "ge-auth/"


def etcdctl(server: EtcdServer, *args: str) -> None:
    done = subprocess.run(
        ["etcdctl", "--endpoints", server.url, *args],
        capture_output=True, text=True, check=False, timeout=30,
        env={**os.environ, "ETCDCTL_API": "3"},
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    """Authentication on; user ge-node may read and write under ge-auth/ only; tokens live
    TOKEN_TTL_S seconds (unused)."""
    args = ("--auth-token-ttl", str(TOKEN_TTL_S))
    with EtcdServer(name="ge-auth", extra_args=args, client_port=AUTH_PORT) as server:
        for command in (
            ("user", "add", "root", "--new-user-password=ge-root-pw", "--interactive=false"),
            ("user", "add", NODE.user, f"--new-user-password={NODE.password}",
             "--interactive=false"),
            ("role", "add", "ge-rw"),
            ("role", "grant-permission", "ge-rw", "--prefix=true", "readwrite", PREFIX),
            ("user", "grant-role", NODE.user, "ge-rw"),
            ("auth", "enable"),
        ):
            etcdctl(server, *command)
        yield server


def test_operations_watches_and_sessions_as_a_user(etcd: EtcdServer) -> None:
    with EtcdKVStore(etcd.url, root=PREFIX + "ops/", auth=NODE) as kv:
        events = EventQueue()
        kv.watch("w/", events)
        first = events.get(5)
        assert isinstance(first, Relisted)
        kv.put("w/a", b"1")
        assert events.get(5) == KeyPut("w/a", b"1", first.revision + 1)
        assert kv.transaction([Absent("b")], [Put("b", b"2")]) and kv.get("b") == b"2"
        session = kv.session(3, name="auth")
        assert session.wait_ready(5), session.last_error
        session.put("mine", b"s")
        assert session.wait_flushed(5) and kv.get("mine") == b"s"
        assert kv.logins == 1


def test_an_expired_token_is_renewed_and_the_call_goes_through(etcd: EtcdServer) -> None:
    with EtcdKVStore(etcd.url, root=PREFIX + "ttl/", auth=NODE) as kv:
        kv.put("a", b"1")
        time.sleep(TOKEN_TTL_S + 1.5)  # etcd forgets the unused token
        assert kv.get("a") == b"1"
        assert kv.logins == 2


def test_streams_that_reconnect_with_an_expired_token_log_in_again(etcd: EtcdServer) -> None:
    """A watch's stream is checked when it is made: one that breaks after the token expired
    (a network break, simulated by cancelling the stream) comes back with a new login, and
    misses nothing."""
    with EtcdKVStore(etcd.url, root=PREFIX + "stream/", auth=NODE, timeout_s=3.0) as kv:
        events = EventQueue()
        watch = kv.watch("w/", events)
        assert isinstance(events.get(5), Relisted)
        time.sleep(TOKEN_TTL_S + 1.5)  # the token is gone; the open stream still works
        broken = watch._call
        assert broken is not None
        broken.cancel()
        deadline = time.monotonic() + 10
        while watch._call is broken or not watch.connected:
            assert time.monotonic() < deadline, watch.last_error
            time.sleep(0.05)
        assert kv.logins == 2 and watch.reconnects == 1
        kv.put("w/after", b"x")
        event = events.get(5)
        assert isinstance(event, KeyPut) and event.key == "w/after"


def refused(etcd: EtcdServer, root: str, auth: EtcdAuth | None) -> str:
    with (
        EtcdKVStore(etcd.url, root=root, auth=auth, timeout_s=3.0) as kv,
        pytest.raises(KVStoreError) as info,
    ):
        kv.put("k", b"v")
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_no_user_is_refused_with_the_flags_to_give(etcd: EtcdServer) -> None:
    assert refused(etcd, PREFIX, None) == (
        f"etcd put: etcd at 127.0.0.1:{AUTH_PORT} has authentication on: give --kvstore-user"
        " and --kvstore-password-file (or a client certificate whose CN is an etcd user)"
    )


def test_a_wrong_password_is_refused_naming_the_user(etcd: EtcdServer) -> None:
    assert refused(etcd, PREFIX, EtcdAuth(NODE.user, "wrong")) == (
        f"etcd at 127.0.0.1:{AUTH_PORT} refused user 'ge-node': wrong user name or password"
        " (--kvstore-user, --kvstore-password-file)"
    )


def test_a_prefix_the_user_may_not_write_is_refused_naming_the_grant(etcd: EtcdServer) -> None:
    assert refused(etcd, "elsewhere/", NODE) == (
        f"etcd put: etcd at 127.0.0.1:{AUTH_PORT} denied 'ge-node' (permission denied): grant"
        " its role readwrite on the prefix 'elsewhere/' (etcdctl role grant-permission ROLE"
        " --prefix readwrite elsewhere/)"
    )


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garrison.cli.main", "agent", "--kvstore", "etcd",
         "--kvstore-endpoints", f"http://127.0.0.1:{AUTH_PORT}", "--pod-cidr", "198.18.97.0/24",
         *args],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "GARRISON_PURE": "1", "PYTHONWARNINGS": "ignore"},
    )


def test_the_agent_refuses_bad_login_flags_with_one_line_and_status_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    missing = tmp_path / "missing"
    cases = {
        ("--kvstore-user", "ge-node"):
            "garrison agent: --kvstore-user and --kvstore-password-file go together: give both"
            " (the etcd user and a file holding its password) or neither",
        ("--kvstore-user", "ge-node", "--kvstore-password-file", str(missing)):
            f"garrison agent: --kvstore-password-file {missing}: cannot read it (No such file"
            " or directory); give a file holding the user's password",
        ("--kvstore-user", "ge-node", "--kvstore-password-file", str(empty)):
            f"garrison agent: --kvstore-password-file {empty}: empty; give a file holding the"
            " etcd password of 'ge-node' on its first line",
    }
    for args, expected in cases.items():
        done = agent(*args)
        assert (done.returncode, done.stderr.strip(), done.stdout) == (2, expected, ""), args
