"""Keeping the kernel's policy map and endpoint flags equal to what the resolver wants.

Order of writes, so that no intermediate state allows what neither the old nor the new
policy allows: the policy entries first (`PolicyDiff.ops`), then the endpoint flags. A
direction that becomes enforced gets its allow entries before default-deny switches on
(allow entries change nothing in an unenforced direction); one that stops being enforced
loses its entries while still enforced (narrower for a moment, never wider).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address

from garrison.bpf.abi import EndpointFlags, deny_response_flags
from garrison.bpf.maps import DatapathMaps, EndpointConfig
from garrison.bpf.policymap import (
    DesiredPolicy,
    PolicyDiff,
    PolicyKey,
    PolicyValue,
    endpoint_flags,
)
from garrison.policies.l7rules import L7Protocol
from garrison.policies.mapstate import MapState
from garrison.policies.resolve import PolicyResolver


@dataclass(frozen=True, slots=True)
class LocalEndpoint:
    """An endpoint whose programs run on this node: its host veth and its identity."""

    ifindex: int
    identity: int
    ipv4: IPv4Address
    audit: bool = False  # the endpoint's own audit mode (`endpoint config NAME audit=true`)
    deny_response: str = "drop"  # `endpoint config NAME deny-response=...` (abi.DENY_RESPONSES)


class PolicySync:
    def __init__(self, maps: DatapathMaps, proxy_ports: Mapping[L7Protocol, int]) -> None:
        self.maps = maps
        self.desired = DesiredPolicy(proxy_ports)
        self._written: dict[int, EndpointConfig] = {}  # what this sync wrote, by ifindex

    def reconcile(
        self, resolver: PolicyResolver, endpoints: Iterable[LocalEndpoint]
    ) -> PolicyDiff:
        """The whole desired state against whatever the kernel holds (agent start, restart
        over pinned maps): writes what is missing or different, deletes what is stale
        (including entries of identities no local endpoint has), then the endpoint flags."""
        eps = list(endpoints)
        wanted = {ep.identity for ep in eps}
        for identity in set(self.desired.identities()) - wanted:
            self.desired.remove(identity)
        for identity in wanted:
            self.desired.replace(resolver.map_state(identity))
        resolver.updates(wanted)  # everything pending is now in `desired`
        diff = self.maps.policy.reconcile(self.desired.entries())
        self._written = self.maps.endpoints.entries()
        self._write_flags(resolver, eps)
        return diff

    def apply_updates(
        self,
        resolver: PolicyResolver,
        identities: Iterable[int],
        endpoints: Iterable[LocalEndpoint],
    ) -> PolicyDiff:
        """After a policy or identity change: only the keys the resolver reports changed
        for `identities` (those with local endpoints), then those endpoints' flags."""
        eps = list(endpoints)
        changed = set(identities)
        local = {ep.identity for ep in eps}
        upserts: dict[PolicyKey, PolicyValue] = {}
        deletes: set[PolicyKey] = set()
        for identity, keys in resolver.updates(changed & local).items():
            changes = {key: resolver.entry(identity, key) for key in keys}
            step = self.desired.update(identity, changes)  # keys of one identity only
            upserts.update(step.upserts)
            deletes |= step.deletes
        diff = PolicyDiff(upserts, frozenset(deletes))
        self.maps.policy.apply(diff)
        self._write_flags(resolver, [ep for ep in eps if ep.identity in changed])
        return diff

    def forget(self, identity: int) -> PolicyDiff:
        """Delete the entries of an identity no local endpoint has any more (call after its
        last endpoint's config and ipcache entry are gone)."""
        diff = self.desired.remove(identity)
        self.maps.policy.apply(diff)
        return diff

    def _write_flags(self, resolver: PolicyResolver, endpoints: list[LocalEndpoint]) -> None:
        states: dict[int, MapState] = {}
        for ep in endpoints:
            state = states.get(ep.identity)
            if state is None:
                state = states[ep.identity] = resolver.map_state(ep.identity)
            flags = endpoint_flags(state) | deny_response_flags(ep.deny_response)
            if ep.audit:
                flags |= EndpointFlags.AUDIT
            config = EndpointConfig(ep.identity, ep.ipv4, flags)
            if self._written.get(ep.ifindex) != config:
                self.maps.endpoints.upsert(ep.ifindex, config)
                self._written[ep.ifindex] = config
