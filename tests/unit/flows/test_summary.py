"""`garrison accesslog summary`: the aggregator on the Star Wars demo's real log, on hand-built
flow dicts, its JSON form and its tables.

The expected values for the demo log were counted independently of the code under test, with
jq over tests/data/flows/starwars-demo.log:

    jq -c '[.Type, .event_type.type, .verdict, .is_reply]' | sort | uniq -c
      4 ["L3_L4",1,"DROPPED",null]       13 ["L3_L4",5,"FORWARDED",false]
      4 ["L3_L4",5,"DROPPED",false]      27 ["L7",129,"FORWARDED",false]
      3 ["L7",129,"DROPPED",false]       27 ["L7",129,"FORWARDED",true]
      3 ["L7",129,"DROPPED",true]

so 81 records (67 FORWARDED, 14 DROPPED) and, the 4 policy-verdict denials being the same
SYNs as the 4 drops, 47 decisions: 13 + 27 = 40 FORWARDED, 4 + 3 = 7 DROPPED.
"""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from rich.console import Console

from garrison.cli.accesslog_view import render_summary
from garrison.flows.codec import format_time
from garrison.flows.summary import (
    DEFAULT_SUMMARY,
    MAX_KEPT_BUCKETS,
    AccessLogSummary,
    PeerKey,
    QuietSpan,
    RateBucket,
    RuleKey,
    SummaryBuilder,
    SummaryConfig,
    path_pattern,
    rule_keys,
    short_labels,
)
from garrison.policies.loader import load_paths, load_text
from tests.conftest import REPO

DEMO_LOG = REPO / "tests" / "data" / "flows" / "starwars-demo.log"
EXAMPLE_POLICIES = [
    REPO / "examples" / "starwars" / "sw_l3_l4_l7_policy.yaml",
    REPO / "examples" / "kafka" / "kafka_policy.yaml",
    REPO / "examples" / "grpc" / "doors-policy.yaml",
]
# 2026-12-05T00:00:00Z, a multiple of every display interval
T0 = 1_796_428_800 * 1_000_000_000
CNP = "CiliumNetworkPolicy"


def demo_flows() -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in DEMO_LOG.read_bytes().splitlines()]


def summarise(
    flows: list[dict[str, Any]],
    config: SummaryConfig = DEFAULT_SUMMARY,
    known: list[RuleKey] | None = None,
) -> AccessLogSummary:
    builder = SummaryBuilder(config, known)
    for flow in flows:
        builder.add(flow)
    return builder.result()


def at(seconds: float) -> str:
    return format_time(T0 + round(seconds * 1_000_000_000))


def ref(name: str, rule: str = "ingress[0]", namespace: str = "default") -> dict[str, str]:
    return {"name": name, "namespace": namespace, "kind": CNP, "rule": rule}


def l7(verdict: str = "FORWARDED", seconds: float = 0, **fields: Any) -> dict[str, Any]:
    flow: dict[str, Any] = {
        "time": at(seconds),
        "verdict": verdict,
        "source": {"identity": 1001, "namespace": "default", "pod_name": "client",
                   "labels": ["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"]},
        "destination": {"identity": 1002, "namespace": "default", "pod_name": "server-7f9c",
                        "labels": ["k8s:app=server", "k8s:io.kubernetes.pod.namespace=default"]},
        "Type": "L7",
        "event_type": {"type": 129},
        "is_reply": False,
        "l7": {"type": "REQUEST", "http": {"method": "GET", "url": "http://server/"}},
    }
    flow.update(fields)
    return flow


def l3(event: int, verdict: str, seconds: float = 0, **fields: Any) -> dict[str, Any]:
    flow: dict[str, Any] = {
        "time": at(seconds),
        "verdict": verdict,
        "l4": {"TCP": {"source_port": 40000, "destination_port": 80, "flags": {"SYN": True}}},
        "source": {"identity": 1001, "namespace": "default", "pod_name": "client",
                   "labels": ["k8s:app=client"]},
        "destination": {"identity": 1002, "namespace": "default", "pod_name": "server-7f9c",
                        "labels": ["k8s:app=server"]},
        "Type": "L3_L4",
        "event_type": {"type": event},
    }
    if verdict == "DROPPED":
        flow["drop_reason_desc"] = "POLICY_DENIED"
    flow.update(fields)
    return flow


# ---------------------------------------------------------------------------------------------
# The demo log


def test_demo_counts_every_record_and_each_decision_once() -> None:
    s = summarise(demo_flows())
    assert s.records_read == 81
    assert s.records_skipped == 0
    assert s.record_verdicts.to_dict() == {
        "total": 81, "forwarded": 67, "dropped": 14, "audit": 0, "error": 0, "other": 0,
    }
    # the xwing's two connection attempts: each SYN retransmitted once, one decision each
    assert s.decision_verdicts.to_dict() == {
        "total": 45, "forwarded": 40, "dropped": 5, "audit": 0, "error": 0, "other": 0,
    }
    assert s.retried_syns == 4  # a drop and a policy-verdict record per retransmission
    assert format_time(s.first_time_ns or 0) == "2026-12-05T11:59:39.547156290Z"
    assert format_time(s.last_time_ns or 0) == "2026-12-05T11:59:51.503159296Z"


def test_demo_top_denied_counts_each_connection_attempt_once_and_every_l7_deny() -> None:
    s = summarise(demo_flows())
    assert s.denied_groups == 4
    rows = [
        (g.count, g.source.text, g.destination.text, g.protocol, g.what,
         format_time(g.first_seen_ns or 0), format_time(g.last_seen_ns or 0))
        for g in s.top_denied
    ]
    # sources and destinations are named alike: identity, namespace, labels
    assert rows == [
        (2, "default class=xwing,org=alliance (ID:258)",
         "default class=deathstar,org=empire (ID:256)", "tcp", "TCP/80 POLICY_DENIED",
         "2026-12-05T11:59:39.893652613Z", "2026-12-05T11:59:42.539526549Z"),
        (1, "default class=tiefighter,org=empire (ID:257)",
         "default class=deathstar,org=empire (ID:256)", "http", "PUT /v1/exhaust-port",
         "2026-12-05T11:59:42.390661376Z", "2026-12-05T11:59:42.390661376Z"),
        (1, "default app=guard (ID:260)", "default app=door-manager (ID:259)", "grpc",
         "doors.DoorManager/SetAccessCode",
         "2026-12-05T11:59:45.958536960Z", "2026-12-05T11:59:45.958536960Z"),
        (1, "default app=empire-hq (ID:262)", "default app=kafka (ID:261)", "kafka",
         "metadata topic deathstar-plans",
         "2026-12-05T11:59:48.051732736Z", "2026-12-05T11:59:48.051732736Z"),
    ]
    xwing = s.top_denied[0]
    assert xwing.source == PeerKey(258, "default", "", ("class=xwing", "org=alliance"))
    # a workload (two deathstar replicas), not a pod; the pods seen are kept beside
    assert xwing.destination == PeerKey(256, "default", "", ("class=deathstar", "org=empire"))
    assert (xwing.source_pods, xwing.destination_pods) == (("xwing",), ("deathstar-1",))


def test_demo_without_drop_records_counts_the_policy_verdict_denials() -> None:
    flows = [f for f in demo_flows() if f["event_type"]["type"] != 1]
    s = summarise(flows)
    assert s.records_read == 77
    assert s.decision_verdicts.dropped == 5
    assert s.retried_syns == 2
    xwing = s.top_denied[0]
    assert (xwing.count, xwing.what) == (2, "TCP/80 POLICY_DENIED")
    assert format_time(xwing.first_seen_ns or 0) == "2026-12-05T11:59:39.893651287Z"
    assert format_time(xwing.last_seen_ns or 0) == "2026-12-05T11:59:42.539525331Z"


def test_demo_rate_is_per_second_with_the_quiet_seconds_as_zeros() -> None:
    s = summarise(demo_flows())
    assert (s.rate.interval_s, s.rate.granularity_s) == (1, 1)
    assert format_time(s.rate.buckets[0].start_ns) == "2026-12-05T11:59:39.000000000Z"
    assert format_time(s.rate.buckets[-1].start_ns) == "2026-12-05T11:59:51.000000000Z"
    assert [b.count for b in s.rate.buckets] == [3, 0, 0, 5, 0, 0, 4, 0, 14, 12, 0, 0, 7]
    assert [b.verdicts.dropped for b in s.rate.buckets] == [1, 0, 0, 2, 0, 0, 1, 0, 0, 1, 0, 0, 0]
    assert s.rate.buckets[8].rate_per_s == 14.0
    # for a table, a run of empty seconds is one span; a lone empty second stays a row
    rows = s.rate.rows()
    assert [r.count if isinstance(r, RateBucket) else ("quiet", r.buckets) for r in rows] == [
        3, ("quiet", 2), 5, ("quiet", 2), 4, 0, 14, 12, ("quiet", 2), 7]
    quiet = rows[1]
    assert isinstance(quiet, QuietSpan)
    assert (format_time(quiet.start_ns), format_time(quiet.end_ns)) == (
        "2026-12-05T11:59:40.000000000Z", "2026-12-05T11:59:42.000000000Z")


def test_demo_rules_and_the_sections_that_never_matched() -> None:
    known = rule_keys(load_paths(EXAMPLE_POLICIES).policies)
    assert [k.text for k in known] == [
        f"{CNP} default/rule1 ingress[0]",
        f"{CNP} default/secure-empire-kafka ingress[0]",
        f"{CNP} default/secure-empire-kafka ingress[1]",
        f"{CNP} default/door-manager ingress[0]",
        f"{CNP} default/door-manager ingress[1]",
        f"{CNP} default/door-manager ingress[2]",
    ]
    s = summarise(demo_flows(), known=known)
    rows = [(r.key.text, r.allowed, r.denied, r.audited) for r in s.rules]
    assert rows == [
        (f"{CNP} default/door-manager ingress[0]", 1, 1, 0),
        (f"{CNP} default/rule1 ingress[0]", 1, 1, 0),
        (f"{CNP} default/secure-empire-kafka ingress[0]", 10, 0, 0),
        (f"{CNP} default/secure-empire-kafka ingress[1]", 15, 0, 0),
    ]
    kafka_outpost = s.rules[3]
    assert format_time(kafka_outpost.first_seen_ns or 0) == "2026-12-05T11:59:48.424188416Z"
    assert format_time(kafka_outpost.last_seen_ns or 0) == "2026-12-05T11:59:51.501136128Z"
    assert s.never_matched == (
        RuleKey(CNP, "default", "door-manager", "ingress[1]"),
        RuleKey(CNP, "default", "door-manager", "ingress[2]"),
    )


def test_without_known_rules_never_matched_is_unknown_not_empty() -> None:
    assert summarise(demo_flows()).never_matched is None
    everything = [RuleKey(CNP, "default", "rule1", "ingress[0]")]
    assert summarise(demo_flows(), known=everything).never_matched == ()


# ---------------------------------------------------------------------------------------------
# Denied groups


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("http://198.18.0.2/v1/ships/42/parts/9f86d081884c7d65", "/v1/ships/{n}/parts/{hex}"),
        ("https://api:8443/orders/123e4567-e89b-12d3-a456-426614174000/items?x=1#top",
         "/orders/{uuid}/items"),
        ("/v1/exhaust-port?force=1", "/v1/exhaust-port"),
        ("http://deathstar", "/"),
        ("http://deathstar/", "/"),
        ("/users/deadbeefcafe", "/users/deadbeefcafe"),  # no digit: a word
        ("/users/abc1234", "/users/abc1234"),  # 7 characters: too short for {hex}
        ("/users/ABCDEF12/v2/0", "/users/{hex}/v2/{n}"),
        ("/a//b/", "/a//b/"),
    ],
)
def test_path_pattern(url: str, pattern: str) -> None:
    assert path_pattern(url) == pattern


def test_http_denies_of_one_path_pattern_are_one_group() -> None:
    flows = [
        l7("DROPPED", 1, l7={"type": "REQUEST",
                             "http": {"method": "GET", "url": "http://s/v1/ships/1?a=b"}}),
        l7("DROPPED", 2, l7={"type": "REQUEST",
                             "http": {"method": "GET", "url": "http://s/v1/ships/22"}}),
        l7("DROPPED", 3, l7={"type": "REQUEST",
                             "http": {"method": "POST", "url": "http://s/v1/ships/3"}}),
        # another replica of the same workload: same group
        l7("DROPPED", 4, destination={"identity": 1002, "namespace": "default",
                                      "pod_name": "server-a1b2", "labels": ["k8s:app=server"]},
           l7={"type": "REQUEST", "http": {"method": "GET", "url": "http://s/v1/ships/4"}}),
        # the response repeats its request's decision
        l7("DROPPED", 4.1, is_reply=True,
           l7={"type": "RESPONSE", "http": {"method": "GET", "url": "http://s/v1/ships/4",
                                            "code": 403}}),
    ]
    s = summarise(flows)
    assert [(g.count, g.what) for g in s.top_denied] == [
        (3, "GET /v1/ships/{n}"), (1, "POST /v1/ships/{n}"),
    ]
    group = s.top_denied[0]
    assert (group.first_seen_ns, group.last_seen_ns) == (T0 + 1_000_000_000, T0 + 4_000_000_000)
    assert group.destination.text == "default app=server (ID:1002)"


def test_kafka_denies_group_per_topic_and_topicless_requests_by_api_key() -> None:
    def kafka(seconds: float, **part: Any) -> dict[str, Any]:
        return l7("DROPPED", seconds, l7={"type": "REQUEST", "kafka": part})

    flows = [
        kafka(1, api_key="produce", topic="a", topics=["a", "b"]),
        kafka(2, api_key="produce", topic="a"),  # Hubble's record: one topic, no list
        kafka(3, api_key="findcoordinator"),
        kafka(4, api_key="produce", topics=[{"no": "topic"}, "b"]),
    ]
    s = summarise(flows)
    assert sorted((g.what, g.count) for g in s.top_denied) == [
        ("findcoordinator", 1), ("produce topic a", 2), ("produce topic b", 2),
    ]


def test_grpc_denies_name_service_and_method_even_with_the_http_part() -> None:
    flow = l7("DROPPED", l7={"type": "REQUEST",
                             "http": {"method": "POST", "url": "http://d:50051/door.D/Open"},
                             "grpc": {"service": "door.D", "method": "Open"}})
    (group,) = summarise([flow]).top_denied
    assert (group.protocol, group.what) == ("grpc", "door.D/Open")


def test_l3_l4_denies_name_protocol_port_and_reason_and_world_by_labels() -> None:
    world = {"identity": 2, "labels": ["reserved:world"], "ip": "203.0.113.9"}
    flows = [
        l3(1, "DROPPED", 1, source=world),
        l3(1, "DROPPED", 2, source={**world, "ip": "203.0.113.10"}),
        l3(1, "DROPPED", 3, l4={"UDP": {"source_port": 1, "destination_port": 53}},
           drop_reason_desc="POLICY_DENY"),
        l3(1, "DROPPED", 4, l4={"ICMPv4": {"type": 8}}, source={"identity": 0, "ip": "10.0.0.9"}),
    ]
    s = summarise(flows)
    assert [(g.count, g.source.text, g.protocol, g.what) for g in s.top_denied] == [
        (2, "reserved:world (world)", "tcp", "TCP/80 POLICY_DENIED"),
        (1, "default app=client (ID:1001)", "udp", "UDP/53 POLICY_DENY"),
        (1, "10.0.0.9 (unknown)", "icmpv4", "ICMPv4/8 POLICY_DENIED"),
    ]


def test_top_keeps_the_largest_groups_then_the_earliest_and_reports_how_many() -> None:
    flows = []
    for i, (path, n) in enumerate([("/a", 1), ("/b", 3), ("/c", 1), ("/d", 2)]):
        flows += [
            l7("DROPPED", 10 - i + j,
               l7={"type": "REQUEST", "http": {"method": "GET", "url": f"http://s{path}"}})
            for j in range(n)
        ]
    s = summarise(flows, SummaryConfig(top=3))
    assert s.denied_groups == 4
    # /a (first seen at 10 s) and /c (at 8 s) have one each: /c is earlier
    assert [(g.what, g.count) for g in s.top_denied] == [
        ("GET /b", 3), ("GET /d", 2), ("GET /c", 1),
    ]


def test_short_labels() -> None:
    labels = ["k8s:org=empire", "k8s:io.kubernetes.pod.namespace=default", "reserved:world",
              "k8s:io.cilium.k8s.namespace.labels.team=red", "k8s:class=deathstar"]
    assert short_labels(labels) == ("class=deathstar", "org=empire", "reserved:world")


# ---------------------------------------------------------------------------------------------
# Rate over time


def three_decisions() -> list[dict[str, Any]]:
    return [l7("FORWARDED", 0), l7("DROPPED", 7), l7("FORWARDED", 100)]


def test_rate_chooses_the_smallest_interval_that_fits_and_fills_gaps_with_zeros() -> None:
    s = summarise(three_decisions())  # 101 s: 1 s would make 101 buckets, 5 s makes 21
    assert s.rate.interval_s == 5
    counts = [b.count for b in s.rate.buckets]
    assert counts == [1, 1] + [0] * 18 + [1]
    assert [b.start_ns for b in s.rate.buckets[:3]] == [T0, T0 + 5 * 10**9, T0 + 10 * 10**9]
    assert s.rate.buckets[1].verdicts.dropped == 1
    assert s.rate.buckets[1].rate_per_s == 0.2


def test_rate_with_few_buckets_allowed() -> None:
    # 10 s: 11 buckets, 15 s: 7, 30 s: 4
    s = summarise(three_decisions(), SummaryConfig(max_buckets=5))
    assert s.rate.interval_s == 30
    assert [b.count for b in s.rate.buckets] == [2, 0, 0, 1]


def test_rate_with_a_given_interval() -> None:
    s = summarise(three_decisions(), SummaryConfig(interval_s=50))
    assert s.rate.interval_s == 50
    assert [b.count for b in s.rate.buckets] == [2, 0, 1]


def test_rate_beyond_the_last_display_interval_uses_whole_days() -> None:
    flows = [l7("FORWARDED", 0), l7("FORWARDED", 365 * 86400)]
    s = summarise(flows, SummaryConfig(max_buckets=60))
    assert s.rate.interval_s == 7 * 86400  # 366 days in at most 60 buckets
    assert len(s.rate.buckets) == 53
    assert sum(b.count for b in s.rate.buckets) == 2


def test_the_time_series_coarsens_past_its_bucket_limit() -> None:
    # one decision a second: the 100,001st second makes the builder keep minutes instead
    template = l7()
    builder = SummaryBuilder()
    for second in range(MAX_KEPT_BUCKETS):
        builder.add({**template, "time": format_time(T0 + second * 10**9)})
    kept = builder.result().rate
    assert kept.granularity_s == 1
    assert kept.interval_s == 1800  # 100,000 s: 1800 s makes 56 buckets
    builder.add({**template, "time": format_time(T0 + MAX_KEPT_BUCKETS * 10**9)})
    s = builder.result()
    assert s.rate.granularity_s == 60
    assert s.rate.interval_s == 1800
    assert len(s.rate.buckets) == 56
    assert [b.count for b in s.rate.buckets[:2]] == [1800, 1800]
    assert sum(b.count for b in s.rate.buckets) == MAX_KEPT_BUCKETS + 1
    # a given interval finer than what was kept is raised to it
    builder2 = SummaryBuilder(SummaryConfig(interval_s=1))
    for second in range(MAX_KEPT_BUCKETS + 1):
        builder2.add({**template, "time": format_time(T0 + second * 10**9)})
    assert builder2.result().rate.interval_s == 60


def test_time_in_another_spelling_and_out_of_order() -> None:
    flows = [
        l7("FORWARDED", time="2026-12-05T01:00:02+01:00"),  # 00:00:02Z
        l7("FORWARDED", time="2026-12-05T00:00:00.5Z"),
        l7("FORWARDED", time="2026-12-05T00:00:03.000000000Z"),
        l7("FORWARDED", time="2026-12-05T00:00:00.000000001Z"),
    ]
    s = summarise(flows)
    assert (s.first_time_ns, s.last_time_ns) == (T0 + 1, T0 + 3 * 10**9)
    assert [b.count for b in s.rate.buckets] == [2, 0, 1, 1]


# ---------------------------------------------------------------------------------------------
# Decisions and odd records


def test_replies_and_traces_are_records_but_not_decisions() -> None:
    flows = [
        l7("FORWARDED", 0),
        l7("FORWARDED", 0, is_reply=True),
        l3(4, "FORWARDED", 0),
        l3(5, "AUDIT", 0),
        l7("ERROR", 0, is_reply=None),
        l7("DROPPED", 0, Type=None),  # no Type but an l7 part: an L7 record
    ]
    s = summarise(flows)
    assert s.record_verdicts.to_dict() == {
        "total": 6, "forwarded": 3, "dropped": 1, "audit": 1, "error": 1, "other": 0,
    }
    assert s.decision_verdicts.to_dict() == {
        "total": 4, "forwarded": 1, "dropped": 1, "audit": 1, "error": 1, "other": 0,
    }


@pytest.mark.parametrize(
    "flow",
    [
        {},
        {"verdict": 5, "time": 12, "Type": ["L7"]},
        {"verdict": "DROPPED", "Type": "L3_L4", "event_type": "drop"},
        {"verdict": "DROPPED", "Type": "L3_L4", "event_type": {"type": True}},
        {"verdict": "DROPPED", "Type": "L3_L4", "event_type": {"type": 1}, "l4": [1],
         "source": "x", "destination": {"labels": "k8s:a=b"}},
        {"verdict": "DROPPED", "Type": "L7", "l7": {"kafka": {"topics": "t", "api_key": 3}},
         "source": {"labels": [1, {}], "identity": "7"}},
        {"verdict": "DROPPED", "Type": "L7", "l7": {"http": {"url": 7, "method": None}},
         "ingress_denied_by": [{"name": ["x"]}, "rule1", None], "egress_allowed_by": {"a": 1}},
        {"verdict": "FORWARDED", "Type": "L7", "time": "2026-13-40T00:00:00.000000000Z"},
        {"verdict": "FORWARDED", "Type": "L7", "time": "yesterday"},
    ],
)
def test_odd_records_are_counted_without_crashing(flow: dict[str, Any]) -> None:
    builder = SummaryBuilder(known_rules=[RuleKey(CNP, "default", "rule1", "ingress[0]")])
    builder.add(flow)
    s = builder.result()
    assert s.records_read == 1
    assert s.rate.buckets == ()  # no record had a time that could be read
    assert orjson.loads(orjson.dumps(s.to_dict()))["records_read"] == 1


def test_a_record_without_time_counts_in_verdicts_not_in_the_series() -> None:
    untimed = l7("DROPPED")
    del untimed["time"]
    s = summarise([l7("FORWARDED", 0), untimed])
    assert s.decision_verdicts.dropped == 1
    assert [b.count for b in s.rate.buckets] == [1]
    (group,) = s.top_denied
    assert (group.count, group.first_seen_ns, group.last_seen_ns) == (1, None, None)
    assert group.to_dict()["first_seen"] is None


def test_values_that_are_no_objects_and_undecodable_lines_are_skipped() -> None:
    builder = SummaryBuilder()
    builder.add(l7())
    builder.add(["not", "a", "flow"])  # type: ignore[arg-type]
    s = builder.result(skipped=2)
    assert (s.records_read, s.records_skipped) == (1, 3)


def test_summary_config_is_checked() -> None:
    for bad in ({"top": -1}, {"max_buckets": 0}, {"interval_s": 0}):
        with pytest.raises(ValueError):
            SummaryConfig(**bad)


# ---------------------------------------------------------------------------------------------
# Policy rules


def test_rules_count_allowed_denied_and_audited_for_decisions_only() -> None:
    r1, r2 = ref("rule1"), ref("rule1", "egress[0]")
    cluster = {"name": "ccnp", "kind": "CiliumClusterwideNetworkPolicy", "rule": "ingress[1]"}
    flows = [
        l7("FORWARDED", 1, ingress_allowed_by=[r1]),
        l7("FORWARDED", 1.5, is_reply=True, ingress_allowed_by=[r1]),  # not a decision
        l7("DROPPED", 2, ingress_denied_by=[r1]),
        l7("AUDIT", 3, ingress_denied_by=[r1], egress_allowed_by=[r2]),
        l7("DROPPED", 4, egress_denied_by=[r2, cluster]),
        # one denied SYN, both records naming the deny rule: one denial
        l3(5, "DROPPED", 5, ingress_denied_by=[r1]),
        l3(1, "DROPPED", 5, ingress_denied_by=[r1]),
        l3(4, "FORWARDED", 6, ingress_allowed_by=[r1]),  # a trace: not a decision
        # the same rule, its namespace missing instead of empty
        l7("FORWARDED", 7, ingress_allowed_by=[{k: v for k, v in cluster.items()}]),
        l7("FORWARDED", 0, ingress_allowed_by=[{**cluster, "namespace": ""}]),
    ]
    s = summarise(flows)
    rows = [(r.key.text, r.allowed, r.denied, r.audited,
             (r.first_seen_ns or 0) // 10**9 - T0 // 10**9,
             (r.last_seen_ns or 0) // 10**9 - T0 // 10**9) for r in s.rules]
    assert rows == [
        ("CiliumClusterwideNetworkPolicy ccnp ingress[1]", 2, 1, 0, 0, 7),
        (f"{CNP} default/rule1 ingress[0]", 1, 2, 1, 1, 5),
        (f"{CNP} default/rule1 egress[0]", 1, 1, 0, 3, 4),
    ]


def test_rules_sort_by_policy_then_section_as_policies_list_them() -> None:
    rules = ["egress[0]", "ingress[10]", "specs[1].ingress[0]", "ingressDeny[0]", "ingress[2]",
             "egressDeny[1]", "custom"]
    flows = [l7(ingress_allowed_by=[ref("p", rule)]) for rule in rules]
    flows.append(l7(ingress_allowed_by=[ref("a", "egress[0]")]))
    assert [r.key.text.split(" ", 1)[1] for r in summarise(flows).rules] == [
        "default/a egress[0]",
        "default/p ingress[2]", "default/p ingress[10]", "default/p ingressDeny[0]",
        "default/p egress[0]", "default/p egressDeny[1]", "default/p specs[1].ingress[0]",
        "default/p custom",
    ]


def test_rule_keys_name_every_section_of_specs_and_deny_rules() -> None:
    policy = load_text(
        "apiVersion: cilium.io/v2\n"
        "kind: CiliumClusterwideNetworkPolicy\n"
        "metadata: {name: ccnp}\n"
        "specs:\n"
        "- endpointSelector: {matchLabels: {app: a}}\n"
        "  ingress: [{fromEndpoints: [{matchLabels: {app: b}}]}]\n"
        "  ingressDeny: [{fromEndpoints: [{matchLabels: {app: c}}]}]\n"
        "- endpointSelector: {matchLabels: {app: a}}\n"
        "  egress: [{toEndpoints: [{matchLabels: {app: b}}]},\n"
        "           {toEndpoints: [{matchLabels: {app: d}}]}]\n"
        "  egressDeny: [{toEndpoints: [{matchLabels: {app: c}}]}]\n"
    ).policies
    kind = "CiliumClusterwideNetworkPolicy"
    assert rule_keys(policy) == [
        RuleKey(kind, "", "ccnp", "specs[0].ingress[0]"),
        RuleKey(kind, "", "ccnp", "specs[0].ingressDeny[0]"),
        RuleKey(kind, "", "ccnp", "specs[1].egress[0]"),
        RuleKey(kind, "", "ccnp", "specs[1].egress[1]"),
        RuleKey(kind, "", "ccnp", "specs[1].egressDeny[0]"),
    ]
    flows = [l7(egress_denied_by=[{"name": "ccnp", "kind": kind, "rule": "specs[1].egress[1]"}],
                verdict="DROPPED")]
    never = summarise(flows, known=rule_keys(policy)).never_matched or ()
    assert [k.rule for k in never] == [
        "specs[0].ingress[0]", "specs[0].ingressDeny[0]", "specs[1].egress[0]",
        "specs[1].egressDeny[0]",
    ]


def test_rule_key_json() -> None:
    key = RuleKey(CNP, "default", "rule1", "ingress[0]")
    assert key.to_dict() == {"kind": CNP, "namespace": "default", "name": "rule1",
                             "rule": "ingress[0]"}
    assert RuleKey.from_dict(key.to_dict()) == key
    assert RuleKey.from_dict({"name": "ccnp", "namespace": None}) == RuleKey(name="ccnp")
    assert RuleKey(CNP, "", "ccnp", "egress[1]").text == f"{CNP} ccnp egress[1]"


# ---------------------------------------------------------------------------------------------
# JSON


def test_json_layout() -> None:
    known = rule_keys(load_paths(EXAMPLE_POLICIES).policies)
    d = orjson.loads(orjson.dumps(summarise(demo_flows(), known=known).to_dict()))
    assert list(d) == ["records_read", "records_skipped", "retried_syns", "first_time",
                       "last_time", "verdicts", "top_denied", "rate", "rules"]
    assert (d["records_read"], d["first_time"]) == (81, "2026-12-05T11:59:39.547156290Z")
    assert d["retried_syns"] == 4
    assert d["verdicts"]["decisions"] == {
        "total": 45, "forwarded": 40, "dropped": 5, "audit": 0, "error": 0, "other": 0,
    }
    assert d["top_denied"]["total_groups"] == 4
    assert d["top_denied"]["groups"][0] == {
        "count": 2,
        "first_seen": "2026-12-05T11:59:39.893652613Z",
        "last_seen": "2026-12-05T11:59:42.539526549Z",
        "source": {"identity": 258, "namespace": "default", "pod_name": "",
                   "labels": ["class=xwing", "org=alliance"], "ip": "",
                   "text": "default class=xwing,org=alliance (ID:258)", "pods": ["xwing"]},
        "destination": {"identity": 256, "namespace": "default", "pod_name": "",
                        "labels": ["class=deathstar", "org=empire"], "ip": "",
                        "text": "default class=deathstar,org=empire (ID:256)",
                        "pods": ["deathstar-1"]},
        "protocol": "tcp",
        "what": "TCP/80 POLICY_DENIED",
        "verdict": "DROPPED",
    }
    assert list(d["rate"]) == ["interval_s", "granularity_s", "buckets"]
    assert d["rate"]["buckets"][0] == {
        "start": "2026-12-05T11:59:39.000000000Z", "count": 3, "rate_per_s": 3.0,
        "forwarded": 2, "dropped": 1, "audit": 0, "error": 0, "other": 0,
    }
    assert d["rules"]["policies_given"] is True
    assert d["rules"]["matched"][1] == {
        "kind": CNP, "namespace": "default", "name": "rule1", "rule": "ingress[0]",
        "text": f"{CNP} default/rule1 ingress[0]", "allowed": 1, "denied": 1, "audited": 0,
        "first_seen": "2026-12-05T11:59:42.231383296Z",
        "last_seen": "2026-12-05T11:59:42.390661376Z",
    }
    assert d["rules"]["never_matched"] == [
        {"kind": CNP, "namespace": "default", "name": "door-manager", "rule": "ingress[1]",
         "text": f"{CNP} default/door-manager ingress[1]"},
        {"kind": CNP, "namespace": "default", "name": "door-manager", "rule": "ingress[2]",
         "text": f"{CNP} default/door-manager ingress[2]"},
    ]


def test_json_of_an_empty_summary() -> None:
    assert SummaryBuilder().result().to_dict() == {
        "records_read": 0,
        "records_skipped": 0,
        "retried_syns": 0,
        "first_time": None,
        "last_time": None,
        "verdicts": {
            "records": {"total": 0, "forwarded": 0, "dropped": 0, "audit": 0, "error": 0,
                        "other": 0},
            "decisions": {"total": 0, "forwarded": 0, "dropped": 0, "audit": 0, "error": 0,
                          "other": 0},
        },
        "top_denied": {"total_groups": 0, "groups": []},
        "rate": {"interval_s": 1, "granularity_s": 1, "buckets": []},
        "rules": {"policies_given": False, "matched": [], "never_matched": []},
    }


# ---------------------------------------------------------------------------------------------
# Tables


def rendered(summary: AccessLogSummary) -> list[str]:
    out = io.StringIO()
    render_summary(summary, Console(file=out, width=120, color_system=None))
    text = out.getvalue()
    assert "\x1b" not in text
    return [line.rstrip() for line in text.splitlines()]


def test_tables_of_the_demo() -> None:
    known = rule_keys(load_paths(EXAMPLE_POLICIES).policies)
    lines = rendered(summarise(demo_flows(), known=known))
    assert lines[:2] == [
        "81 records read, 0 skipped, from Dec  5 11:59:39.547 to Dec  5 11:59:51.503",
        "4 retransmitted SYNs of denied connection attempts are counted as records, not "
        "again as decisions",
    ]
    for line in [
        "VERDICT    RECORDS  DECISIONS",
        "FORWARDED       67         40",
        "DROPPED         14          5",
        "TOTAL           81         45",
        "Top denied (4 of 4 groups)",
        "Decisions over time (per 1 s)",
        "START                DECISIONS  FORWARDED  DROPPED  RATE/s",
        "Dec  5 11:59:39.000          3          2        1    3.00  " + "█" * 4,
        "Dec  5 11:59:40.000          0                              no decisions until Dec  5 "
        "11:59:42.000 (2 intervals)",
        "Dec  5 11:59:46.000          0          0        0    0.00",
        "Dec  5 11:59:47.000         14         14        0   14.00  " + "█" * 20,
        "Dec  5 11:59:48.000         12         11        1   12.00  " + "█" * 17,
        "RULE                                                        ALLOWED  DENIED  AUDITED"
        "  LAST SEEN",
        "CiliumNetworkPolicy default/rule1 ingress[0]                      1       1        0"
        "  Dec  5 11:59:42.390",
        "Never matched — candidates for removal:",
        "  CiliumNetworkPolicy default/door-manager ingress[1]",
        "  CiliumNetworkPolicy default/door-manager ingress[2]",
    ]:
        assert line in lines
    text = "\n".join(lines)
    for cell in ("PUT /v1/exhaust-port", "metadata topic", "deathstar-plans"):
        assert cell in text
    assert "AUDIT " not in text.split("Decisions over time")[1]  # no audit column: all zero


def test_tables_show_other_verdicts_only_when_there_are_some() -> None:
    lines = rendered(summarise([l7("FORWARDED", 0), l7("AUDIT", 0), l7("ERROR", 1)]))
    assert "START                DECISIONS  FORWARDED  DROPPED  AUDIT  ERROR  RATE/s" in lines
    assert "No denied decisions." in lines


def test_tables_of_an_empty_summary() -> None:
    lines = rendered(SummaryBuilder().result())
    assert lines[0] == "0 records read, 0 skipped"
    assert "No decisions with a time." in lines
    assert "No decision named a policy rule." in lines
    assert (
        "No policies given, so rules that never matched cannot be listed (pass --policy)."
        in lines
    )
    everything_matched = SummaryBuilder(known_rules=[]).result()
    assert "Every rule section of the given policies matched." in rendered(everything_matched)
