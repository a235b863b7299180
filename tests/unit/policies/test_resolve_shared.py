"""The bulk build of `add_policies` (one build per class of endpoints with the same rules and
port names, the others copies on write) against the rule-by-rule path, on the scenario of
`bench/policy.py` at a small scale, and through the incremental changes that follow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.mapstate import PROTO_TCP, MapState, MapStateKey
from garrison.policies.model import (
    EndpointPeer,
    Policy,
    PolicySection,
    PortProtocol,
    PortRule,
    Protocol,
    Rule,
)
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.policies.resolve import PolicyResolver
from garrison.policies.selector import EndpointSelector

BENCH = Path(__file__).resolve().parents[3] / "bench" / "policy.py"


def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("garrison_bench_policy", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def snapshot(r: PolicyResolver) -> dict[int, MapState]:
    return {ident: r.map_state(ident) for ident in sorted(r.endpoint_identities())}


def changed_keys(before: MapState | None, after: MapState) -> set[MapStateKey]:
    if before is None:
        return set(after.entries) | set(after.l7)
    keys = set(before.entries) | set(after.entries) | set(before.l7) | set(after.l7)
    return {
        k for k in keys
        if before.entries.get(k) != after.entries.get(k) or before.l7.get(k) != after.l7.get(k)
    }


def step(
    bulk: PolicyResolver, single: PolicyResolver, changed_bulk: set[int], changed_single: set[int]
) -> None:
    """After one change applied to both: the same endpoints changed, the same policy, and the
    keys the bulk-built resolver reports cover every entry that changed (what a datapath sync
    rewrites)."""
    assert changed_bulk == changed_single
    before = {i: bulk.map_state(i) for i in changed_bulk if i in bulk.endpoint_identities()}
    touched = bulk.updates(changed_bulk)
    single.updates(changed_single)
    for ident, keys in touched.items():
        after = bulk.map_state(ident)
        missed = changed_keys(before.get(ident), after) - keys
        assert not missed, f"identity {ident}: changed keys not reported: {sorted(missed)[:3]}"
    assert snapshot(bulk) == snapshot(single)


@pytest.mark.parametrize("seed", [7, 11])
def test_the_bulk_build_equals_the_rule_by_rule_build_and_stays_equal(seed: int) -> None:
    bp = bench_module()
    sc = bp.Scenario(400, 600, seed)
    ids: dict[Labels, int] = {}
    for labels in sc.endpoints:
        ids.setdefault(labels, 256 + len(ids))
    bulk, single = PolicyResolver(), PolicyResolver()
    for r in (bulk, single):
        for labels, ident in ids.items():
            r.set_named_ports(ident, sc.app_ports[str(labels.get("app"))])
            r.add_identity(ident, labels)
    changed_bulk = bulk.add_policies(sc.policies)
    changed_single: set[int] = set()
    for policy in sc.policies:
        changed_single |= single.add_policy(policy)
    assert changed_bulk == changed_single
    # the bulk build shared work: fewer builds than endpoints (white box: the clones share
    # their contribution maps until they change)
    eps = bulk._endpoints
    assert len({id(ep.contribs) for ep in eps.values()}) < len(eps) * 0.8
    touched = bulk.updates(changed_bulk)
    for ident in changed_bulk:  # a first sync writes every entry
        ms = bulk.map_state(ident)
        assert set(ms.entries) | set(ms.l7) <= touched[ident]
    assert snapshot(bulk) == snapshot(single)
    single.updates(changed_single)

    next_id = 256 + len(ids)
    victims = iter(sorted(ids.values()))
    for k in range(6):
        # a new endpoint (same labels as another but one: a class member of its own)
        labels = sc.endpoint().union(Labels.parse(f"instance=new{k}"))
        ports = sc.app_ports[str(labels.get("app"))]
        a = bulk.set_named_ports(next_id, ports) | bulk.add_identity(next_id, labels)
        b = single.set_named_ports(next_id, ports) | single.add_identity(next_id, labels)
        step(bulk, single, a, b)
        next_id += 1
        # a new rule, then an old one removed
        policy = sc.policy(600 + k)
        step(bulk, single, bulk.add_policy(policy), single.add_policy(policy))
        old = sc.policies[k * 37]
        step(bulk, single, bulk.remove_policy(old), single.remove_policy(old))
        # an endpoint identity removed, one's port names changed
        victim = next(victims)
        step(bulk, single, bulk.remove_identity(victim), single.remove_identity(victim))
        other = next(victims)
        ports = {"http": frozenset({(PROTO_TCP, 7000 + k)})}
        step(bulk, single, bulk.set_named_ports(other, ports),
             single.set_named_ports(other, ports))
    # and a second bulk add on top of built endpoints
    more = [sc.policy(700 + k) for k in range(40)]
    more_bulk = bulk.add_policies(more)
    more_single: set[int] = set()
    for policy in more:
        more_single |= single.add_policy(policy)
    step(bulk, single, more_bulk, more_single)


def test_endpoints_with_the_same_rules_but_other_port_names_do_not_share() -> None:
    """A named port on ingress means the selected endpoint's own number: two endpoints of
    one app that declare `http` differently get different entries."""
    ns = "default"
    a = endpoint_labels(Labels.parse("app=web,version=a"), ns)
    b = endpoint_labels(Labels.parse("app=web,version=b"), ns)
    client = endpoint_labels(Labels.parse("app=client"), ns)
    subject = EndpointSelector.match_labels({"app": "web"}).in_namespace(ns)
    peer = EndpointSelector.match_labels({"app": "client"}).in_namespace(ns)
    policies = [
        Policy(PolicyKind.CNP, f"p{i}", ns, (Rule(subject, ingress=(PolicySection(
            (EndpointPeer(peer),),
            (PortRule((PortProtocol(0, 0, Protocol.TCP, name),)),),
            (),
            RuleRef(PolicyKind.CNP, ns, f"p{i}", "ingress"),
        ),), namespace=ns),))
        for i, name in enumerate(["http", "metrics"])
    ]
    r = PolicyResolver()
    r.set_named_ports(300, {"http": frozenset({(PROTO_TCP, 8080)})})
    r.set_named_ports(301, {"http": frozenset({(PROTO_TCP, 9090)})})
    for ident, labels in ((300, a), (301, b), (302, client)):
        r.add_identity(ident, labels)
    r.add_policies(policies)
    ports = {
        ident: {(k.port, k.identity) for k in r.map_state(ident).entries if k.port}
        for ident in (300, 301)
    }
    assert ports == {300: {(8080, 302)}, 301: {(9090, 302)}}


def test_rules_first_then_identities_resolves_as_identities_first() -> None:
    """An endpoint identity added after the rules finds the rules selecting it among the
    selectors it matched (no scan of every rule's subject): the same policy either way."""
    bp = bench_module()
    sc = bp.Scenario(200, 400, 5)
    ids: dict[Labels, int] = {}
    for labels in sc.endpoints:
        ids.setdefault(labels, 256 + len(ids))
    identities_first, rules_first = PolicyResolver(), PolicyResolver()
    for labels, ident in ids.items():
        identities_first.set_named_ports(ident, sc.app_ports[str(labels.get("app"))])
        identities_first.add_identity(ident, labels)
    identities_first.add_policies(sc.policies)
    rules_first.add_policies(sc.policies)
    for labels, ident in ids.items():
        rules_first.set_named_ports(ident, sc.app_ports[str(labels.get("app"))])
        rules_first.add_identity(ident, labels)
    assert snapshot(rules_first) == snapshot(identities_first)
    assert any(rules_first.rules_selecting(ident) for ident in ids.values())


@pytest.mark.parametrize("enabled", [True, False])
def test_a_bulk_add_leaves_the_cycle_collector_as_it_found_it(enabled: bool) -> None:
    import gc

    bp = bench_module()
    sc = bp.Scenario(20, 30, 3)
    r = PolicyResolver()
    for n, labels in enumerate(dict.fromkeys(sc.endpoints)):
        r.add_identity(256 + n, labels)
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        r.add_policies(sc.policies)
        assert gc.isenabled() is enabled
        with pytest.raises(AttributeError):
            r.add_policies([sc.policies[0], None])  # type: ignore[list-item]
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_a_change_that_removes_every_rule_then_adds_others_reports_what_went() -> None:
    """`apply` removes, then adds in bulk: an endpoint left without rules by the removal is
    rebuilt at the end of the bulk add, and the sync still hears of the entries the removed
    rules had (or the kernel map would keep them)."""
    from garrison.policies.repository import PolicyChange

    bp = bench_module()
    sc = bp.Scenario(60, 120, 9)
    r = PolicyResolver()
    for n, labels in enumerate(dict.fromkeys(sc.endpoints)):
        r.add_identity(256 + n, labels)
    first, second = sc.policies[:60], sc.policies[60:]
    r.updates(r.add_policies(first))
    before = snapshot(r)
    changed = r.apply(PolicyChange(1, tuple(second), tuple(first)))
    touched = r.updates(changed)
    after = snapshot(r)
    gone = 0
    for ident in before:
        diff = changed_keys(before[ident], after[ident])
        assert diff <= touched.get(ident, set()), ident
        gone += len(set(before[ident].entries) - set(after[ident].entries))
    assert gone  # the change did take entries away
    fresh = PolicyResolver()
    for n, labels in enumerate(dict.fromkeys(sc.endpoints)):
        fresh.add_identity(256 + n, labels)
    fresh.add_policies(second)
    assert {i: (m.entries, m.l7) for i, m in snapshot(fresh).items()} == {
        i: (m.entries, m.l7) for i, m in after.items()
    }
