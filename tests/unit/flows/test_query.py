"""Filters of `garrison observe`: every flag, AND across flags, OR within one, `--not`, time
bounds, and the substring pre-test that must never drop a line the full test keeps."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from garrison.flows.codec import parse_time
from garrison.flows.query import (
    FLAGS,
    FilterError,
    FilterTerm,
    FlowQuery,
    parse_duration_ns,
    parse_selector,
    parse_time_bound,
    url_path,
)
from garrison.flows.record import FlowRecord
from tests.unit.flows import samples

DEMO_LOG = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"
RECORDS: dict[str, FlowRecord] = {name: make() for name, make in samples.ALL_KINDS.items()}
DICTS = {name: record.to_dict() for name, record in RECORDS.items()}
LINES = {name: record.to_json().encode() for name, record in RECORDS.items()}


def query(*flags: tuple[str, str] | tuple[str, str, bool], **bounds: int) -> FlowQuery:
    return FlowQuery.of(
        ((f[0], f[1], bool(f[2]) if len(f) > 2 else False) for f in flags),  # type: ignore[misc]
        **bounds,
    )


def names(q: FlowQuery) -> set[str]:
    compiled = q.compile()
    return {name for name, d in DICTS.items() if compiled.matches(d)}


KAFKA = {"kafka_request_denied", "kafka_response_denied", "kafka_request_many_topics",
         "proxy_parse_error"}
L7_DROPPED = {"http_request_denied", "kafka_request_denied", "kafka_response_denied",
              "grpc_response_denied"}

CASES: list[tuple[FlowQuery, set[str]]] = [
    (query(("verdict", "dropped"), ("type", "l7")), L7_DROPPED),
    (query(("verdict", "ERROR")), {"proxy_parse_error"}),
    (query(("verdict", "DROPPED"), ("verdict", "ERROR"), ("type", "l7")),
     L7_DROPPED | {"proxy_parse_error"}),
    (query(("protocol", "kafka")), KAFKA),
    (query(("protocol", "grpc")), {"grpc_request_allowed", "grpc_response_denied"}),
    # Hubble: --protocol http is any record with an HTTP part, gRPC calls included
    (query(("protocol", "http")), {"http_request_denied", "http_request_allowed",
                                   "http_response_allowed", "grpc_request_allowed",
                                   "grpc_response_denied"}),
    (query(("protocol", "udp")), {"l3_verdict_denied_egress"}),
    (query(("type", "drop")), {"l3_drop_denied", "l3_drop_deny_rule"}),
    (query(("type", "policy-verdict")), {"l3_verdict_allowed", "l3_verdict_denied_egress"}),
    (query(("type", "trace")), {"l3_trace_to_endpoint"}),
    (query(("type", "trace:to-endpoint")), {"l3_trace_to_endpoint"}),
    (query(("type", "trace:to-proxy")), set()),
    (query(("drop-reason-desc", "policy_deny")), {"l3_drop_deny_rule"}),
    (query(("traffic-direction", "egress")), {"l3_verdict_denied_egress"}),
    (query(("namespace", "kafka")), KAFKA),
    (query(("to-namespace", "kafka")), {"kafka_request_denied", "kafka_request_many_topics",
                                        "proxy_parse_error"}),
    (query(("from-namespace", "kafka")), {"kafka_response_denied"}),
    (query(("pod", "default/door")), {"grpc_request_allowed", "grpc_response_denied"}),
    (query(("pod", "kafka/door")), set()),
    # a bare pod name is in `default` (Hubble); NS/ is the whole namespace
    (query(("pod", "kafka-")), set()),
    (query(("pod", "kafka/kafka-")), KAFKA),
    (query(("pod", "kafka/")), KAFKA),
    (query(("identity", "2")), {"l3_verdict_denied_egress"}),
    (query(("to-identity", "world")), {"l3_verdict_denied_egress"}),
    (query(("from-identity", "world")), set()),
    (query(("label", "class=xwing"), ("verdict", "DROPPED")), {
        "kafka_request_denied", "kafka_response_denied", "grpc_response_denied",
        "l3_drop_denied", "l3_drop_deny_rule", "l3_verdict_denied_egress"}),
    # a selector must hold on one endpoint: xwing is never a deathstar
    (query(("label", "class=xwing,class=deathstar")), set()),
    (query(("label", "class in (xwing, deathstar)"), ("type", "drop")),
     {"l3_drop_denied", "l3_drop_deny_rule"}),
    (query(("from-label", "class notin (xwing,tiefighter)"), ("protocol", "http")),
     {"http_response_allowed", "grpc_response_denied"}),
    (query(("from-label", "org=alliance,!app"), ("type", "drop")),
     {"l3_drop_denied", "l3_drop_deny_rule"}),
    (query(("from-label", "class!=xwing"), ("to-label", "org==empire"), ("type", "drop")),
     set()),
    # several selectors: either
    (query(("label", "app=door-manager"), ("label", "reserved:world")),
     {"grpc_request_allowed", "grpc_response_denied", "l3_verdict_denied_egress"}),
    (query(("label", "k8s:app"), ("protocol", "http")),
     {"grpc_request_allowed", "grpc_response_denied"}),
    (query(("label", "reserved:app=kafka")), set()),
    (query(("from-ip", "198.18.0.0/15"), ("to-ip", "203.0.113.9")),
     {"l3_verdict_denied_egress"}),
    (query(("ip", "203.0.113.0/24")), {"l3_verdict_denied_egress"}),
    (query(("to-port", "80"), ("type", "l7")), {"http_request_denied", "http_request_allowed"}),
    (query(("from-port", "80"), ("type", "l7")), {"http_response_allowed"}),
    (query(("port", "9092"), ("verdict", "FORWARDED")), {"kafka_request_many_topics"}),
    (query(("http-method", "put")), {"http_request_denied"}),
    (query(("http-path", "^/v1/request-")), {"http_request_allowed", "http_response_allowed"}),
    (query(("http-path", "landing$"), ("http-status", "2+")), {"http_response_allowed"}),
    # a gRPC response is an HTTP/2 200 as well
    (query(("http-status", "200")), {"http_response_allowed", "grpc_response_denied"}),
    (query(("http-status", "4+")), set()),
    (query(("grpc-service", "door.DoorManager")), {"grpc_request_allowed",
                                                   "grpc_response_denied"}),
    (query(("grpc-method", "SetAccessCode")), {"grpc_response_denied"}),
    (query(("grpc-status", "PERMISSION_DENIED")), {"grpc_response_denied"}),
    (query(("grpc-status", "7")), {"grpc_response_denied"}),
    (query(("grpc-status", "0")), set()),
    (query(("kafka-topic", "deathstar-plans")), {"kafka_request_denied", "kafka_response_denied",
                                                 "kafka_request_many_topics"}),
    (query(("kafka-topic", "empire-announce")), {"kafka_request_many_topics"}),
    (query(("kafka-api-key", "fetch")), {"kafka_request_many_topics"}),
    (query(("kafka-api-key", "0")), {"kafka_request_denied", "kafka_response_denied"}),
    # --not moves the flag that follows to one exclusion filter; its values: any
    (query(("protocol", "kafka"), ("verdict", "DROPPED", True)),
     {"kafka_request_many_topics", "proxy_parse_error"}),
    (query(("protocol", "kafka"), ("verdict", "DROPPED", True), ("verdict", "ERROR", True)),
     {"kafka_request_many_topics"}),
    # several --not flags: hidden only when all of them match (an L7 record of alliance)
    (query(("type", "l7", True), ("label", "org=alliance", True)),
     {"http_request_denied", "http_request_allowed", "http_response_allowed",
      "kafka_request_many_topics", "grpc_request_allowed", "l3_drop_denied",
      "l3_drop_deny_rule", "l3_verdict_allowed", "l3_verdict_denied_egress",
      "l3_trace_to_endpoint"}),
]  # fmt: skip


@pytest.mark.parametrize(("q", "expected"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_filters(q: FlowQuery, expected: set[str]) -> None:
    assert names(q) == expected


@pytest.mark.parametrize(("q", "expected"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_pretest_never_drops_a_match(q: FlowQuery, expected: set[str]) -> None:
    compiled = q.compile()
    for name in expected:
        assert compiled.may_match(LINES[name]), name
    # and it earns its keep: a selective query rules lines out before decoding them
    if q.terms and all(not t.negated and t.name in ("verdict", "kafka-topic") for t in q.terms):
        assert any(not compiled.may_match(LINES[n]) for n in set(LINES) - expected)


def _demo_lines() -> list[bytes]:
    return [line for line in DEMO_LOG.read_bytes().splitlines() if line]


DEMO_QUERIES = [
    query(("verdict", "DROPPED")),
    query(("to-pod", "deathstar"), ("http-method", "PUT")),
    query(("from-label", "class=xwing")),
    query(("kafka-topic", "deathstar-plans"), ("protocol", "kafka")),
    query(("grpc-method", "SetAccessCode")),
    query(("to-port", "9092"), ("from-namespace", "default")),
    query(("identity", "258")),
    query(("ip", "198.18.0.5")),
    query(("drop-reason-desc", "POLICY_DENIED")),
    query(("traffic-direction", "ingress"), ("verdict", "FORWARDED", True)),
]


@pytest.mark.parametrize("q", DEMO_QUERIES, ids=[str(i) for i in range(len(DEMO_QUERIES))])
def test_pretest_agrees_on_a_real_log(q: FlowQuery) -> None:
    compiled = q.compile()
    for line in _demo_lines():
        if compiled.matches(orjson.loads(line)):
            assert compiled.may_match(line), line[:200]


def test_real_log_counts() -> None:
    lines = _demo_lines()

    def count(q: FlowQuery) -> int:
        compiled = q.compile()
        return sum(compiled.matches(orjson.loads(line)) for line in lines)

    assert len(lines) == 81
    # the xwing's SYNs: a policy-verdict and a drop record each, four SYNs
    assert count(query(("from-pod", "xwing"))) == 8
    assert count(query(("from-pod", "xwing"), ("type", "drop"))) == 4
    assert count(query(("to-pod", "deathstar"), ("http-method", "PUT"))) == 1
    assert count(query(("http-status", "403"))) == 1
    assert count(query(("grpc-method", "SetAccessCode"))) == 2  # request and response
    assert count(query(("kafka-topic", "deathstar-plans"), ("verdict", "DROPPED"))) == 2


def test_backslash_lines_skip_the_pretest() -> None:
    # JSON may spell a value with escapes: the pre-test cannot see it, the full test can
    line = LINES["http_request_denied"].replace(b'"DROPPED"', b'"\\u0044ROPPED"')
    compiled = query(("verdict", "DROPPED")).compile()
    assert compiled.may_match(line)
    assert compiled.matches(orjson.loads(line))


def test_time_bounds_are_inclusive() -> None:
    t = samples.T0
    later = {"http_response_allowed", "kafka_response_denied", "grpc_response_denied"}
    assert names(query(since_ns=t + 1)) == later
    assert names(query(until_ns=t)) == set(RECORDS) - later
    assert names(query(since_ns=t + 2_500_000, until_ns=t + 2_500_000)) == {
        "http_response_allowed"
    }
    compiled = query(since_ns=t + 1).compile()
    assert not compiled.may_match(LINES["http_request_denied"])
    assert compiled.may_match(LINES["http_response_allowed"])


def test_time_bounds_on_other_spellings() -> None:
    d = dict(DICTS["http_request_denied"])
    d["time"] = "2024-11-21T13:00:00.5+01:00"  # = 12:00:00.5Z
    assert query(since_ns=samples.T0).compile().matches(d)
    assert not query(until_ns=samples.T0).compile().matches(d)
    d["time"] = "yesterday"
    assert not query(since_ns=0).compile().matches(d)
    assert query().compile().matches(d)


def test_empty_query_matches_everything() -> None:
    compiled = FlowQuery().compile()
    assert compiled.selects_all
    assert names(FlowQuery()) == set(RECORDS)
    assert compiled.matches_record(RECORDS["l3_drop_denied"])


def test_hubble_json_fallbacks() -> None:
    # Hubble's own JSON: addresses under IP, ports under l4, no ip/port on the endpoints
    d = {
        "time": "2024-11-21T12:00:00.123456789Z",
        "verdict": "DROPPED",
        "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": "41000", "destination_port": 80}},
        "source": {"identity": "31028", "labels": ["k8s:org=empire"]},
        "destination": {"identity": 16530},
    }
    assert query(("from-ip", "10.0.0.1"), ("to-port", "80"), ("from-port", "41000"),
                 ("from-identity", "31028")).compile().matches(d)


@pytest.mark.parametrize(
    "garbage",
    [{}, {"source": "x", "l7": [], "l4": 3}, {"l7": {"http": {"url": 7, "code": "x"}}}],
)
def test_mistyped_records_never_raise(garbage: dict[str, object]) -> None:
    for q, _ in CASES:
        assert q.compile().matches(garbage) in (True, False)
    # an empty object only matches queries that exclude things
    for q, _ in CASES:
        if q.compile().matches({}):
            assert all(t.negated for t in q.terms), q


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("verdict", "MAYBE", "--verdict 'MAYBE': expected one of FORWARDED"),
        ("type", "l9", "--type 'l9': not a type name (drop, debug"),
        ("type", "drop:x", "--type 'drop:x': sub type 'x' is no number"),
        ("type", "trace:typo", "nor an observation point (to-endpoint"),
        ("protocol", "smtp", "--protocol 'smtp'"),
        ("traffic-direction", "sideways", "expected one of INGRESS, EGRESS"),
        ("label", "", "empty label selector"),
        ("label", "=v", "cannot read '=v'"),
        ("label", "k in (a", "unbalanced '('"),
        ("label", "k > x", "'>' needs an integer"),
        ("from-ip", "300.1.1.1", "--from-ip '300.1.1.1': not an address or CIDR"),
        ("to-port", "65536", "--to-port '65536': expected a port, 0-65535"),
        ("identity", "galaxy", "--identity 'galaxy': expected a number or a reserved"),
        ("http-path", "(", "--http-path '(': not a regular expression"),
        ("http-status", "600", "--http-status '600'"),
        ("http-status", "40", "--http-status '40'"),
        ("http-status", "404+", "--http-status '404+'"),
        ("grpc-status", "NOPE", "--grpc-status 'NOPE'"),
        ("kafka-api-key", "brew", "--kafka-api-key 'brew'"),
        ("drop-reason-desc", "BAD", "--drop-reason-desc 'BAD'"),
        ("pod", "", "--pod: empty pod name"),
    ],
)
def test_bad_values_name_the_flag_and_the_fix(flag: str, value: str, message: str) -> None:
    with pytest.raises(FilterError, match=None) as info:
        query((flag, value)).compile()
    assert message in str(info.value)


def test_unknown_flag() -> None:
    with pytest.raises(FilterError, match="unknown filter --colour"):
        query(("colour", "red"))
    with pytest.raises(FilterError, match="unknown filter --colour"):
        FlowQuery((FilterTerm("colour", ("red",)),)).compile()


def test_round_trip_through_the_api_form() -> None:
    q = query(("verdict", "DROPPED"), ("verdict", "ERROR"), ("label", "org=empire", True),
              since_ns=5, until_ns=9)
    again = FlowQuery.from_dict(orjson.loads(orjson.dumps(q.to_dict())))
    assert again == q
    assert [t.values for t in q.terms] == [("DROPPED", "ERROR"), ("org=empire",)]
    with pytest.raises(FilterError):
        FlowQuery.from_dict({"terms": [{"name": "verdict", "values": "DROPPED"}]})
    with pytest.raises(FilterError):
        FlowQuery.from_dict({"terms": [], "since_ns": "soon"})


def test_every_flag_has_help_and_both_directions() -> None:
    for noun in ("label", "identity", "ip", "port", "namespace", "pod"):
        assert {noun, f"from-{noun}", f"to-{noun}"} <= set(FLAGS)
    assert all(spec.help and (spec.metavar or not spec.takes_value) for spec in FLAGS.values())


def test_selector_grammar() -> None:
    reqs = parse_selector("k8s:org=empire, class in (a, b),!app,tier notin (x),zone!=eu,h")
    assert [(r.source, r.key, r.op, r.values) for r in reqs] == [
        ("k8s", "org", "in", ("empire",)),
        ("any", "class", "in", ("a", "b")),
        ("any", "app", "!exists", ()),
        ("any", "tier", "notin", ("x",)),
        ("any", "zone", "notin", ("eu",)),
        ("any", "h", "exists", ()),
    ]


@pytest.mark.parametrize(
    ("url", "path"),
    [("http://h/v1/x?y=1", "/v1/x"), ("/a#f", "/a"), ("http://host", "/"), ("", "/")],
)
def test_url_path(url: str, path: str) -> None:
    assert url_path(url) == path


NOW = parse_time("2024-11-21T12:00:00Z")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("90s", NOW - 90 * 10**9),
        ("1h30m", NOW - 5400 * 10**9),
        ("1.5h", NOW - 5400 * 10**9),
        ("2d", NOW - 2 * 86400 * 10**9),
        ("2024-11-21T11:00:00Z", NOW - 3600 * 10**9),
        ("2024-11-21T12:00:00+01:00", NOW - 3600 * 10**9),
        ("2024-11-21 11:00", NOW - 3600 * 10**9),
        ("2024-11-21", NOW - 12 * 3600 * 10**9),
    ],
)
def test_time_bounds(text: str, expected: int) -> None:
    assert parse_time_bound(text, NOW) == expected


def test_bad_time_bound() -> None:
    with pytest.raises(FilterError, match="--until 'tomorrow-ish': expected a duration"):
        parse_time_bound("tomorrow-ish", NOW, "until")
    assert parse_duration_ns("5x") is None
    assert parse_duration_ns("") is None
