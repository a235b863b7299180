"""Flow records → JSON with Hubble's keys, field by field, and back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.flows.codec import format_time, parse_time, record_to_dict
from garrison.flows.record import (
    GRPC,
    HTTP,
    Aggregate,
    DropReasonDesc,
    Endpoint,
    EventType,
    FlowDecodeError,
    FlowRecord,
    FlowType,
    HTTPHeader,
    Kafka,
    L4Protocol,
    L7FlowType,
    Layer4,
    Layer7,
    Policy,
    TCPFlags,
    TraceObservationPoint,
    TrafficDirection,
    Verdict,
)
from garrison.policies.mapstate import MatchType
from tests.unit.flows import samples

# Every top-level key a record may have: Hubble's, plus garrison's `error`.
HUBBLE_KEYS = {
    "time",
    "verdict",
    "IP",
    "l4",
    "source",
    "destination",
    "Type",
    "node_name",
    "l7",
    "event_type",
    "traffic_direction",
    "policy_match_type",
    "trace_observation_point",
    "drop_reason_desc",
    "is_reply",
    "Summary",
    "egress_allowed_by",
    "ingress_allowed_by",
    "egress_denied_by",
    "ingress_denied_by",
    "aggregate",
}
GARRISON_KEYS = {"error"}

TOP_LEVEL_KEYS = {
    "http_request_denied": {
        "time", "verdict", "IP", "l4", "source", "destination", "Type", "l7", "event_type",
        "traffic_direction", "drop_reason_desc", "is_reply", "Summary",
    },
    "http_response_allowed": {
        "time", "verdict", "IP", "l4", "source", "destination", "Type", "l7", "event_type",
        "traffic_direction", "is_reply", "Summary", "ingress_allowed_by",
    },
    "l3_drop_denied": {
        "time", "verdict", "IP", "l4", "source", "destination", "Type", "event_type",
        "traffic_direction", "drop_reason_desc", "Summary",
    },
    "l3_verdict_allowed": {
        "time", "verdict", "IP", "l4", "source", "destination", "Type", "event_type",
        "traffic_direction", "policy_match_type", "is_reply", "Summary", "ingress_allowed_by",
    },
    "l3_trace_to_endpoint": {
        "time", "verdict", "IP", "l4", "source", "destination", "Type", "event_type",
        "traffic_direction", "trace_observation_point", "is_reply", "Summary",
    },
    "proxy_parse_error": {
        "time", "verdict", "IP", "l4", "source", "destination", "Type", "l7", "event_type",
        "traffic_direction", "drop_reason_desc", "is_reply", "Summary", "error",
    },
}  # fmt: skip


def dig(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


# (record kind, JSON path, expected value)
FIELDS: list[tuple[str, str, Any]] = [
    # HTTP request denied
    ("http_request_denied", "time", "2024-11-21T12:00:00.123456789Z"),
    ("http_request_denied", "verdict", "DROPPED"),
    ("http_request_denied", "drop_reason_desc", "POLICY_DENIED"),
    ("http_request_denied", "Type", "L7"),
    ("http_request_denied", "event_type", {"type": 129}),
    ("http_request_denied", "traffic_direction", "INGRESS"),
    ("http_request_denied", "is_reply", False),
    ("http_request_denied", "IP", {
        "source": "198.18.0.2", "destination": "198.18.0.3", "ipVersion": "IPv4",
    }),
    ("http_request_denied", "l4", {"TCP": {"source_port": 42690, "destination_port": 80}}),
    ("http_request_denied", "source", {
        "identity": 31028,
        "namespace": "default",
        "labels": [
            "k8s:class=tiefighter", "k8s:io.kubernetes.pod.namespace=default", "k8s:org=empire",
        ],
        "pod_name": "tiefighter",
        "ip": "198.18.0.2",
        "port": 42690,
    }),
    ("http_request_denied", "destination.identity", 16530),
    ("http_request_denied", "destination.pod_name", "deathstar"),
    ("http_request_denied", "destination.port", 80),
    ("http_request_denied", "l7", {
        "type": "REQUEST",
        "http": {
            "method": "PUT",
            "url": "http://deathstar/v1/exhaust-port",
            "protocol": "HTTP/1.1",
            "headers": [
                {"key": "User-Agent", "value": "curl/7.88.1"},
                {"key": "Authorization", "value": "[REDACTED]"},
            ],
        },
    }),
    ("http_request_denied", "Summary", "HTTP/1.1 PUT http://deathstar/v1/exhaust-port"),
    # HTTP response: source is the server, is_reply, latency, code, policy ref
    ("http_response_allowed", "verdict", "FORWARDED"),
    ("http_response_allowed", "is_reply", True),
    ("http_response_allowed", "source.pod_name", "deathstar"),
    ("http_response_allowed", "destination.pod_name", "tiefighter"),
    ("http_response_allowed", "l4.TCP", {"source_port": 80, "destination_port": 42690}),
    ("http_response_allowed", "l7.type", "RESPONSE"),
    ("http_response_allowed", "l7.latency_ns", 2_500_000),
    ("http_response_allowed", "l7.http.code", 200),
    ("http_response_allowed", "l7.http.headers", [
        {"key": "Content-Type", "value": "text/plain"},
        {"key": "Set-Cookie", "value": "[REDACTED]"},
    ]),
    ("http_response_allowed", "ingress_allowed_by", [
        {"name": "rule1", "namespace": "default", "kind": "CiliumNetworkPolicy",
         "rule": "ingress[0]"},
    ]),
    ("http_response_allowed", "Summary",
     "HTTP/1.1 200 2ms (POST http://deathstar/v1/request-landing)"),
    # Kafka
    ("kafka_request_denied", "l7", {
        "type": "REQUEST",
        "kafka": {
            "api_version": 9, "api_key": "produce", "correlation_id": 7,
            "topic": "deathstar-plans", "topics": ["deathstar-plans"],
        },
    }),
    ("kafka_response_denied", "l7.kafka.error_code", 29),
    ("kafka_response_denied", "l7.latency_ns", 40_000),
    ("kafka_response_denied", "Summary",
     "Kafka response produce correlation id 7 topic 'deathstar-plans' return code 29"),
    ("kafka_request_many_topics", "l7.kafka.api_key", "fetch"),
    ("kafka_request_many_topics", "l7.kafka.topic", "empire-announce"),
    ("kafka_request_many_topics", "l7.kafka.topics", ["empire-announce", "deathstar-plans"]),
    # gRPC: the HTTP/2 request and the call
    ("grpc_response_denied", "l7", {
        "type": "RESPONSE",
        "latency_ns": 300_000,
        "http": {
            "code": 200, "method": "POST", "protocol": "HTTP/2",
            "url": "http://door-manager:50051/door.DoorManager/SetAccessCode",
        },
        "grpc": {"service": "door.DoorManager", "method": "SetAccessCode", "status": 7},
    }),
    ("grpc_request_allowed", "l7.grpc", {"service": "door.DoorManager", "method": "GetName"}),
    # L3/L4 drop events
    ("l3_drop_denied", "Type", "L3_L4"),
    ("l3_drop_denied", "event_type", {"type": 1, "sub_type": 133}),
    ("l3_drop_denied", "drop_reason_desc", "POLICY_DENIED"),
    ("l3_drop_denied", "l4", {
        "TCP": {"source_port": 51812, "destination_port": 80, "flags": {"SYN": True}},
    }),
    ("l3_drop_denied", "Summary", "TCP Flags: SYN"),
    ("l3_drop_deny_rule", "event_type", {"type": 1, "sub_type": 181}),
    ("l3_drop_deny_rule", "drop_reason_desc", "POLICY_DENY"),
    ("l3_drop_deny_rule", "ingress_denied_by", [
        {"name": "no-xwing", "kind": "CiliumClusterwideNetworkPolicy",
         "rule": "specs[1].ingressDeny[0]"},
    ]),
    # policy verdicts
    ("l3_verdict_allowed", "event_type", {"type": 5}),
    ("l3_verdict_allowed", "policy_match_type", 2),
    ("l3_verdict_allowed", "verdict", "FORWARDED"),
    ("l3_verdict_denied_egress", "policy_match_type", 0),
    ("l3_verdict_denied_egress", "traffic_direction", "EGRESS"),
    ("l3_verdict_denied_egress", "l4", {"UDP": {"source_port": 51812, "destination_port": 33000}}),
    ("l3_verdict_denied_egress", "destination", {
        "identity": 2, "labels": ["reserved:world"], "ip": "203.0.113.9", "port": 33000,
    }),
    ("l3_verdict_denied_egress", "Summary", "UDP"),
    # trace
    ("l3_trace_to_endpoint", "event_type", {"type": 4}),
    ("l3_trace_to_endpoint", "trace_observation_point", "TO_ENDPOINT"),
    # proxy error
    ("proxy_parse_error", "verdict", "ERROR"),
    ("proxy_parse_error", "drop_reason_desc", "PARSE_ERROR"),
    ("proxy_parse_error", "l7", {"type": "REQUEST", "kafka": {}}),
    ("proxy_parse_error", "error", "frame length 2147483647 exceeds the 1048576-byte limit"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "path", "expected"), FIELDS, ids=[f"{k}:{p}" for k, p, _ in FIELDS]
)
def test_field(kind: str, path: str, expected: Any) -> None:
    data = json.loads(samples.ALL_KINDS[kind]().to_json())
    assert dig(data, path) == expected


@pytest.mark.parametrize("kind", sorted(TOP_LEVEL_KEYS))
def test_top_level_keys_exact(kind: str) -> None:
    assert set(samples.ALL_KINDS[kind]().to_dict()) == TOP_LEVEL_KEYS[kind]


@pytest.mark.parametrize("kind", sorted(samples.ALL_KINDS))
def test_only_hubble_keys_and_error(kind: str) -> None:
    assert set(samples.ALL_KINDS[kind]().to_dict()) <= HUBBLE_KEYS | GARRISON_KEYS


@pytest.mark.parametrize("kind", sorted(samples.ALL_KINDS))
def test_one_line_and_round_trip(kind: str) -> None:
    record = samples.ALL_KINDS[kind]()
    line = record.to_json()
    assert "\n" not in line
    assert line.isascii()
    assert FlowRecord.from_json(line) == record
    assert FlowRecord.from_json(line.encode()) == record


def test_key_order_follows_hubble() -> None:
    keys = list(samples.http_response_allowed().to_dict())
    assert keys[:7] == ["time", "verdict", "IP", "l4", "source", "destination", "Type"]
    assert keys.index("event_type") < keys.index("traffic_direction") < keys.index("Summary")


def test_ipv6_version() -> None:
    src = Endpoint(identity=2, ip="2001:db8::1", port=1234)
    dst = Endpoint(identity=300, ip="2001:db8::2", port=80)
    record = FlowRecord(
        time=0,
        verdict=Verdict.FORWARDED,
        type=FlowType.L3_L4,
        event_type=EventType.TRACE,
        traffic_direction=TrafficDirection.INGRESS,
        source=src,
        destination=dst,
    )
    assert record.to_dict()["IP"]["ipVersion"] == "IPv6"


# -- time --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1970-01-01T00:00:00.000000000Z", 0),
        ("2024-11-21T12:00:00.123456789Z", samples.T0),
        ("2024-11-21T12:00:00Z", samples.T0 - 123_456_789),
        ("2024-11-21T12:00:00.5Z", samples.T0 - 123_456_789 + 500_000_000),
        ("2024-11-21T13:00:00.123456789+01:00", samples.T0),
    ],
)
def test_parse_time(text: str, ns: int) -> None:
    assert parse_time(text) == ns


def test_format_time_keeps_nanoseconds() -> None:
    assert format_time(samples.T0) == "2024-11-21T12:00:00.123456789Z"
    assert format_time(1) == "1970-01-01T00:00:00.000000001Z"


# -- reading Hubble's own JSON and bad input ---------------------------------------------------


def test_reads_hubble_json() -> None:
    """A flow as `hubble observe -o json` prints it (jsonpb: quoted uint64, extra keys)."""
    line = json.dumps(
        {
            "time": "2024-11-21T12:00:00.123456789Z",
            "uuid": "c1d2",
            "verdict": "DROPPED",
            "ethernet": {"source": "aa:bb:cc:dd:ee:ff", "destination": "11:22:33:44:55:66"},
            "IP": {"source": "10.0.0.5", "destination": "10.0.0.7", "ipVersion": "IPv4"},
            "l4": {"TCP": {"source_port": 42690, "destination_port": 80, "flags": {"SYN": True}}},
            "source": {
                "ID": 1234,
                "identity": 31028,
                "namespace": "default",
                "labels": ["k8s:class=tiefighter"],
                "pod_name": "tiefighter",
            },
            "destination": {"identity": 16530, "namespace": "default", "pod_name": "deathstar"},
            "Type": "L3_L4",
            "node_name": "kind-worker",
            "event_type": {"type": 1, "sub_type": 133},
            "traffic_direction": "INGRESS",
            "drop_reason_desc": "POLICY_DENIED",
            "Summary": "TCP Flags: SYN",
        }
    )
    record = FlowRecord.from_json(line)
    assert record.source == Endpoint(
        identity=31028,
        labels=("k8s:class=tiefighter",),
        namespace="default",
        pod_name="tiefighter",
        ip="10.0.0.5",
        port=42690,
    )
    assert record.destination.port == 80 and record.destination.ip == "10.0.0.7"
    assert record.l4 == Layer4(L4Protocol.TCP, TCPFlags(syn=True))
    assert record.event_type is EventType.DROP
    assert record.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert record.is_reply is None
    assert record.node_name == "kind-worker"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "not json",
        "[]",
        "{}",
        '{"time": "yesterday", "verdict": "DROPPED"}',
        '{"time": "2024-11-21T12:00:00Z", "verdict": "MAYBE"}',
        '{"time": "2024-11-21T12:00:00Z", "verdict": "DROPPED", "source": {"identity": "x"}}',
        '{"time": "2024-11-21T12:00:00Z", "verdict": "DROPPED", "source": []}',
        '{"time": "2024-11-21T12:00:00Z", "verdict": "DROPPED", "is_reply": "yes"}',
        '{"time": "2024-11-21T12:00:00Z", "verdict": "DROPPED", "policy_match_type": 99}',
    ],
)
def test_bad_input_is_a_decode_error(line: str) -> None:
    with pytest.raises(FlowDecodeError):
        FlowRecord.from_json(line)


# -- round trip of arbitrary records -----------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=12)  # no lone surrogates
_label = st.builds(
    lambda s, k, v: f"{s}:{k}={v}",
    st.sampled_from(["k8s", "reserved", "cidr"]),
    st.text("abcdefgh.-/", min_size=1, max_size=8),
    st.text("abcxyz09", max_size=6),
)
_endpoints = st.builds(
    Endpoint,
    identity=st.integers(0, 2**32 - 1),
    labels=st.lists(_label, max_size=4).map(lambda ls: tuple(sorted(ls))),
    namespace=_text,
    pod_name=_text,
    ip=st.sampled_from(["", "198.18.0.1", "203.0.113.7", "2001:db8::5"]),
    port=st.integers(0, 65535),
)
_u32 = st.integers(0, 2**31 - 1)
_http = st.builds(
    HTTP,
    method=_text,
    url=_text,
    protocol=st.sampled_from(["", "HTTP/1.1", "HTTP/2"]),
    code=st.integers(0, 599),
    headers=st.lists(st.builds(HTTPHeader, _text, _text), max_size=3).map(tuple),
    raw_target=_text,
)
_kafka = st.builds(
    Kafka,
    api_key=_text,
    api_version=st.none() | _u32,
    correlation_id=st.none() | _u32,
    topic=_text,
    topics=st.lists(_text, max_size=3).map(tuple),
    error_code=st.none() | st.integers(-1, 120),
)
_grpc = st.builds(GRPC, service=_text, method=_text, status=st.none() | st.integers(0, 16))
_l7 = st.builds(
    Layer7,
    type=st.sampled_from(L7FlowType),
    latency_ns=st.none() | st.integers(0, 2**62),
    http=st.none() | _http,
    kafka=st.none() | _kafka,
    grpc=st.none() | _grpc,
)
_flags = st.builds(TCPFlags, st.booleans(), st.booleans(), st.booleans(), st.booleans())
_l4 = st.one_of(
    st.builds(Layer4, st.just(L4Protocol.TCP), st.none() | _flags),
    st.builds(Layer4, st.sampled_from([L4Protocol.UDP, L4Protocol.SCTP]), st.none()),
)
_policies = st.lists(
    st.builds(Policy, name=_text.filter(bool), namespace=_text, kind=_text, rule=_text),
    max_size=2,
).map(tuple)


@st.composite
def records(draw: st.DrawFn) -> FlowRecord:
    src = draw(_endpoints)
    dst = draw(_endpoints)
    l4 = draw(st.none() | _l4)
    return FlowRecord(
        time=draw(st.integers(0, 2**62)),
        verdict=draw(st.sampled_from(Verdict)),
        type=draw(st.sampled_from(FlowType)),
        event_type=draw(st.sampled_from(EventType)),
        traffic_direction=draw(st.sampled_from(TrafficDirection)),
        source=src,
        destination=dst,
        is_reply=draw(st.none() | st.booleans()),
        l4=l4,
        l7=draw(st.none() | _l7),
        drop_reason_desc=draw(st.none() | st.sampled_from(DropReasonDesc)),
        policy_match_type=draw(st.none() | st.sampled_from(MatchType)),
        trace_observation_point=draw(st.none() | st.sampled_from(TraceObservationPoint)),
        ingress_allowed_by=draw(_policies),
        egress_allowed_by=draw(_policies),
        ingress_denied_by=draw(_policies),
        egress_denied_by=draw(_policies),
        summary=draw(_text),
        node_name=draw(_text),
        error=draw(_text),
        aggregate=draw(st.none() | st.builds(Aggregate, _u32, _u32, _u32)),
    )


@settings(max_examples=300, deadline=None)
@given(records())
def test_json_round_trip(record: FlowRecord) -> None:
    line = record.to_json()
    assert "\n" not in line and line.isascii()
    assert FlowRecord.from_json(line) == record


@settings(max_examples=300, deadline=None)
@given(records())
def test_fast_line_is_the_dict(record: FlowRecord) -> None:
    """The directly written line is exactly the JSON object `to_dict()` defines, key order
    included, also when its endpoints' JSON was cached by an earlier line."""
    expected = record_to_dict(record)
    for _ in range(2):
        decoded = json.loads(record.to_json())
        assert decoded == expected
        assert list(decoded) == list(expected)
        assert json.dumps(decoded, separators=(",", ":")) == record.to_json()
