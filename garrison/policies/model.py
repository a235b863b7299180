"""The validated policy model: what the YAML of the three policy kinds means.

The loader (`garrison.policies.loader`) builds these from YAML; everything after it (the
repository, resolution, trace) reads only these types. Absent vs empty matters and is
documented on each field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from garrison.policies.l7rules import L7Rules
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.policies.selector import EndpointSelector

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_PORTS_PER_RULE = 40


class Direction(StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"
    ANY = "ANY"
    ICMP = "ICMP"
    ICMPV6 = "ICMPv6"


IP_PROTO: dict[Protocol, int] = {
    Protocol.TCP: 6,
    Protocol.UDP: 17,
    Protocol.SCTP: 132,
    Protocol.ICMP: 1,
    Protocol.ICMPV6: 58,
    Protocol.ANY: 0,
}


class Entity(StrEnum):
    ALL = "all"
    WORLD = "world"
    CLUSTER = "cluster"
    HOST = "host"
    REMOTE_NODE = "remote-node"
    HEALTH = "health"
    INIT = "init"
    UNMANAGED = "unmanaged"
    NONE = "none"
    KUBE_APISERVER = "kube-apiserver"
    INGRESS = "ingress"
    # Cilium also accepts world-ipv4 / world-ipv6; they select the world identity here.
    WORLD_IPV4 = "world-ipv4"
    WORLD_IPV6 = "world-ipv6"


class Tier(StrEnum):
    """ClusterNetworkPolicy tiers (`spec.tier`): Admin before NetworkPolicy, Baseline after."""

    ADMIN = "Admin"
    BASELINE = "Baseline"


class TierAction(StrEnum):
    """A ClusterNetworkPolicy rule's `action`."""

    ACCEPT = "Accept"
    DENY = "Deny"
    PASS = "Pass"


# What a ClusterNetworkPolicy's priority (0-1000) allows, and rules per direction (25).
CNP_MAX_PRIORITY = 1000
CNP_MAX_RULES = 25


def tier_order(priority: int, rule_index: int) -> int:
    """The precedence of a ClusterNetworkPolicy rule in its tier, lower first: priority,
    then the rule's place in its policy's ingress (egress) list. Fits 16 bits."""
    return priority * 32 + rule_index


class EnforcementMode(StrEnum):
    DEFAULT = "default"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class PortProtocol:
    """`port` 0 = any port; `end_port` 0 = no range (a range is port..end_port inclusive).

    `name` set: a named port (`port: http`), `port` is then 0 and means nothing by itself.
    The resolver maps the name per destination endpoint, from the port names that endpoint
    declares; an endpoint that declares no such name is selected on no port by it."""

    port: int = 0
    end_port: int = 0
    protocol: Protocol = Protocol.ANY
    name: str = ""

    @property
    def last(self) -> int:
        return self.end_port if self.end_port else self.port

    def covers(self, port: int) -> bool:
        if self.name:
            return False  # only the resolver knows what a name means on an endpoint
        return self.port == 0 or self.port <= port <= self.last


# Kubernetes' IANA_SVC_NAME: 1-15 lower-case letters, digits and '-', at least one letter,
# no '-' at either end and no '--'.
_PORT_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def port_name_problem(name: str) -> str | None:
    """Why `name` is not a valid port name (Kubernetes' IANA_SVC_NAME rules), or None."""
    if not 1 <= len(name) <= 15:
        return "a port name has 1-15 characters"
    if not set(name) <= _PORT_NAME_CHARS:
        return "a port name has only lower-case letters, digits and '-'"
    if not any(c.isalpha() for c in name):
        return "a port name has at least one letter"
    if name.startswith("-") or name.endswith("-"):
        return "a port name neither starts nor ends with '-'"
    if "--" in name:
        return "a port name has no '--'"
    return None


@dataclass(frozen=True, slots=True, order=True)
class NamedPort:
    """A port name an endpoint declares: `http=8080/TCP` (a container port's name)."""

    name: str
    port: int
    protocol: Protocol = Protocol.TCP

    def __str__(self) -> str:
        return f"{self.name}={self.port}/{self.protocol.value}"


def parse_named_port(text: str) -> NamedPort:
    """`NAME=PORT[/PROTO]` (protocol TCP, UDP or SCTP; TCP when absent); ValueError names
    what is wrong and the expected form."""
    name, sep, rest = text.strip().partition("=")
    form = "expected NAME=PORT/PROTO, e.g. http=8080/TCP"
    if not sep:
        raise ValueError(f"{text!r}: {form}")
    problem = port_name_problem(name)
    if problem is not None:
        raise ValueError(f"{text!r}: invalid port name {name!r} ({problem})")
    number, _, proto_text = rest.partition("/")
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ValueError(f"{text!r}: port {number!r} is not a number 1-65535 ({form})")
    protocols = {p.value: p for p in (Protocol.TCP, Protocol.UDP, Protocol.SCTP)}
    proto = protocols.get((proto_text or "TCP").upper())
    if proto is None:
        raise ValueError(f"{text!r}: protocol {proto_text!r} is not TCP, UDP or SCTP")
    return NamedPort(name, int(number), proto)


def named_port_map(ports: Iterable[NamedPort]) -> dict[str, frozenset[tuple[int, int]]]:
    """Port names as the resolver takes them: name -> {(IP protocol number, port)}."""
    out: dict[str, set[tuple[int, int]]] = {}
    for np in ports:
        out.setdefault(np.name, set()).add((IP_PROTO[np.protocol], np.port))
    return {name: frozenset(pp) for name, pp in out.items()}


@dataclass(frozen=True, slots=True)
class PortRule:
    """One `toPorts` element. `ports` empty = any port, any protocol.
    `rules` None = L4 only (no redirect)."""

    ports: tuple[PortProtocol, ...] = ()
    rules: L7Rules | None = None


# ICMP type names Cilium accepts, per family.
ICMP_TYPES: dict[str, dict[str, int]] = {
    "IPv4": {
        "EchoReply": 0,
        "DestinationUnreachable": 3,
        "Redirect": 5,
        "Echo": 8,
        "EchoRequest": 8,
        "RouterAdvertisement": 9,
        "RouterSelection": 10,
        "TimeExceeded": 11,
        "ParameterProblem": 12,
        "Timestamp": 13,
        "TimestampReply": 14,
        "Photuris": 40,
        "ExtendedEchoRequest": 42,
        "ExtendedEchoReply": 43,
    },
    "IPv6": {
        "DestinationUnreachable": 1,
        "PacketTooBig": 2,
        "TimeExceeded": 3,
        "ParameterProblem": 4,
        "EchoRequest": 128,
        "EchoReply": 129,
        "MulticastListenerQuery": 130,
        "MulticastListenerReport": 131,
        "MulticastListenerDone": 132,
        "RouterSolicitation": 133,
        "RouterAdvertisement": 134,
        "NeighborSolicitation": 135,
        "NeighborAdvertisement": 136,
        "RedirectMessage": 137,
        "RouterRenumbering": 138,
        "ICMPNodeInformationQuery": 139,
        "ICMPNodeInformationResponse": 140,
        "InverseNeighborDiscoverySolicitation": 141,
        "InverseNeighborDiscoveryAdvertisement": 142,
        "HomeAgentAddressDiscoveryRequest": 144,
        "HomeAgentAddressDiscoveryReply": 145,
        "MobilePrefixSolicitation": 146,
        "MobilePrefixAdvertisement": 147,
        "DuplicateAddressRequestCodeSuffix": 157,
        "DuplicateAddressConfirmationCodeSuffix": 158,
        "ExtendedEchoRequest": 160,
        "ExtendedEchoReply": 161,
    },
}


@dataclass(frozen=True, slots=True)
class ICMPField:
    family: str = "IPv4"  # IPv4 | IPv6
    type: int | str = 0


@dataclass(frozen=True, slots=True)
class EndpointPeer:
    """`fromEndpoints`/`toEndpoints` element, already limited to the policy's namespace
    where the semantics require (see loader)."""

    selector: EndpointSelector


@dataclass(frozen=True, slots=True)
class EntityPeer:
    entity: Entity


@dataclass(frozen=True, slots=True)
class CIDRPeer:
    """`fromCIDR` / `fromCIDRSet` (with `except`) / NetworkPolicy `ipBlock`."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, prefix: IPNetwork) -> bool:
        if prefix.version != self.cidr.version or not prefix.subnet_of(self.cidr):  # type: ignore[arg-type]
            return False
        return not any(
            prefix.version == e.version and prefix.subnet_of(e)  # type: ignore[arg-type]
            for e in self.excepts
        )


Peer = EndpointPeer | EntityPeer | CIDRPeer


@dataclass(frozen=True, slots=True)
class PolicySection:
    """One element of `ingress`, `ingressDeny`, `egress` or `egressDeny`.

    `peers` None = any peer (no peer list was given, which only allows when `to_ports`
    is non-empty — the loader turns "no peers and no ports" into `peers=()`).
    `peers` () = an explicitly empty list: selects nothing.
    `to_ports` () = any port and protocol.
    `icmps` non-empty: the section allows those ICMP types instead of ports.
    """

    peers: tuple[Peer, ...] | None
    to_ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPField, ...] = ()
    ref: RuleRef | None = None
    # `fromRequires` / `toRequires`: grants nothing itself; every peer that any allow rule
    # grants to an endpoint this rule selects must also match all of these (Cilium).
    requires: tuple[EndpointSelector, ...] = ()
    # ClusterNetworkPolicy rules: what a match does (the section is in `ingress`/`egress`,
    # never in a deny list); None for every other kind
    action: TierAction | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """One `spec` (or one element of `specs`, or one NetworkPolicy).

    A direction's tuple is None when its key was absent; present (even empty) means the rule
    has a section for that direction, which switches the direction to default-deny for the
    endpoints it selects unless `default_deny_*` is False.
    """

    endpoint_selector: EndpointSelector
    ingress: tuple[PolicySection, ...] | None = None
    ingress_deny: tuple[PolicySection, ...] | None = None
    egress: tuple[PolicySection, ...] | None = None
    egress_deny: tuple[PolicySection, ...] | None = None
    default_deny_ingress: bool = True
    default_deny_egress: bool = True
    description: str = ""
    # Namespace the rule is limited to (CNP / NetworkPolicy); None = cluster-wide.
    namespace: str | None = None
    # ClusterNetworkPolicy: its tier and priority. Such a rule never switches a direction to
    # default-deny (no implicit isolation): its sections act only where they match.
    tier: Tier | None = None
    priority: int = 0

    def enforces(self, direction: Direction) -> bool:
        if self.tier is not None:
            return False
        if direction is Direction.INGRESS:
            has = self.ingress is not None or self.ingress_deny is not None
            return has and self.default_deny_ingress
        has = self.egress is not None or self.egress_deny is not None
        return has and self.default_deny_egress


@dataclass(frozen=True, slots=True)
class Source:
    """Where a policy was read from: file and 0-based document index."""

    path: str
    document: int = 0
    line: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    kind: PolicyKind
    name: str
    namespace: str | None
    rules: tuple[Rule, ...]
    source: Source | None = None
    labels: tuple[tuple[str, str], ...] = field(default=())
    # `metadata.annotations: {garrison.io/audit: "true"}`: try before enforce. What this
    # policy would deny is let through and recorded AUDIT with its rule; an allow it adds
    # allows nothing (POLICY-SEMANTICS, docs/policy.md "garrison extensions").
    audit: bool = False

    @property
    def key(self) -> tuple[str, str | None, str]:
        """Identity of the policy in a repository: importing the same key replaces it."""
        return (self.kind.value, self.namespace, self.name)
