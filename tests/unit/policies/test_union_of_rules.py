"""An L3-only allow opens L7 for that peer (issue 20): the resolver's MapState and L7 rule
sets, `policy trace` and the standalone proxy's view give the same answer, request by request.

The scenario is Cilium's union of rules: tiefighter is allowed at L3 only (no `toPorts`), a
second rule puts HTTP rules on port 80 for any peer. tiefighter's connections to port 80 are
redirected — the HTTP rules apply to it — but its L3-only allow makes its L7 allow-all there:
every request passes, and the flow names the L3-only rule. When the HTTP rules are for
another peer only, tiefighter is not redirected (Cilium redirects per selector) and every
request passes at L3.
"""

from __future__ import annotations

import pytest

from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.mapstate import PROTO_TCP, MatchType, lookup
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.model import Direction, Policy
from garrison.policies.resolve import build_resolver
from garrison.policies.trace import HTTPRequestSpec, TraceEndpoint, trace
from garrison.proxy.policyview import DESTINATION_IDENTITY, PeerMapping, StandalonePolicy

from .helpers import policies

DEATHSTAR = endpoint_labels(Labels.parse("org=empire,class=deathstar"))
SHIPS = {
    "tiefighter": ("127.0.0.2", "org=empire,class=tiefighter"),
    "xwing": ("127.0.0.3", "org=alliance,class=xwing"),
    "shuttle": ("127.0.0.4", "org=empire,class=shuttle"),
}

L3_ONLY = """
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
  - PEERS
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
"""
# the HTTP rule's peers: any peer, or a peer other than tiefighter
HTTP_PEERS = {
    "any-peer": "fromEntities: [all]",
    "no-peer-list": "{}",
    "other-peer": "fromEndpoints: [{matchLabels: {class: shuttle}}]",
}

REQUESTS = [("POST", "/v1/request-landing"), ("PUT", "/v1/exhaust-port"), ("GET", "/v1/")]


def scenario(peers: str) -> tuple[Policy, ...]:
    text = L3_ONLY.replace("- PEERS\n    ", f"- {peers}\n    " if peers != "{}" else "- ")
    return policies(text)


def expected(peers: str, ship: str, method: str) -> bool:
    if ship == "tiefighter":
        return True  # L3-only allow: union of rules, allow-all at L7
    if ship == "xwing":
        return peers != "other-peer" and method == "POST"
    return method == "POST"  # shuttle: the HTTP rule decides


@pytest.mark.parametrize("peers", HTTP_PEERS)
def test_resolver_trace_and_proxy_view_agree(peers: str) -> None:
    pols = scenario(HTTP_PEERS[peers])
    ships = {name: endpoint_labels(Labels.parse(lab)) for name, (_, lab) in SHIPS.items()}
    ids = {name: DESTINATION_IDENTITY + 1 + i for i, name in enumerate(ships)}
    resolver = build_resolver(
        pols, [(DESTINATION_IDENTITY, DEATHSTAR), *((ids[n], lab) for n, lab in ships.items())]
    )
    state = resolver.map_state(DESTINATION_IDENTITY)
    view = StandalonePolicy(
        pols, DEATHSTAR, 80, L7Protocol.HTTP,
        [PeerMapping.parse(f"{ip}/32={lab}") for ip, lab in SHIPS.values()],
    )
    for ship, (ip, _) in SHIPS.items():
        res = lookup(state, Direction.INGRESS, ids[ship], PROTO_TCP, 80)
        admission = view.admit(ip, "127.0.0.1", 80)
        for method, path in REQUESTS:
            want = expected(peers, ship, method)
            # the resolver's MapState and L7 rule set (what the datapath and agent use)
            model = res.allowed and (
                res.redirect is None
                or (res.l7 is not None
                    and HTTPMatcher(res.l7).match(method, path, None, []).allowed)
            )
            # policy trace
            traced = trace(
                pols, TraceEndpoint(ships[ship], "default"),
                TraceEndpoint(DEATHSTAR, "default"), 80,
                request=HTTPRequestSpec(method, path),
            )
            # the proxy's view: admitted, then its matcher on the rule set it was handed
            proxied = admission.allowed and HTTPMatcher(admission.ruleset).match(
                method, path, None, []
            ).allowed
            assert (model, traced.allowed, proxied) == (want, want, want), (
                ship, method, path
            )
            if ship == "tiefighter":
                assert traced.denied_at is None
                assert traced.redirected == (peers != "other-peer")
                assert admission.lookup.redirect == res.redirect
                landing = ["landing"] if peers != "other-peer" else []
                assert [r.name for r in traced.allowed_by] == ["tiefighter-l3", *landing]


def test_l3_only_peer_gets_its_own_redirect_entry_naming_both_rules() -> None:
    pols = scenario(HTTP_PEERS["any-peer"])
    tie = endpoint_labels(Labels.parse(SHIPS["tiefighter"][1]))
    resolver = build_resolver(pols, [(DESTINATION_IDENTITY, DEATHSTAR), (300, tie)])
    state = resolver.map_state(DESTINATION_IDENTITY)
    res = lookup(state, Direction.INGRESS, 300, PROTO_TCP, 80)
    assert res.match_type is MatchType.L3_L4 and res.redirect is L7Protocol.HTTP
    assert res.key is not None and (res.key.identity, res.key.port) == (300, 80)
    assert [r.name for r in res.refs] == ["tiefighter-l3", "landing"]
    assert res.l7 is not None and res.l7.allow_all
    assert res.l7.allow_all_ref is not None and res.l7.allow_all_ref.name == "tiefighter-l3"
    # other ports: the L3-only entry, not redirected
    other = lookup(state, Direction.INGRESS, 300, PROTO_TCP, 8080)
    assert other.match_type is MatchType.L3_ONLY and other.redirect is None
    # removing the L3-only policy takes the derived entry away again (incremental)
    resolver.remove_policy(pols[0])
    resolver.updates([DESTINATION_IDENTITY])
    state = resolver.map_state(DESTINATION_IDENTITY)
    assert all(k.identity != 300 for k in state.entries)
    after = lookup(state, Direction.INGRESS, 300, PROTO_TCP, 80)
    assert after.l7 is not None and not after.l7.allow_all



def test_rebuilt_endpoint_reports_its_derived_entry_for_deletion() -> None:
    """A fromRequires policy rebuilds the endpoint; the derived (peer, TCP, port) entry it
    no longer has must be among the keys a datapath sync rewrites or deletes."""
    pols = scenario(HTTP_PEERS["any-peer"])
    tie = endpoint_labels(Labels.parse(SHIPS["tiefighter"][1]))
    resolver = build_resolver(pols, [(DESTINATION_IDENTITY, DEATHSTAR), (300, tie)])
    derived = lookup(resolver.map_state(DESTINATION_IDENTITY), Direction.INGRESS, 300,
                     PROTO_TCP, 80).key
    assert derived is not None and derived.identity == 300
    requires = policies(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: alliance-only}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromRequires: [{matchLabels: {org: alliance}}]
        """
    )[0]
    changed = resolver.add_policy(requires)
    touched = resolver.updates(changed)[DESTINATION_IDENTITY]
    assert derived in touched
    assert derived not in resolver.map_state(DESTINATION_IDENTITY).entries
