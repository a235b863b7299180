"""TLS to etcd, before any connection: the endpoints' scheme and the certificate files are
checked when the store is made, each problem one line naming the file (or flag) and the fix.
No etcd needed: nothing here connects (a refused file never reaches gRPC)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.kvstore.base import KVStoreError
from garrison.kvstore.etcd import (
    EtcdKVStore,
    EtcdTLS,
    load_tls,
    parse_endpoint_urls,
    parse_endpoints,
)
from tests.etcd_server import EtcdPKI, make_pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

URL = "https://127.0.0.1:23799"  # nothing listens: these stores must fail before connecting


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdPKI]:
    yield make_pki(tmp_path_factory.mktemp("ge-tls-pki"))


def test_https_endpoints_are_parsed_and_mixing_schemes_is_refused() -> None:
    parsed = parse_endpoint_urls("https://127.0.0.1:2379,https://[::1]:2379")
    assert parsed.tls and parsed.addresses == ("127.0.0.1:2379", "[::1]:2379")
    assert parsed.hosts == ("127.0.0.1", "::1")
    assert not parse_endpoint_urls("http://127.0.0.1:2379, 127.0.0.1:22379").tls
    with pytest.raises(KVStoreError, match=r"mix http:// and https://: give them all https://"):
        parse_endpoints("https://127.0.0.1:2379,http://127.0.0.2:2379")
    with pytest.raises(KVStoreError, match="mix http:// and https://"):
        parse_endpoints("https://127.0.0.1:2379,127.0.0.2:2379")  # no scheme means http://
    with pytest.raises(KVStoreError, match=r"bad etcd endpoint 'unix:///run/etcd\.sock'"):
        parse_endpoints("unix:///run/etcd.sock")


def test_a_good_set_of_files_loads(pki: EtcdPKI) -> None:
    material = load_tls(EtcdTLS(pki.ca, pki.client_cert, pki.client_key))
    assert material.ca == pki.ca.read_bytes() and material.cert == pki.client_cert.read_bytes()
    assert load_tls(EtcdTLS()).ca is None  # gRPC's default roots


def refused(tls: EtcdTLS, url: str = URL) -> str:
    with pytest.raises(KVStoreError) as info:
        EtcdKVStore(url, tls=tls)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_missing_or_unreadable_file_is_named(pki: EtcdPKI, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    assert refused(EtcdTLS(ca_file=missing)) == (
        f"--kvstore-ca {missing}: cannot read it (No such file or directory); give the CA"
        " bundle (PEM) that issued etcd's server certificate"
    )
    assert refused(EtcdTLS(pki.ca, pki.client_cert, missing)).startswith(
        f"--kvstore-key {missing}: cannot read it (No such file or directory)"
    )
    assert refused(EtcdTLS(pki.ca, tmp_path, pki.client_key)).startswith(
        f"--kvstore-cert {tmp_path}: cannot read it (Is a directory)"
    )


def test_files_that_are_not_what_they_should_be_are_named(pki: EtcdPKI, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert refused(EtcdTLS(ca_file=junk)).startswith(f"--kvstore-ca {junk}: no PEM certificate")
    # a key given as the CA bundle: no certificate in it either
    assert "no PEM certificate" in refused(EtcdTLS(ca_file=pki.client_key))
    assert refused(EtcdTLS(pki.ca, junk, pki.client_key)).startswith(
        f"--kvstore-cert {junk}: no PEM certificate in it"
    )
    assert refused(EtcdTLS(pki.ca, pki.client_cert, pki.client_cert)).startswith(
        f"--kvstore-key {pki.client_cert}: no PEM private key in it"
    )


def test_a_key_that_is_not_the_certificates_is_refused(pki: EtcdPKI) -> None:
    assert refused(EtcdTLS(pki.ca, pki.client_cert, pki.server_key)) == (
        f"--kvstore-key {pki.server_key} is not the key of --kvstore-cert {pki.client_cert}:"
        " give the key the certificate was issued for"
    )


def test_an_encrypted_key_is_refused_without_asking_for_a_password(
    pki: EtcdPKI, tmp_path: Path
) -> None:
    encrypted = tmp_path / "client-enc.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.client_key), "-out", str(encrypted), "-aes256",
         "-passout", "pass:secret"],
        check=True, capture_output=True,
    )
    message = refused(EtcdTLS(pki.ca, pki.client_cert, encrypted))
    assert message.startswith(
        f"--kvstore-key {encrypted}: the key is encrypted; give it unencrypted"
    )


def test_a_certificate_without_its_key_or_the_reverse_is_refused(pki: EtcdPKI) -> None:
    both = "--kvstore-cert and --kvstore-key go together: give both"
    assert refused(EtcdTLS(pki.ca, cert_file=pki.client_cert)).startswith(both)
    assert refused(EtcdTLS(pki.ca, key_file=pki.client_key)).startswith(both)


def test_tls_files_with_http_endpoints_are_refused_not_ignored(pki: EtcdPKI) -> None:
    message = refused(EtcdTLS(pki.ca), url="http://127.0.0.1:23799")
    assert "are for TLS but the etcd endpoints 127.0.0.1:23799 are http://" in message
    assert message.endswith("use https:// URLs")
