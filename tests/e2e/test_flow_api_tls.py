"""The flow API over TLS and mTLS: real `FlowAPIServer`s on loopback over real flow rings,
real `FlowAPIClient`s, certificates made with the openssl CLI (a CA, a server certificate for
IP 127.0.0.1, a client certificate, a second CA that issued none of them, a server certificate
for another IP), and `garrison observe --cluster` against a real etcd whose node records say
which nodes serve TLS.

What a user sees: records read over TLS (and mTLS with the right client certificate); every
way TLS can go wrong is one line naming the node, the cause and the flag that fixes it; bad
TLS flags are refused with one line and status 2 before anything starts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from garrison.cluster.flowapi import (
    FlowAPIClient,
    FlowAPIError,
    FlowAPIServer,
    ReaderTLS,
    ServerTLS,
    load_reader_tls,
    load_server_tls,
)
from garrison.cluster.keys import NodeRecord
from garrison.flows.codec import format_time
from garrison.flows.record import FlowRecord
from garrison.flows.store import FlowStore
from garrison.tlsfiles import TLSFileError
from tests.etcd_server import EtcdPKI, EtcdServer, _issue, etcd_skip_reason, make_pki, wait_for
from tests.unit.test_cluster_relay import run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]

DEMO = Path(__file__).resolve().parents[1] / "data" / "flows" / "starwars-demo.log"
RECORDS = [FlowRecord.from_json(line) for line in DEMO.read_bytes().splitlines() if line]
BASE_NS = 1_796_000_000_000_000_000


@dataclass(frozen=True)
class PKI:
    base: EtcdPKI
    other_client_cert: Path  # issued by the other CA
    other_client_key: Path
    wrong_ip_cert: Path  # issued by the right CA, for 127.0.0.2 only
    wrong_ip_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("gf-tls-pki")
    base = make_pki(directory)
    other = _issue(directory, "other-client", (base.other_ca, base.other_key),
                   "extendedKeyUsage=clientAuth\n")
    wrong_ip = _issue(directory, "wrong-ip", (base.ca, directory / "ca.key"),
                      "subjectAltName=IP:127.0.0.2\nextendedKeyUsage=serverAuth\n")
    return PKI(base, *other, *wrong_ip)


def ring(node: str, offsets: range) -> FlowStore:
    store = FlowStore()
    for i in offsets:
        store.add(replace(RECORDS[i], time=BASE_NS + i * 1_000_000, node_name=node))
    return store


@contextlib.contextmanager
def serving(tls: ServerTLS | None, store: FlowStore | None = None) -> Iterator[FlowAPIServer]:
    server = FlowAPIServer(store if store is not None else ring("n1", range(5)), "127.0.0.1",
                           0, tls)
    server.start()
    try:
        yield server
    finally:
        server.stop(0)


def read(server: FlowAPIServer, tls: ReaderTLS | None) -> list[str]:
    client = FlowAPIClient(server.address, timeout_s=5, tls=tls)
    try:
        flows: list[str] = client.call("Flows", limit=10)["flows"]
        return flows
    finally:
        client.close()


def refusal(server: FlowAPIServer, tls: ReaderTLS | None) -> str:
    with pytest.raises(FlowAPIError) as info:
        read(server, tls)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def server_tls(pki: PKI, *, mtls: bool = False) -> ServerTLS:
    tls = load_server_tls(pki.base.server_cert, pki.base.server_key,
                          pki.base.ca if mtls else None)
    assert tls is not None and tls.mode == ("mtls" if mtls else "tls")
    return tls


def test_records_read_over_tls_with_the_ca(pki: PKI) -> None:
    with serving(server_tls(pki)) as server:
        flows = read(server, load_reader_tls(pki.base.ca, None, None))
    assert [FlowRecord.from_json(f).time for f in flows] == [
        BASE_NS + i * 1_000_000 for i in range(5)]


def test_a_plaintext_reader_of_a_tls_node_is_told_why(pki: PKI) -> None:
    with serving(server_tls(pki)) as server:
        assert refusal(server, None) == (
            "closed the plaintext connection (Socket closed): it serves TLS, but was asked"
            " without (its node record says plaintext: restart its agent to publish its"
            " record again)")


def test_a_tls_reader_of_a_plaintext_node_is_told_why(pki: PKI) -> None:
    with serving(None) as server:
        assert refusal(server, load_reader_tls(pki.base.ca, None, None)) == (
            "TLS handshake failed: it answers in plaintext though its node record says TLS"
            " (restart its agent to publish its record again)")


def test_a_reader_that_does_not_trust_the_ca_is_told_to_give_flow_api_ca(pki: PKI) -> None:
    with serving(server_tls(pki)) as server:
        wrong = refusal(server, load_reader_tls(pki.base.other_ca, None, None))
        system = refusal(server, load_reader_tls(None, None, None))
    assert wrong.startswith(
        f"TLS handshake failed: certificate not trusted by --flow-api-ca {pki.base.other_ca}: ")
    assert wrong.endswith(" (give --flow-api-ca, the CA that issued the nodes' flow API"
                          " certificates)")
    assert system.startswith("TLS handshake failed: certificate not trusted by ")
    assert "no --flow-api-ca" in system and "give --flow-api-ca" in system


def test_mtls_wants_a_certificate_of_its_client_ca(pki: PKI) -> None:
    with serving(server_tls(pki, mtls=True)) as server:
        assert refusal(server, load_reader_tls(pki.base.ca, None, None)) == (
            "TLS handshake failed: the node requires a client certificate (give"
            " --flow-api-cert/--flow-api-key)")
        other = load_reader_tls(pki.base.ca, pki.other_client_cert, pki.other_client_key)
        assert refusal(server, other) == (
            "TLS handshake failed: the node refused the client certificate --flow-api-cert"
            f" {pki.other_client_cert} (not issued by its --flow-api-tls-client-ca, or"
            " expired; give one that is)")
        right = load_reader_tls(pki.base.ca, pki.base.client_cert, pki.base.client_key)
        assert len(read(server, right)) == 5


def test_a_certificate_without_the_nodes_ip_is_refused(pki: PKI) -> None:
    tls = load_server_tls(pki.wrong_ip_cert, pki.wrong_ip_key, None)
    with serving(tls) as server:
        assert refusal(server, load_reader_tls(pki.base.ca, None, None)) == (
            "TLS handshake failed: its certificate does not carry the IP it publishes as an IP"
            " SAN (issue the node's flow API certificate with subjectAltName IP:<node IP>)")


def test_tls_files_are_checked_with_one_line_naming_flag_file_and_fix(
    pki: PKI, tmp_path: Path
) -> None:
    missing, text = tmp_path / "missing.pem", tmp_path / "not.pem"
    text.write_text("hello\n")
    b = pki.base
    cases: list[tuple[tuple[Path | None, Path | None, Path | None], str]] = [
        ((missing, b.server_key, None),
         f"--flow-api-tls-cert {missing}: cannot read it (No such file or directory); give the"
         " flow API's server certificate (PEM)"),
        ((text, b.server_key, None),
         f"--flow-api-tls-cert {text}: no PEM certificate in it; give the flow API's server"
         " certificate (PEM)"),
        ((b.server_cert, b.client_key, None),
         f"--flow-api-tls-key {b.client_key} is not the key of --flow-api-tls-cert"
         f" {b.server_cert}: give the key the certificate was issued for"),
        ((None, b.server_key, None),
         "--flow-api-tls-cert and --flow-api-tls-key go together: give both (the flow API's"
         " server certificate, with this node's IP as an IP SAN, and its private key) or"
         " neither"),
        ((None, None, b.ca),
         f"--flow-api-tls-client-ca {b.ca}: client certificates are asked over TLS only; give"
         " --flow-api-tls-cert and --flow-api-tls-key too"),
        ((b.server_cert, b.server_key, text),
         f"--flow-api-tls-client-ca {text}: no PEM certificate in it; give the CA bundle (PEM)"
         " that issues the readers' client certificates"),
    ]
    for args, expected in cases:
        with pytest.raises(TLSFileError) as info:
            load_server_tls(*args)
        assert str(info.value) == expected, args
    with pytest.raises(TLSFileError, match=r"^--flow-api-ca .*: no PEM certificate in it"):
        load_reader_tls(text, None, None)
    with pytest.raises(TLSFileError, match=r"^--flow-api-cert and --flow-api-key go together"):
        load_reader_tls(None, b.client_cert, None)
    assert load_server_tls(None, None, None) is None



def test_a_renewed_certificate_is_served_without_a_restart(
    pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As Hubble, the flow API follows its files: replaced by a certificate another CA issued,
    the next reader that trusts that CA reads, and one that trusts only the old CA is refused.
    Files that do not load (the new certificate written before its key) leave the last good
    ones in use, said in the log."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki.base.server_cert, cert)
    shutil.copy(pki.base.server_key, key)
    tls = load_server_tls(cert, key, None)
    renewed_cert, renewed_key = _issue(
        tmp_path, "renewed", (pki.base.other_ca, pki.base.other_key),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    old_ca = load_reader_tls(pki.base.ca, None, None)
    new_ca = load_reader_tls(pki.base.other_ca, None, None)
    with serving(tls) as server, caplog.at_level(logging.INFO, logger="garrison.cluster"):
        assert len(read(server, old_ca)) == 5
        shutil.copy(renewed_cert, cert)  # its key not yet
        time.sleep(1.1)  # the files are looked at, at a new connection, once a second
        assert len(read(server, old_ca)) == 5
        assert any("the changed certificate files do not load, the previous ones stay in use:"
                   f" --flow-api-tls-key {key} is not the key of --flow-api-tls-cert {cert}"
                   in r.getMessage() for r in caplog.records)
        shutil.copy(renewed_key, key)
        wait_for(lambda: _reads(server, new_ca), 10.0, "the renewed certificate to be served")
        assert refusal(server, old_ca).startswith(
            "TLS handshake failed: certificate not trusted by --flow-api-ca")
        assert server.reloader is not None and server.reloader.reloads == 1


def _reads(server: FlowAPIServer, tls: ReaderTLS) -> bool:
    try:
        return len(read(server, tls)) == 5
    except FlowAPIError:
        return False


# -- the commands ----------------------------------------------------------------------------


def garrison(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garrison.cli.main", *args],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "GARRISON_PURE": "1", "PYTHONWARNINGS": "ignore"},
    )


def test_the_agent_refuses_bad_flow_api_tls_flags_with_one_line_and_status_2(
    pki: PKI, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    cluster = ("--kvstore", "etcd", "--kvstore-endpoints", "http://127.0.0.1:1",
               "--pod-cidr", "198.18.98.0/24")
    b = pki.base
    cases = {
        (*cluster, f"--flow-api-tls-cert={missing}", f"--flow-api-tls-key={b.server_key}"):
            f"--flow-api-tls-cert {missing}: cannot read it (No such file or directory); give"
            " the flow API's server certificate (PEM)",
        (*cluster, f"--flow-api-tls-key={b.server_key}"):
            "--flow-api-tls-cert and --flow-api-tls-key go together: give both (the flow API's"
            " server certificate, with this node's IP as an IP SAN, and its private key) or"
            " neither",
        (*cluster, f"--flow-api-tls-client-ca={b.ca}"):
            f"--flow-api-tls-client-ca {b.ca}: client certificates are asked over TLS only;"
            " give --flow-api-tls-cert and --flow-api-tls-key too",
        (*cluster, f"--flow-api-tls-cert={b.server_cert}", f"--flow-api-tls-key={b.ca}"):
            f"--flow-api-tls-key {b.ca}: no PEM private key in it; give the flow API's server"
            " certificate's private key (PEM)",
        (*cluster, "--flow-api=none", f"--flow-api-tls-cert={b.server_cert}",
         f"--flow-api-tls-key={b.server_key}"):
            "--flow-api-tls-cert is for the flow API, which serves the cluster's flow view: it"
            " needs --kvstore etcd and --flow-api other than none",
        (f"--flow-api-tls-cert={b.server_cert}", f"--flow-api-tls-key={b.server_key}"):
            "--flow-api-tls-cert is for the flow API, which serves the cluster's flow view: it"
            " needs --kvstore etcd and --flow-api other than none",
    }
    for args, expected in cases.items():
        done = garrison("agent", *args)
        assert (done.returncode, done.stderr.strip(), done.stdout) == (
            2, f"garrison agent: {expected}", ""), args


def test_readers_refuse_bad_flow_api_flags_with_one_line_and_status_2(
    pki: PKI, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    for command in (("observe",), ("accesslog", "summary"), ("accesslog", "export")):
        done = garrison(*command, "--cluster", "--kvstore-endpoints", "http://127.0.0.1:1",
                        "--flow-api-ca", str(missing))
        assert (done.returncode, done.stderr.strip()) == (
            2, f"garrison: --flow-api-ca {missing}: cannot read it (No such file or directory);"
            " give the CA bundle (PEM) that issued the nodes' flow API certificates"), command
        done = garrison(*command, "--flow-api-ca", str(pki.base.ca))
        assert (done.returncode, done.stderr.strip()) == (
            2, "garrison: --flow-api-ca is for reading the nodes' flow APIs: add --cluster"
        ), command
    done = garrison("observe", "--cluster", "--kvstore-endpoints", "http://127.0.0.1:1",
                    "--flow-api-key", str(pki.base.client_key))
    assert (done.returncode, done.stderr.strip()) == (
        2, "garrison: --flow-api-cert and --flow-api-key go together: give both (the client"
        " certificate the nodes' --flow-api-tls-client-ca issued, and its private key) or"
        " neither")


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    reason = etcd_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with EtcdServer(name="gf-flowtls") as server:
        yield server


def test_observe_cluster_reads_tls_mtls_and_plaintext_nodes_by_their_records(
    pki: PKI, etcd: EtcdServer
) -> None:
    """n1 plaintext (a record as older agents write it), n2 TLS, n3 mTLS: all read with the CA
    and the client certificate; without the client certificate n3 is named with the fix."""
    from garrison.kvstore.etcd import EtcdKVStore

    rings = {name: ring(name, range(i, 15, 3)) for i, name in enumerate(("n1", "n2", "n3"))}
    with (
        serving(None, rings["n1"]) as s1,
        serving(server_tls(pki), rings["n2"]) as s2,
        serving(server_tls(pki, mtls=True), rings["n3"]) as s3,
        EtcdKVStore(etcd.url) as store,
    ):
        records = [
            NodeRecord(name, ipaddress.IPv4Address("127.0.0.1"),
                       ipaddress.IPv4Network(f"198.18.{90 + i}.0/24"), server.address,
                       flow_api_tls=server.tls is not None)
            for i, (name, server) in enumerate((("n1", s1), ("n2", s2), ("n3", s3)))
        ]
        assert b"flow_api_tls" not in records[0].encode()
        try:
            for rec in records:
                store.put(rec.key, rec.encode())
            rc, out, err = run_cli(
                "observe", "--cluster", "--kvstore-endpoints", etcd.url, "--last", "15",
                "-o", "json", "--flow-api-ca", str(pki.base.ca),
                "--flow-api-cert", str(pki.base.client_cert),
                "--flow-api-key", str(pki.base.client_key))
            assert (rc, err) == (0, "")
            got = [json.loads(line) for line in out.splitlines()]
            assert [(d["time"], d["node_name"]) for d in got] == [
                (format_time(BASE_NS + i * 1_000_000), f"n{i % 3 + 1}") for i in range(15)]
            rc, out, err = run_cli("observe", "--cluster", "--kvstore-endpoints", etcd.url,
                                   "--last", "15", "-o", "json", "--flow-api-ca",
                                   str(pki.base.ca))
            assert rc == 1 and len(out.splitlines()) == 10
            assert err == (
                f"garrison: node n3 ({s3.address}): TLS handshake failed: the node requires a"
                " client certificate (give --flow-api-cert/--flow-api-key); its records are"
                " not shown\n")
        finally:
            for rec in records:
                store.delete(rec.key)
