"""The etcd backend over TLS against a real etcd 3.4 started with `--cert-file --key-file
--client-cert-auth --trusted-ca-file` and an https:// client URL, with certificates this test
makes with the openssl CLI (a CA, a server certificate for IP 127.0.0.1, a client certificate).

What a user sees: the store's operations, leases, sessions and watches work over TLS with a
client certificate; every way of getting TLS wrong is one line naming the cause and the fix
(never a traceback, never plaintext instead); `garrison agent` refuses bad TLS flags with
exit status 2 before it starts anything.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.cluster.status import cluster_lines, cluster_problems
from garrison.kvstore.base import Absent, KeyPut, KVStoreUnavailableError, Put, Relisted
from garrison.kvstore.etcd import EtcdKVStore, EtcdTLS, EventQueue
from tests.etcd_server import (
    EtcdPKI,
    EtcdServer,
    _issue,
    _make_ca,
    etcd_skip_reason,
    make_pki,
    wait_for,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]

# Loopback ports of this module (23790-23799): the TLS etcd's client port, and one where
# nothing listens (a dead member in an endpoint list).
TLS_PORT = 23791
DEAD_PORT = 23798
TLS_URL = f"https://127.0.0.1:{TLS_PORT}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> EtcdPKI:
    return make_pki(tmp_path_factory.mktemp("ge-tls-pki"))


@pytest.fixture(scope="module")
def etcd(pki: EtcdPKI) -> Iterator[EtcdServer]:
    with EtcdServer(name="ge-tls", tls=pki, client_port=TLS_PORT) as server:
        assert server.url == TLS_URL
        yield server


@pytest.fixture
def client_tls(pki: EtcdPKI) -> EtcdTLS:
    return EtcdTLS(pki.ca, pki.client_cert, pki.client_key)


def root() -> str:
    return f"ge-tls-{uuid.uuid4().hex[:8]}/"


def failure(url: str, tls: EtcdTLS | None) -> str:
    """The error of the first call through a store that cannot talk to etcd: one line."""
    with (
        EtcdKVStore(url, root=root(), tls=tls, timeout_s=3.0) as kv,
        pytest.raises(KVStoreUnavailableError) as info,
    ):
        kv.get("x")
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_the_store_contract_over_tls_with_a_client_certificate(
    etcd: EtcdServer, client_tls: EtcdTLS
) -> None:
    with EtcdKVStore(etcd.url, root=root(), tls=client_tls) as kv:
        assert kv.tls == client_tls and kv.server_name == "127.0.0.1"
        assert kv.get("a") is None
        kv.put("a", b"1")
        assert kv.get("a") == b"1"
        assert kv.create("b", b"2") and not kv.create("b", b"3")
        assert kv.compare_and_swap("a", b"1", b"10") and not kv.compare_and_swap("a", b"1", b"x")
        assert kv.transaction([Absent("c")], [Put("c", b"3"), Put("d", b"4")])
        assert not kv.transaction([Absent("c")], [Put("e", b"5")])
        assert kv.list_prefix("") == {"a": b"10", "b": b"2", "c": b"3", "d": b"4"}
        assert kv.delete("d") and not kv.delete("d")
        assert kv.status().version.startswith("3.4")


def test_leases_sessions_and_watches_over_tls(etcd: EtcdServer, client_tls: EtcdTLS) -> None:
    with EtcdKVStore(etcd.url, root=root(), tls=client_tls) as kv:
        events = EventQueue()
        kv.watch("w/", events)
        first = events.get(5)
        assert isinstance(first, Relisted) and first.items == {}
        lease = kv.grant_lease(5)
        kv.put("w/leased", b"v", lease=lease)
        assert events.get(5) == KeyPut("w/leased", b"v", first.revision + 1)
        assert 0 < kv.lease_ttl(lease) <= 5
        session = kv.session(3, name="tls")
        assert session.wait_ready(5), session.last_error
        session.put("w/mine", b"s")
        event = events.get(5)
        assert isinstance(event, KeyPut) and event.key == "w/mine"
        time.sleep(4)  # past the TTL: the keepalive stream over TLS keeps the key
        assert kv.get("w/mine") == b"s" and session.connected
        kv.revoke_lease(lease)
        assert kv.get("w/leased") is None


def test_several_endpoints_are_verified_against_the_first_urls_host(
    etcd: EtcdServer, client_tls: EtcdTLS
) -> None:
    """A dead member first: gRPC fails over to the live one, whose certificate names
    127.0.0.1, the host checked for every member."""
    urls = f"https://127.0.0.1:{DEAD_PORT},{TLS_URL}"
    with EtcdKVStore(urls, root=root(), tls=client_tls, timeout_s=5.0) as kv:
        kv.put("k", b"v")
        assert kv.get("k") == b"v" and kv.server_name == "127.0.0.1"


def test_several_endpoints_whose_first_host_the_certificate_does_not_name_are_refused(
    etcd: EtcdServer, client_tls: EtcdTLS
) -> None:
    """127.0.0.2 first (nothing listens there): the live member's certificate names only
    127.0.0.1, and gRPC checks every member against the first host."""
    urls = f"https://127.0.0.2:{DEAD_PORT},{TLS_URL}"
    message = failure(urls, client_tls)
    assert message == (
        f"etcd get: the certificate of an etcd member at 127.0.0.2:{DEAD_PORT},127.0.0.1:"
        f"{TLS_PORT} is not issued for 127.0.0.2: with several endpoints every member's"
        " certificate must name the first endpoint's host (one TLS name per gRPC channel);"
        " issue them so, or give one endpoint"
    )


def test_a_server_certificate_of_another_ca_is_refused(
    etcd: EtcdServer, pki: EtcdPKI
) -> None:
    message = failure(TLS_URL, EtcdTLS(pki.other_ca, pki.client_cert, pki.client_key))
    assert message.startswith(
        f"etcd get: the certificate of etcd at 127.0.0.1:{TLS_PORT} does not verify against"
        f" --kvstore-ca {pki.other_ca} (unable to get local issuer certificate); give the CA"
        " that issued it with --kvstore-ca"
    ), message
    # no --kvstore-ca: the system's roots, which do not hold the test's CA
    message = failure(TLS_URL, EtcdTLS(None, pki.client_cert, pki.client_key))
    system = ssl.get_default_verify_paths().cafile
    assert f"does not verify against the system's CA roots ({system}; no --kvstore-ca)" in message


def test_without_a_ca_file_the_systems_bundle_verifies_etcd(
    etcd: EtcdServer, pki: EtcdPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test's CA as the system's bundle (SSL_CERT_FILE, OpenSSL's override): no
    --kvstore-ca needed."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    tls = EtcdTLS(None, pki.client_cert, pki.client_key)
    with EtcdKVStore(TLS_URL, root=root(), tls=tls) as kv:
        kv.put("k", b"v")
        assert kv.get("k") == b"v"
        assert kv.tls_description == (
            f"TLS, server verified against the system's CA roots ({pki.ca}; no --kvstore-ca),"
            f" client certificate {pki.client_cert}"
        )


def test_a_server_certificate_for_another_name_is_refused(
    etcd: EtcdServer, client_tls: EtcdTLS
) -> None:
    """The certificate names IP 127.0.0.1, the URL says localhost: refused, not trusted."""
    message = failure(f"https://localhost:{TLS_PORT}", client_tls)
    assert message == (
        f"etcd get: the certificate of etcd at localhost:{TLS_PORT} is not issued for localhost"
        " (not in its subject alternative names); issue it for the host in"
        " --kvstore-endpoints, or give the endpoint by a name the certificate carries"
    )


def test_no_client_certificate_is_refused_by_etcd_and_said(
    etcd: EtcdServer, pki: EtcdPKI
) -> None:
    message = failure(TLS_URL, EtcdTLS(pki.ca))
    assert message == (
        f"etcd get: etcd at 127.0.0.1:{TLS_PORT} refused this client: it wants a client"
        " certificate (--client-cert-auth); give --kvstore-cert and --kvstore-key"
    )


def test_a_client_certificate_of_an_untrusted_ca_is_refused_and_said(
    etcd: EtcdServer, pki: EtcdPKI, tmp_path: Path
) -> None:
    stranger_ca = _make_ca(tmp_path, "stranger-ca")
    cert, key = _issue(tmp_path, "stranger", stranger_ca, "extendedKeyUsage=clientAuth\n")
    message = failure(TLS_URL, EtcdTLS(pki.ca, cert, key))
    assert message.startswith(
        f"etcd get: etcd at 127.0.0.1:{TLS_PORT} refused the client certificate --kvstore-cert"
        f" {cert}: not issued by a CA etcd trusts"
    ), message


def test_plaintext_against_a_tls_etcd_fails_naming_https(etcd: EtcdServer) -> None:
    message = failure(f"http://127.0.0.1:{TLS_PORT}", None)
    assert message.startswith(f"etcd get: etcd at 127.0.0.1:{TLS_PORT} closed the connection")
    assert message.endswith("if it serves TLS, use https:// endpoints (and --kvstore-ca)")


def test_tls_against_a_plaintext_etcd_fails_naming_http(client_tls: EtcdTLS) -> None:
    with EtcdServer(name="ge-tls-plain") as plain:
        url = plain.url.replace("http://", "https://")
        message = failure(url, client_tls)
    assert "did not complete a TLS handshake" in message
    assert message.endswith("if it serves plaintext, use http:// endpoints"), message


def test_a_session_that_cannot_verify_etcd_says_why_in_status(
    etcd: EtcdServer, pki: EtcdPKI
) -> None:
    """What `garrison status` shows comes from the session's last error."""
    tls = EtcdTLS(pki.other_ca, pki.client_cert, pki.client_key)
    with EtcdKVStore(TLS_URL, root=root(), tls=tls, timeout_s=2.0) as kv:
        session = kv.session(5, name="node-x")
        assert not session.wait_ready(3)
        wait_for(lambda: session.last_error is not None, 5, "the session's error")
        status = {
            "endpoints": list(kv.endpoints),
            "connected": session.connected,
            "error": session.last_error,
            "tls": kv.tls_description,
        }
    problems = cluster_problems({"cluster": status})
    assert len(problems) == 1
    assert problems[0].startswith(
        f"etcd at 127.0.0.1:{TLS_PORT} is not connected: etcd lease grant: the certificate of"
        f" etcd at 127.0.0.1:{TLS_PORT} does not verify against --kvstore-ca {pki.other_ca}"
    ), problems[0]
    assert (
        f"Kvstore TLS:     TLS, server verified against --kvstore-ca {pki.other_ca}, client"
        f" certificate {pki.client_cert}"
    ) in cluster_lines({"cluster": status})


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garrison.cli.main", "agent", "--kvstore", "etcd",
         "--pod-cidr", "198.18.97.0/24", *args],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "GARRISON_PURE": "1", "PYTHONWARNINGS": "ignore"},
    )


def test_the_agent_refuses_bad_tls_flags_with_one_line_and_status_2(
    pki: EtcdPKI, tmp_path: Path
) -> None:
    missing = tmp_path / "ca.pem"
    cases = {
        (f"--kvstore-endpoints={TLS_URL}", f"--kvstore-ca={missing}"):
            f"garrison agent: --kvstore-ca {missing}: cannot read it (No such file or"
            " directory); give the CA bundle (PEM) that issued etcd's server certificate",
        (f"--kvstore-endpoints={TLS_URL}", f"--kvstore-cert={pki.client_cert}"):
            "garrison agent: --kvstore-cert and --kvstore-key go together: give both (the"
            " client certificate and its private key) or neither",
        (f"--kvstore-endpoints={TLS_URL}", f"--kvstore-cert={pki.client_cert}",
         f"--kvstore-key={pki.server_key}"):
            f"garrison agent: --kvstore-key {pki.server_key} is not the key of --kvstore-cert"
            f" {pki.client_cert}: give the key the certificate was issued for",
        (f"--kvstore-endpoints={TLS_URL},http://127.0.0.2:2379",):
            f"garrison agent: etcd endpoints '{TLS_URL},http://127.0.0.2:2379' mix http:// and"
            " https://: give them all https:// when etcd serves TLS (else all http://)",
        ("--kvstore-endpoints=http://127.0.0.1:2379", f"--kvstore-ca={pki.ca}"):
            "garrison agent: --kvstore-ca/--kvstore-cert/--kvstore-key are for TLS but the etcd"
            " endpoints are http://: use https:// URLs",
    }
    for args, expected in cases.items():
        done = agent(*args)
        assert (done.returncode, done.stderr.strip(), done.stdout) == (2, expected, ""), args


def test_the_agent_help_names_the_tls_flags() -> None:
    done = agent("--help")
    assert done.returncode == 0
    for flag in ("--kvstore-ca FILE", "--kvstore-cert FILE", "--kvstore-key FILE"):
        assert flag in done.stdout
