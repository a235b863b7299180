"""The compact one-line rendering, exactly as `hubble observe` prints each kind of flow."""

from __future__ import annotations

import pytest

from garrison.flows.build import l3_l4_drop, l3_l4_trace, l3_l4_verdict
from garrison.flows.record import Endpoint, TraceObservationPoint, Verdict
from garrison.flows.render import (
    RenderOptions,
    render_compact,
    render_host,
    render_identity,
    render_time,
)
from garrison.policies.mapstate import DropReason, MatchType
from tests.unit.flows import samples

NO_TIME = RenderOptions(time=False)

EXPECTED = {
    "http_request_denied": "default/tiefighter:42690 (ID:31028) -> default/deathstar:80 "
    "(ID:16530) http-request DROPPED (HTTP/1.1 PUT http://deathstar/v1/exhaust-port)",
    "http_request_allowed": "default/tiefighter:42690 (ID:31028) -> default/deathstar:80 "
    "(ID:16530) http-request FORWARDED (HTTP/1.1 POST http://deathstar/v1/request-landing)",
    "http_response_allowed": "default/tiefighter:42690 (ID:31028) <- default/deathstar:80 "
    "(ID:16530) http-response FORWARDED "
    "(HTTP/1.1 200 2ms (POST http://deathstar/v1/request-landing))",
    "kafka_request_denied": "default/xwing:51812 (ID:4123) -> kafka/kafka-0:9092 (ID:20111) "
    "kafka-request DROPPED (Kafka request produce correlation id 7 topic 'deathstar-plans')",
    "kafka_response_denied": "default/xwing:51812 (ID:4123) <- kafka/kafka-0:9092 (ID:20111) "
    "kafka-response DROPPED "
    "(Kafka response produce correlation id 7 topic 'deathstar-plans' return code 29)",
    "kafka_request_many_topics": "default/tiefighter:42690 (ID:31028) -> kafka/kafka-0:9092 "
    "(ID:20111) kafka-request FORWARDED "
    "(Kafka request fetch correlation id 42 topics 'empire-announce', 'deathstar-plans')",
    "grpc_request_allowed": "default/tiefighter:42690 (ID:31028) -> "
    "default/door-manager:50051 (ID:20222) grpc-request FORWARDED "
    "(gRPC door.DoorManager/GetName)",
    "grpc_response_denied": "default/xwing:51812 (ID:4123) <- default/door-manager:50051 "
    "(ID:20222) grpc-response DROPPED "
    "(gRPC 7 PERMISSION_DENIED 0ms (door.DoorManager/SetAccessCode))",
    "l3_drop_denied": "default/xwing:51812 (ID:4123) <> default/deathstar:80 (ID:16530) "
    "Policy denied DROPPED (TCP Flags: SYN)",
    "l3_drop_deny_rule": "default/xwing:51812 (ID:4123) <> default/deathstar:80 (ID:16530) "
    "Policy denied by denylist DROPPED (TCP Flags: SYN)",
    "l3_verdict_allowed": "default/tiefighter:42690 (ID:31028) -> default/deathstar:80 "
    "(ID:16530) policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)",
    "l3_verdict_denied_egress": "default/xwing:51812 (ID:4123) -> 203.0.113.9:33000 (world) "
    "policy-verdict:none EGRESS DENIED (UDP)",
    "l3_trace_to_endpoint": "default/tiefighter:42690 (ID:31028) -> default/deathstar:80 "
    "(ID:16530) to-endpoint FORWARDED (TCP Flags: SYN)",
    "proxy_parse_error": "default/xwing:51812 (ID:4123) -> kafka/kafka-0:9092 (ID:20111) "
    "kafka-request ERROR (frame length 2147483647 exceeds the 1048576-byte limit)",
}


def test_every_kind_has_an_expected_line() -> None:
    assert set(EXPECTED) == set(samples.ALL_KINDS)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_compact(kind: str) -> None:
    assert render_compact(samples.ALL_KINDS[kind](), NO_TIME) == EXPECTED[kind]


def test_time_in_front_as_hubble() -> None:
    line = render_compact(samples.http_request_denied())
    assert line == "Nov 21 12:00:00.123: " + EXPECTED["http_request_denied"]


def test_node_name() -> None:
    record = l3_l4_drop(
        time_ns=samples.T0,
        direction="ingress",
        source=samples.XWING,
        destination=samples.DEATHSTAR,
        reason=DropReason.POLICY_DENIED,
        node_name="node-1",
    )
    with_time = render_compact(record, RenderOptions(node_name=True))
    assert with_time.startswith("Nov 21 12:00:00.123 [node-1]: default/xwing:51812 ")
    bare = render_compact(record, RenderOptions(time=False, node_name=True))
    assert bare.startswith("[node-1]: default/xwing")


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "Jan  1 00:00:00.000"),  # Go's `_2`: the day padded with a space
        (samples.T0, "Nov 21 12:00:00.123"),
        (1_700_000_000_999_999_999, "Nov 14 22:13:20.999"),
    ],
)
def test_render_time(ns: int, text: str) -> None:
    assert render_time(ns) == text


@pytest.mark.parametrize(
    ("identity", "text"),
    [
        (0, "(unknown)"),
        (1, "(host)"),
        (2, "(world)"),
        (6, "(remote-node)"),
        (8, "(ingress)"),
        (256, "(ID:256)"),
        ((1 << 24) | 5, "(ID:16777221)"),
    ],
)
def test_render_identity(identity: int, text: str) -> None:
    assert render_identity(identity) == text


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [
        (Endpoint(namespace="default", pod_name="xwing", ip="198.18.0.4", port=80),
         "default/xwing:80"),
        (Endpoint(pod_name="xwing", port=80), "xwing:80"),
        (Endpoint(ip="198.18.0.4", port=0), "198.18.0.4"),
        (Endpoint(ip="2001:db8::1", port=443), "[2001:db8::1]:443"),
        (Endpoint(ip="2001:db8::1"), "2001:db8::1"),
        (Endpoint(), "-"),
    ],
)  # fmt: skip
def test_render_host(endpoint: Endpoint, text: str) -> None:
    assert render_host(endpoint) == text


def test_reply_flips_to_the_initiator_side() -> None:
    record = l3_l4_trace(
        time_ns=samples.T0,
        source=samples.DEATHSTAR,
        destination=samples.TIEFIGHTER,
        observation_point=TraceObservationPoint.TO_ENDPOINT,
        direction="ingress",
        flags=None,
        is_reply=True,
    )
    assert render_compact(record, NO_TIME) == (
        "default/tiefighter:42690 (ID:31028) <- default/deathstar:80 (ID:16530) "
        "to-endpoint FORWARDED (TCP)"
    )


def test_audited_policy_verdict() -> None:
    record = l3_l4_verdict(
        time_ns=samples.T0,
        direction="egress",
        source=samples.TIEFIGHTER,
        destination=samples.DEATHSTAR,
        verdict=Verdict.AUDIT,
        match_type=MatchType.NONE,
    )
    assert render_compact(record, NO_TIME).endswith(
        "policy-verdict:none EGRESS AUDITED (TCP Flags: SYN)"
    )


def test_to_proxy_trace() -> None:
    record = l3_l4_trace(
        time_ns=samples.T0,
        source=samples.TIEFIGHTER,
        destination=samples.DEATHSTAR,
        observation_point=TraceObservationPoint.TO_PROXY,
        is_reply=False,
    )
    assert " to-proxy FORWARDED (TCP Flags: SYN)" in render_compact(record, NO_TIME)
