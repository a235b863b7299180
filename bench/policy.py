"""Policy resolution at scale: 1,000 endpoints against 10,000 rules, then incremental changes.

Run: .venv/bin/python bench/policy.py [--endpoints N] [--rules N] [--seed S]

Prints the full-resolve time (identities + rules + every endpoint's MapState materialized;
CPU time, the aim's measure, and wall time),
the CPU time to add one endpoint and one rule incrementally (resolver update plus the merge of
every changed key of every endpoint it affects — what a datapath sync then writes), and the
peak RSS. The reference in the same run is the full resolve:
the incremental ratios say how much work incrementality saves.

Named ports and namespace labels (issue 20): every app declares the port names `http` and
`metrics` (its own numbers), 10% of the ports rules write are named, and 5% of the peers
select an app by a namespace label (`io.cilium.k8s.namespace.labels.env`, any namespace).
Also timed: adding an endpoint that declares port names (identity + port names + merge),
and relabelling one namespace (each of its identities replaced by one with the new
namespace label: port names and the new identity added, the old one removed, what changed
merged).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from garrison.policies.l7rules import HTTPRule, KafkaRole, KafkaRule, L7Rules
from garrison.policies.labels import NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, Labels, endpoint_labels
from garrison.policies.mapstate import PROTO_TCP
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
from garrison.policies.selector import EndpointSelector, Operator, Requirement

TIERS = ["web", "api", "db", "cache", "worker"]
ENVS = ["prod", "staging"]
PORTS = [80, 443, 8080, 9090, 5432, 6379, 9092, 3000]


class Scenario:
    def __init__(self, endpoints: int, rules: int, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.namespaces = [f"ns{i}" for i in range(20)]
        # namespace labels: half the namespaces are env=prod
        self.ns_labels = {ns: {"env": ENVS[i % 2]} for i, ns in enumerate(self.namespaces)}
        self.apps = [(f"app{i}", self.rnd.choice(self.namespaces)) for i in range(200)]
        # port names per app: `http` and `metrics`, each app its own numbers
        self.app_ports = {
            app: {"http": frozenset({(PROTO_TCP, 8000 + i % 50)}),
                  "metrics": frozenset({(PROTO_TCP, 9100 + i % 7)})}
            for i, (app, _) in enumerate(self.apps)
        }
        self.teams = [f"team{i}" for i in range(30)]
        self.endpoints = [self.endpoint() for _ in range(endpoints)]
        self.policies = [self.policy(i) for i in range(rules)]

    def endpoint(self) -> Labels:
        app, ns = self.rnd.choice(self.apps)
        labels = Labels.parse(
            f"app={app},tier={self.rnd.choice(TIERS)},env={self.rnd.choice(ENVS)},"
            f"team={self.teams[int(app[3:]) % len(self.teams)]},version=v{self.rnd.randint(1, 3)}"
        )
        return endpoint_labels(labels, ns, self.ns_labels[ns])

    def selector(self, ns: str) -> EndpointSelector:
        """A peer: mostly an app of the same namespace; some apps of another namespace
        (named with the namespace label, as cross-namespace rules must); some team or tier
        selectors within the namespace."""
        kind = self.rnd.random()
        if kind < 0.05:  # an app wherever its namespace has a label (a namespaceSelector)
            return EndpointSelector.of([
                Requirement(NAMESPACE_KEY, Operator.EXISTS, (), "k8s"),
                Requirement(NAMESPACE_LABELS_PREFIX + "env", Operator.IN,
                            (self.rnd.choice(ENVS),), "k8s"),
                Requirement("app", Operator.IN, (self.rnd.choice(self.apps)[0],), "k8s"),
            ])
        if kind < 0.7:
            local = [a for a, n in self.apps if n == ns]
            if local and self.rnd.random() < 0.8:
                labels = {"app": self.rnd.choice(local)}
            else:
                app, other = self.rnd.choice(self.apps)
                labels = {"app": app, "k8s:io.kubernetes.pod.namespace": other}
            if self.rnd.random() < 0.3:
                labels["tier"] = self.rnd.choice(TIERS)
        elif kind < 0.85:
            labels = {"team": self.rnd.choice(self.teams), "env": self.rnd.choice(ENVS)}
        else:
            labels = {"tier": self.rnd.choice(TIERS)}
        return EndpointSelector.match_labels(labels).in_namespace(ns)

    def policy(self, i: int) -> Policy:
        app, ns = self.rnd.choice(self.apps)
        name = f"pol{i}"
        subject = EndpointSelector.match_labels({"app": app}).in_namespace(ns)
        sections = []
        for j in range(self.rnd.randint(1, 2)):
            ports = []
            for _ in range(self.rnd.randint(1, 2)):
                port = self.rnd.choice(PORTS)
                l7 = None
                roll = self.rnd.random()
                if roll < 0.08:
                    l7 = L7Rules(http=(HTTPRule(method="GET", path=f"/api/v{j}/.*"),))
                elif roll < 0.1:
                    l7 = L7Rules(kafka=(KafkaRule(role=KafkaRole.CONSUME, topic=f"t{i}"),))
                pp = PortProtocol(port, 0, Protocol.TCP)
                if self.rnd.random() < 0.1 and (l7 is None or l7.http):
                    pp = PortProtocol(0, 0, Protocol.TCP, self.rnd.choice(["http", "metrics"]))
                ports.append(PortRule((pp,), l7))
            peers = tuple(EndpointPeer(self.selector(ns)) for _ in range(self.rnd.randint(1, 2)))
            ref = RuleRef(PolicyKind.CNP, ns, name, "ingress", 0, j)
            sections.append(PolicySection(peers, tuple(ports), (), ref))
        deny = None
        if self.rnd.random() < 0.05:
            ref = RuleRef(PolicyKind.CNP, ns, name, "ingressDeny")
            deny = (PolicySection((EndpointPeer(self.selector(ns)),), (), (), ref),)
        rule = Rule(subject, ingress=tuple(sections), ingress_deny=deny, namespace=ns)
        return Policy(PolicyKind.CNP, name, ns, (rule,))


def materialize(resolver: PolicyResolver, identities: set[int] | list[int]) -> int:
    total = 0
    for ident in identities:
        total += len(resolver.map_state(ident).entries)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=20, help="incremental samples")
    args = ap.parse_args()

    sc = Scenario(args.endpoints, args.rules, args.seed)
    ids: dict[Labels, int] = {}
    for labels in sc.endpoints:
        ids.setdefault(labels, 256 + len(ids))

    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    resolver = PolicyResolver()
    for labels, ident in ids.items():
        resolver.set_named_ports(ident, sc.app_ports[str(labels.get("app"))])
        resolver.add_identity(ident, labels)
    resolver.add_policies(sc.policies)
    entries = materialize(resolver, resolver.endpoint_identities())
    full = time.perf_counter() - t0
    full_cpu = time.process_time() - c0

    # After a full resolve the heap holds ~10^6 long-lived objects; without freezing them a
    # generation-2 collection during an incremental update costs hundreds of ms. The agent
    # does the same after its initial sync.
    c0 = time.process_time()
    gc.collect()
    collect_cpu = time.process_time() - c0
    gc.freeze()

    add_ep, add_named, add_rule, relabel = [], [], [], []
    next_id = 256 + len(ids)
    for k in range(args.repeat):
        labels = sc.endpoint().union(Labels.parse(f"instance=new{k}"))
        t = time.process_time()
        changed = resolver.add_identity(next_id, labels)
        resolver.updates(changed)
        add_ep.append(time.process_time() - t)
        next_id += 1

        labels = sc.endpoint().union(Labels.parse(f"instance=named{k}"))
        t = time.process_time()
        changed = resolver.set_named_ports(next_id, sc.app_ports[str(labels.get("app"))])
        changed |= resolver.add_identity(next_id, labels)
        resolver.updates(changed)
        add_named.append(time.process_time() - t)
        next_id += 1

        pol = sc.policy(args.rules + k)
        t = time.process_time()
        changed = resolver.add_policy(pol)
        resolver.updates(changed)
        add_rule.append(time.process_time() - t)

    # namespace relabels: env flips on one namespace, every identity of it replaced
    moved_ids = []
    for k in range(min(args.repeat, len(sc.namespaces))):
        ns = sc.namespaces[k]
        env = "staging" if sc.ns_labels[ns]["env"] == "prod" else "prod"
        sc.ns_labels[ns] = {"env": env}
        old = {lab: i for lab, i in ids.items() if lab.namespace == ns}
        t = time.process_time()
        changed = set()
        for labels, ident in old.items():
            new_labels = Labels.of(
                [lab for lab in labels if not lab.key.startswith(NAMESPACE_LABELS_PREFIX)]
            ).union(Labels.parse(f"{NAMESPACE_LABELS_PREFIX}env={env}"))
            changed |= resolver.set_named_ports(next_id, sc.app_ports[str(labels.get("app"))])
            changed |= resolver.add_identity(next_id, new_labels)
            changed |= resolver.remove_identity(ident)
            changed.discard(ident)
            del ids[labels]
            ids[new_labels] = next_id
            next_id += 1
        resolver.updates(changed)
        relabel.append(time.process_time() - t)
        moved_ids.append(len(old))

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ep_ms = statistics.median(add_ep) * 1000
    rule_ms = statistics.median(add_rule) * 1000
    print(f"policy resolution: {args.endpoints} endpoints ({len(ids)} identities), "
          f"{args.rules} rules, {entries} map entries")
    print(f"  full resolve:            {full_cpu * 1000:9.1f} ms CPU (aim < 2000 ms), "
          f"{full * 1000:.1f} ms wall; the full collection after it {collect_cpu * 1000:.1f} "
          f"ms CPU")
    print(f"  add one endpoint:        {ep_ms:9.2f} ms CPU, median of {args.repeat}, "
          f"max {max(add_ep) * 1000:.2f} ms (aim < 10 ms)  ratio to full "
          f"{ep_ms / (full * 1000):.5f}")
    print(f"  add one rule:            {rule_ms:9.2f} ms CPU, median of {args.repeat}, "
          f"max {max(add_rule) * 1000:.2f} ms (aim < 10 ms)  ratio to full "
          f"{rule_ms / (full * 1000):.5f}")
    named_ms = statistics.median(add_named) * 1000
    print(f"  add one endpoint + port names: {named_ms:7.2f} ms CPU, median of {args.repeat}, "
          f"max {max(add_named) * 1000:.2f} ms")
    relabel_ms = statistics.median(relabel) * 1000
    print(f"  relabel one namespace:   {relabel_ms:9.2f} ms CPU, median of {len(relabel)} "
          f"({statistics.median(moved_ids):.0f} identities each), max "
          f"{max(relabel) * 1000:.2f} ms")
    print(f"  peak RSS:                {rss_mb:9.1f} MB")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"  load average at the end: {load} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
