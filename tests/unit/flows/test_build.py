"""What the builders decide for the engine and the datapath reader."""

from __future__ import annotations

import dataclasses
import json

import pytest

from garrison.flows.build import (
    http_url,
    kafka_api_name,
    l3_l4_drop,
    l3_l4_verdict,
    l7_http_request,
    l7_kafka_request,
    proxy_error,
)
from garrison.flows.record import (
    DropReasonDesc,
    FlowRecord,
    FlowType,
    L4Protocol,
    Policy,
    TCPFlags,
    TrafficDirection,
    Verdict,
)
from garrison.policies.mapstate import DropReason, MatchType
from garrison.policies.model import Direction
from tests.unit.flows import samples


def test_refs_go_under_the_direction() -> None:
    record = l7_http_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction=Direction.EGRESS,
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        method="GET",
        path="/",
        allowed_by=[samples.RULE1],
    )
    assert record.traffic_direction is TrafficDirection.EGRESS
    assert record.egress_allowed_by == (
        Policy("rule1", "default", "CiliumNetworkPolicy", "ingress[0]"),
    )
    assert record.ingress_allowed_by == ()


def test_audit_keeps_the_would_be_reason() -> None:
    record = l7_http_request(
        time_ns=samples.T0,
        verdict=Verdict.AUDIT,
        direction="ingress",
        client=samples.XWING,
        server=samples.DEATHSTAR,
        method="PUT",
        path="/v1/exhaust-port",
        drop_reason=DropReasonDesc.POLICY_DENIED,
    )
    assert record.verdict is Verdict.AUDIT
    assert record.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    allowed = l7_http_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.XWING,
        server=samples.DEATHSTAR,
        method="GET",
        path="/",
    )
    assert allowed.drop_reason_desc is None


@pytest.mark.parametrize(
    ("host", "target", "url"),
    [
        ("deathstar", "/v1/", "http://deathstar/v1/"),
        ("deathstar:8080", "/v1/?a=b", "http://deathstar:8080/v1/?a=b"),
        ("", "/v1/", "/v1/"),
        ("proxy", "http://deathstar/v1/", "http://deathstar/v1/"),  # absolute form
    ],
)
def test_http_url(host: str, target: str, url: str) -> None:
    assert http_url(host, target) == url


@pytest.mark.parametrize(
    ("key", "name"),
    [
        (0, "produce"),
        (3, "metadata"),
        (18, "apiversions"),
        (71, "gettelemetrysubscriptions"),
        (999, "999"),
    ],
)
def test_kafka_api_names(key: int, name: str) -> None:
    assert kafka_api_name(key) == name


def test_kafka_topicless_request() -> None:
    record = l7_kafka_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.XWING,
        server=samples.KAFKA,
        api_key=18,
        api_version=3,
        correlation_id=1,
    )
    assert record.summary == "Kafka request apiversions correlation id 1 topic ''"
    assert "topic" not in record.to_dict()["l7"]["kafka"]


@pytest.mark.parametrize(
    ("bits", "names"),
    [
        (0x02, ["SYN"]),
        (0x12, ["SYN", "ACK"]),
        (0x11, ["ACK", "FIN"]),
        (0x1C, ["ACK", "RST", "PSH"]),
    ],
)
def test_tcp_flags_from_header_bits(bits: int, names: list[str]) -> None:
    assert TCPFlags.from_bits(bits).names() == names


def test_udp_carries_no_flags() -> None:
    record = l3_l4_drop(
        time_ns=samples.T0,
        direction="egress",
        source=samples.XWING,
        destination=samples.WORLD,
        reason="POLICY_DENIED",
        protocol="udp",
    )
    assert record.l4 is not None and record.l4.protocol is L4Protocol.UDP
    assert record.l4.flags is None and record.summary == "UDP"


def test_icmp_and_unmodelled_protocols_still_make_a_record() -> None:
    """An ICMP drop (icmps rules are enforced) is a record with Hubble's `l4.ICMPv4.type`;
    a protocol records do not model is a record without `l4`, never a lost one."""
    icmp = l3_l4_drop(
        time_ns=samples.T0,
        direction="ingress",
        source=samples.XWING,
        destination=dataclasses.replace(samples.DEATHSTAR, port=8),
        reason="POLICY_DENIED",
        protocol="icmpv4",
    )
    assert icmp.l4 is not None and icmp.l4.protocol is L4Protocol.ICMPV4
    line = json.loads(icmp.to_json())
    assert line["l4"] == {"ICMPv4": {"type": 8}}
    assert line == icmp.to_dict()
    assert FlowRecord.from_json(icmp.to_json()).l4 == icmp.l4
    other = l3_l4_drop(
        time_ns=samples.T0,
        direction="ingress",
        source=samples.XWING,
        destination=samples.DEATHSTAR,
        reason="POLICY_DENIED",
        protocol=None,
    )
    assert other.l4 is None and "l4" not in json.loads(other.to_json())


def test_drop_reasons_from_the_policy_model() -> None:
    assert DropReasonDesc.of(DropReason.POLICY_DENIED) is DropReasonDesc.POLICY_DENIED
    assert DropReasonDesc.of(DropReason.POLICY_DENY) is DropReasonDesc.POLICY_DENY
    assert DropReasonDesc.POLICY_DENY.code == 181 and DropReasonDesc.PARSE_ERROR.code == 0


def test_policy_verdict_dropped_defaults_to_policy_denied() -> None:
    record = l3_l4_verdict(
        time_ns=samples.T0,
        direction="ingress",
        source=samples.XWING,
        destination=samples.DEATHSTAR,
        verdict=Verdict.DROPPED,
        match_type=MatchType.NONE,
    )
    assert record.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert record.type is FlowType.L3_L4 and record.l7 is None


@pytest.mark.parametrize(
    ("proto", "expected"), [("http", "http"), ("grpc", "grpc"), ("kafka", "kafka")]
)
def test_proxy_error_keeps_the_protocol(proto: str, expected: str) -> None:
    record = proxy_error(
        time_ns=samples.T0,
        direction="ingress",
        client=samples.XWING,
        server=samples.DEATHSTAR,
        protocol=proto,
        error="upstream refused the connection",
        reason=DropReasonDesc.UPSTREAM_ERROR,
    )
    assert record.l7 is not None and record.l7.protocol == expected
    assert record.verdict is Verdict.ERROR
    assert record.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
