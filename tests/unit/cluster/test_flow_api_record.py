"""The node record's word on its flow API's TLS (`flow_api_tls`), and `garrison status`'s line
for the flow API: plaintext, TLS or mTLS."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from garrison.cluster.keys import NodeRecord
from garrison.cluster.status import cluster_lines

PLAIN = NodeRecord("n1", ipaddress.IPv4Address("198.19.0.1"),
                   ipaddress.IPv4Network("198.18.1.0/24"), "198.19.0.1:4244")


def test_a_tls_node_record_round_trips_and_says_so() -> None:
    tls = replace(PLAIN, flow_api_tls=True)
    raw = tls.encode()
    assert raw == (b'{"flow_api":"198.19.0.1:4244","flow_api_tls":true,"ip":"198.19.0.1",'
                   b'"name":"n1","pod_cidr":"198.18.1.0/24"}')
    assert NodeRecord.decode(tls.key, raw) == tls


def test_a_plaintext_record_is_written_as_before_and_old_records_read_as_plaintext() -> None:
    old = b'{"flow_api":"198.19.0.1:4244","ip":"198.19.0.1","name":"n1","pod_cidr":"198.18.1.0/24"}'
    assert PLAIN.encode() == old  # no new field for a plaintext node: older readers unchanged
    decoded = NodeRecord.decode(PLAIN.key, old)
    assert decoded == PLAIN and decoded.flow_api_tls is False


def test_only_json_true_means_tls() -> None:
    for value in (b'"yes"', b"1", b"null", b"false", b'"true"', b"[]"):
        raw = (b'{"flow_api":"198.19.0.1:4244","flow_api_tls":' + value
               + b',"ip":"198.19.0.1","name":"n1","pod_cidr":"198.18.1.0/24"}')
        assert NodeRecord.decode(PLAIN.key, raw).flow_api_tls is False, value


def test_status_names_the_flow_apis_security() -> None:
    base = {"endpoints": ["198.19.0.250:2379"], "connected": True, "node": "n1", "nodes": {},
            "flow_api": "198.19.0.201:4244"}
    lines = {
        security: cluster_lines({"cluster": {**base, "flow_api_security": security}})[2]
        for security in ("plaintext", "tls", "mtls")
    }
    assert lines == {
        "plaintext": "Flow API:        198.19.0.201:4244 (read-only, plaintext:"
                     " `garrison observe --cluster`)",
        "tls": "Flow API:        198.19.0.201:4244 (read-only, TLS, no client certificate"
               " asked: `garrison observe --cluster`)",
        "mtls": "Flow API:        198.19.0.201:4244 (read-only, mTLS, client certificates from"
                " --flow-api-tls-client-ca: `garrison observe --cluster`)",
    }
    # an agent from before TLS says nothing: plaintext, as it was
    assert cluster_lines({"cluster": base})[2] == lines["plaintext"]
