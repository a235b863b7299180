"""A real `garrison agent --kvstore etcd` over TLS (docs/cluster.md, "TLS to etcd").

The agent and a real etcd 3.4 (`--client-cert-auth`, certificates made by openssl) share a
network namespace of the test's own (`ns_agent`), so etcd's 127.0.0.1:2379 there is the
test's alone. The agent joins with a client certificate and `garrison status` says how etcd
was verified; with a CA that did not issue etcd's certificate it does not start, and its
last line says why and what to give instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.etcd_server import EtcdPKI, EtcdServer, etcd_skip_reason, make_pki
from tests.privileged.agent_harness import GARRISON, NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF"),
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]



def cluster_args(etcd: EtcdServer, ca: Path, pki: EtcdPKI) -> list[str]:
    return [
        "--kvstore", "etcd", "--kvstore-endpoints", etcd.url, "--node-name", "ge-tls-n1",
        "--pod-cidr", "198.18.96.0/24", "--node-ip", "127.0.0.1", "--flow-api", "127.0.0.1:4244",
        "--kvstore-ca", str(ca), "--kvstore-cert", str(pki.client_cert),
        "--kvstore-key", str(pki.client_key),
    ]


def test_an_agent_joins_a_tls_etcd_and_status_says_how(
    ns_agent: NsAgent, tmp_path: Path
) -> None:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir)
    with EtcdServer(name="ge-tls-agent", netns=ns_agent.netns, tls=pki) as etcd:
        assert etcd.url == "https://127.0.0.1:2379"
        ns_agent.extra = cluster_args(etcd, pki.ca, pki)
        ns_agent.start()
        shown = ns_agent.cli("status")
        assert shown.returncode == 0, shown.stdout + shown.stderr + ns_agent.log()[-3000:]
        assert "Kvstore:         etcd 127.0.0.1:2379, connected" in shown.stdout
        assert (
            f"Kvstore TLS:     TLS, server verified against --kvstore-ca {pki.ca}, client"
            f" certificate {pki.client_cert}"
        ) in shown.stdout

        # the cluster's flow view over the same TLS, etcd's URLs taken from the agent's status
        view = ns_agent.observe_cluster("--kvstore-ca", str(pki.ca), "--kvstore-cert",
                               str(pki.client_cert), "--kvstore-key", str(pki.client_key))
        assert view.returncode == 0, view.stdout + view.stderr
        # without the client certificate etcd refuses the reader: said in one line, exit 3
        bare = ns_agent.observe_cluster("--kvstore-ca", str(pki.ca))
        assert bare.returncode == 3, bare.stdout + bare.stderr
        assert "Traceback" not in bare.stderr and "etcd" in bare.stderr, bare.stderr
        assert ns_agent.stop() == 0

        # restarted with a CA that did not issue etcd's certificate: it runs on from its
        # saved copy of the cluster, and status says why etcd is not connected
        ns_agent.extra = cluster_args(etcd, pki.other_ca, pki)
        ns_agent.start()
        shown = ns_agent.cli("status")
        problem = (
            "etcd at 127.0.0.1:2379 is not connected: etcd lease grant: the certificate of etcd"
            f" at 127.0.0.1:2379 does not verify against --kvstore-ca {pki.other_ca} (unable to"
            " get local issuer certificate); give the CA that issued it with --kvstore-ca"
        )
        assert problem in shown.stdout + shown.stderr, shown.stdout + shown.stderr
        assert "Kvstore:         etcd 127.0.0.1:2379, NOT CONNECTED" in shown.stdout
        assert ns_agent.stop() == 0

        # a node that was never connected does not start, and its last line says why
        fresh = ["--state-dir", str(tmp_path / "fresh-state"), "--socket",
                 str(tmp_path / "fresh.sock"), "--bpffs-root", str(ns_agent.pin_root)]
        done = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns_agent.netns}", GARRISON, "agent", *fresh,
             *ns_agent.extra],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 1, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(
            "garrison agent: cannot join the cluster: etcd lease grant: the certificate of etcd"
            f" at 127.0.0.1:2379 does not verify against --kvstore-ca {pki.other_ca}"
        ), done.stderr[-3000:]
        assert "Traceback" not in done.stderr
    cleaned = ns_agent.cleanup()
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
