"""A real `garrison agent --kvstore etcd` serving its flow API with mTLS (docs/cluster.md,
"TLS and client certificates on the flow API").

The agent and a real etcd share a network namespace of the test's own (`ns_agent`), so
127.0.0.1:2379 and :4244 there are the test's alone. `garrison status` says mTLS; `garrison
observe --cluster` reads the node over TLS (as its record says) with the CA and a client
certificate, and names the missing certificate without one; restarted without
TLS on 0.0.0.0 it warns, in one line, that whoever reaches the port reads the flows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.etcd_server import EtcdServer, etcd_skip_reason, make_pki
from tests.privileged.agent_harness import NsAgent, fixture_ns_agent  # noqa: F401

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF"),
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason())),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]

def test_an_agent_serves_its_flows_with_mtls_and_readers_need_the_certificate(
    ns_agent: NsAgent, tmp_path: Path
) -> None:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir)
    with EtcdServer(name="gf-flowtls-agent", netns=ns_agent.netns) as etcd:
        base = ["--kvstore", "etcd", "--kvstore-endpoints", etcd.url, "--node-name",
                "gf-tls-n1", "--pod-cidr", "198.18.95.0/24", "--node-ip", "127.0.0.1"]
        ns_agent.extra = [*base, "--flow-api", "127.0.0.1:4244",
                          "--flow-api-tls-cert", str(pki.server_cert),
                          "--flow-api-tls-key", str(pki.server_key),
                          "--flow-api-tls-client-ca", str(pki.ca)]
        ns_agent.start()
        shown = ns_agent.cli("status")
        assert shown.returncode == 0, shown.stdout + shown.stderr + ns_agent.log()[-3000:]
        assert ("Flow API:        127.0.0.1:4244 (read-only, mTLS, client certificates from"
                " --flow-api-tls-client-ca: `garrison observe --cluster`)") in shown.stdout
        status = json.loads(ns_agent.cli("status", "-o", "json").stdout)["cluster"]
        assert (status["flow_api"], status["flow_api_security"]) == ("127.0.0.1:4244", "mtls")
        assert "plaintext and unauthenticated" not in ns_agent.log()

        view = ns_agent.observe_cluster("--flow-api-ca", str(pki.ca), "--flow-api-cert",
                               str(pki.client_cert), "--flow-api-key", str(pki.client_key))
        assert (view.returncode, view.stderr) == (0, ""), view.stdout + view.stderr
        bare = ns_agent.observe_cluster("--flow-api-ca", str(pki.ca))
        assert bare.returncode == 3, bare.stdout + bare.stderr
        assert bare.stderr.splitlines() == [
            "garrison: node gf-tls-n1 (127.0.0.1:4244): TLS handshake failed: the node requires"
            " a client certificate (give --flow-api-cert/--flow-api-key); its records are not"
            " shown",
            "garrison: no node's flow API answered (named above)",
        ]
        assert ns_agent.stop() == 0

        # plaintext on every address: the record says so (no field), and the agent warns
        ns_agent.extra = [*base, "--flow-api", "0.0.0.0:4244"]
        ns_agent.start()
        status = json.loads(ns_agent.cli("status", "-o", "json").stdout)["cluster"]
        assert status["flow_api_security"] == "plaintext"
        warnings = [line for line in ns_agent.log().splitlines()
                    if "plaintext and unauthenticated" in line]
        assert len(warnings) == 1 and "--flow-api-tls-cert" in warnings[0], warnings
        assert ns_agent.stop() == 0
    cleaned = ns_agent.cleanup()
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
