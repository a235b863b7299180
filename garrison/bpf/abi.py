"""The datapath ABI in Python: the one mirror of `abi.h`.

Structures are ctypes mirrors of the C structs (same field names, order and padding);
constants carry the C names without the `GAR_` prefix. `tests/unit/bpf/test_abi.py` checks
every `#define` of abi.h against this module and `tests/privileged/test_datapath_abi.py`
checks sizes and offsets against what bcc compiled. Nothing here needs bcc or root.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum, IntFlag
from pathlib import Path

from garrison.policies.mapstate import DropReason as ModelDropReason
from garrison.policies.mapstate import MatchType as ModelMatchType
from garrison.policies.model import Direction

ABI_HEADER = Path(__file__).with_name("abi.h")

# ---- Marks ---------------------------------------------------------------------------------
MARK_MASK = 0x0F00
MARK_TO_PROXY = 0x0200
MARK_PROXY_UPSTREAM = 0x0B00
"""The SO_MARK the proxy sets on its upstream sockets (see abi.h for what the datapath does
with it): `sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK_PROXY_UPSTREAM)`."""
MARK_DENY_RESPONSE = 0x0C00
"""On an answer to_container made for a denied packet, redirected towards the sender through
the ingress of the same host veth: from_container passes it (see abi.h)."""
PROXY_ROUTE_TABLE = 2004
PROXY_LISTEN_ADDR = 0x7F000001

# ---- Identities ----------------------------------------------------------------------------
IDENTITY_ANY = 0
IDENTITY_HOST = 1
IDENTITY_WORLD = 2

# ---- Policy key layout ---------------------------------------------------------------------
POLICY_FIXED_BITS = 96
POLICY_FULL_BITS = 112
POLICY_REDIRECT = 0x1
POLICY_ACCEPT = 0x2
POLICY_DENY = 0x4
POLICY_PASS = 0x8
POLICY_TIER_NETWORKPOLICY = 0
POLICY_TIER_ADMIN = 1
POLICY_TIER_BASELINE = 2

# ---- Conntrack timeouts (seconds) ----------------------------------------------------------
CT_TIMEOUT_SYN_S_DEFAULT = 60
CT_TIMEOUT_TCP_S_DEFAULT = 21600
CT_TIMEOUT_CLOSE_S_DEFAULT = 10
CT_TIMEOUT_OTHER_S_DEFAULT = 60

COUNTERS_MAX = 512

# ---- Answers for denied packets: the per-CPU token bucket ----------------------------------
DENY_RESPONSE_INTERVAL_NS = 1_000_000
"""One answer per millisecond per CPU (1000/s), as Linux's own icmp_msgs_per_sec."""
DENY_RESPONSE_BURST = 50


class TrafficDirection(IntEnum):
    """GAR_DIR_*: which side's policy (Hubble's TrafficDirection numbers)."""

    INGRESS = 1
    EGRESS = 2

    @classmethod
    def of(cls, direction: Direction) -> TrafficDirection:
        return cls.INGRESS if direction is Direction.INGRESS else cls.EGRESS

    @property
    def model(self) -> Direction:
        return Direction.INGRESS if self is TrafficDirection.INGRESS else Direction.EGRESS


class ObservationPoint(IntEnum):
    """GAR_OBS_*."""

    FROM_CONTAINER = 1
    TO_CONTAINER = 2


class MatchType(IntEnum):
    """GAR_MATCH_* (Cilium's policy-verdict numbering)."""

    NONE = 0
    L3_ONLY = 1
    L3_L4 = 2
    L4_ONLY = 3
    ALL = 4
    L3_PROTO = 5
    PROTO_ONLY = 6

    @property
    def model(self) -> ModelMatchType:
        return _MATCH_TO_MODEL[self]

    @classmethod
    def of(cls, match: ModelMatchType) -> MatchType:
        return _MODEL_TO_MATCH[match]


_MATCH_TO_MODEL = {
    MatchType.NONE: ModelMatchType.NONE,
    MatchType.L3_ONLY: ModelMatchType.L3_ONLY,
    MatchType.L3_L4: ModelMatchType.L3_L4,
    MatchType.L4_ONLY: ModelMatchType.L4_ONLY,
    MatchType.ALL: ModelMatchType.ALL,
    MatchType.L3_PROTO: ModelMatchType.L3_PROTO,
    MatchType.PROTO_ONLY: ModelMatchType.PROTO_ONLY,
}
_MODEL_TO_MATCH = {v: k for k, v in _MATCH_TO_MODEL.items()}


class DropReason(IntEnum):
    """GAR_DROP_* (Hubble's DropReason numbers and names)."""

    INVALID_SOURCE_IP = 132
    POLICY_DENIED = 133
    INVALID_PACKET = 134
    UNSUPPORTED_L3 = 139
    CT_INSERT_FAILED = 155
    FRAGMENT = 157
    NO_ENDPOINT_CONFIG = 165
    PROXY_NOT_LISTENING = 178
    PROXY_ASSIGN_FAILED = 179
    PROXY_REDIRECT_UNSUPPORTED = 180
    POLICY_DENY = 181

    @property
    def model(self) -> ModelDropReason | None:
        """The model's reason for the two policy drops, None for the others."""
        if self is DropReason.POLICY_DENIED:
            return ModelDropReason.POLICY_DENIED
        if self is DropReason.POLICY_DENY:
            return ModelDropReason.POLICY_DENY
        return None

    @property
    def description(self) -> str:
        return DROP_DESCRIPTIONS[self]


DROP_DESCRIPTIONS: dict[DropReason, str] = {
    DropReason.INVALID_SOURCE_IP: "source address is not the endpoint's",
    DropReason.POLICY_DENIED: "policy denied: no rule allows it",
    DropReason.INVALID_PACKET: "truncated or invalid headers",
    DropReason.UNSUPPORTED_L3: "neither IPv4 nor ARP",
    DropReason.CT_INSERT_FAILED: "conntrack table insert failed",
    DropReason.FRAGMENT: "IP fragments are not supported",
    DropReason.NO_ENDPOINT_CONFIG: "no endpoint configuration for this interface",
    DropReason.PROXY_NOT_LISTENING: "redirect to proxy: no proxy socket is listening",
    DropReason.PROXY_ASSIGN_FAILED: "redirect to proxy: socket assignment failed",
    DropReason.PROXY_REDIRECT_UNSUPPORTED: (
        "redirect to proxy needed where it cannot happen (source is not a local endpoint)"
    ),
    DropReason.POLICY_DENY: "policy deny: an explicit deny rule matches",
}

# Hubble's names (flow.proto DropReason) where they differ from ours.
HUBBLE_DROP_NAMES: dict[DropReason, str] = {
    DropReason.INVALID_PACKET: "INVALID_PACKET_DROPPED",
    DropReason.UNSUPPORTED_L3: "UNSUPPORTED_L3_PROTOCOL",
    DropReason.CT_INSERT_FAILED: "CT_MAP_INSERTION_FAILED",
    DropReason.FRAGMENT: "IP_FRAGMENTATION_NOT_SUPPORTED",
    DropReason.NO_ENDPOINT_CONFIG: "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
    DropReason.PROXY_NOT_LISTENING: "SOCKET_LOOKUP_FAILED",
    DropReason.PROXY_ASSIGN_FAILED: "SOCKET_ASSIGN_FAILED",
    DropReason.PROXY_REDIRECT_UNSUPPORTED: "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL",
}


class EndpointFlags(IntFlag):
    """GAR_EP_*."""

    NONE = 0
    INGRESS_ENFORCED = 0x1
    EGRESS_ENFORCED = 0x2
    AUDIT = 0x4
    DENY_RESPONSE_ICMP = 0x8
    DENY_RESPONSE_TCP_RESET = 0x10
    TIERS = 0x20  # has ClusterNetworkPolicy (Admin / Baseline) entries: look them up
    # audited policies select it: its what-if state is in gar_policy_audit (abi.h)
    POLICY_AUDIT = 0x40
    AUDIT_INGRESS_ENFORCED = 0x80
    AUDIT_EGRESS_ENFORCED = 0x100
    AUDIT_TIERS = 0x200


DENY_RESPONSES: dict[str, EndpointFlags] = {
    "drop": EndpointFlags.NONE,
    "icmp": EndpointFlags.DENY_RESPONSE_ICMP,
    "tcp-reset": EndpointFlags.DENY_RESPONSE_TCP_RESET,
}
"""`garrison endpoint config NAME deny-response=VALUE`: the endpoint flag of each value
(`drop`, the default, sets none)."""


def deny_response_flags(value: str) -> EndpointFlags:
    """The flag of a deny-response setting; an unknown one (a registry written by a later
    version) is the default, a silent drop: answers never change what is allowed."""
    return DENY_RESPONSES.get(value, EndpointFlags.NONE)


class IPCacheFlags(IntFlag):
    """GAR_IPCACHE_*."""

    NONE = 0
    LOCAL_ENDPOINT = 0x1


class CTFlags(IntFlag):
    """GAR_CT_*."""

    NONE = 0
    SEEN_REPLY = 0x0001
    ESTABLISHED = 0x0002
    FIN_ORIG = 0x0004
    FIN_REPLY = 0x0008
    RST = 0x0010
    EGRESS_DONE = 0x0020
    INGRESS_DONE = 0x0040
    REDIRECT = 0x0080
    PROXY_UPSTREAM = 0x0100
    AUDIT = 0x0200


class CounterCode(IntEnum):
    """GAR_COUNT_*: counter codes that are not drop reasons."""

    FORWARDED = 0
    REDIRECTED = 1
    AUDITED = 2
    EVENTS_LOST = 3
    DENY_RESPONSE_SENT = 4
    DENY_RESPONSE_LIMITED = 5


def counter_index(obs: ObservationPoint, code: int) -> int:
    """GAR_COUNTER_INDEX."""
    return (((obs - 1) & 0x1) << 8) | (code & 0xFF)


class EventType(IntEnum):
    """GAR_EVENT_*."""

    DROP = 1
    POLICY_VERDICT = 2


class EventFlags(IntFlag):
    """GAR_EVENT_F_*."""

    NONE = 0
    ALLOWED = 0x01
    AUDIT = 0x02
    REDIRECT = 0x04
    DENY_RESPONSE_ICMP = 0x08
    DENY_RESPONSE_TCP_RESET = 0x10


# ---- Structures ----------------------------------------------------------------------------
_u8, _u16, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class Endpoint(ctypes.Structure):
    _fields_ = [("identity", _u32), ("ipv4", _u32), ("flags", _u32), ("pad", _u32)]


class Config(ctypes.Structure):
    _fields_ = [
        ("ct_timeout_syn_s", _u32),
        ("ct_timeout_tcp_s", _u32),
        ("ct_timeout_close_s", _u32),
        ("ct_timeout_other_s", _u32),
    ]


class IPCacheKey(ctypes.Structure):
    _fields_ = [("prefixlen", _u32), ("addr", _u32)]


class IPCacheValue(ctypes.Structure):
    _fields_ = [("identity", _u32), ("ifindex", _u32), ("flags", _u32)]


class PolicyKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", _u32),
        ("endpoint_identity", _u32),
        ("remote_identity", _u32),
        ("direction", _u8),
        ("deny", _u8),
        ("protocol", _u8),
        ("tier", _u8),
        ("dport", _u16),
        ("pad1", _u16),
    ]


class PolicyValue(ctypes.Structure):
    _fields_ = [("proxy_port", _u16), ("flags", _u8), ("port_prefixlen", _u8)]


class CTKey(ctypes.Structure):
    _fields_ = [
        ("saddr", _u32),
        ("daddr", _u32),
        ("sport", _u16),
        ("dport", _u16),
        ("protocol", _u8),
        ("pad", _u8 * 3),
    ]


class CTEntry(ctypes.Structure):
    _fields_ = [
        ("expires_ns", _u64),
        ("packets_orig", _u64),
        ("packets_reply", _u64),
        ("src_identity", _u32),
        ("dst_identity", _u32),
        ("proxy_port", _u16),
        ("flags", _u16),
        ("tcp_flags_orig", _u8),
        ("tcp_flags_reply", _u8),
        ("pad", _u8 * 2),
    ]


class Counter(ctypes.Structure):
    _fields_ = [("packets", _u64), ("bytes", _u64)]


class Event(ctypes.Structure):
    _fields_ = [
        ("time_ns", _u64),
        ("type", _u8),
        ("reason", _u8),
        ("direction", _u8),
        ("match_type", _u8),
        ("flags", _u8),
        ("protocol", _u8),
        ("tcp_flags", _u8),
        ("obs_point", _u8),
        ("ifindex", _u32),
        ("src_identity", _u32),
        ("dst_identity", _u32),
        ("saddr", _u32),
        ("daddr", _u32),
        ("sport", _u16),
        ("dport", _u16),
        ("proxy_port", _u16),
        ("pad", _u16),
        ("length", _u32),
    ]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "gar_endpoint": Endpoint,
    "gar_config": Config,
    "gar_ipcache_key": IPCacheKey,
    "gar_ipcache_value": IPCacheValue,
    "gar_policy_key": PolicyKey,
    "gar_policy_value": PolicyValue,
    "gar_ct_key": CTKey,
    "gar_ct_entry": CTEntry,
    "gar_counter": Counter,
    "gar_event": Event,
}
"""C struct name -> mirror; what the ABI tests walk."""

# Map name -> (key type, value type) as the programs declare them.
MAPS: dict[str, tuple[type, type]] = {
    "gar_endpoints": (ctypes.c_uint32, Endpoint),
    "gar_config": (ctypes.c_uint32, Config),
    "gar_ipcache": (IPCacheKey, IPCacheValue),
    "gar_policy": (PolicyKey, PolicyValue),
    "gar_policy_audit": (PolicyKey, PolicyValue),
    "gar_ct": (CTKey, CTEntry),
    "gar_counters": (ctypes.c_uint32, Counter),
}
RINGBUF = "gar_events"
