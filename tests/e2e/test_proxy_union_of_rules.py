"""The union of rules through the real proxy (issue 20): a peer allowed at L3 only is
redirected on a port where an any-peer rule has HTTP rules, and every request of it passes;
the other peers get the HTTP rules. Real `garrison proxy`, the deathstar app, raw clients
bound to the ships' addresses, the access log."""

from __future__ import annotations

from pathlib import Path

import pytest

from garrison.flows.record import FlowRecord, L7FlowType, Verdict
from tests.e2e.conftest import (
    DEATHSTAR_LABELS,
    TIEFIGHTER,
    TIEFIGHTER_PEER,
    XWING,
    XWING_PEER,
    Address,
    ProxyRunner,
    exchange,
    request,
)

pytestmark = pytest.mark.e2e

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tiefighter-l3}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: landing}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
"""


def _request_record(ship: str, method: str):  # type: ignore[no-untyped-def]
    def check(r: FlowRecord) -> bool:
        return (
            r.source.ip == ship
            and r.l7 is not None
            and r.l7.type is L7FlowType.REQUEST
            and r.l7.http is not None
            and r.l7.http.method == method
        )
    return check


def test_l3_only_peer_is_redirected_and_allowed_every_request(
    proxy_runner: ProxyRunner, deathstar: Address, tmp_path: Path
) -> None:
    policy = tmp_path / "union.yaml"
    policy.write_text(POLICY)
    proxy = proxy_runner(
        protocol="http",
        policy_files=[policy],
        dst_labels=DEATHSTAR_LABELS,
        peers=[TIEFIGHTER_PEER, XWING_PEER],
        upstream=deathstar,
        dport=80,
    )
    pipeline = request("PUT", "/v1/exhaust-port") + request("GET", "/v1/")
    tie = exchange(proxy.address, TIEFIGHTER, pipeline, ["PUT", "GET"])
    assert [a.status for a in tie] == [503, 200]
    assert tie[0].body == b"Panic: deathstar exploded\n"
    xwing = exchange(
        proxy.address, XWING, request("PUT", "/v1/exhaust-port")
        + request("POST", "/v1/request-landing"), ["PUT", "POST"],
    )
    assert [a.status for a in xwing] == [403, 200]

    put = proxy.wait_record(_request_record(TIEFIGHTER, "PUT"))
    assert put.verdict is Verdict.FORWARDED
    assert "tiefighter-l3" in [p.name for p in put.ingress_allowed_by]
    denied = proxy.wait_record(_request_record(XWING, "PUT"))
    assert denied.verdict is Verdict.DROPPED
    assert [p.name for p in denied.ingress_denied_by] == ["landing"]
