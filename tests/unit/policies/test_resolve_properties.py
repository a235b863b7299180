"""Invariants of resolution, checked on generated policies (hypothesis)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from garrison.policies.l7rules import HTTPRule, L7Rules, L7RuleSet
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.mapstate import PROTO_TCP, PROTO_UDP, MapState, lookup
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.model import (
    Direction,
    EndpointPeer,
    EnforcementMode,
    Entity,
    EntityPeer,
    Policy,
    PolicySection,
    PortProtocol,
    PortRule,
    Protocol,
    Rule,
)
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.policies.resolve import PolicyResolver, ResolverConfig
from garrison.policies.selector import EndpointSelector

NS = "default"
APPS = ["a", "b", "c"]
TIERS = ["x", "y"]
ENDPOINTS = [
    (256 + i, endpoint_labels(Labels.parse(f"app={app},tier={tier}"), NS))
    for i, (app, tier) in enumerate((a, t) for a in APPS for t in TIERS)
]
PORTS = [80, 443, 8080]
QUERIES = [(ident, proto, port) for ident, _ in ENDPOINTS for proto in (PROTO_TCP, PROTO_UDP)
           for port in (*PORTS, 22)]
# L7 rules the generator puts on ports, and the requests every redirected lookup is asked
HTTP_RULES = [HTTPRule(method="GET", path="/"), HTTPRule(method="PUT"), HTTPRule()]
REQUESTS = [("GET", "/"), ("PUT", "/private")]
# (port, end port): any port, 80 (shared, drawn more often), a range holding 80, the others
PORT_CHOICES = [(0, 0), (80, 0), (80, 0), (79, 81), *((p, 0) for p in PORTS)]


def selector(draw: st.DrawFn) -> EndpointSelector:
    labels: dict[str, str] = {}
    if draw(st.booleans()):
        labels["app"] = draw(st.sampled_from(APPS))
    if draw(st.booleans()):
        labels["tier"] = draw(st.sampled_from(TIERS))
    return EndpointSelector.match_labels(labels).in_namespace(NS)


@st.composite
def sections(draw: st.DrawFn, name: str, section: str, deny: bool) -> PolicySection:
    """Specific peers (1-2 selectors, `{}` among them), the `all` entity or no peer list (any
    peer); L3-only (no ports, when there are peers), L4-only and L7 port rules, mostly on the
    shared port 80, single ports, ranges and any port, TCP, UDP or any protocol."""
    kind = draw(st.sampled_from(["endpoints", "endpoints", "all", "none"]))
    peers: tuple[EndpointPeer | EntityPeer, ...] | None
    if kind == "endpoints":
        peers = tuple(EndpointPeer(selector(draw)) for _ in range(draw(st.integers(1, 2))))
    elif kind == "all":
        peers = (EntityPeer(Entity.ALL),)
    else:
        peers = None
    port_rules = []
    for _ in range(draw(st.integers(0 if peers is not None else 1, 2))):
        port, end = draw(st.sampled_from(PORT_CHOICES))
        proto = draw(st.sampled_from([Protocol.TCP, Protocol.UDP, Protocol.ANY]))
        l7 = None
        if not deny and port and not end and proto is not Protocol.UDP and draw(st.booleans()):
            l7 = L7Rules(http=(draw(st.sampled_from(HTTP_RULES)),))
        port_rules.append(PortRule((PortProtocol(port, end, proto),), l7))
    ref = RuleRef(PolicyKind.CNP, NS, name, section)
    return PolicySection(peers, tuple(port_rules), (), ref)


@st.composite
def policies(draw: st.DrawFn, name: str, allow_deny: bool = True) -> Policy:
    subject = selector(draw)
    ingress = tuple(draw(sections(name, "ingress", False)) for _ in range(draw(st.integers(0, 2))))
    deny: tuple[PolicySection, ...] | None = None
    if allow_deny and draw(st.booleans()):
        deny = (draw(sections(name, "ingressDeny", True)),)
    rule = Rule(subject, ingress=ingress or None, ingress_deny=deny, namespace=NS)
    return Policy(PolicyKind.CNP, name, NS, (rule,))


policy_sets = st.lists(st.integers(0, 10_000), min_size=0, max_size=4).flatmap(
    lambda ns: st.tuples(*[policies(f"p{i}") for i in range(len(ns))])
)


def resolve(pols: tuple[Policy, ...] | list[Policy], config: ResolverConfig | None = None,
            identities_first: bool = True) -> PolicyResolver:
    r = PolicyResolver(config)
    if identities_first:
        for ident, labels in ENDPOINTS:
            r.add_identity(ident, labels)
        r.add_policies(pols)
    else:
        r.add_policies(pols)
        for ident, labels in ENDPOINTS:
            r.add_identity(ident, labels)
    return r


def verdicts(r: PolicyResolver) -> dict[tuple[int, int, int, int], tuple[bool, object]]:
    out = {}
    for dst, _ in ENDPOINTS:
        state = r.map_state(dst)
        for src, proto, port in QUERIES:
            res = lookup(state, Direction.INGRESS, src, proto, port)
            out[(dst, src, proto, port)] = (res.allowed, res.redirect)
    return out


def access(r: PolicyResolver) -> dict[tuple[int, int, int, int, str], bool]:
    """What a client sees: per (destination, source, protocol, port, request), whether the
    request gets through — L3/L4 allows it and, where the connection is redirected, the L7
    rule set the proxy gets for it allows the request (`GET /` and `PUT /private`)."""
    matchers: dict[L7RuleSet, HTTPMatcher] = {}
    out = {}
    for dst, _ in ENDPOINTS:
        state = r.map_state(dst)
        for src, proto, port in QUERIES:
            res = lookup(state, Direction.INGRESS, src, proto, port)
            for method, path in REQUESTS:
                ok = res.allowed
                if ok and res.redirect is not None:
                    assert res.l7 is not None, "a redirect without a rule set"
                    matcher = matchers.get(res.l7) or matchers.setdefault(
                        res.l7, HTTPMatcher(res.l7)
                    )
                    ok = matcher.match(method, path, None, []).allowed
                out[(dst, src, proto, port, f"{method} {path}")] = ok
    return out


def normalized(state: MapState) -> dict[object, object]:
    return {
        k: (e.deny, e.redirect, frozenset(e.derived_from)) for k, e in state.entries.items()
    }


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(policy_sets, st.data())
def test_deny_always_wins(pols: tuple[Policy, ...], data: st.DataObject) -> None:
    victim_src, victim_labels = data.draw(st.sampled_from(ENDPOINTS))
    victim = EndpointSelector.match_labels(
        {lab.key: lab.value for lab in victim_labels if lab.key in ("app", "tier")}
    ).in_namespace(NS)
    section = PolicySection(
        (EndpointPeer(victim),),
        (PortRule((PortProtocol(80, 0, Protocol.TCP),)),),
        (),
        RuleRef(PolicyKind.CNP, NS, "deny", "ingressDeny"),
    )
    subject = EndpointSelector().in_namespace(NS)
    deny = Policy(
        PolicyKind.CNP, "deny", NS, (Rule(subject, ingress_deny=(section,), namespace=NS),)
    )
    r = resolve([*pols, deny])
    for dst, _ in ENDPOINTS:
        res = lookup(r.map_state(dst), Direction.INGRESS, victim_src, PROTO_TCP, 80)
        assert not res.allowed


@FAST
@given(policy_sets, st.data())
def test_adding_an_allow_rule_never_removes_access(
    pols: tuple[Policy, ...], data: st.DataObject
) -> None:
    """At L3/L4 and at L7: an allow rule (L3-only, L4-only or L7, for specific or any peers)
    may redirect a connection to the proxy, but the proxy must then allow every request the
    other rules allowed (Cilium's union of rules)."""
    # In `always` mode every direction is already default-deny, so an allow can only add.
    config = ResolverConfig(EnforcementMode.ALWAYS)
    extra = data.draw(policies("extra", allow_deny=False))
    before = access(resolve(pols, config))
    after = access(resolve([*pols, extra], config))
    lost = [key for key, ok in before.items() if ok and not after[key]]
    assert not lost, f"adding {extra} removed (dst, src, proto, port, request) {lost[:5]}"


def test_default_with_no_selecting_rule_is_allow() -> None:
    r = resolve([])
    assert all(allowed for allowed, _ in verdicts(r).values())


@FAST
@given(policy_sets, st.randoms(use_true_random=False))
def test_resolution_is_independent_of_rule_order(
    pols: tuple[Policy, ...], rnd: random.Random
) -> None:
    shuffled = list(pols)
    rnd.shuffle(shuffled)
    a, b = resolve(pols), resolve(shuffled, identities_first=False)
    for ident, _ in ENDPOINTS:
        assert normalized(a.map_state(ident)) == normalized(b.map_state(ident))
        assert a.map_state(ident).l7.keys() == b.map_state(ident).l7.keys()


@FAST
@given(policy_sets, st.data())
def test_incremental_equals_full(pols: tuple[Policy, ...], data: st.DataObject) -> None:
    full = resolve(pols)
    inc = resolve(pols[: len(pols) // 2])
    for p in pols[len(pols) // 2 :]:
        inc.add_policy(p)
    # add then remove a policy: back to the same state
    extra = data.draw(policies("extra"))
    inc.add_policy(extra)
    inc.remove_policy(extra)
    for ident, _ in ENDPOINTS:
        assert normalized(full.map_state(ident)) == normalized(inc.map_state(ident))


@FAST
@given(policy_sets)
def test_identity_removal_and_readd_restores_state(pols: tuple[Policy, ...]) -> None:
    r = resolve(pols)
    before = {i: normalized(r.map_state(i)) for i, _ in ENDPOINTS}
    ident, labels = ENDPOINTS[0]
    r.remove_identity(ident)
    for other, _ in ENDPOINTS[1:]:
        assert all(k.identity != ident for k in r.map_state(other).entries)
    r.add_identity(ident, labels)
    assert {i: normalized(r.map_state(i)) for i, _ in ENDPOINTS} == before


@FAST
@given(policy_sets, st.data())
def test_incremental_merge_equals_reference_merge(
    pols: tuple[Policy, ...], data: st.DataObject
) -> None:
    from garrison.policies.resolve import merge_contributions

    r = resolve(pols[:1])
    for ident, _ in ENDPOINTS:
        r.map_state(ident)  # materialize, then change incrementally
    for p in pols[1:]:
        r.add_policy(p)
    if pols:
        r.remove_policy(pols[0])
    r.remove_identity(ENDPOINTS[1][0])
    r.add_identity(*ENDPOINTS[1])
    for ident, _ in ENDPOINTS:
        state = r.map_state(ident)
        entries, l7 = merge_contributions(r._endpoints[ident].contribs)
        assert dict(state.entries) == entries
        assert dict(state.l7) == l7
