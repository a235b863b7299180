"""Typed access to the datapath's maps: ipcache, policy, endpoints, conntrack, settings,
counters and the event ring buffer.

Each accessor wraps one bcc table of a loaded `Datapath` (`datapath.maps`); keys and values
are converted between the ABI structs (`garrison.bpf.abi`) and plain typed records here and
nowhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from garrison.bpf import abi
from garrison.bpf.abi import (
    CTFlags,
    DropReason,
    EndpointFlags,
    EventFlags,
    EventType,
    IPCacheFlags,
    MatchType,
    ObservationPoint,
    TrafficDirection,
)
from garrison.bpf.policymap import PolicyDiff, PolicyKey, PolicyValue, diff_entries

Prefix = IPv4Network | IPv4Address | str


def _addr_be(address: IPv4Address) -> int:
    """An address as the kernel stores it (network byte order) read as a host integer."""
    return int.from_bytes(address.packed, "little" if _LITTLE else "big")


def _addr_from_be(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, "little" if _LITTLE else "big"))


_LITTLE = socket.htons(1) != 1


def _network(prefix: Prefix) -> IPv4Network:
    net = ipaddress.ip_network(prefix, strict=False)
    if not isinstance(net, IPv4Network):
        raise ValueError(f"{prefix}: the datapath holds IPv4 prefixes only")
    return net


# ---- ipcache -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IPCacheEntry:
    prefix: IPv4Network
    identity: int
    ifindex: int = 0
    flags: IPCacheFlags = IPCacheFlags.NONE

    @property
    def local_endpoint(self) -> bool:
        return bool(self.flags & IPCacheFlags.LOCAL_ENDPOINT)


class IPCache:
    """IPv4 prefix -> identity. A local endpoint's /32 also names its host veth (ifindex),
    which lets the source side apply the destination's ingress policy."""

    def __init__(self, table: Any) -> None:
        self._table = table

    @staticmethod
    def _key(prefix: Prefix) -> abi.IPCacheKey:
        net = _network(prefix)
        return abi.IPCacheKey(net.prefixlen, _addr_be(net.network_address))

    def upsert(
        self, prefix: Prefix, identity: int, *, ifindex: int = 0, local_endpoint: bool = False
    ) -> None:
        if identity <= 0:
            raise ValueError(f"identity {identity} cannot be stored in the ipcache")
        flags = IPCacheFlags.LOCAL_ENDPOINT if local_endpoint else IPCacheFlags.NONE
        if local_endpoint and not ifindex:
            raise ValueError("a local endpoint entry needs the ifindex of its host veth")
        self._table[self._key(prefix)] = abi.IPCacheValue(identity, ifindex, int(flags))

    def delete(self, prefix: Prefix) -> bool:
        try:
            del self._table[self._key(prefix)]
        except KeyError:
            return False
        return True

    def get(self, prefix: Prefix) -> IPCacheEntry | None:
        """The entry stored for exactly this prefix."""
        for entry in self.entries():
            if entry.prefix == _network(prefix):
                return entry
        return None

    def lookup(self, address: IPv4Address | str) -> int:
        """The identity the datapath sees for `address` (longest prefix; world if none)."""
        key = abi.IPCacheKey(32, _addr_be(IPv4Address(address)))
        try:
            value = self._table[key]
        except KeyError:
            return abi.IDENTITY_WORLD
        return int(value.identity) or abi.IDENTITY_WORLD

    def entries(self) -> list[IPCacheEntry]:
        out = []
        for key, value in self._table.items():
            net = IPv4Network((_addr_from_be(key.addr), key.prefixlen))
            out.append(
                IPCacheEntry(net, value.identity, value.ifindex, IPCacheFlags(value.flags))
            )
        return out

    def reconcile(self, desired: Iterable[IPCacheEntry]) -> tuple[int, int]:
        """Make the map hold exactly `desired` (after a restart over pinned maps): writes
        what is missing or different first, then deletes the rest. (written, deleted)"""
        want = {e.prefix: e for e in desired}
        have = {e.prefix: e for e in self.entries()}
        written = 0
        for prefix, entry in want.items():
            if have.get(prefix) != entry:
                self._table[self._key(prefix)] = abi.IPCacheValue(
                    entry.identity, entry.ifindex, int(entry.flags)
                )
                written += 1
        stale = [prefix for prefix in have if prefix not in want]
        for prefix in stale:
            self.delete(prefix)
        return written, len(stale)


# ---- policy --------------------------------------------------------------------------------


def policy_key_to_abi(key: PolicyKey) -> abi.PolicyKey:
    return abi.PolicyKey(
        prefixlen=abi.POLICY_FIXED_BITS + key.port_prefixlen,
        endpoint_identity=key.endpoint_identity,
        remote_identity=key.remote_identity,
        direction=TrafficDirection.of(key.direction),
        deny=int(key.deny),
        protocol=key.protocol,
        tier=key.tier,
        dport=socket.htons(key.port),
    )


def policy_key_from_abi(key: abi.PolicyKey) -> PolicyKey:
    return PolicyKey(
        endpoint_identity=key.endpoint_identity,
        direction=TrafficDirection(key.direction).model,
        deny=bool(key.deny),
        remote_identity=key.remote_identity,
        protocol=key.protocol,
        port=socket.ntohs(key.dport),
        port_prefixlen=key.prefixlen - abi.POLICY_FIXED_BITS,
        tier=key.tier,
    )


def policy_value_to_abi(value: PolicyValue) -> abi.PolicyValue:
    if value.action:  # a ClusterNetworkPolicy tier entry: its order in the port field
        return abi.PolicyValue(value.order, value.action, value.port_prefixlen)
    flags = abi.POLICY_REDIRECT if value.redirect else 0
    return abi.PolicyValue(value.proxy_port, flags, value.port_prefixlen)


def policy_value_from_abi(value: abi.PolicyValue) -> PolicyValue:
    action = value.flags & (abi.POLICY_ACCEPT | abi.POLICY_DENY | abi.POLICY_PASS)
    if action:
        return PolicyValue(False, 0, value.port_prefixlen, value.proxy_port, action)
    return PolicyValue(
        bool(value.flags & abi.POLICY_REDIRECT), value.proxy_port, value.port_prefixlen
    )


class PolicyMap:
    """The kernel's policy entries of every endpoint identity (see lib/policy.h)."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def write(self, key: PolicyKey, value: PolicyValue) -> None:
        self._table[policy_key_to_abi(key)] = policy_value_to_abi(value)

    def delete(self, key: PolicyKey) -> bool:
        try:
            del self._table[policy_key_to_abi(key)]
        except KeyError:
            return False
        return True

    def entries(self, identities: Iterable[int] | None = None) -> dict[PolicyKey, PolicyValue]:
        wanted = None if identities is None else set(identities)
        out = {}
        for key, value in self._table.items():
            if wanted is not None and key.endpoint_identity not in wanted:
                continue
            out[policy_key_from_abi(key)] = policy_value_from_abi(value)
        return out

    def apply(self, diff: PolicyDiff, room_first: bool = False) -> int:
        """Write a diff in its safe order (`PolicyDiff.ops`); returns the operations done."""
        ops = diff.ops(room_first)
        for key, value in ops:
            if value is None:
                self.delete(key)
            else:
                self.write(key, value)
        return len(ops)

    def reconcile(
        self,
        desired: Mapping[PolicyKey, PolicyValue],
        identities: Iterable[int] | None = None,
        room_first: bool = False,
    ) -> PolicyDiff:
        """Bring the kernel to `desired` and return what it took. With `identities`, only
        those endpoint identities' entries are compared (others are left alone); without,
        entries of identities `desired` does not mention are deleted. `room_first`: stale
        allow entries go first (`PolicyDiff.ops`, for a full map)."""
        actual = self.entries(identities)
        diff = diff_entries(desired, actual)
        self.apply(diff, room_first)
        return diff


# ---- endpoints -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """What the programs on one endpoint's host veth need: its identity, its address (the
    only source address it may send from) and enforcement/audit flags."""

    identity: int
    ipv4: IPv4Address
    flags: EndpointFlags = EndpointFlags.NONE


class EndpointMap:
    """Host-veth ifindex -> EndpointConfig."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def upsert(self, ifindex: int, config: EndpointConfig) -> None:
        self._table[ctypes.c_uint32(ifindex)] = abi.Endpoint(
            config.identity, _addr_be(config.ipv4), int(config.flags), 0
        )

    def delete(self, ifindex: int) -> bool:
        try:
            del self._table[ctypes.c_uint32(ifindex)]
        except KeyError:
            return False
        return True

    def get(self, ifindex: int) -> EndpointConfig | None:
        try:
            value = self._table[ctypes.c_uint32(ifindex)]
        except KeyError:
            return None
        return EndpointConfig(value.identity, _addr_from_be(value.ipv4), EndpointFlags(value.flags))

    def entries(self) -> dict[int, EndpointConfig]:
        return {
            int(k.value): EndpointConfig(v.identity, _addr_from_be(v.ipv4), EndpointFlags(v.flags))
            for k, v in self._table.items()
        }

    def reconcile(self, desired: Mapping[int, EndpointConfig]) -> tuple[int, int]:
        """Make the map hold exactly `desired`; a deleted endpoint's programs drop all it
        sends (fail closed). (written, deleted)"""
        have = self.entries()
        written = 0
        for ifindex, config in desired.items():
            if have.get(ifindex) != config:
                self.upsert(ifindex, config)
                written += 1
        stale = [ifindex for ifindex in have if ifindex not in desired]
        for ifindex in stale:
            self.delete(ifindex)
        return written, len(stale)


# ---- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CTTimeouts:
    """Conntrack lifetimes in seconds, by state."""

    syn_s: int = abi.CT_TIMEOUT_SYN_S_DEFAULT
    tcp_s: int = abi.CT_TIMEOUT_TCP_S_DEFAULT
    close_s: int = abi.CT_TIMEOUT_CLOSE_S_DEFAULT
    other_s: int = abi.CT_TIMEOUT_OTHER_S_DEFAULT


class DatapathSettings:
    def __init__(self, table: Any) -> None:
        self._table = table

    def write(self, timeouts: CTTimeouts) -> None:
        self._table[ctypes.c_uint32(0)] = abi.Config(
            timeouts.syn_s, timeouts.tcp_s, timeouts.close_s, timeouts.other_s
        )

    def read(self) -> CTTimeouts:
        v = self._table[ctypes.c_uint32(0)]
        d = CTTimeouts()
        return CTTimeouts(
            v.ct_timeout_syn_s or d.syn_s,
            v.ct_timeout_tcp_s or d.tcp_s,
            v.ct_timeout_close_s or d.close_s,
            v.ct_timeout_other_s or d.other_s,
        )


# ---- conntrack -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CTTuple:
    """A connection's original direction. ICMP: a query (identifier, 0), any other type
    (0x100 | type, 0x200 | code) (lib/packet.h)."""

    saddr: IPv4Address
    daddr: IPv4Address
    sport: int
    dport: int
    protocol: int

    def to_abi(self) -> abi.CTKey:
        key = abi.CTKey()
        key.saddr = _addr_be(self.saddr)
        key.daddr = _addr_be(self.daddr)
        key.sport = socket.htons(self.sport)
        key.dport = socket.htons(self.dport)
        key.protocol = self.protocol
        return key

    @classmethod
    def from_abi(cls, key: abi.CTKey) -> CTTuple:
        return cls(
            _addr_from_be(key.saddr),
            _addr_from_be(key.daddr),
            socket.ntohs(key.sport),
            socket.ntohs(key.dport),
            key.protocol,
        )


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    tuple: CTTuple
    expires_ns: int
    packets_orig: int
    packets_reply: int
    src_identity: int
    dst_identity: int
    proxy_port: int
    flags: CTFlags
    tcp_flags_orig: int
    tcp_flags_reply: int

    def expired(self, now_ns: int) -> bool:
        return self.expires_ns <= now_ns


def monotonic_ns() -> int:
    """The clock of bpf_ktime_get_ns (CLOCK_MONOTONIC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Conntrack:
    def __init__(self, table: Any) -> None:
        self._table = table

    def entries(self) -> list[ConntrackEntry]:
        return [
            ConntrackEntry(
                CTTuple.from_abi(k),
                v.expires_ns,
                v.packets_orig,
                v.packets_reply,
                v.src_identity,
                v.dst_identity,
                v.proxy_port,
                CTFlags(v.flags),
                v.tcp_flags_orig,
                v.tcp_flags_reply,
            )
            for k, v in self._table.items()
        ]

    def get(self, conn: CTTuple) -> ConntrackEntry | None:
        for entry in self.entries():
            if entry.tuple == conn:
                return entry
        return None

    def delete(self, conn: CTTuple) -> bool:
        try:
            del self._table[conn.to_abi()]
        except KeyError:
            return False
        return True

    def gc(self, now_ns: int | None = None) -> int:
        """Delete expired entries; returns how many. The datapath ignores expired entries
        already, so this only frees room."""
        now = monotonic_ns() if now_ns is None else now_ns
        stale = [k for k, v in self._table.items() if v.expires_ns <= now]
        for key in stale:
            try:
                del self._table[key]
            except KeyError:
                continue
        return len(stale)

    def delete_address(self, address: IPv4Address) -> int:
        """Delete every entry with `address` at either end; returns how many. For an
        endpoint that is gone: the next endpoint given its address must not inherit its
        connections (a packet matching one passes without a policy lookup)."""
        be = _addr_be(address)
        stale = [k for k in self._table if be in (k.saddr, k.daddr)]
        for key in stale:
            with contextlib.suppress(KeyError):
                del self._table[key]
        return len(stale)

    def flush(self) -> int:
        keys = list(self._table.keys())
        for key in keys:
            try:
                del self._table[key]
            except KeyError:
                continue
        return len(keys)


# ---- counters ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CounterValue:
    packets: int
    bytes: int


class Counters:
    """Per observation point: packets forwarded / redirected / audited, events lost, and
    drops by reason (summed over CPUs)."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def read(self) -> dict[tuple[ObservationPoint, int], CounterValue]:
        """(observation point, code) -> totals, non-zero ones only; code is a CounterCode
        or a DropReason number."""
        out = {}
        for obs in ObservationPoint:
            for code in range(256):
                index = abi.counter_index(obs, code)
                per_cpu = self._table[ctypes.c_uint32(index)]
                packets = sum(int(c.packets) for c in per_cpu)
                if packets:
                    out[(obs, code)] = CounterValue(packets, sum(int(c.bytes) for c in per_cpu))
        return out

    def get(self, obs: ObservationPoint, code: int) -> CounterValue:
        per_cpu = self._table[ctypes.c_uint32(abi.counter_index(obs, code))]
        return CounterValue(
            sum(int(c.packets) for c in per_cpu), sum(int(c.bytes) for c in per_cpu)
        )


# ---- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatapathEvent:
    """One ring buffer record: a drop, or one side's verdict on a new connection."""

    time_ns: int
    type: EventType
    reason: DropReason | None
    reason_code: int
    direction: TrafficDirection | None
    match_type: MatchType
    flags: EventFlags
    protocol: int
    tcp_flags: int
    observation_point: ObservationPoint
    ifindex: int
    src_identity: int
    dst_identity: int
    saddr: IPv4Address
    daddr: IPv4Address
    sport: int
    dport: int
    proxy_port: int
    length: int

    @property
    def allowed(self) -> bool:
        return bool(self.flags & EventFlags.ALLOWED)

    @property
    def audit(self) -> bool:
        return bool(self.flags & EventFlags.AUDIT)

    @property
    def redirect(self) -> bool:
        return bool(self.flags & EventFlags.REDIRECT)

    @classmethod
    def from_bytes(cls, data: bytes) -> DatapathEvent:
        ev = abi.Event.from_buffer_copy(data[: ctypes.sizeof(abi.Event)])
        try:
            reason: DropReason | None = DropReason(ev.reason) if ev.reason else None
        except ValueError:
            reason = None
        return cls(
            time_ns=ev.time_ns,
            type=EventType(ev.type),
            reason=reason,
            reason_code=ev.reason,
            direction=TrafficDirection(ev.direction) if ev.direction else None,
            match_type=MatchType(ev.match_type),
            flags=EventFlags(ev.flags),
            protocol=ev.protocol,
            tcp_flags=ev.tcp_flags,
            observation_point=ObservationPoint(ev.obs_point),
            ifindex=ev.ifindex,
            src_identity=ev.src_identity,
            dst_identity=ev.dst_identity,
            saddr=_addr_from_be(ev.saddr),
            daddr=_addr_from_be(ev.daddr),
            sport=ev.sport,
            dport=ev.dport,
            proxy_port=ev.proxy_port,
            length=ev.length,
        )


class EventReader:
    """Reads the pinned ring buffer. `poll()` waits up to `timeout_ms` for records and
    returns what arrived; `drain()` returns what is queued without waiting."""

    def __init__(self, bpf: Any) -> None:
        self._bpf = bpf
        self._pending: list[DatapathEvent] = []
        self._callback: Callable[[Any, Any, int], None] = self._on_record
        bpf[abi.RINGBUF.encode()].open_ring_buffer(self._callback)
        self._open = True

    def _on_record(self, _ctx: Any, data: Any, size: int) -> None:
        self._pending.append(DatapathEvent.from_bytes(ctypes.string_at(data, size)))

    def poll(self, timeout_ms: int = 0) -> list[DatapathEvent]:
        if self._open:
            self._bpf.ring_buffer_poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def drain(self) -> list[DatapathEvent]:
        if self._open:
            self._bpf.ring_buffer_consume()
        out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        self._open = False


class DatapathMaps:
    """Every map of a loaded Datapath, typed.

    An endpoint's identity lives in two places: its endpoint config (the identity its own
    host veth acts as, used at from_container) and its ipcache /32 (what every other
    endpoint sees, used when it is the remote side). `write_endpoint` keeps them together —
    admitting an endpoint and relabelling it are both one call. Write the policy entries of
    a new identity (PolicySync) before moving an endpoint to it.
    """

    def __init__(self, bpf: Any) -> None:
        self.ipcache = IPCache(bpf[b"gar_ipcache"])
        self.policy = PolicyMap(bpf[b"gar_policy"])
        # the what-if state of identities audited policies select (lib/policy.h)
        self.policy_audit = PolicyMap(bpf[b"gar_policy_audit"])
        self.endpoints = EndpointMap(bpf[b"gar_endpoints"])
        self.conntrack = Conntrack(bpf[b"gar_ct"])
        self.settings = DatapathSettings(bpf[b"gar_config"])
        self.counters = Counters(bpf[b"gar_counters"])
        self.events = EventReader(bpf)

    def write_endpoint(self, ifindex: int, config: EndpointConfig) -> None:
        """Admit or relabel a local endpoint: its config, then its ipcache entry."""
        self.endpoints.upsert(ifindex, config)
        self.ipcache.upsert(
            IPv4Network((config.ipv4, 32)), config.identity, ifindex=ifindex,
            local_endpoint=True,
        )

    def remove_endpoint(self, ifindex: int, ipv4: IPv4Address) -> None:
        """Forget a local endpoint: its ipcache entry first (nobody reaches it as itself
        any more), then its config (its programs then drop everything it sends), then its
        connections (`Conntrack.delete_address`)."""
        self.ipcache.delete(IPv4Network((ipv4, 32)))
        self.endpoints.delete(ifindex)
        self.conntrack.delete_address(ipv4)
