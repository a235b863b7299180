"""Which policy applies to a proxied connection: who the client is, whether L3/L4 policy lets
it in at all, and the L7 rule set for it.

`PolicySource` is what the server asks per accepted connection. `StandalonePolicy` answers it
for `garrison proxy` in standalone mode (one destination service, clients mapped to labels by
source address); the agent answers it in transparent mode from the live resolver and ipcache.
Pure: no sockets, no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from garrison.policies.l7rules import L7Protocol, L7RuleSet
from garrison.policies.labels import (
    SOURCE_RESERVED,
    Label,
    Labels,
    endpoint_labels,
)
from garrison.policies.mapstate import PROTO_TCP, LookupResult, lookup
from garrison.policies.model import Direction, IPNetwork, Policy
from garrison.policies.resolve import ResolverConfig, build_resolver
from garrison.policies.selectorcache import WORLD_IDENTITY

DESTINATION_IDENTITY = 256


class PolicyConfigError(ValueError):
    """The policy cannot serve this proxy (e.g. Kafka rules on a port proxied as HTTP)."""


@dataclass(frozen=True, slots=True)
class PeerMapping:
    """`--peer CIDR=k=v,...`: clients from `network` carry `labels` (namespace included)."""

    network: IPNetwork
    labels: Labels
    namespace: str

    @classmethod
    def parse(cls, text: str, default_namespace: str = "default") -> PeerMapping:
        """`127.0.0.2/32=org=empire,class=tiefighter` (optionally `...,ns=NAME`)."""
        cidr, sep, labels_text = text.partition("=")
        if not sep or not labels_text:
            raise ValueError(f"--peer {text!r}: expected CIDR=k=v,... e.g. 127.0.0.2/32=app=web")
        try:
            network = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"--peer {text!r}: {exc}") from exc
        parts = [p.strip() for p in labels_text.split(",") if p.strip()]
        namespace = default_namespace
        own = []
        for part in parts:
            if part.startswith("ns="):
                namespace = part[3:]
            else:
                own.append(part)
        try:
            labels = Labels.parse(own)
        except ValueError as exc:
            raise ValueError(f"--peer {text!r}: {exc}") from exc
        return cls(network, endpoint_labels(labels, namespace), namespace)


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer for one client: its identity, whether L3/L4 admits it, and the L7 rules."""

    identity: int
    labels: Labels
    namespace: str | None
    allowed: bool
    lookup: LookupResult
    ruleset: L7RuleSet
    audit: bool = False
    pod_name: str | None = None  # the client endpoint's name, for flow records
    # the side whose rules apply (the agent: the destination's ingress or the source's
    # egress); None: the proxy's own setting (a standalone proxy judges ingress)
    direction: Direction | None = None


class PolicySource(Protocol):
    def admit(self, src_ip: str, dst_ip: str, dst_port: int) -> Admission: ...


def world_labels() -> Labels:
    return Labels.of([Label("world", "", SOURCE_RESERVED)])


class StandalonePolicy:
    """Ingress policy of one destination (its labels and port) for clients mapped by address.

    Unknown addresses are `reserved:world`. A connection the L3/L4 policy does not allow is
    refused (the datapath would have dropped its SYN). When the port is allowed at L4 only, or
    no policy enforces the destination's ingress, every request passes (still parsed and
    logged): the rule set is allow-all. `destination_selected` says whether any rule selects
    the destination for ingress at all.
    """

    def __init__(
        self,
        policies: Sequence[Policy],
        destination: Labels,
        port: int,
        protocol: L7Protocol,
        peers: Sequence[PeerMapping] = (),
        config: ResolverConfig | None = None,
    ) -> None:
        self.destination = destination
        self.port = port
        self.protocol = protocol
        self.peers = sorted(peers, key=lambda p: p.network.prefixlen, reverse=True)
        ids: dict[Labels, int] = {destination: DESTINATION_IDENTITY}
        for peer in self.peers:
            ids.setdefault(peer.labels, DESTINATION_IDENTITY + len(ids))
        self._ids = ids
        endpoints = [(i, lab) for lab, i in ids.items()]
        # Audited policies (garrison.io/audit) enforce nothing: the others decide
        # (`_state`); `_would` (all of them) names what they would deny, recorded AUDIT.
        enforced = [p for p in policies if not p.audit]
        resolver = full = build_resolver(policies, endpoints, config)
        self._would = None
        if len(enforced) != len(policies):
            self._would = full.map_state(DESTINATION_IDENTITY)
            resolver = build_resolver(enforced, endpoints, config)
        self.audit = resolver.config.audit
        self._state = resolver.map_state(DESTINATION_IDENTITY)
        # False when no rule selects the destination with an ingress section: then nothing
        # the policy files say applies here (often a typo in the destination's labels).
        self.destination_selected = any(
            rule.ingress is not None or rule.ingress_deny is not None
            for _, rule in full.rules_selecting(DESTINATION_IDENTITY)
        )
        self.ingress_enforced = self._state.ingress_enforced
        self._check_protocol()

    def _check_protocol(self) -> None:
        rulesets = list(self._state.l7.items())
        if self._would is not None:
            rulesets += self._would.l7.items()
        for key, ruleset in rulesets:
            if key.direction is Direction.INGRESS and key.port == self.port and (
                ruleset.protocol is not self.protocol
            ):
                raise PolicyConfigError(
                    f"the policy puts {ruleset.protocol.value} rules on port {self.port}, "
                    f"but this proxy parses {self.protocol.value}: start it with "
                    f"--protocol {ruleset.protocol.value}, or fix the policy"
                )

    def classify(self, src_ip: str) -> tuple[int, Labels, str | None]:
        try:
            addr = ipaddress.ip_address(src_ip)
        except ValueError:
            return WORLD_IDENTITY, world_labels(), None
        for peer in self.peers:
            if addr.version == peer.network.version and addr in peer.network:
                return self._ids[peer.labels], peer.labels, peer.namespace
        return WORLD_IDENTITY, world_labels(), None

    def admit(self, src_ip: str, dst_ip: str = "", dst_port: int = 0) -> Admission:
        identity, labels, namespace = self.classify(src_ip)
        result = lookup(self._state, Direction.INGRESS, identity, PROTO_TCP, self.port)
        ruleset = self._ruleset(result)
        if self._would is not None and result.allowed:
            would = lookup(self._would, Direction.INGRESS, identity, PROTO_TCP, self.port)
            if not would.allowed:
                # the audited policies would drop the connection: admitted, and the server
                # records the L3/L4 decision AUDIT with the lookup that would have dropped it
                return Admission(identity, labels, namespace, True, would, ruleset, self.audit)
            layer = self._ruleset(would)
            if layer != ruleset and not (layer.allow_all and not layer.deny_rules):
                ruleset = replace(ruleset, audit_layer=layer)
        allowed = result.allowed or self.audit
        return Admission(identity, labels, namespace, allowed, result, ruleset, self.audit)

    def _ruleset(self, result: LookupResult) -> L7RuleSet:
        if result.allowed and result.l7 is not None and result.redirect is self.protocol:
            return result.l7
        ref = result.refs[0] if result.refs else None
        return L7RuleSet(self.protocol, (), allow_all=True, allow_all_ref=ref)
