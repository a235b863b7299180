"""Invariants of L7 deny rules (garrison extension), on generated policies (hypothesis): the
generator of test_resolve_properties (L3-only, L4-only and L7 allows on shared ports, for
specific and wildcard peers, L3/L4 denies) plus L7 deny sections.

- deny always wins: a request an L7 deny rule names, from a peer it names, never gets through;
- an L7 deny only removes what it names: adding one never removes another request's access
  and never adds access (under `always` enforcement: a deny section also switches its
  subjects to default-deny, as every section does);
- resolution is independent of order, and the incremental merge equals the reference merge.
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from garrison.policies.l7rules import HTTPRule, L7Rules
from garrison.policies.model import (
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
from garrison.policies.resolve import ResolverConfig, merge_contributions
from garrison.policies.selector import EndpointSelector

from .test_resolve_properties import (
    ENDPOINTS,
    FAST,
    NS,
    access,
    normalized,
    policy_sets,
    resolve,
    selector,
)

# the requests `access` asks are GET / and PUT /private
DENY_RULES = [HTTPRule(method="PUT"), HTTPRule(path="/"), HTTPRule(method="GET", path="/")]
DENIED = {
    HTTPRule(method="PUT"): {"PUT /private"},
    HTTPRule(path="/"): {"GET /"},
    HTTPRule(method="GET", path="/"): {"GET /"},
}


@st.composite
def l7_deny(draw: st.DrawFn, name: str) -> tuple[Policy, set[int] | None, int, HTTPRule]:
    """A policy with one L7 deny section on TCP port 80 or 443: (policy, the peer identities
    it names or None for any, port, rule)."""
    kind = draw(st.sampled_from(["endpoints", "all", "none"]))
    peers: tuple[EndpointPeer | EntityPeer, ...] | None
    named: set[int] | None
    if kind == "endpoints":
        sel = selector(draw)
        peers = (EndpointPeer(sel),)
        named = {ident for ident, labels in ENDPOINTS if sel.matches(labels)}
    else:
        peers = (EntityPeer(Entity.ALL),) if kind == "all" else None
        named = None
    port = draw(st.sampled_from([80, 80, 443]))
    rule = draw(st.sampled_from(DENY_RULES))
    section = PolicySection(
        peers,
        (PortRule((PortProtocol(port, 0, Protocol.TCP),), L7Rules(http=(rule,))),),
        (),
        RuleRef(PolicyKind.CNP, NS, name, "ingressDeny"),
    )
    subject = selector(draw)
    policy = Policy(PolicyKind.CNP, name, NS,
                    (Rule(subject, ingress_deny=(section,), namespace=NS),))
    return policy, named, port, rule


@FAST
@given(policy_sets, l7_deny("l7deny"))
def test_an_l7_deny_wins_and_removes_only_what_it_names(
    pols: tuple[Policy, ...], deny: tuple[Policy, set[int] | None, int, HTTPRule]
) -> None:
    policy, named, port, rule = deny
    subjects = {ident for ident, labels in ENDPOINTS
                if policy.rules[0].endpoint_selector.matches(labels)}
    # A deny section switches its subjects to default-deny, as any section does; in `always`
    # mode every direction already is, so only the deny rules themselves can change access.
    config = ResolverConfig(EnforcementMode.ALWAYS)
    before = access(resolve(pols, config))
    after = access(resolve([*pols, policy], config))
    for (dst, src, proto, p, request), ok in after.items():
        was = before[(dst, src, proto, p, request)]
        hit = (dst in subjects and (named is None or src in named) and p == port
               and proto == 6 and request in DENIED[rule])
        if hit:
            assert not ok, ("deny did not win", dst, src, p, request)
        else:
            assert ok == was, ("changed what it does not name", dst, src, proto, p, request)


@FAST
@given(policy_sets, st.lists(l7_deny("d"), max_size=2), st.randoms(use_true_random=False))
def test_order_independence_and_incremental_merge_with_l7_denies(
    pols: tuple[Policy, ...], denies: list[tuple[Policy, set[int] | None, int, HTTPRule]],
    rnd: random.Random,
) -> None:
    every = [*pols, *(
        Policy(d.kind, f"d{i}", d.namespace, d.rules) for i, (d, _, _, _) in enumerate(denies)
    )]
    shuffled = list(every)
    rnd.shuffle(shuffled)
    a, b = resolve(every), resolve(shuffled, identities_first=False)
    assert access(a) == access(b)
    for ident, _ in ENDPOINTS:
        assert normalized(a.map_state(ident)) == normalized(b.map_state(ident))
    inc = resolve(every[:1])
    for ident, _ in ENDPOINTS:
        inc.map_state(ident)
    for p in every[1:]:
        inc.add_policy(p)
    if every:
        inc.remove_policy(every[0])
        inc.add_policy(every[0])
    for ident, _ in ENDPOINTS:
        state = inc.map_state(ident)
        entries, l7 = merge_contributions(inc._endpoints[ident].contribs)
        assert dict(state.entries) == entries
        assert dict(state.l7) == l7


def test_selector_helper_matches_as_the_resolver_does() -> None:
    sel = EndpointSelector.match_labels({"app": "a"}).in_namespace(NS)
    assert {ident for ident, labels in ENDPOINTS if sel.matches(labels)} == {256, 257}
