"""Datapath events → flow records, the same record type the proxy writes, so a kernel drop
and an L7 deny are reviewed the same way.

Time: the kernel stamps events with the monotonic clock; records carry wall-clock time, so
the offset between the two is taken once per conversion.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from garrison.bpf.abi import DropReason, EventFlags, EventType
from garrison.bpf.maps import DatapathEvent
from garrison.flows.build import l3_l4_drop, l3_l4_verdict
from garrison.flows.record import (
    DropReasonDesc,
    Endpoint,
    FlowRecord,
    L4Protocol,
    TCPFlags,
    TrafficDirection,
    Verdict,
)
from garrison.policies.labels import Labels
from garrison.policies.mapstate import PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, lookup
from garrison.policies.mapstate import DropReason as ModelDropReason
from garrison.policies.mapstate import MatchType as ModelMatchType
from garrison.policies.model import Direction
from garrison.policies.refs import RuleRef
from garrison.policies.trace import rule_refs

if TYPE_CHECKING:
    from garrison.agent.daemon import Agent

# Every reason the datapath drops for, by its Hubble name: none of them reads as "unknown".
DROP_REASONS = {
    DropReason.POLICY_DENIED: DropReasonDesc.POLICY_DENIED,
    DropReason.POLICY_DENY: DropReasonDesc.POLICY_DENY,
    DropReason.PROXY_NOT_LISTENING: DropReasonDesc.PROXY_NOT_LISTENING,
    DropReason.PROXY_ASSIGN_FAILED: DropReasonDesc.PROXY_NOT_LISTENING,
    DropReason.INVALID_SOURCE_IP: DropReasonDesc.INVALID_SOURCE_IP,
    DropReason.INVALID_PACKET: DropReasonDesc.INVALID_PACKET_DROPPED,
    DropReason.UNSUPPORTED_L3: DropReasonDesc.UNSUPPORTED_L3_PROTOCOL,
    DropReason.CT_INSERT_FAILED: DropReasonDesc.CT_MAP_INSERTION_FAILED,
    DropReason.FRAGMENT: DropReasonDesc.IP_FRAGMENTATION_NOT_SUPPORTED,
    DropReason.NO_ENDPOINT_CONFIG: (
        DropReasonDesc.NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION
    ),
    DropReason.PROXY_REDIRECT_UNSUPPORTED: (
        DropReasonDesc.PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL
    ),
}


_PROTOCOLS = {
    PROTO_TCP: L4Protocol.TCP,
    PROTO_UDP: L4Protocol.UDP,
    PROTO_SCTP: L4Protocol.SCTP,
    PROTO_ICMP: L4Protocol.ICMPV4,
}


def _endpoint(agent: Agent, identity: int, ip: str, port: int) -> Endpoint:
    ep = agent.endpoints.by_ip(ip)
    labels = agent.resolver.cache.labels_of(identity) or Labels()
    if ep is not None:
        name = ep.name
    elif agent.cluster is not None:  # another node's endpoint: its name came through etcd
        name = agent.cluster.remote_endpoint_name(ip)
    else:
        name = ""
    return Endpoint.of(
        identity,
        labels,
        namespace=ep.namespace if ep else None,
        pod_name=name,
        ip=ip,
        port=port,
    )


def _sender(agent: Agent, event: DatapathEvent) -> Endpoint:
    """The source of a packet dropped for a source address that is not its endpoint's: the
    endpoint that sent it (the host veth the event names), with the address it claimed —
    never the endpoint that address belongs to, which sent nothing."""
    ep = agent.endpoint_of_ifindex(event.ifindex)
    if ep is None:
        return Endpoint.of(event.src_identity, Labels(), ip=str(event.saddr), port=event.sport)
    labels = agent.resolver.cache.labels_of(event.src_identity) or Labels()
    return Endpoint.of(event.src_identity, labels, namespace=ep.namespace, pod_name=ep.name,
                       ip=str(event.saddr), port=event.sport)


def deny_response_of(event: DatapathEvent) -> str:
    """The answer a dropped packet got (`endpoint config NAME deny-response=...`), by the
    setting's name; "" for a silent drop."""
    if event.flags & EventFlags.DENY_RESPONSE_TCP_RESET:
        return "tcp-reset"
    if event.flags & EventFlags.DENY_RESPONSE_ICMP:
        return "icmp"
    return ""


def audited_by(agent: Agent, event: DatapathEvent) -> tuple[RuleRef, ...]:
    """The rules of policies in audit mode (garrison.io/audit) that would have denied a
    connection the enforced policy allowed (a verdict event flagged AUDIT and allowed by
    gar_policy): an audited deny rule, or the audited rules that make the direction
    default-deny. Empty when no audited policy selects the deciding endpoint."""
    what_if = agent.resolver.what_if
    if what_if is None or event.direction is None:
        return ()
    direction = event.direction.model
    if direction is Direction.INGRESS:
        identity, remote = event.dst_identity, event.src_identity
    else:
        identity, remote = event.src_identity, event.dst_identity
    try:
        enforced = agent.resolver.map_state(identity)
        state = what_if.map_state(identity)
    except KeyError:
        return ()
    if not lookup(enforced, direction, remote, event.protocol, event.dport).allowed:
        return ()  # the endpoint's own audit mode let through what is enforced as denied
    result = lookup(state, direction, remote, event.protocol, event.dport)
    if result.allowed:
        return ()
    if result.drop_reason is ModelDropReason.POLICY_DENY:
        return result.refs
    return tuple(
        ref
        for policy, rule in what_if.enforcing_rules(identity, direction)
        if policy.audit
        for ref in rule_refs(policy, rule, direction)
    )


def wall_ns(monotonic_ns: int) -> int:
    return time.time_ns() - (time.monotonic_ns() - monotonic_ns)


def event_to_record(agent: Agent, event: DatapathEvent) -> FlowRecord | None:
    """The flow record of one event; None for events that make no record."""
    if event.type is EventType.DROP and event.reason == DropReason.INVALID_SOURCE_IP:
        src = _sender(agent, event)
    else:
        src = _endpoint(agent, event.src_identity, str(event.saddr), event.sport)
    dst = _endpoint(agent, event.dst_identity, str(event.daddr), event.dport)
    proto = _PROTOCOLS.get(event.protocol)  # None: recorded without an l4 part
    flags = TCPFlags.from_bits(event.tcp_flags) if proto is L4Protocol.TCP else None
    # some drops happen before any policy direction applies (a redirect with no proxy socket,
    # a packet that cannot be parsed): Hubble's TRAFFIC_DIRECTION_UNKNOWN
    direction: Direction | TrafficDirection = (
        event.direction.model if event.direction is not None
        else TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN
    )
    node = agent.config.node_name
    if event.type is EventType.DROP:
        reason = DROP_REASONS.get(event.reason, DropReasonDesc.DROP_REASON_UNKNOWN) if (
            event.reason is not None
        ) else DropReasonDesc.DROP_REASON_UNKNOWN
        return l3_l4_drop(
            time_ns=wall_ns(event.time_ns),
            direction=direction,
            source=src,
            destination=dst,
            reason=reason,
            protocol=proto,
            flags=flags,
            node_name=node,
            deny_response=deny_response_of(event),
        )
    if event.allowed and not event.audit and event.match_type.model is ModelMatchType.NONE:
        return None  # an unenforced direction let it pass: no policy decided anything
    denied_by: tuple[RuleRef, ...] = ()
    if event.audit and not event.allowed:
        verdict = Verdict.AUDIT
        denied_by = audited_by(agent, event)
    elif event.allowed:
        verdict = Verdict.FORWARDED
    else:
        verdict = Verdict.DROPPED
    verdict_reason = DROP_REASONS.get(event.reason) if event.reason is not None else None
    return l3_l4_verdict(
        time_ns=wall_ns(event.time_ns),
        direction=direction,
        source=src,
        destination=dst,
        verdict=verdict,
        match_type=event.match_type.model,
        protocol=proto,
        flags=flags,
        drop_reason=verdict_reason,
        denied_by=denied_by,
        node_name=node,
    )
