"""The agent's kernel side: the bcc-loaded datapath (`garrison.bpf`) and its plumbing
(`garrison.redirect`), behind the few calls the agent makes.

Write order (from `garrison.bpf.sync`): an identity's policy entries before any endpoint
moves to it; an endpoint's config and ipcache entry before its programs are attached; on
delete, programs and ipcache first. Nothing is flushed on start: pinned maps are reused and
reconciled by diff, so enforcement never has an open window across an agent restart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from garrison.agent.ipcacheclaims import IPCacheClaims
from garrison.bpf.abi import CTFlags, ObservationPoint
from garrison.bpf.loader import Datapath, DatapathConfig
from garrison.bpf.maps import (
    ConntrackEntry,
    CounterValue,
    DatapathEvent,
    EndpointConfig,
    monotonic_ns,
)
from garrison.bpf.policymap import PolicyDiff
from garrison.bpf.sync import LocalEndpoint, PolicySync, local_endpoint_flags
from garrison.identity.model import CIDR_ID_FLAG
from garrison.policies.l7rules import L7Protocol
from garrison.policies.mapstate import PROTOCOL_NAMES
from garrison.policies.model import IPNetwork
from garrison.policies.resolve import PolicyResolver
from garrison.redirect import endpoint as netdev
from garrison.redirect.addresses import AddressWatch, host_addresses
from garrison.redirect.bpffs import ensure_bpffs, prepare_pin_dir
from garrison.redirect.steering import SteeringParts, SteeringRecord, proxy_steering_installed
from garrison.redirect.tc import (
    attach_endpoint_programs,
    attach_netdev_program,
    detach_endpoint_programs,
)
from garrison.redirect.underlay import UnderlayRecord

STEERING_RECORD = "steering.json"  # in the state directory: what this agent added
UNDERLAY_RECORD = "underlay.json"  # in the state directory: the underlay device's from_netdev


def _is_cidr(identity: int) -> bool:
    return bool(identity & CIDR_ID_FLAG)


@dataclass(frozen=True, slots=True)
class Link:
    host_ifname: str
    ifindex: int


class KernelDatapath:
    def __init__(
        self, pin_root: Path, proxy_ports: Mapping[L7Protocol, int], state_dir: Path
    ) -> None:
        self.pin_root = pin_root
        self.proxy_ports = dict(proxy_ports)
        # the steering rule and route are host-wide: record which of them this agent added
        # (across restarts), so that its clean-up removes those and nothing else
        self.steering = SteeringRecord(state_dir / STEERING_RECORD)
        self.steering_added = SteeringParts()
        self.underlay = UnderlayRecord(state_dir / UNDERLAY_RECORD)
        self._dp: Datapath | None = None
        self._sync: PolicySync | None = None
        self.claims = IPCacheClaims()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        ensure_bpffs()
        prepare_pin_dir(self.pin_root)
        self._dp = Datapath.load(DatapathConfig(pin_root=self.pin_root))
        self._sync = PolicySync(self._dp.maps, self.proxy_ports)
        for entry in self._dp.maps.ipcache.entries():  # pinned: what a previous run holds
            if not _is_cidr(entry.identity):
                self.claims.hold(entry.prefix, entry.identity)
        self.steering_added = self.steering.install()

    def close(self) -> None:
        """Release handles only: programs stay attached and maps pinned."""
        if self._dp is not None:
            self._dp.close()
            self._dp = None

    @property
    def dp(self) -> Datapath:
        if self._dp is None:
            raise RuntimeError("the datapath is not loaded")
        return self._dp

    @property
    def sync(self) -> PolicySync:
        assert self._sync is not None
        return self._sync

    # -- endpoints ---------------------------------------------------------------------------

    def create_endpoint(self, name: str, ipv4: str) -> Link:
        link = netdev.create_endpoint(netdev.EndpointSpec(name, IPv4Address(ipv4)))
        return Link(link.host_ifname, link.host_ifindex)

    def adopt_endpoint(
        self, name: str, netns_path: str, ifname: str, ipv4: str | None
    ) -> tuple[Link, str, tuple[str, ...]]:
        """A namespace someone else made: its link, address and what garrison created."""
        link = netdev.adopt_endpoint(
            name, netns_path, ifname, IPv4Address(ipv4) if ipv4 else None
        )
        owned = tuple(k for k, v in link.owned.to_dict().items() if v)
        return Link(link.host_ifname, link.host_ifindex), str(link.ipv4), owned

    def link_of(self, name: str, host_ifname: str | None = None) -> Link | None:
        ifname = host_ifname or netdev.host_ifname_for(name)
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
        return Link(ifname, found[0]) if found else None

    def write_endpoint(
        self, link: Link, identity: int, ipv4: str, resolver: PolicyResolver,
        audit: bool = False, deny_response: str = "drop",
        what_if: PolicyResolver | None = None,
    ) -> None:
        """`audit`: the endpoint's own audit mode, beside what its MapState implies;
        `deny_response`: what its denied connections get back (abi.DENY_RESPONSES);
        `what_if`: the resolver with the audited policies enforced (garrison.bpf.sync)."""
        flags = local_endpoint_flags(resolver, what_if, identity, audit, deny_response)
        config = EndpointConfig(identity, IPv4Address(ipv4), flags)
        self.claims.hold(IPv4Network((IPv4Address(ipv4), 32)), identity)
        self.dp.maps.write_endpoint(link.ifindex, config)

    def attach(self, link: Link) -> bool:
        """True when this created the clsact qdisc."""
        return attach_endpoint_programs(link.ifindex, self.dp.programs)

    def attach_netdev(self, ifindex: int) -> bool:
        """from_netdev on a cluster node's underlay device, recorded in the state directory;
        True when the device's clsact is garrison's (this agent's or a killed one's)."""
        made = attach_netdev_program(ifindex, self.dp.programs.from_netdev)
        return self.underlay.attached(ifindex, made)

    def detach_netdev(self) -> None:
        """Remove what `attach_netdev` recorded (the filter; the clsact when garrison's)."""
        self.underlay.release()

    def delete_endpoint(
        self, name: str, ipv4: str, host_ifname: str | None = None,
        owned: tuple[str, ...] = ("netns", "veth", "clsact"),
    ) -> None:
        """Programs and map entries off, then exactly what `owned` says garrison created."""
        link = self.link_of(name, host_ifname) if host_ifname or "veth" in owned else None
        if link is not None:
            detach_endpoint_programs(link.ifindex, remove_qdisc="clsact" in owned)
            if self._dp is not None:
                self.dp.maps.remove_endpoint(link.ifindex, IPv4Address(ipv4))
        elif self._dp is not None:
            with contextlib.suppress(KeyError):
                self.dp.maps.ipcache.delete(IPv4Network((IPv4Address(ipv4), 32)))
            self.dp.maps.conntrack.delete_address(IPv4Address(ipv4))
        if self._dp is not None:
            self._released(IPv4Network((IPv4Address(ipv4), 32)))
        if "netns" in owned:
            netdev.delete_endpoint(name)
        elif host_ifname:
            netdev.release_endpoint(host_ifname, netdev.Ownership(veth="veth" in owned))

    # -- ipcache (the host, remote endpoints, CIDR identities) -------------------------------

    def set_prefix(self, prefix: IPNetwork, identity: int) -> None:
        """The host's or a remote endpoint's address: it holds the prefix, whatever CIDR
        identity a policy wants there (garrison.agent.ipcacheclaims)."""
        if isinstance(prefix, IPv4Network):
            self.claims.hold(prefix, identity)
            self.dp.maps.ipcache.upsert(prefix, identity)

    def delete_prefix(self, prefix: IPNetwork) -> None:
        if isinstance(prefix, IPv4Network):
            self.dp.maps.ipcache.delete(prefix)
            self._released(prefix)

    def set_cidr_prefix(self, prefix: IPNetwork, identity: int) -> None:
        """A prefix a policy names, unless an endpoint or the host holds exactly it."""
        if isinstance(prefix, IPv4Network) and self.claims.set_cidr(prefix, identity):
            self.dp.maps.ipcache.upsert(prefix, identity)

    def host_addresses(self) -> set[IPv4Address]:
        return host_addresses()

    def address_watch(self) -> AddressWatch:
        return AddressWatch()

    def delete_cidr_prefix(self, prefix: IPNetwork) -> None:
        if isinstance(prefix, IPv4Network) and self.claims.delete_cidr(prefix):
            self.dp.maps.ipcache.delete(prefix)

    def _released(self, prefix: IPv4Network) -> None:
        """Its holder's entry is deleted: a CIDR identity a policy wants there comes back."""
        cidr = self.claims.release(prefix)
        if cidr is not None:
            self.dp.maps.ipcache.upsert(prefix, cidr)

    # -- policy ------------------------------------------------------------------------------

    def reconcile(
        self, resolver: PolicyResolver, endpoints: Iterable[LocalEndpoint],
        what_if: PolicyResolver | None = None,
    ) -> PolicyDiff:
        return self.sync.reconcile(resolver, endpoints, what_if)

    def apply_updates(
        self,
        resolver: PolicyResolver,
        identities: Iterable[int],
        endpoints: Iterable[LocalEndpoint],
        what_if: PolicyResolver | None = None,
    ) -> PolicyDiff:
        return self.sync.apply_updates(resolver, identities, endpoints, what_if)

    # -- inspection --------------------------------------------------------------------------

    def dump_policy(self, identity: int) -> list[dict[str, object]]:
        rows = []
        entries = self.dp.maps.policy.entries([identity])
        for key, value in sorted(entries.items(), key=lambda kv: tuple(kv[0])):
            rows.append({**_jsonable(key._asdict()), **_jsonable(value._asdict())})
        return rows

    def dump_ipcache(self) -> list[dict[str, object]]:
        return [
            {
                "prefix": str(e.prefix),
                "identity": e.identity,
                "ifindex": e.ifindex,
                "local_endpoint": e.local_endpoint,
            }
            for e in sorted(self.dp.maps.ipcache.entries(), key=lambda e: str(e.prefix))
        ]

    def dump_ct(self) -> list[dict[str, object]]:
        """Typed rows, oldest expiry first: names for protocols and flags, seconds left."""
        now = monotonic_ns()
        rows = [ct_row(entry, now) for entry in self.dp.maps.conntrack.entries()]
        rows.sort(key=lambda r: (r["expires_in_s"], r["source"], r["source_port"]))
        return rows

    def gc_ct(self) -> int:
        return self.dp.maps.conntrack.gc()

    def counters(self) -> dict[tuple[ObservationPoint, int], CounterValue]:
        """The datapath's packet counters: (observation point, drop reason or count code)."""
        return self.dp.maps.counters.read()

    def map_usage(self) -> dict[str, tuple[int, int]]:
        return self.dp.map_usage()

    def read_events(self, timeout_ms: int) -> list[DatapathEvent]:
        return self.dp.maps.events.poll(timeout_ms)

    def status(self) -> dict[str, object]:
        return {
            "loaded": self._dp is not None,
            "pin_root": str(self.pin_root),
            "proxy_steering": proxy_steering_installed(),
            "proxy_steering_added": {
                "rule": self.steering_added.rule, "route": self.steering_added.route
            },
            "proxy_ports": {p.value: port for p, port in self.proxy_ports.items()},
        }


TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"),
                  (0x20, "URG"))


def ct_row(entry: ConntrackEntry, now_ns: int) -> dict[str, Any]:
    """One conntrack entry as `garrison bpf ct list -o json` gives it."""
    t = entry.tuple
    return {
        "protocol": PROTOCOL_NAMES.get(t.protocol, str(t.protocol)),
        "source": str(t.saddr),
        "source_port": t.sport,
        "destination": str(t.daddr),
        "destination_port": t.dport,
        "expires_in_s": max(0, (entry.expires_ns - now_ns) // 1_000_000_000),
        "expired": entry.expired(now_ns),
        "flags": [f.name for f in CTFlags if f and f in entry.flags and f.name],
        "tcp_flags_orig": [n for bit, n in TCP_FLAG_NAMES if entry.tcp_flags_orig & bit],
        "tcp_flags_reply": [n for bit, n in TCP_FLAG_NAMES if entry.tcp_flags_reply & bit],
        "packets_orig": entry.packets_orig,
        "packets_reply": entry.packets_reply,
        "src_identity": entry.src_identity,
        "dst_identity": entry.dst_identity,
        "proxy_port": entry.proxy_port or None,
    }


def _jsonable(data: Mapping[str, Any]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in data.items():
        if k == "protocol" and isinstance(v, int):
            out[k] = PROTOCOL_NAMES.get(v, "ANY" if v == 0 else str(v))
        elif isinstance(v, bool | int | float | str) or v is None:
            out[k] = v
        else:
            out[k] = str(v)
    return out
