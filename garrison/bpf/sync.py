"""Keeping the kernel's policy map and endpoint flags equal to what the resolver wants.

Order of writes, so that no intermediate state allows what neither the old nor the new
policy allows: the policy entries first (`PolicyDiff.ops`), then the endpoint flags. A
direction that becomes enforced gets its allow entries before default-deny switches on
(allow entries change nothing in an unenforced direction); one that stops being enforced
loses its entries while still enforced (narrower for a moment, never wider).

Policies in audit mode (garrison.io/audit): `what_if` is a second resolver with every policy
enforced, the audited ones included. The identities an audited policy selects get that state
in gar_policy_audit (same layout, same DesiredPolicy bookkeeping) and the endpoint flag
GAR_EP_POLICY_AUDIT with the what-if state's enforcement bits; the kernel looks it up only
for what gar_policy allows, so nothing written there can widen access. Its entries are
written before the flag turns on and deleted after it turns off.
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


def audits(what_if: PolicyResolver | None, identity: int) -> bool:
    """Whether a policy in audit mode (garrison.io/audit) selects `identity`."""
    if what_if is None:
        return False
    return any(policy.audit for policy, _ in what_if.rules_selecting(identity))


def what_if_flags(state: MapState) -> EndpointFlags:
    """The endpoint bits of an audited identity's what-if state."""
    flags = EndpointFlags.POLICY_AUDIT
    if state.ingress_enforced:
        flags |= EndpointFlags.AUDIT_INGRESS_ENFORCED
    if state.egress_enforced:
        flags |= EndpointFlags.AUDIT_EGRESS_ENFORCED
    if state.tiers:
        flags |= EndpointFlags.AUDIT_TIERS
    return flags


def local_endpoint_flags(
    resolver: PolicyResolver, what_if: PolicyResolver | None, identity: int, audit: bool,
    deny_response: str,
) -> EndpointFlags:
    """Every GAR_EP_* bit of a local endpoint."""
    flags = endpoint_flags(resolver.map_state(identity)) | deny_response_flags(deny_response)
    if audit:
        flags |= EndpointFlags.AUDIT
    if what_if is not None and audits(what_if, identity):
        flags |= what_if_flags(what_if.map_state(identity))
    return flags


@dataclass(frozen=True, slots=True)
class LocalEndpoint:
    """An endpoint whose programs run on this node: its host veth and its identity."""

    ifindex: int
    identity: int
    ipv4: IPv4Address
    audit: bool = False  # the endpoint's own audit mode (`endpoint config NAME audit=true`)
    deny_response: str = "drop"  # `endpoint config NAME deny-response=...` (abi.DENY_RESPONSES)


class KernelBehindError(RuntimeError):
    """A kernel map write failed (a map full): the kernel lags what `PolicySync` wants."""


class PolicySync:
    """`behind`: why the kernel lags the desired state (a write failed part-way: by the
    order of `PolicyDiff.ops`, the entries not written leave the previous verdict or a
    drop in force, never wider access), None when it holds it all; `catch_up` retries."""

    def __init__(self, maps: DatapathMaps, proxy_ports: Mapping[L7Protocol, int]) -> None:
        self.behind: str | None = None
        self.maps = maps
        self.desired = DesiredPolicy(proxy_ports)
        # gar_policy_audit: the what-if state of the identities audited policies select
        self.desired_audit = DesiredPolicy(proxy_ports)
        self.audited: set[int] = set()
        self._written: dict[int, EndpointConfig] = {}  # what this sync wrote, by ifindex

    def reconcile(
        self, resolver: PolicyResolver, endpoints: Iterable[LocalEndpoint],
        what_if: PolicyResolver | None = None,
    ) -> PolicyDiff:
        """The whole desired state against whatever the kernel holds (agent start, restart
        over pinned maps): writes what is missing or different, deletes what is stale
        (including entries of identities no local endpoint has), then the endpoint flags.
        Raises KernelBehindError when a write fails (`behind` says why)."""
        try:
            diff = self._reconcile(resolver, endpoints, what_if)
        except Exception as exc:
            raise self._fell_behind(exc) from exc
        self.behind = None
        return diff

    def catch_up(
        self, resolver: PolicyResolver, endpoints: Iterable[LocalEndpoint],
        what_if: PolicyResolver | None = None,
    ) -> PolicyDiff | None:
        """After a failed write: the whole desired state again (`reconcile`), stale allow
        entries first to make room (`PolicyDiff.ops`); None when the kernel was not behind."""
        if self.behind is None:
            return None
        try:
            diff = self._reconcile(resolver, endpoints, what_if, room_first=True)
        except Exception as exc:
            raise self._fell_behind(exc) from exc
        self.behind = None
        return diff

    def _fell_behind(self, exc: Exception) -> KernelBehindError:
        self.behind = (
            f"a kernel map write failed ({exc}): the entries not written keep the previous"
            " verdict or drop (never wider access) and are retried every second; if a map is"
            " full, fewer selected peers or ports free room"
        )
        return KernelBehindError(self.behind)

    def _reconcile(
        self, resolver: PolicyResolver, endpoints: Iterable[LocalEndpoint],
        what_if: PolicyResolver | None = None, room_first: bool = False,
    ) -> PolicyDiff:
        eps = list(endpoints)
        wanted = {ep.identity for ep in eps}
        for identity in set(self.desired.identities()) - wanted:
            self.desired.remove(identity)
        for identity in wanted:
            self.desired.replace(resolver.map_state(identity))
        resolver.updates(wanted)  # everything pending is now in `desired`
        diff = self.maps.policy.reconcile(self.desired.entries(), room_first=room_first)
        audited = {i for i in wanted if audits(what_if, i)}
        for identity in self.audited - audited:
            self.desired_audit.remove(identity)
        if what_if is not None:
            for identity in audited:
                self.desired_audit.replace(what_if.map_state(identity))
            what_if.updates(wanted)
        self.audited = audited
        self.maps.policy_audit.reconcile(self.desired_audit.entries(), room_first=room_first)
        self._written = self.maps.endpoints.entries()
        self._write_flags(resolver, eps, what_if)
        return diff

    def apply_updates(
        self,
        resolver: PolicyResolver,
        identities: Iterable[int],
        endpoints: Iterable[LocalEndpoint],
        what_if: PolicyResolver | None = None,
    ) -> PolicyDiff:
        """After a policy or identity change: only the keys the resolver reports changed
        for `identities` (those with local endpoints), then those endpoints' flags. The
        same for the what-if state of audited identities (`what_if`); an identity that
        stops being audited loses its what-if entries after its flag. Raises
        KernelBehindError when a write fails (the desired state is kept: `catch_up`)."""
        try:
            return self._apply_updates(resolver, identities, endpoints, what_if)
        except Exception as exc:
            raise self._fell_behind(exc) from exc

    def _apply_updates(
        self,
        resolver: PolicyResolver,
        identities: Iterable[int],
        endpoints: Iterable[LocalEndpoint],
        what_if: PolicyResolver | None = None,
    ) -> PolicyDiff:
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
        gone = self._apply_what_if(what_if, changed, local)
        self._write_flags(resolver, [ep for ep in eps if ep.identity in changed], what_if)
        for identity in gone:
            self.maps.policy_audit.apply(self.desired_audit.remove(identity))
        return diff

    def _apply_what_if(
        self, what_if: PolicyResolver | None, changed: set[int], local: set[int]
    ) -> set[int]:
        """The what-if entries of the changed audited identities (written now); returns
        the identities that stop being audited (their entries go after their flags)."""
        audited = {i for i in changed & local if audits(what_if, i)}
        gone = (self.audited & changed) - audited
        gone |= self.audited - local
        if what_if is None:
            gone |= self.audited
        upserts: dict[PolicyKey, PolicyValue] = {}
        deletes: set[PolicyKey] = set()
        if what_if is not None:
            pending = what_if.updates(changed & local)
            for identity in audited:
                if identity in self.audited:
                    keys = pending.get(identity, set())
                    step = self.desired_audit.update(
                        identity, {key: what_if.entry(identity, key) for key in keys}
                    )
                else:  # newly audited: its whole what-if state
                    step = self.desired_audit.replace(what_if.map_state(identity))
                upserts.update(step.upserts)
                deletes |= step.deletes
        self.maps.policy_audit.apply(PolicyDiff(upserts, frozenset(deletes)))
        self.audited = (self.audited - gone) | audited
        return gone

    def forget(self, identity: int) -> PolicyDiff:
        """Delete the entries of an identity no local endpoint has any more (call after its
        last endpoint's config and ipcache entry are gone)."""
        diff = self.desired.remove(identity)
        self.maps.policy.apply(diff)
        if identity in self.audited:
            self.audited.discard(identity)
            self.maps.policy_audit.apply(self.desired_audit.remove(identity))
        return diff

    def _write_flags(
        self, resolver: PolicyResolver, endpoints: list[LocalEndpoint],
        what_if: PolicyResolver | None = None,
    ) -> None:
        states: dict[int, EndpointFlags] = {}
        for ep in endpoints:
            policy_flags = states.get(ep.identity)
            if policy_flags is None:
                policy_flags = endpoint_flags(resolver.map_state(ep.identity))
                if what_if is not None and ep.identity in self.audited:
                    policy_flags |= what_if_flags(what_if.map_state(ep.identity))
                states[ep.identity] = policy_flags
            flags = policy_flags | deny_response_flags(ep.deny_response)
            if ep.audit:
                flags |= EndpointFlags.AUDIT
            config = EndpointConfig(ep.identity, ep.ipv4, flags)
            if self._written.get(ep.ifindex) != config:
                self.maps.endpoints.upsert(ep.ifindex, config)
                self._written[ep.ifindex] = config
