"""ClusterNetworkPolicy tiers, checked on generated policies (hypothesis).

The reference is a direct evaluation of the API's semantics, written here without the
resolver's tier code: per side of a connection, the Admin rules whose subject selects the
endpoint and whose peer and protocols match, first by (priority, place in the policy),
decide (Accept, Deny) or Pass; then the NetworkPolicy tier (the resolver over the
NetworkPolicy-tier policies alone, which the other property tests cover); where that tier
does not enforce the direction, the Baseline rules the same way; then allow. The resolver's
MapState, read by `mapstate.lookup()` (the kernel's model), must give the same verdict for
every endpoint, direction, peer, protocol and port, also when built incrementally, and the
kernel entries `policymap` writes (incrementally, from `updates()`) must decide the same.

What holds per tier (stated in docs/policy.md):
- Admin / Baseline: adding an Accept rule never removes access, adding a Deny rule never
  grants any; the order of policies in the input does not matter (ties of priority and place
  are decided Deny, then Pass, then Accept).
- NetworkPolicy tier: unchanged (deny wins; adding an allow never removes access where the
  direction is enforced), and an Admin Deny / Accept cannot be overridden by it.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from garrison.bpf.policymap import DesiredPolicy, lookup_entries, state_entries
from garrison.policies.labels import NAMESPACE_KEY, SOURCE_K8S, Labels, endpoint_labels
from garrison.policies.mapstate import (
    ACTION_RANK,
    PROTO_TCP,
    PROTO_UDP,
    DropReason,
    lookup,
)
from garrison.policies.model import (
    IP_PROTO,
    Direction,
    EndpointPeer,
    EnforcementMode,
    Policy,
    PolicySection,
    PortProtocol,
    PortRule,
    Protocol,
    Rule,
    Tier,
    TierAction,
    tier_order,
)
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.policies.resolve import PolicyResolver, ResolverConfig, merge_contributions
from garrison.policies.selector import EndpointSelector, Operator, Requirement

NAMESPACES = ["red", "blue"]
APPS = ["a", "b", "c"]
ENDPOINTS = [
    (256 + i, endpoint_labels(Labels.parse(f"app={app}"), ns))
    for i, (ns, app) in enumerate((n, a) for n in NAMESPACES for a in APPS)
]
LABELS = dict(ENDPOINTS)
# endpoints of app a declare the port name "web" (8080/TCP), of app b "web" = 80/TCP
NAMED = {ident: {"web": frozenset({(PROTO_TCP, 8080 if lab.get("app") == "a" else 80)})}
         for ident, lab in ENDPOINTS if lab.get("app") in ("a", "b")}
PORTS = [79, 80, 81, 443, 8080]
QUERIES = [(proto, port) for proto in (PROTO_TCP, PROTO_UDP) for port in PORTS]
# protocols entries: (protocol, port, end port) or a named port
PORT_CHOICES: list[PortProtocol] = [
    PortProtocol(80, 0, Protocol.TCP),
    PortProtocol(80, 0, Protocol.TCP),
    PortProtocol(79, 81, Protocol.TCP),
    PortProtocol(80, 443, Protocol.TCP),
    PortProtocol(0, 0, Protocol.TCP),
    PortProtocol(80, 0, Protocol.UDP),
    PortProtocol(8080, 0, Protocol.TCP),
    PortProtocol(0, 0, Protocol.ANY, "web"),
]


def ns_exists() -> Requirement:
    return Requirement(NAMESPACE_KEY, Operator.EXISTS, (), SOURCE_K8S)


@st.composite
def cnp_selector(draw: st.DrawFn) -> EndpointSelector:
    """`namespaces: {}` / `{name}` or `pods: {namespaceSelector, podSelector}`."""
    reqs = [ns_exists()]
    if draw(st.booleans()):
        reqs.append(Requirement(NAMESPACE_KEY, Operator.IN, (draw(st.sampled_from(NAMESPACES)),),
                                SOURCE_K8S))
    if draw(st.booleans()):
        reqs.append(Requirement("app", Operator.IN, (draw(st.sampled_from(APPS)),), SOURCE_K8S))
    return EndpointSelector.of(reqs)


@st.composite
def cnp_rules(draw: st.DrawFn, name: str, section: str, tier: Tier, priority: int,
              start: int = 0, action: TierAction | None = None) -> tuple[PolicySection, ...]:
    out = []
    for index in range(start, start + draw(st.integers(0 if not action else 1, 3))):
        peers = tuple(EndpointPeer(draw(cnp_selector())) for _ in range(draw(st.integers(1, 2))))
        ports: tuple[PortRule, ...] = ()
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(PORT_CHOICES), min_size=1, max_size=2))
            ports = (PortRule(tuple(chosen)),)
        ref = RuleRef(PolicyKind.CLUSTER, None, name, section, 0, index, False, "",
                      f"{tier.value} {priority}")
        act = action or draw(st.sampled_from(list(TierAction)))
        out.append(PolicySection(peers, ports, (), ref, action=act))
    return tuple(out)


@st.composite
def cnps(draw: st.DrawFn, name: str) -> Policy:
    tier = draw(st.sampled_from(list(Tier)))
    priority = draw(st.integers(1, 3))
    ingress = draw(cnp_rules(name, "ingress", tier, priority))
    egress = draw(cnp_rules(name, "egress", tier, priority))
    rule = Rule(draw(cnp_selector()), ingress=ingress or None, egress=egress or None,
                tier=tier, priority=priority)
    return Policy(PolicyKind.CLUSTER, name, None, (rule,))


@st.composite
def np_policies(draw: st.DrawFn, name: str) -> Policy:
    """A NetworkPolicy-tier policy: allows and denies, specific or any peers and ports."""
    ns = draw(st.sampled_from(NAMESPACES))

    def sections(section: str) -> tuple[PolicySection, ...]:
        out = []
        for _ in range(draw(st.integers(1, 2))):
            peers = None
            if draw(st.booleans()):
                peers = (EndpointPeer(draw(cnp_selector())),)
            port = draw(st.sampled_from([PortProtocol(80, 0, Protocol.TCP),
                                         PortProtocol(79, 443, Protocol.ANY),
                                         PortProtocol(0, 0, Protocol.UDP)]))
            ports = (PortRule((port,)),) if peers is None or draw(st.booleans()) else ()
            out.append(PolicySection(peers, ports, (), RuleRef(PolicyKind.CNP, ns, name, section)))
        return tuple(out)

    kinds = draw(st.sampled_from(["ingress", "egress", "both"]))
    allow_in = sections("ingress") if kinds != "egress" else None
    allow_out = sections("egress") if kinds != "ingress" else None
    deny_in = sections("ingressDeny") if allow_in and draw(st.booleans()) else None
    deny_out = sections("egressDeny") if allow_out and draw(st.booleans()) else None
    subject = draw(cnp_selector()).in_namespace(ns)
    rule = Rule(subject, ingress=allow_in, ingress_deny=deny_in, egress=allow_out,
                egress_deny=deny_out, namespace=ns)
    return Policy(PolicyKind.CNP, name, ns, (rule,))


policy_sets = st.tuples(
    st.lists(st.integers(0, 1), min_size=1, max_size=4),
    st.lists(st.integers(0, 1), min_size=0, max_size=2),
).flatmap(lambda ns: st.tuples(
    st.tuples(*[cnps(f"cnp{i}") for i in range(len(ns[0]))]),
    st.tuples(*[np_policies(f"np{i}") for i in range(len(ns[1]))]),
))


def resolve(pols: list[Policy] | tuple[Policy, ...], identities_first: bool = True,
            config: ResolverConfig | None = None) -> PolicyResolver:
    r = PolicyResolver(config)
    if not identities_first:
        r.add_policies(pols)
    for ident, labels in ENDPOINTS:
        r.set_named_ports(ident, NAMED.get(ident, {}))
        r.add_identity(ident, labels)
    if identities_first:
        r.add_policies(pols)
    return r


def _ports_match(rule_ports: tuple[PortRule, ...], dest: int, proto: int, port: int) -> bool:
    if not rule_ports:
        return True
    for pr in rule_ports:
        for pp in pr.ports:
            if pp.name:
                if (proto, port) in NAMED.get(dest, {}).get(pp.name, frozenset()):
                    return True
            elif IP_PROTO[pp.protocol] in (0, proto) and pp.covers(port):
                return True
    return False


def _first_rule(pols: list[Policy], tier: Tier, ep: int, direction: Direction, remote: int,
                proto: int, port: int) -> TierAction | None:
    best: tuple[int, int, TierAction] | None = None
    dest = ep if direction is Direction.INGRESS else remote
    for policy in pols:
        for rule in policy.rules:
            if rule.tier is not tier or not rule.endpoint_selector.matches(LABELS[ep]):
                continue
            sections = rule.ingress if direction is Direction.INGRESS else rule.egress
            for index, section in enumerate(sections or ()):
                assert section.action is not None and section.peers is not None
                if not any(isinstance(p, EndpointPeer) and p.selector.matches(LABELS[remote])
                           for p in section.peers):
                    continue
                if not _ports_match(section.to_ports, dest, proto, port):
                    continue
                rank = (tier_order(rule.priority, index), ACTION_RANK[section.action],
                        section.action)
                if best is None or rank[:2] < best[:2]:
                    best = rank
    return best[2] if best else None


def reference(pols: list[Policy], np_resolver: PolicyResolver, ep: int, direction: Direction,
              remote: int, proto: int, port: int) -> tuple[bool, str]:
    """(allowed, which tier decided) by the API's words."""
    admin = _first_rule(pols, Tier.ADMIN, ep, direction, remote, proto, port)
    if admin is TierAction.ACCEPT:
        return True, "Admin"
    if admin is TierAction.DENY:
        return False, "Admin"
    np = lookup(np_resolver.map_state(ep), direction, remote, proto, port)
    if np.tier is not None or np.enforced:
        return np.allowed, "NetworkPolicy" if np.tier is not None else "default deny"
    baseline = _first_rule(pols, Tier.BASELINE, ep, direction, remote, proto, port)
    if baseline is TierAction.ACCEPT:
        return True, "Baseline"
    if baseline is TierAction.DENY:
        return False, "Baseline"
    return True, "default allow"


def verdicts(r: PolicyResolver) -> dict[tuple[int, Direction, int, int, int], tuple[bool, str]]:
    out = {}
    for ep, _ in ENDPOINTS:
        state = r.map_state(ep)
        for direction in Direction:
            for remote, _ in ENDPOINTS:
                for proto, port in QUERIES:
                    res = lookup(state, direction, remote, proto, port)
                    out[(ep, direction, remote, proto, port)] = (res.allowed, res.decided_by)
    return out


FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(policy_sets)
def test_lookup_equals_the_tiered_semantics(sets: tuple[tuple[Policy, ...], ...]) -> None:
    cnp, np = sets
    pols = [*cnp, *np]
    r = resolve(pols)
    np_only = resolve(list(np))
    for (ep, direction, remote, proto, port), got in verdicts(r).items():
        want = reference(pols, np_only, ep, direction, remote, proto, port)
        assert got == want, (ep, direction.value, remote, proto, port)


@FAST
@given(policy_sets)
def test_kernel_entries_decide_as_the_model(sets: tuple[tuple[Policy, ...], ...]) -> None:
    """policymap's kernel entries (written whole, and kept current from `updates()` while
    the policies arrive one by one) decide every case as `mapstate.lookup()`."""
    cnp, np = sets
    pols = [*cnp, *np]
    r = resolve(pols)
    inc = resolve([])
    desired = DesiredPolicy({})
    for ep, _ in ENDPOINTS:
        desired.replace(inc.map_state(ep))
    for policy in pols:
        changed = inc.add_policy(policy)
        for ep, keys in inc.updates(changed).items():
            desired.update(ep, {k: inc.entry(ep, k) for k in keys})
    for ep, _ in ENDPOINTS:
        state = r.map_state(ep)
        whole = state_entries(state, {})
        assert desired.entries(ep) == whole
        # the endpoint flag that makes the kernel look the tiers up
        assert state.tiers == any(k.tier for k in state.entries)
        assert inc.map_state(ep).tiers == state.tiers
        for direction in Direction:
            for remote, _ in ENDPOINTS:
                for proto, port in QUERIES:
                    m = lookup(state, direction, remote, proto, port)
                    k = lookup_entries(whole, ep, direction, remote, proto, port,
                                       state.enforced(direction), state.tiers)
                    assert (k.allowed, k.match_type, k.drop_reason) == (
                        m.allowed, m.match_type, m.drop_reason
                    )


@FAST
@given(policy_sets, st.randoms(use_true_random=False))
def test_order_independent_and_incremental(
    sets: tuple[tuple[Policy, ...], ...], rnd: random.Random
) -> None:
    cnp, np = sets
    pols = [*cnp, *np]
    full = resolve(pols)
    shuffled = list(pols)
    rnd.shuffle(shuffled)
    other = resolve(shuffled, identities_first=False)
    inc = resolve(pols[:1])
    for ep, _ in ENDPOINTS:
        inc.map_state(ep)
    for p in pols[1:]:
        inc.add_policy(p)
    inc.remove_policy(pols[0])
    inc.add_policy(pols[0])
    inc.remove_identity(ENDPOINTS[1][0])
    inc.set_named_ports(ENDPOINTS[1][0], NAMED.get(ENDPOINTS[1][0], {}))
    inc.add_identity(*ENDPOINTS[1])
    for ep, _ in ENDPOINTS:
        want = dict(full.map_state(ep).entries)
        assert dict(other.map_state(ep).entries).keys() == want.keys()
        assert dict(inc.map_state(ep).entries) == want
        entries, _ = merge_contributions(inc._endpoints[ep].contribs)
        assert entries == want


@FAST
@given(policy_sets, st.data())
def test_adding_an_accept_never_removes_access_and_a_deny_never_grants(
    sets: tuple[tuple[Policy, ...], ...], data: st.DataObject
) -> None:
    """In the Admin and Baseline tiers: an Accept rule added anywhere (any priority, any
    place in a policy) never removes access; a Deny rule never grants any."""
    cnp, np = sets
    pols = [*cnp, *np]
    before = verdicts(resolve(pols))
    tier = data.draw(st.sampled_from(list(Tier)))
    priority = data.draw(st.integers(1, 3))
    action = data.draw(st.sampled_from([TierAction.ACCEPT, TierAction.DENY]))
    sections = data.draw(cnp_rules("extra", "ingress", tier, priority, 0, action))
    extra = Policy(PolicyKind.CLUSTER, "extra", None, (
        Rule(data.draw(cnp_selector()), ingress=sections, egress=sections, tier=tier,
             priority=priority),
    ))
    after = verdicts(resolve([*pols, extra]))
    for key, (was, _) in before.items():
        if action is TierAction.ACCEPT:
            assert after[key][0] or not was, key
        else:
            assert not after[key][0] or was, key


@FAST
@given(policy_sets, st.data())
def test_admin_decisions_are_final(
    sets: tuple[tuple[Policy, ...], ...], data: st.DataObject
) -> None:
    """An Admin Accept or Deny of priority 0 rule 0 decides whatever the other tiers hold,
    in every enforcement mode but `never`."""
    cnp, np = sets
    action = data.draw(st.sampled_from([TierAction.ACCEPT, TierAction.DENY]))
    sections = data.draw(cnp_rules("first", "ingress", Tier.ADMIN, 0, 0, action))[:1]
    first = Policy(PolicyKind.CLUSTER, "first", None, (
        Rule(EndpointSelector.of([ns_exists()]), ingress=sections, tier=Tier.ADMIN, priority=0),
    ))
    mode = data.draw(st.sampled_from([EnforcementMode.DEFAULT, EnforcementMode.ALWAYS]))
    r = resolve([first, *cnp, *np], config=ResolverConfig(mode))
    for ep, _ in ENDPOINTS:
        for remote, _ in ENDPOINTS:
            for proto, port in QUERIES:
                hit = _first_rule([first], Tier.ADMIN, ep, Direction.INGRESS, remote, proto, port)
                res = lookup(r.map_state(ep), Direction.INGRESS, remote, proto, port)
                if hit is not None:
                    assert res.allowed == (action is TierAction.ACCEPT)
                    assert res.decided_by == "Admin"
                    if not res.allowed:
                        assert res.drop_reason is DropReason.POLICY_DENY


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6), st.integers(0, 3),
                          st.sampled_from(list(TierAction))), min_size=1, max_size=12))
def test_flattened_bucket_holds_the_first_rule_at_every_port(
    keys: list[tuple[int, int, int, TierAction]],
) -> None:
    """flatten_tier_bucket over overlapping ranges, single ports and the any-port key (port
    0): the longest-prefix entry at every port is the covering rule of lowest rank, with the
    refs of every rule at that rank; segments are disjoint."""
    from garrison.bpf.policymap import port_blocks
    from garrison.policies.mapstate import MapStateKey
    from garrison.policies.resolve import Contribution, flatten_tier_bucket

    raw: dict[MapStateKey, list[Contribution]] = {}
    for n, (port, width, order, action) in enumerate(keys):
        key = MapStateKey(Direction.INGRESS, 300, PROTO_TCP, port, port + width if port else 0,
                          1)
        ref = RuleRef(PolicyKind.CLUSTER, None, f"p{n}", "ingress", 0, order)
        raw.setdefault(key, []).append(
            Contribution(n + 1, ref, action is TierAction.DENY, None, action, order, 1)
        )
    out = flatten_tier_bucket(raw)
    blocks: dict[tuple[int, int], MapStateKey] = {}
    for key in out:
        for block in port_blocks(key.port, key.end_port):
            assert block not in blocks, "segments overlap"
            blocks[block] = key
    for port in range(1, 50):
        want = [(c.order, ACTION_RANK[c.action], c.ref) for k, cs in raw.items()
                for c in cs if c.action and (k.port == 0 or k.port <= port <= k.end_port)]
        found = [k for k in out if k.port == 0 or k.port <= port <= k.end_port]
        narrow = [k for k in found if k.port]
        got = out[narrow[0]] if narrow else (out[found[0]] if found else None)
        assert len(narrow) <= 1
        if not want:
            assert got is None
            continue
        best = min(w[:2] for w in want)
        assert got is not None and got.rank == best
        assert set(got.derived_from) == {w[2] for w in want if w[:2] == best}
