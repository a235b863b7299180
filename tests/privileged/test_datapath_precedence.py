"""The kernel's policy lookup agrees with the model, case by case.

Each case resolves a policy with the real resolver, writes the endpoint's MapState to the
kernel the way the agent does (PolicySync), runs `from_container` (egress of the endpoint)
or `to_container` (its ingress) on a crafted frame with BPF_PROG_TEST_RUN, and compares the
kernel's policy-verdict event and return code with `mapstate.lookup()` on the same
MapState: allowed or not, match type, drop reason, redirect.

The endpoint under test runs "on" loopback (ifindex 1, what test runs use); its peers are
ipcache entries that are not local endpoints, so each run judges exactly one side.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from functools import cache
from ipaddress import IPv4Address

import pytest

from garrison.bpf import abi
from garrison.bpf.loader import Datapath
from garrison.bpf.maps import DatapathEvent
from garrison.bpf.sync import LocalEndpoint, PolicySync
from garrison.bpf.syscall import TC_ACT_OK, TC_ACT_SHOT, SkbContext
from garrison.policies.mapstate import (
    PROTO_ICMP,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    DropReason,
    MatchType,
    lookup,
)
from garrison.policies.model import Direction, EnforcementMode
from garrison.policies.resolve import PolicyResolver, ResolverConfig, build_resolver
from garrison.policies.selectorcache import cidr_of, is_cidr

from .test_datapath_harness import (  # noqa: F401 (fixtures)
    PROXY_PORTS,
    fixture_bpffs,
    fixture_datapath,
    fixture_dp,
    fixture_no_leftovers,
    labels_of,
    policies,
)

pytestmark = pytest.mark.privileged

LO = 1
ME = ("198.18.1.1", 400, "app=me")
PEERS = {
    "a": ("198.18.1.2", 401, "app=peer-a"),
    "b": ("198.18.1.3", 402, "app=peer-b"),
    "world": ("198.18.1.4", abi.IDENTITY_WORLD, None),  # not in the ipcache
    "cidr": ("198.18.9.7", 0, None),  # a CIDR identity, found by prefix
    "host": ("198.18.1.5", abi.IDENTITY_HOST, None),  # the node: reserved identity 1
}
PROTOS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP, "ICMP": PROTO_ICMP}

HEAD = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}}}
spec:
  endpointSelector: {{matchLabels: {{app: me}}}}
"""

SCENARIOS: dict[str, tuple[str, ResolverConfig | None]] = {
    # one allow of every precedence class; egress: allow-all with denies at two classes
    "classes": (
        HEAD.format(name="classes")
        + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "0", protocol: UDP}]}]
  - toPorts: [{ports: [{port: "0", protocol: SCTP}]}]
  - fromEndpoints: [{matchLabels: {app: peer-b}}]
  egress:
  - toEntities: [all]
  egressDeny:
  - toEndpoints: [{matchLabels: {app: peer-b}}]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "53", protocol: UDP}]}]
""",
        None,
    ),
    # ranges (overlapping, protocol ANY vs TCP), denies over ranges, an unenforced
    # direction that still has a deny
    "ranges": (
        HEAD.format(name="ranges")
        + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts:
    - ports: [{port: "1000", endPort: 1999, protocol: TCP}]
    - ports: [{port: "1500", endPort: 1599, protocol: ANY}]
    - ports: [{port: "53", protocol: ANY}, {port: "53", protocol: TCP}]
  - toPorts: [{ports: [{port: "3000", endPort: 3999, protocol: TCP}]}]
  ingressDeny:
  - toPorts: [{ports: [{port: "1500", endPort: 1509, protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: peer-b}}]
  egressDeny:
  - toEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  enableDefaultDeny: {egress: false}
""",
        None,
    ),
    # L7 on a port inside an L4 range of the same peer; ICMP by type; a CIDR peer
    "l7": (
        HEAD.format(name="l7")
        + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /}]}
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "1", endPort: 79, protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: peer-b}}]
    icmps: [{fields: [{type: 8, family: IPv4}]}]
  egress:
  - toCIDR: [198.18.9.0/24]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: produce, topic: t}]}
""",
        None,
    ),
    # the union of rules (issue 20): peers allowed at L3 only (a) or on TCP any port (b) are
    # redirected on a port where an any-peer rule has L7 rules — by the derived entry for
    # exactly (peer, TCP, port) — with allow-all L7 (the unit tests check the rule sets)
    "union": (
        HEAD.format(name="union")
        + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
  - fromEndpoints: [{matchLabels: {app: peer-b}}]
    toPorts: [{ports: [{port: "0", protocol: TCP}]}]
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /}]}
  egress:
  - toEndpoints: [{matchLabels: {app: peer-a}}]
  - toEndpoints: [{matchLabels: {app: peer-b}}]
    toPorts: [{ports: [{port: "0", protocol: TCP}]}]
  - toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: produce, topic: t}]}
""",
        None,
    ),
    # allow-localhost (the default): the host reaches the endpoint under default deny, an
    # explicit deny of the host still wins; egress to the host stays with policy
    "localhost": (
        HEAD.format(name="localhost")
        + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  ingressDeny:
  - fromEntities: [host]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  egress: [{}]
""",
        None,
    ),
    # --allow-localhost policy: the host reaches only what policy allows
    "no-localhost": (
        HEAD.format(name="no-localhost")
        + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
        ResolverConfig(allow_localhost=False),
    ),
    # audit: verdicts computed and logged, nothing dropped
    "audit": (
        HEAD.format(name="audit")
        + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  egressDeny:
  - toEndpoints: [{matchLabels: {app: peer-b}}]
""",
        ResolverConfig(audit=True),
    ),
    # enforcement never: nothing applies
    "never": (
        HEAD.format(name="never")
        + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
        ResolverConfig(enforcement=EnforcementMode.NEVER),
    ),
    # ClusterNetworkPolicy tiers around a CiliumNetworkPolicy: Admin Pass inside an Admin
    # Accept range, Admin rules of two priorities in two protocol buckets, an any-port Deny
    # over single-port Accepts before and after it, Admin networks; Baseline where the
    # NetworkPolicy tier leaves the direction unenforced (egress), its Pass and Deny
    "tiers": (
        """
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: admin}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {podSelector: {matchLabels: {app: me}}}}
  ingress:
  - action: Pass
    from: [{pods: {podSelector: {matchLabels: {app: peer-a}}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]
  - action: Accept
    from: [{pods: {podSelector: {matchLabels: {app: peer-a}}}}]
    protocols: [{tcp: {destinationPort: {range: {start: 70, end: 90}}}}]
  - action: Deny
    from: [{pods: {podSelector: {matchLabels: {app: peer-b}}}}]
  egress:
  - action: Deny
    to: [{networks: [198.18.9.0/24]}]
    protocols: [{tcp: {destinationPort: {number: 443}}}]
  - action: Accept
    to: [{pods: {podSelector: {matchLabels: {app: peer-b}}}}]
    protocols: [{udp: {destinationPort: {number: 53}}}]
  - action: Accept
    to: [{pods: {podSelector: {matchLabels: {app: peer-b}}}}]
    protocols: [{tcp: {destinationPort: {number: 5000}}}]
  - action: Deny
    to: [{pods: {podSelector: {matchLabels: {app: peer-b}}}}]
    protocols: [{tcp: {}}]
  - action: Accept
    to: [{pods: {podSelector: {matchLabels: {app: peer-b}}}}]
    protocols: [{tcp: {destinationPort: {number: 6000}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: admin-first}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {}}
  ingress:
  - action: Accept
    from: [{pods: {podSelector: {matchLabels: {app: peer-b}}}}]
    protocols: [{tcp: {destinationPort: {number: 8080}}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: np-tier}
spec:
  endpointSelector: {matchLabels: {app: me}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "81", endPort: 85, protocol: TCP}]}]
  ingressDeny:
  - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: baseline}
spec:
  tier: Baseline
  priority: 1
  subject: {pods: {podSelector: {matchLabels: {app: me}}}}
  ingress:
  - action: Accept
    from: [{namespaces: {}}]
  egress:
  - action: Deny
    to: [{pods: {podSelector: {matchLabels: {app: peer-a}}}}]
    protocols: [{tcp: {destinationPort: {range: {start: 1000, end: 2000}}}}]
  - action: Pass
    to: [{pods: {podSelector: {matchLabels: {app: peer-b}}}}]
  - action: Deny
    to: [{namespaces: {}}]
""",
        None,
    ),
}


@dataclass(frozen=True)
class Case:
    scenario: str
    direction: Direction
    peer: str
    proto: str
    port: int
    # the expectation in words (also checked against the model, so a wrong line fails)
    expect: str

    def __str__(self) -> str:
        return f"{self.scenario}-{self.direction.value}-{self.peer}-{self.proto}-{self.port}"


IN, OUT = Direction.INGRESS, Direction.EGRESS
CASES = [
    Case("classes", IN, "a", "TCP", 80, "allow L3-L4"),
    Case("classes", IN, "a", "TCP", 81, "drop POLICY_DENIED"),
    Case("classes", IN, "a", "UDP", 5000, "allow L3-proto"),
    Case("classes", IN, "b", "TCP", 8080, "allow L4-only"),
    Case("classes", IN, "b", "TCP", 9999, "allow L3-only"),
    Case("classes", IN, "b", "UDP", 53, "allow L3-only"),
    Case("classes", IN, "world", "TCP", 8080, "allow L4-only"),
    Case("classes", IN, "world", "TCP", 80, "drop POLICY_DENIED"),
    Case("classes", IN, "world", "SCTP", 1, "allow proto-only"),
    Case("classes", IN, "a", "SCTP", 7, "allow proto-only"),
    Case("classes", IN, "world", "ICMP", 8, "drop POLICY_DENIED"),
    Case("classes", OUT, "b", "TCP", 22, "drop POLICY_DENY L3-L4"),
    Case("classes", OUT, "a", "TCP", 22, "allow all"),
    Case("classes", OUT, "world", "UDP", 53, "drop POLICY_DENY L4-only"),
    Case("classes", OUT, "b", "UDP", 53, "drop POLICY_DENY L4-only"),
    Case("classes", OUT, "world", "ICMP", 8, "allow all"),
    Case("ranges", IN, "a", "TCP", 1000, "allow L3-L4"),
    Case("ranges", IN, "a", "TCP", 1999, "allow L3-L4"),
    Case("ranges", IN, "a", "TCP", 2000, "drop POLICY_DENIED"),
    Case("ranges", IN, "a", "UDP", 1550, "allow L3-L4"),
    Case("ranges", IN, "a", "UDP", 1499, "drop POLICY_DENIED"),
    Case("ranges", IN, "a", "TCP", 1505, "drop POLICY_DENY L4-only"),
    Case("ranges", IN, "a", "TCP", 1510, "allow L3-L4"),
    Case("ranges", IN, "a", "UDP", 1505, "allow L3-L4"),
    Case("ranges", IN, "a", "UDP", 53, "allow L3-L4"),
    Case("ranges", IN, "a", "TCP", 53, "allow L3-L4"),
    Case("ranges", IN, "world", "TCP", 3500, "allow L4-only"),
    Case("ranges", IN, "world", "TCP", 2999, "drop POLICY_DENIED"),
    Case("ranges", IN, "b", "TCP", 3500, "drop POLICY_DENY L3-only"),
    Case("ranges", IN, "b", "TCP", 1505, "drop POLICY_DENY L4-only"),
    Case("ranges", OUT, "a", "TCP", 5432, "drop POLICY_DENY L3-L4"),
    Case("ranges", OUT, "a", "TCP", 5433, "allow none"),
    Case("ranges", OUT, "b", "UDP", 5432, "allow none"),
    Case("l7", IN, "a", "TCP", 80, "redirect L3-L4"),
    Case("l7", IN, "a", "TCP", 79, "allow L3-L4"),
    Case("l7", IN, "a", "TCP", 81, "drop POLICY_DENIED"),
    Case("l7", IN, "b", "ICMP", 8, "allow L3-L4"),
    Case("l7", IN, "b", "ICMP", 13, "drop POLICY_DENIED"),
    Case("l7", OUT, "cidr", "TCP", 443, "allow L3-L4"),
    Case("l7", OUT, "world", "TCP", 443, "drop POLICY_DENIED"),
    Case("l7", OUT, "a", "TCP", 9092, "redirect L3-L4"),
    Case("union", IN, "a", "TCP", 80, "redirect L3-L4"),
    Case("union", IN, "a", "TCP", 81, "allow L3-only"),
    Case("union", IN, "a", "UDP", 80, "allow L3-only"),
    Case("union", IN, "b", "TCP", 80, "redirect L3-L4"),
    Case("union", IN, "b", "TCP", 22, "allow L3-proto"),
    Case("union", IN, "world", "TCP", 80, "redirect L4-only"),
    Case("union", IN, "world", "TCP", 81, "drop POLICY_DENIED"),
    Case("union", OUT, "a", "TCP", 9092, "redirect L3-L4"),
    Case("union", OUT, "a", "TCP", 9093, "allow L3-only"),
    Case("union", OUT, "b", "TCP", 9092, "redirect L3-L4"),
    Case("union", OUT, "b", "TCP", 22, "allow L3-proto"),
    Case("union", OUT, "world", "TCP", 9092, "redirect L4-only"),
    Case("union", OUT, "world", "TCP", 9093, "drop POLICY_DENIED"),
    Case("localhost", IN, "host", "TCP", 8080, "allow L3-only"),
    Case("localhost", IN, "host", "UDP", 53, "allow L3-only"),
    Case("localhost", IN, "host", "TCP", 22, "drop POLICY_DENY L3-L4"),
    Case("localhost", IN, "world", "TCP", 8080, "drop POLICY_DENIED"),
    Case("localhost", OUT, "host", "TCP", 10250, "drop POLICY_DENIED"),
    Case("no-localhost", IN, "host", "TCP", 8080, "drop POLICY_DENIED"),
    Case("no-localhost", IN, "a", "TCP", 80, "allow L3-L4"),
    Case("audit", IN, "a", "TCP", 80, "allow L3-L4"),
    Case("audit", IN, "b", "TCP", 80, "drop POLICY_DENIED"),
    Case("audit", OUT, "b", "UDP", 53, "drop POLICY_DENY L3-only"),
    Case("audit", OUT, "a", "UDP", 53, "drop POLICY_DENIED"),
    Case("never", IN, "b", "TCP", 80, "allow none"),
    Case("never", OUT, "a", "TCP", 80, "allow none"),
    Case("tiers", IN, "a", "TCP", 80, "drop POLICY_DENY L4-only"),
    Case("tiers", IN, "a", "TCP", 82, "allow L3-L4"),
    Case("tiers", IN, "a", "TCP", 70, "allow L3-L4"),
    Case("tiers", IN, "a", "TCP", 95, "drop POLICY_DENIED"),
    Case("tiers", IN, "b", "TCP", 8080, "allow L3-L4"),
    Case("tiers", IN, "b", "TCP", 22, "drop POLICY_DENY L3-only"),
    Case("tiers", IN, "b", "UDP", 8080, "drop POLICY_DENY L3-only"),
    Case("tiers", IN, "world", "TCP", 80, "drop POLICY_DENY L4-only"),
    Case("tiers", IN, "world", "TCP", 82, "drop POLICY_DENIED"),
    Case("tiers", OUT, "cidr", "TCP", 443, "drop POLICY_DENY L3-L4"),
    Case("tiers", OUT, "cidr", "TCP", 444, "allow none"),
    Case("tiers", OUT, "b", "UDP", 53, "allow L3-L4"),
    Case("tiers", OUT, "b", "TCP", 5000, "allow L3-L4"),
    Case("tiers", OUT, "b", "TCP", 5001, "drop POLICY_DENY L3-proto"),
    Case("tiers", OUT, "b", "TCP", 6000, "drop POLICY_DENY L3-L4"),
    Case("tiers", OUT, "b", "UDP", 54, "allow none"),
    Case("tiers", OUT, "a", "TCP", 1500, "drop POLICY_DENY L3-L4"),
    Case("tiers", OUT, "a", "TCP", 22, "drop POLICY_DENY L3-only"),
    Case("tiers", OUT, "world", "TCP", 80, "allow none"),
]


@cache
def resolver_for(scenario: str) -> PolicyResolver:
    text, config = SCENARIOS[scenario]
    eps = [(ME[1], labels_of(ME[2]))] + [
        (ident, labels_of(lab)) for _, ident, lab in PEERS.values() if lab is not None
    ]
    return build_resolver(policies(text), eps, config)


def cidr_identities(resolver: PolicyResolver) -> dict[str, int]:
    out = {}
    for ident, labels in resolver.cache.identities().items():
        if is_cidr(ident) and (net := cidr_of(labels)) is not None:
            out[str(net)] = ident
    return out


def frame(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    eth = bytes.fromhex("020000000002" "020000000001") + struct.pack("!H", 0x0800)
    if proto == PROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    elif proto == PROTO_UDP:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    elif proto == PROTO_SCTP:
        l4 = struct.pack("!HHII", sport, dport, 0, 0)
    else:  # ICMP: the port is the type; the identifier rides as "source port"
        l4 = struct.pack("!BBHHH", dport, 0, 0, sport, 1)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    return eth + ip + l4


def install(dp: Datapath, resolver: PolicyResolver) -> int:
    """ipcache for the peers (CIDR prefixes included), the policy via PolicySync; returns
    the identity the cidr peer's address resolves to."""
    for ip, ident, _ in PEERS.values():
        if ident not in (0, abi.IDENTITY_WORLD):
            dp.maps.ipcache.upsert(f"{ip}/32", ident)
    for prefix, ident in cidr_identities(resolver).items():
        dp.maps.ipcache.upsert(prefix, ident)
    sync = PolicySync(dp.maps, PROXY_PORTS)
    sync.reconcile(resolver, [LocalEndpoint(LO, ME[1], IPv4Address(ME[0]))])
    return dp.maps.ipcache.lookup(PEERS["cidr"][0])


def verdicts(events: list[DatapathEvent]) -> list[DatapathEvent]:
    return [e for e in events if e.type is abi.EventType.POLICY_VERDICT]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_verdict_equals_model(dp: Datapath, case: Case) -> None:
    resolver = resolver_for(case.scenario)
    cidr_identity = install(dp, resolver)
    peer_ip, peer_identity, _ = PEERS[case.peer]
    if case.peer == "cidr":
        peer_identity = cidr_identity
    proto = PROTOS[case.proto]
    state = resolver.map_state(ME[1])
    model = lookup(state, case.direction, peer_identity, proto, case.port)

    # the table's words agree with the model (a typo in the table must not go unnoticed)
    words = case.expect.split()
    assert model.allowed == (words[0] in ("allow", "redirect"))
    assert (model.redirect is not None) == (words[0] == "redirect")
    if words[0] == "drop":
        assert model.drop_reason is DropReason(words[1])
    assert model.match_type is MatchType(words[-1] if words[-1] != "POLICY_DENIED" else "none")

    if case.direction is Direction.EGRESS:
        program, src, dst = "from_container", ME[0], peer_ip
    else:
        program, src, dst = "to_container", peer_ip, ME[0]
    dp.maps.events.drain()
    result = dp.test_run(program, frame(src, dst, proto, 40000, case.port), SkbContext(ifindex=LO))
    events = dp.maps.events.drain()
    [verdict] = verdicts(events)

    assert verdict.allowed == model.allowed
    assert verdict.match_type.model is model.match_type
    assert (verdict.reason.model if verdict.reason else None) is model.drop_reason
    assert verdict.redirect == (model.redirect is not None)
    assert verdict.direction is abi.TrafficDirection.of(case.direction)
    assert verdict.audit == state.audit
    me, peer = ME[1], peer_identity
    assert (verdict.src_identity, verdict.dst_identity) == (
        (me, peer) if case.direction is Direction.EGRESS else (peer, me)
    )

    drops = [e for e in events if e.type is abi.EventType.DROP]
    if state.audit or (model.allowed and model.redirect is None):
        assert result.retval == TC_ACT_OK
        assert not [d for d in drops if not d.audit]
    else:
        assert result.retval == TC_ACT_SHOT
        [drop] = drops
        if not model.allowed:
            assert drop.reason is not None and drop.reason.model is model.drop_reason
        elif case.direction is Direction.EGRESS:  # no proxy listens: fail closed
            assert drop.reason is abi.DropReason.PROXY_NOT_LISTENING
        else:  # ingress redirect cannot happen at to_container for a non-local source
            assert drop.reason is abi.DropReason.PROXY_REDIRECT_UNSUPPORTED


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert {c.scenario for c in CASES} == set(SCENARIOS)


def test_tiers_arrive_and_leave_incrementally(dp: Datapath) -> None:
    """An Admin Deny added to a running datapath (resolver update -> PolicySync.apply_updates,
    as the agent does) sets the endpoint's TIERS flag and drops what the NetworkPolicy tier
    allows; removing it clears the flag and the connection passes again."""
    allow = HEAD.format(name="np") + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
"""
    deny = policies("""
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: admin-deny}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {podSelector: {matchLabels: {app: me}}}}
  ingress:
  - action: Deny
    from: [{pods: {podSelector: {matchLabels: {app: peer-a}}}}]
    protocols: [{tcp: {destinationPort: {range: {start: 80, end: 89}}}}]
""")[0]
    eps = [(ME[1], labels_of(ME[2])), (PEERS["a"][1], labels_of(PEERS["a"][2]))]
    resolver = build_resolver(policies(allow), eps)
    dp.maps.ipcache.upsert(f"{PEERS['a'][0]}/32", PEERS["a"][1])
    local = [LocalEndpoint(LO, ME[1], IPv4Address(ME[0]))]
    sync = PolicySync(dp.maps, PROXY_PORTS)
    sync.reconcile(resolver, local)
    sports = iter(range(40001, 40010))  # a new connection each time (no conntrack hit)

    def verdict() -> tuple[bool, int]:
        dp.maps.events.drain()
        syn = frame(PEERS["a"][0], ME[0], PROTO_TCP, next(sports), 85)
        result = dp.test_run("to_container", syn, SkbContext(ifindex=LO))
        [event] = verdicts(dp.maps.events.drain())
        flags = dp.maps.endpoints.get(LO)
        assert flags is not None
        return event.allowed, int(flags.flags & abi.EndpointFlags.TIERS) + (
            0 if result.retval == TC_ACT_OK else 100
        )

    assert verdict() == (True, 0)
    sync.apply_updates(resolver, resolver.add_policy(deny), local)
    assert verdict() == (False, abi.EndpointFlags.TIERS + 100)
    sync.apply_updates(resolver, resolver.remove_policy(deny), local)
    assert verdict() == (True, 0)
    assert not [k for k in dp.maps.policy.entries() if k.tier]


# ---- policies in audit mode (garrison.io/audit): the what-if map ---------------------------

AUDIT_ENFORCED = HEAD.format(name="in-force") + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "80", endPort: 81, protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: peer-b}}]
"""
# an audited deny over part of what is allowed, an audited allow of what is denied, and an
# egress the audited policy alone would switch to default-deny
AUDIT_CANDIDATE = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: candidate
  annotations: {garrison.io/audit: "true"}
spec:
  endpointSelector: {matchLabels: {app: me}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "81", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  ingress:
  - fromEntities: [world]
  egress:
  - toEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


def test_what_if_lookup_equals_model(dp: Datapath) -> None:
    """An audited policy (agent resolver, PolicySync with its what-if resolver): over a grid
    of peers, ports, protocols and both directions, the kernel's verdict event and return
    code are the enforced model's, except where the enforced model allows and the what-if
    model denies: then the event says AUDIT (not allowed) with the what-if reason and match
    type, and the packet passes. Removing the audited policy clears the flag and the map."""
    from garrison.agent.whatif import AuditingResolver

    resolver = AuditingResolver()
    for ident, labels in [(ME[1], ME[2]), (PEERS["a"][1], PEERS["a"][2]),
                          (PEERS["b"][1], PEERS["b"][2])]:
        assert labels is not None
        resolver.add_identity(ident, labels_of(labels))
    enforced = policies(AUDIT_ENFORCED)[0]
    [candidate] = policies(AUDIT_CANDIDATE)
    resolver.add_policy(enforced)
    resolver.add_policy(candidate)
    assert resolver.what_if is not None
    for peer in ("a", "b"):
        dp.maps.ipcache.upsert(f"{PEERS[peer][0]}/32", PEERS[peer][1])
    local = [LocalEndpoint(LO, ME[1], IPv4Address(ME[0]))]
    sync = PolicySync(dp.maps, PROXY_PORTS)
    sync.reconcile(resolver, local, resolver.what_if)
    config = dp.maps.endpoints.get(LO)
    assert config is not None and abi.EndpointFlags.POLICY_AUDIT in config.flags
    assert abi.EndpointFlags.AUDIT_EGRESS_ENFORCED in config.flags
    assert abi.EndpointFlags.EGRESS_ENFORCED not in config.flags
    assert dp.maps.policy_audit.entries([ME[1]])

    state, what_if = resolver.map_state(ME[1]), resolver.what_if.map_state(ME[1])
    sports = iter(range(41000, 42000))
    audited = 0
    for direction in (Direction.INGRESS, Direction.EGRESS):
        for peer in ("a", "b", "world"):
            for proto in (PROTO_TCP, PROTO_UDP):
                for port in (80, 81, 443, 8080):
                    peer_ip, peer_identity, _ = PEERS[peer]
                    model = lookup(state, direction, peer_identity, proto, port)
                    would = lookup(what_if, direction, peer_identity, proto, port)
                    audit = model.allowed and not would.allowed
                    expect = would if audit else model
                    if direction is Direction.EGRESS:
                        program, src, dst = "from_container", ME[0], peer_ip
                    else:
                        program, src, dst = "to_container", peer_ip, ME[0]
                    dp.maps.events.drain()
                    result = dp.test_run(program, frame(src, dst, proto, next(sports), port),
                                         SkbContext(ifindex=LO))
                    [verdict] = verdicts(dp.maps.events.drain())
                    where = f"{direction.value} {peer} {proto}/{port}"
                    assert verdict.audit == audit, where
                    assert verdict.allowed == (model.allowed and not audit), where
                    assert verdict.match_type.model is expect.match_type, where
                    assert (verdict.reason.model if verdict.reason else None) is (
                        expect.drop_reason), where
                    assert result.retval == (TC_ACT_OK if model.allowed else TC_ACT_SHOT), where
                    audited += audit
    assert audited >= 4  # the grid covers the audited deny, the default-deny and both

    sync.apply_updates(resolver, resolver.remove_policy(candidate), local, resolver.what_if)
    config = dp.maps.endpoints.get(LO)
    assert resolver.what_if is None and config is not None
    assert not config.flags & (abi.EndpointFlags.POLICY_AUDIT
                               | abi.EndpointFlags.AUDIT_EGRESS_ENFORCED)
    assert not dp.maps.policy_audit.entries()



def test_a_redirect_only_audited_policies_ask_for_never_fails_closed(dp: Datapath) -> None:
    """Port 8080 is allowed at L4 by the enforced policy, both ways; only the audited policy
    puts HTTP rules there. from_container steers the egress connection to the proxy for it
    (GAR_REDIRECT_WHAT_IF): with no proxy listening it passes, its drop event flagged AUDIT,
    where an enforced redirect fails closed. to_container, where no redirect can happen,
    passes the ingress connection without a drop event."""
    from garrison.agent.whatif import AuditingResolver

    enforced = HEAD.format(name="in-force") + """
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  egress:
  - toEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
    candidate = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: candidate
  annotations: {garrison.io/audit: "true"}
spec:
  endpointSelector: {matchLabels: {app: me}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET}]}
  egress:
  - toEndpoints: [{matchLabels: {app: peer-a}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET}]}
"""
    resolver = AuditingResolver()
    for ident, labels in [(ME[1], ME[2]), (PEERS["a"][1], PEERS["a"][2])]:
        assert labels is not None
        resolver.add_identity(ident, labels_of(labels))
    [audited] = policies(candidate)
    for policy in (*policies(enforced), audited):
        resolver.add_policy(policy)
    assert resolver.what_if is not None
    for direction in (Direction.INGRESS, Direction.EGRESS):
        model = lookup(resolver.map_state(ME[1]), direction, PEERS["a"][1], PROTO_TCP, 8080)
        would = lookup(resolver.what_if.map_state(ME[1]), direction, PEERS["a"][1],
                       PROTO_TCP, 8080)
        assert model.allowed and model.redirect is None
        assert would.allowed and would.redirect is not None
    dp.maps.ipcache.upsert(f"{PEERS['a'][0]}/32", PEERS["a"][1])
    local = [LocalEndpoint(LO, ME[1], IPv4Address(ME[0]))]
    sync = PolicySync(dp.maps, PROXY_PORTS)
    sync.reconcile(resolver, local, resolver.what_if)
    try:
        dp.maps.events.drain()
        result = dp.test_run("from_container", frame(ME[0], PEERS["a"][0], PROTO_TCP, 43000,
                                                     8080), SkbContext(ifindex=LO))
        events = dp.maps.events.drain()
        [verdict] = verdicts(events)
        [drop] = [e for e in events if e.type is abi.EventType.DROP]
        assert result.retval == TC_ACT_OK
        assert verdict.allowed and verdict.redirect and not verdict.audit
        assert drop.audit and drop.reason is abi.DropReason.PROXY_NOT_LISTENING

        result = dp.test_run("to_container", frame(PEERS["a"][0], ME[0], PROTO_TCP, 43001,
                                                   8080), SkbContext(ifindex=LO))
        events = dp.maps.events.drain()
        [verdict] = verdicts(events)
        assert result.retval == TC_ACT_OK and verdict.allowed
        assert not [e for e in events if e.type is abi.EventType.DROP]
    finally:
        sync.apply_updates(resolver, resolver.remove_policy(audited), local, resolver.what_if)
    assert not dp.maps.policy_audit.entries()
