"""Resolution semantics, one test per rule of POLICY-SEMANTICS.md (L3/L4 part)."""

from __future__ import annotations

import pytest

from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.mapstate import PROTO_TCP, DropReason, LookupResult, MatchType, lookup
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.model import Direction, EnforcementMode
from garrison.policies.resolve import ResolverConfig, build_resolver

from .helpers import policies, world

EPS = {
    "deathstar": "org=empire,class=deathstar",
    "tiefighter": "org=empire,class=tiefighter",
    "xwing": "org=alliance,class=xwing",
}

L3L4 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


def test_no_policy_allows_everything() -> None:
    w = world("", EPS)
    assert w.allowed("xwing", "deathstar", 80)
    res = w.ingress("xwing", "deathstar", 80)
    assert not res.enforced and res.match_type is MatchType.NONE


def test_l3_l4_policy_allows_selected_peer_on_port_only() -> None:
    w = world(L3L4, EPS)
    ok = w.ingress("tiefighter", "deathstar", 80)
    assert ok.allowed and ok.match_type is MatchType.L3_L4
    assert [r.name for r in ok.refs] == ["rule1"]
    denied = w.ingress("xwing", "deathstar", 80)
    assert not denied.allowed and denied.drop_reason is DropReason.POLICY_DENIED
    assert not w.allowed("tiefighter", "deathstar", 81)
    assert not w.allowed("tiefighter", "deathstar", 80, "UDP")


def test_ingress_policy_leaves_egress_unrestricted() -> None:
    w = world(L3L4, EPS)
    # deathstar's egress is not enforced: it may open connections to anyone
    assert w.allowed("deathstar", "xwing", 443)
    # xwing is not selected by any rule: its ingress stays open
    assert w.allowed("tiefighter", "xwing", 22)


def test_empty_ingress_element_is_default_deny() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: lockdown}
        spec:
          endpointSelector: {}
          ingress: [{}]
        """,
        EPS,
    )
    assert not w.allowed("tiefighter", "deathstar", 80)
    assert w.ingress("tiefighter", "deathstar", 80).drop_reason is DropReason.POLICY_DENIED


def test_enable_default_deny_false_keeps_direction_open() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: visibility}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          enableDefaultDeny: {ingress: false}
          ingress:
          - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{}]}}]
        """,
        EPS,
    )
    res = w.ingress("xwing", "deathstar", 80)
    assert res.allowed and res.redirect is L7Protocol.HTTP
    assert w.allowed("xwing", "deathstar", 22)


def test_deny_wins_over_more_specific_allow() -> None:
    w = world(
        L3L4
        + """
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-tiefighters}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
""",
        EPS,
    )
    res = w.ingress("tiefighter", "deathstar", 80)
    assert not res.allowed and res.drop_reason is DropReason.POLICY_DENY
    assert [r.name for r in res.refs] == ["no-tiefighters"]


def test_deny_only_policy_switches_to_default_deny() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: deny-xwing}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingressDeny:
          - fromEndpoints: [{matchLabels: {class: xwing}}]
        """,
        EPS,
    )
    assert w.ingress("xwing", "deathstar", 80).drop_reason is DropReason.POLICY_DENY
    assert w.ingress("tiefighter", "deathstar", 80).drop_reason is DropReason.POLICY_DENIED


def test_l3_only_peer_is_redirected_by_portwide_l7_rule_and_allowed_all() -> None:
    """Cilium's Star Wars v2 header demo: the port-wide L7 rule redirects the L3-only peer,
    and the union of rules lets every request of that peer through (allow-all L7), logged."""
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: v2}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEndpoints: [{matchLabels: {org: empire}}]
          - toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules: {http: [{method: GET, path: "/v1/", headers: ["X-Has-Force: True"]}]}
        """,
        EPS,
    )
    res = w.ingress("tiefighter", "deathstar", 80)
    assert res.allowed and res.redirect is L7Protocol.HTTP
    assert res.match_type is MatchType.L3_L4
    assert res.l7 is not None and res.l7.allow_all
    assert res.l7.allow_all_ref is not None and res.l7.allow_all_ref.section == "ingress"
    assert http_allowed(res, "PUT", "/v1/exhaust-port")
    # a peer only the port-wide rule allows: its L7 rules decide
    xwing = w.ingress("xwing", "deathstar", 80)
    assert xwing.redirect is L7Protocol.HTTP and xwing.l7 is not None
    assert not xwing.l7.allow_all and not http_allowed(xwing, "GET", "/v1/")
    other = w.ingress("tiefighter", "deathstar", 22)
    assert other.allowed and other.match_type is MatchType.L3_ONLY and other.redirect is None


def http_allowed(res: LookupResult, method: str, path: str) -> bool:
    """What the client sees: L3/L4 lets it in and, when redirected, the proxy's matcher
    (with the rule set the lookup hands it) allows the request."""
    if not res.allowed:
        return False
    if res.redirect is None:
        return True
    assert res.l7 is not None
    return HTTPMatcher(res.l7).match(method, path, None, []).allowed


UNION_EPS = {"web": "app=web", "foo": "app=foo", "bar": "app=bar"}
ANY_PEER_GET = """
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: any-peer-get}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /}]}
"""


@pytest.mark.parametrize(
    "ports",
    [
        '[{port: "80", protocol: TCP}]',
        '[{port: "80"}]',  # protocol ANY
        '[{port: "79", endPort: 81, protocol: TCP}]',
        '[{port: "0", protocol: TCP}]',  # TCP, any port
    ],
)
def test_adding_an_any_peer_l7_rule_keeps_l4_allowed_peer_allow_all(ports: str) -> None:
    """Issue 20: an L4-only allow for foo on port 80, then an HTTP `GET /` rule for any peer on
    port 80: foo is redirected, but its L4-only allow makes its L7 allow-all (union of rules);
    `PUT /private` from foo is allowed with and without the any-peer rule."""
    foo_l4 = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: foo-l4}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: foo}}}}]
    toPorts: [{{ports: {ports}}}]
"""
    alone = world(foo_l4, UNION_EPS)
    assert http_allowed(alone.ingress("foo", "web", 80), "PUT", "/private")
    both = world(foo_l4 + ANY_PEER_GET, UNION_EPS)
    res = both.ingress("foo", "web", 80)
    assert res.redirect is L7Protocol.HTTP
    assert http_allowed(res, "PUT", "/private")
    assert res.l7 is not None and res.l7.allow_all_ref is not None
    assert res.l7.allow_all_ref.name == "foo-l4"
    bar = both.ingress("bar", "web", 80)
    assert http_allowed(bar, "GET", "/") and not http_allowed(bar, "PUT", "/private")


def test_any_peer_l4_allow_keeps_l7_allow_all_for_peer_with_own_l7_rules() -> None:
    """Any peer may use port 80 at L4 only; foo also has its own L7 rule there. Adding an
    any-peer L7 rule on port 80 must not take foo's allow-all away."""
    base = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: base}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: foo}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /}]}
"""
    assert http_allowed(world(base, UNION_EPS).ingress("foo", "web", 80), "PUT", "/private")
    both = world(base + ANY_PEER_GET, UNION_EPS)
    for peer in ("foo", "bar"):
        res = both.ingress(peer, "web", 80)
        assert res.redirect is L7Protocol.HTTP, peer
        assert http_allowed(res, "PUT", "/private"), peer


def test_any_peer_http_and_own_kafka_on_one_port_fail_closed_for_that_peer() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: types}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules: {http: [{}]}
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: foo-kafka}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: foo}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules: {kafka: [{topic: t}]}
        """,
        UNION_EPS,
    )
    foo = w.ingress("foo", "web", 80)
    assert foo.allowed and foo.redirect is L7Protocol.HTTP
    assert foo.l7 is not None and foo.l7.rules == () and not foo.l7.allow_all
    assert http_allowed(w.ingress("bar", "web", 80), "PUT", "/private")


def test_deny_of_the_peer_is_not_turned_into_an_l7_allow_all() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: mixed}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: foo}}]
          - toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules: {http: [{method: GET, path: /}]}
          ingressDeny:
          - fromEndpoints: [{matchLabels: {app: foo}}]
            toPorts: [{ports: [{port: "80", protocol: ANY}]}]
        """,
        UNION_EPS,
    )
    res = w.ingress("foo", "web", 80)
    assert not res.allowed and res.drop_reason is DropReason.POLICY_DENY
    assert w.ingress("foo", "web", 81).allowed


def test_l4_only_allow_of_same_peer_and_port_makes_l7_allow_all() -> None:
    w = world(
        L3L4
        + """
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
""",
        EPS,
    )
    res = w.ingress("tiefighter", "deathstar", 80)
    assert res.redirect is L7Protocol.HTTP
    assert res.l7 is not None and res.l7.allow_all
    assert res.l7.allow_all_ref is not None and res.l7.allow_all_ref.name == "rule1"


def test_specific_l4_allow_still_redirected_when_wildcard_l7_exists() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: mix}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEndpoints: [{matchLabels: {class: tiefighter}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
          - toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules: {http: [{method: GET}]}
        """,
        EPS,
    )
    tie = w.ingress("tiefighter", "deathstar", 80)
    assert tie.redirect is L7Protocol.HTTP and tie.l7 is not None and tie.l7.allow_all
    xw = w.ingress("xwing", "deathstar", 80)
    assert xw.redirect is L7Protocol.HTTP and xw.l7 is not None and not xw.l7.allow_all


def test_port_range_and_protocol_any() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: ranges}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEndpoints: [{matchLabels: {org: empire}}]
            toPorts: [{ports: [{port: "8000", endPort: 8080}]}]
        """,
        EPS,
    )
    assert w.allowed("tiefighter", "deathstar", 8000)
    assert w.allowed("tiefighter", "deathstar", 8080, "UDP")
    assert w.allowed("tiefighter", "deathstar", 8042, "SCTP")
    assert not w.allowed("tiefighter", "deathstar", 8081)
    assert not w.allowed("tiefighter", "deathstar", 7999)


def test_port_of_protocol_any_is_no_icmp_type() -> None:
    """`port: "8"` (protocol ANY) allows TCP, UDP and SCTP port 8, not ICMP type 8 (echo
    request): a port is no ICMP type, in an allow or a deny. A range holding 3 or 11 lets
    no ICMP error through either; ICMP needs `icmps` (or a rule without ports)."""
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: any-port-8}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEndpoints: [{matchLabels: {org: empire}}]
            toPorts: [{ports: [{port: "8"}, {port: "1", endPort: 20}]}]
          ingressDeny:
          - fromEndpoints: [{matchLabels: {org: alliance}}]
            toPorts: [{ports: [{port: "8"}]}]
        """,
        EPS,
    )
    for proto in ("TCP", "UDP", "SCTP"):
        assert w.allowed("tiefighter", "deathstar", 8, proto)
    for icmp_type in (3, 8, 11):
        verdict = w.ingress("tiefighter", "deathstar", icmp_type, "ICMP")
        assert not verdict.allowed and verdict.drop_reason is DropReason.POLICY_DENIED
    # the deny of port 8 is no deny of ICMP type 8: nothing allows the xwing, so it is denied
    verdict = w.ingress("xwing", "deathstar", 8, "ICMP")
    assert verdict.drop_reason is DropReason.POLICY_DENIED
    assert w.ingress("xwing", "deathstar", 8, "UDP").drop_reason is DropReason.POLICY_DENY


def test_entities_world_and_cidr_except() -> None:
    eps = {**EPS, "internet": "reserved:world"}
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: from-world}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEntities: [world]
            toPorts: [{ports: [{port: "443", protocol: TCP}]}]
        """,
        eps,
    )
    assert w.allowed("internet", "deathstar", 443)
    assert not w.allowed("tiefighter", "deathstar", 443)


def test_cidr_set_except_selects_cidr_identities() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: cidr}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromCIDRSet: [{cidr: 198.18.0.0/15, except: [198.18.128.0/24]}]
        """,
        EPS,
    )
    state = w.resolver.map_state(w.ids["deathstar"])
    idents = {k.identity for k in state.entries}
    cidr_ids = {
        i: str(w.resolver.cache.labels_of(i)) for i in idents if i & (1 << 24)
    }
    assert len(cidr_ids) == 1
    assert "198.18.0.0/15" in next(iter(cidr_ids.values()))
    # the excepted prefix has an identity of its own that is not allowed
    assert not any("198.18.128.0/24" in v for v in cidr_ids.values())


def test_peer_selector_is_limited_to_policy_namespace() -> None:
    eps = {
        "deathstar": "org=empire,class=deathstar",
        "tie-here": "org=empire,class=tiefighter",
        "tie-other": "org=empire,class=tiefighter,ns=outer-rim",
    }
    w = world(L3L4, eps)
    assert w.allowed("tie-here", "deathstar", 80)
    assert not w.allowed("tie-other", "deathstar", 80)


def test_peer_selector_naming_namespace_crosses_namespaces() -> None:
    eps = {
        "deathstar": "org=empire,class=deathstar",
        "tie-other": "org=empire,class=tiefighter,ns=outer-rim",
    }
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: cross}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEndpoints:
            - matchLabels: {"k8s:io.kubernetes.pod.namespace": outer-rim, org: empire}
        """,
        eps,
    )
    assert w.allowed("tie-other", "deathstar", 80)


def test_clusterwide_policy_selects_all_namespaces() -> None:
    eps = {
        "deathstar": "org=empire,class=deathstar,ns=core",
        "tie-other": "org=empire,class=tiefighter,ns=outer-rim",
        "xwing": "org=alliance,class=xwing,ns=outer-rim",
    }
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: empire-only}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEndpoints: [{matchLabels: {org: empire}}]
        """,
        eps,
    )
    assert w.allowed("tie-other", "deathstar", 80)
    assert not w.allowed("xwing", "deathstar", 80)


def test_match_expressions() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: expr}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEndpoints:
            - matchExpressions:
              - {key: org, operator: NotIn, values: [alliance]}
              - {key: class, operator: Exists}
        """,
        EPS,
    )
    assert w.allowed("tiefighter", "deathstar", 80)
    assert not w.allowed("xwing", "deathstar", 80)


def test_enforcement_modes() -> None:
    always = world("", EPS, ResolverConfig(EnforcementMode.ALWAYS))
    assert not always.allowed("tiefighter", "deathstar", 80)
    never = world(L3L4, EPS, ResolverConfig(EnforcementMode.NEVER))
    assert never.allowed("xwing", "deathstar", 80)


def test_audit_flag_reaches_map_state() -> None:
    w = world(L3L4, EPS, ResolverConfig(audit=True))
    assert w.resolver.map_state(w.ids["deathstar"]).audit


def test_egress_policy_and_icmp() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: egress}
        spec:
          endpointSelector: {matchLabels: {class: xwing}}
          egress:
          - toEndpoints: [{matchLabels: {class: deathstar}}]
            icmps: [{fields: [{type: 8, family: IPv4}]}]
        """,
        EPS,
    )
    egress, _ = w.check("xwing", "deathstar", 8, "ICMP")
    assert egress is not None and egress.allowed
    egress, _ = w.check("xwing", "deathstar", 80)
    assert egress is not None and not egress.allowed


def test_kubernetes_network_policy() -> None:
    w = world(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: np, namespace: default}
        spec:
          podSelector: {matchLabels: {class: deathstar}}
          policyTypes: [Ingress]
          ingress:
          - from: [{podSelector: {matchLabels: {org: empire}}}]
            ports: [{port: 80}]
        """,
        EPS,
    )
    assert w.allowed("tiefighter", "deathstar", 80)
    assert not w.allowed("tiefighter", "deathstar", 80, "UDP")  # NetworkPolicy default is TCP
    assert not w.allowed("xwing", "deathstar", 80)


def test_l7_conflict_between_policies_fails_closed() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: http}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{}]}}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: kafka}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {kafka: [{topic: t}]}}]
        """,
        EPS,
    )
    res = w.ingress("tiefighter", "deathstar", 80)
    assert res.redirect is not None
    assert res.l7 is not None and res.l7.rules == () and not res.l7.allow_all


REQUIRES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: requires-rule}
specs:
  - endpointSelector: {matchLabels: {env: prod}}
    ingress:
    - fromRequires: [{matchLabels: {env: prod}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: client}}]
  - toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""
REQ_EPS = {
    "web-prod": "app=web,env=prod",
    "client-prod": "role=client,env=prod",
    "client-dev": "role=client,env=dev",
}


def test_from_requires_narrows_every_rule_selecting_the_endpoint() -> None:
    w = world(REQUIRES, REQ_EPS)
    assert w.allowed("client-prod", "web-prod", 80)
    assert not w.allowed("client-dev", "web-prod", 80)
    # the port-wide rule (any peer) is narrowed too
    assert w.allowed("client-prod", "web-prod", 443)
    assert not w.allowed("client-dev", "web-prod", 443)


def test_from_requires_applies_to_identities_added_later() -> None:
    w = world(REQUIRES, {"web-prod": "app=web,env=prod"})
    late_ok = endpoint_labels(Labels.parse("role=client,env=prod"), "default")
    late_no = endpoint_labels(Labels.parse("role=client,env=dev"), "default")
    w.resolver.add_identity(900, late_ok)
    w.resolver.add_identity(901, late_no)
    state = w.resolver.map_state(w.ids["web-prod"])
    assert lookup(state, Direction.INGRESS, 900, PROTO_TCP, 443).allowed
    assert not lookup(state, Direction.INGRESS, 901, PROTO_TCP, 443).allowed
    assert not lookup(state, Direction.INGRESS, 901, PROTO_TCP, 80).allowed


def test_removing_the_requires_policy_restores_access() -> None:
    w = world(REQUIRES, REQ_EPS)
    requires_policy = next(p for p in policies(REQUIRES) if p.name == "requires-rule")
    w.resolver.remove_policy(requires_policy)
    assert w.allowed("client-dev", "web-prod", 80)


HOST_EPS = {**EPS, "host": "reserved:host", "world": "reserved:world"}


def test_local_host_reaches_endpoints_under_default_deny() -> None:
    """allow-localhost (on by default, as in Cilium): health checks from the node keep
    working when a policy switches an endpoint's ingress to default deny."""
    w = world(L3L4, HOST_EPS)
    res = w.ingress("host", "deathstar", 8080)
    assert res.allowed and res.enforced and res.match_type is MatchType.L3_ONLY
    assert res.refs == ()  # no policy rule allowed it: the agent's allow-localhost did
    assert not w.ingress("world", "deathstar", 8080).allowed
    assert not w.ingress("xwing", "deathstar", 80).allowed


def test_allow_localhost_policy_leaves_the_host_to_policy() -> None:
    w = world(L3L4, HOST_EPS, ResolverConfig(allow_localhost=False))
    res = w.ingress("host", "deathstar", 8080)
    assert not res.allowed and res.drop_reason is DropReason.POLICY_DENIED


def test_explicit_deny_of_the_host_wins_over_allow_localhost() -> None:
    w = world(
        L3L4
        + """
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-host}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingressDeny:
  - fromEntities: [host]
""",
        HOST_EPS,
    )
    res = w.ingress("host", "deathstar", 80)
    assert not res.allowed and res.drop_reason is DropReason.POLICY_DENY
    assert [r.name for r in res.refs] == ["no-host"]


def test_allow_localhost_is_ingress_only() -> None:
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: egress-lockdown}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          egress: [{}]
        """,
        HOST_EPS,
    )
    state = w.resolver.map_state(w.ids["deathstar"])
    assert not lookup(state, Direction.EGRESS, 1, PROTO_TCP, 10250).allowed


OTHER_NS_SUBJECT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-lockdown, namespace: shop}
spec:
  endpointSelector:
    matchLabels: {app: web, "k8s:io.kubernetes.pod.namespace": bank}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


def test_endpoint_selector_naming_another_namespace_selects_in_its_own() -> None:
    """As Cilium: a namespaced policy's endpointSelector always applies in the policy's
    namespace; a matchLabels entry for another namespace is dropped with a warning."""
    result = load_text(OTHER_NS_SUBJECT, "ns.yaml")
    assert [str(w) for w in result.warnings] == [
        "ns.yaml:7: warning: spec.endpointSelector.matchLabels."
        "k8s:io.kubernetes.pod.namespace: endpointSelector always selects in the policy's "
        "namespace 'shop', not 'bank' (as in Cilium): remove this label, or move the "
        "policy to namespace 'bank'"
    ]
    w = world(
        result.policies,
        {"shop-web": "app=web,ns=shop", "bank-web": "app=web,ns=bank",
         "shop-client": "app=client,ns=shop", "bank-client": "app=client,ns=bank"},
    )
    assert w.allowed("shop-client", "shop-web", 80)
    assert not w.allowed("shop-client", "shop-web", 22)  # shop/web is selected: enforced
    assert w.allowed("bank-client", "bank-web", 22)  # bank/web is not selected


def test_empty_ingress_list_does_not_apply_at_ingress() -> None:
    """Cilium: "If omitted or empty, this rule does not apply at ingress" — `ingress: []`
    switches nothing to default deny (`ingress: [{}]` does)."""
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: nothing}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress: []
          egress: []
        """,
        EPS,
    )
    res = w.ingress("xwing", "deathstar", 80)
    assert res.allowed and not res.enforced
    assert w.allowed("deathstar", "xwing", 443)


def test_from_requires_narrows_endpoint_peers_only_not_entities_or_cidrs() -> None:
    """As Cilium, which folds the requirements into fromEndpoints selectors (and into a rule
    without peers) and leaves entity and CIDR peers alone."""
    w = world(
        REQUIRES
        + """
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: probes}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [host, world]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""",
        {**REQ_EPS, "world": "reserved:world"},
        ResolverConfig(allow_localhost=False),
    )
    assert w.allowed("world", "web-prod", 8080)
    assert w.allowed("client-prod", "web-prod", 8080)
    assert not w.allowed("client-dev", "web-prod", 8080)
    state = w.resolver.map_state(w.ids["web-prod"])
    assert lookup(state, Direction.INGRESS, 1, PROTO_TCP, 8080).allowed  # host entity


def test_from_requires_in_a_deny_section_narrows_the_deny() -> None:
    """Cilium accepts fromRequires in ingressDeny and folds it into the deny rules'
    fromEndpoints: here only dev clients are denied."""
    w = world(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {role: client}}]
          ingressDeny:
          - fromEndpoints: [{matchLabels: {role: client}}]
            fromRequires: [{matchLabels: {env: dev}}]
        """,
        REQ_EPS,
    )
    assert w.allowed("client-prod", "web-prod", 80)
    res = w.ingress("client-dev", "web-prod", 80)
    assert not res.allowed and res.drop_reason is DropReason.POLICY_DENY


INIT_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: init, namespace: shop}
specs:
  - endpointSelector:
      matchLabels:
        "reserved:init": ""
    ingress:
    - fromEntities: [host]
    egress:
    - toEntities: [host]
"""


def test_namespaced_policy_selects_initializing_endpoints() -> None:
    """Cilium's documented policy for endpoints whose labels are not known yet: their
    selector gets no namespace (they have no namespace label), so it selects them."""
    from garrison.identity.model import RESERVED

    init = RESERVED["init"]
    resolver = build_resolver(policies(INIT_POLICY), [], ResolverConfig(allow_localhost=False))
    resolver.add_identity(init.id, init.labels)
    state = resolver.map_state(init.id)
    assert [p.name for p, _ in resolver.rules_selecting(init.id)] == ["init"]
    assert lookup(state, Direction.INGRESS, 1, PROTO_TCP, 8080).allowed
    assert lookup(state, Direction.EGRESS, 1, PROTO_TCP, 53).allowed
    assert not lookup(state, Direction.INGRESS, 2, PROTO_TCP, 8080).allowed
    assert not lookup(state, Direction.EGRESS, 2, PROTO_TCP, 443).allowed


def test_allow_localhost_comes_back_with_the_host_identity() -> None:
    w = world(L3L4, HOST_EPS)
    dst = w.ids["deathstar"]
    host_labels = w.resolver.cache.labels_of(1)
    assert host_labels is not None
    w.resolver.remove_identity(1)
    assert not lookup(w.resolver.map_state(dst), Direction.INGRESS, 1, PROTO_TCP, 8080).allowed
    assert dst in w.resolver.add_identity(1, host_labels)
    assert lookup(w.resolver.map_state(dst), Direction.INGRESS, 1, PROTO_TCP, 8080).allowed
