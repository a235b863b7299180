"""Endpoints, policy refs and one record of every kind, shared by the flow tests."""

from __future__ import annotations

from garrison.flows.build import (
    l3_l4_drop,
    l3_l4_trace,
    l3_l4_verdict,
    l7_grpc_request,
    l7_grpc_response,
    l7_http_request,
    l7_http_response,
    l7_kafka_request,
    l7_kafka_response,
    proxy_error,
)
from garrison.flows.record import (
    Endpoint,
    FlowRecord,
    TCPFlags,
    TraceObservationPoint,
    Verdict,
)
from garrison.policies.labels import Labels
from garrison.policies.mapstate import DropReason, MatchType
from garrison.policies.refs import PolicyKind, RuleRef

# 2024-11-21T12:00:00.123456789Z
T0 = 1_732_190_400_123_456_789

TIEFIGHTER = Endpoint.of(
    31028,
    Labels.parse("org=empire,class=tiefighter,io.kubernetes.pod.namespace=default"),
    pod_name="tiefighter",
    ip="198.18.0.2",
    port=42690,
)
XWING = Endpoint.of(
    4123,
    Labels.parse("org=alliance,class=xwing,io.kubernetes.pod.namespace=default"),
    pod_name="xwing",
    ip="198.18.0.4",
    port=51812,
)
DEATHSTAR = Endpoint.of(
    16530,
    Labels.parse("org=empire,class=deathstar,io.kubernetes.pod.namespace=default"),
    pod_name="deathstar",
    ip="198.18.0.3",
    port=80,
)
KAFKA = Endpoint.of(
    20111,
    Labels.parse("app=kafka,io.kubernetes.pod.namespace=kafka"),
    pod_name="kafka-0",
    ip="198.18.0.10",
    port=9092,
)
DOOR = Endpoint.of(
    20222,
    Labels.parse("app=door-manager,io.kubernetes.pod.namespace=default"),
    pod_name="door-manager",
    ip="198.18.0.11",
    port=50051,
)
WORLD = Endpoint(identity=2, labels=("reserved:world",), ip="203.0.113.9", port=33000)

RULE1 = RuleRef(PolicyKind.CNP, "default", "rule1", "ingress", 0, 0)
DENY1 = RuleRef(PolicyKind.CCNP, None, "no-xwing", "ingressDeny", 1, 0, has_specs=True)


def http_request_denied() -> FlowRecord:
    return l7_http_request(
        time_ns=T0,
        verdict=Verdict.DROPPED,
        direction="ingress",
        client=TIEFIGHTER,
        server=DEATHSTAR,
        method="PUT",
        path="/v1/exhaust-port",
        host="deathstar",
        headers=[(b"User-Agent", b"curl/7.88.1"), (b"Authorization", b"Bearer s3cret")],
    )


def http_request_allowed() -> FlowRecord:
    return l7_http_request(
        time_ns=T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=TIEFIGHTER,
        server=DEATHSTAR,
        method="POST",
        path="/v1/request-landing",
        host="deathstar",
        allowed_by=[RULE1],
    )


def http_response_allowed() -> FlowRecord:
    return l7_http_response(
        time_ns=T0 + 2_500_000,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=TIEFIGHTER,
        server=DEATHSTAR,
        method="POST",
        path="/v1/request-landing",
        host="deathstar",
        code=200,
        latency_ns=2_500_000,
        headers=[("Content-Type", "text/plain"), ("Set-Cookie", "session=abc")],
        allowed_by=[RULE1],
    )


def kafka_request_denied() -> FlowRecord:
    return l7_kafka_request(
        time_ns=T0,
        verdict=Verdict.DROPPED,
        direction="ingress",
        client=XWING,
        server=KAFKA,
        api_key=0,
        api_version=9,
        correlation_id=7,
        topics=["deathstar-plans"],
    )


def kafka_response_denied() -> FlowRecord:
    return l7_kafka_response(
        time_ns=T0 + 40_000,
        verdict=Verdict.DROPPED,
        direction="ingress",
        client=XWING,
        server=KAFKA,
        api_key=0,
        api_version=9,
        correlation_id=7,
        topics=["deathstar-plans"],
        error_code=29,
        latency_ns=40_000,
    )


def kafka_request_many_topics() -> FlowRecord:
    return l7_kafka_request(
        time_ns=T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=TIEFIGHTER,
        server=KAFKA,
        api_key=1,
        api_version=12,
        correlation_id=42,
        topics=["empire-announce", "deathstar-plans"],
        allowed_by=[RULE1],
    )


def grpc_request_allowed() -> FlowRecord:
    return l7_grpc_request(
        time_ns=T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=TIEFIGHTER,
        server=DOOR,
        service="door.DoorManager",
        method="GetName",
        authority="door-manager:50051",
        allowed_by=[RULE1],
    )


def grpc_response_denied() -> FlowRecord:
    return l7_grpc_response(
        time_ns=T0 + 300_000,
        verdict=Verdict.DROPPED,
        direction="ingress",
        client=XWING,
        server=DOOR,
        service="door.DoorManager",
        method="SetAccessCode",
        status=7,
        latency_ns=300_000,
        authority="door-manager:50051",
    )


def l3_drop_denied() -> FlowRecord:
    return l3_l4_drop(
        time_ns=T0,
        direction="ingress",
        source=XWING,
        destination=DEATHSTAR,
        reason=DropReason.POLICY_DENIED,
    )


def l3_drop_deny_rule() -> FlowRecord:
    return l3_l4_drop(
        time_ns=T0,
        direction="ingress",
        source=XWING,
        destination=DEATHSTAR,
        reason=DropReason.POLICY_DENY,
        denied_by=[DENY1],
    )


def l3_verdict_allowed() -> FlowRecord:
    return l3_l4_verdict(
        time_ns=T0,
        direction="ingress",
        source=TIEFIGHTER,
        destination=DEATHSTAR,
        verdict=Verdict.FORWARDED,
        match_type=MatchType.L3_L4,
        allowed_by=[RULE1],
    )


def l3_verdict_denied_egress() -> FlowRecord:
    return l3_l4_verdict(
        time_ns=T0,
        direction="egress",
        source=XWING,
        destination=WORLD,
        verdict=Verdict.DROPPED,
        match_type=MatchType.NONE,
        protocol="UDP",
        flags=None,
    )


def l3_trace_to_endpoint() -> FlowRecord:
    return l3_l4_trace(
        time_ns=T0,
        source=TIEFIGHTER,
        destination=DEATHSTAR,
        observation_point=TraceObservationPoint.TO_ENDPOINT,
        direction="ingress",
        flags=TCPFlags(syn=True),
        is_reply=False,
    )


def proxy_parse_error() -> FlowRecord:
    return proxy_error(
        time_ns=T0,
        direction="ingress",
        client=XWING,
        server=KAFKA,
        protocol="kafka",
        error="frame length 2147483647 exceeds the 1048576-byte limit",
    )


ALL_KINDS = {
    "http_request_denied": http_request_denied,
    "http_request_allowed": http_request_allowed,
    "http_response_allowed": http_response_allowed,
    "kafka_request_denied": kafka_request_denied,
    "kafka_response_denied": kafka_response_denied,
    "kafka_request_many_topics": kafka_request_many_topics,
    "grpc_request_allowed": grpc_request_allowed,
    "grpc_response_denied": grpc_response_denied,
    "l3_drop_denied": l3_drop_denied,
    "l3_drop_deny_rule": l3_drop_deny_rule,
    "l3_verdict_allowed": l3_verdict_allowed,
    "l3_verdict_denied_egress": l3_verdict_denied_egress,
    "l3_trace_to_endpoint": l3_trace_to_endpoint,
    "proxy_parse_error": proxy_parse_error,
}
