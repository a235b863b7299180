"""The service map's aggregation (pure): nodes, edges, L7 detail, rules, grouping, merging."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import orjson
import pytest

from garrison.flows.servicemap import ServiceMapBuilder
from garrison.flows.summary import RuleKey, SummaryBuilder

DEMO = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"


def demo_flows() -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in DEMO.read_bytes().splitlines() if line.strip()]


def built(flows: list[Any]) -> dict[str, Any]:
    builder = ServiceMapBuilder()
    for flow in flows:
        builder.add(flow)
    return builder.result()


def edge(result: dict[str, Any], source: str, target: str) -> dict[str, Any]:
    names = {n["id"]: n["name"] for n in result["nodes"]}
    for e in result["edges"]:
        if names[e["source"]] == source and names[e["target"]] == target:
            return e
    raise AssertionError(f"no edge {source} -> {target}: {result['edges']}")


def test_demo_nodes_group_replicas_by_identity() -> None:
    result = built(demo_flows())
    nodes = {n["name"]: n for n in result["nodes"]}
    assert set(nodes) == {"deathstar", "tiefighter", "xwing", "guard", "door-manager",
                          "kafka", "empire-hq", "outpost"}
    deathstar = nodes["deathstar"]
    assert deathstar["id"] == "default/256"
    assert deathstar["pods"] == ["deathstar-1", "deathstar-2"]
    assert deathstar["labels"] == ["class=deathstar", "org=empire"]


def test_demo_tiefighter_edge_has_the_denied_put_its_403_and_the_rule() -> None:
    e = edge(built(demo_flows()), "tiefighter", "deathstar")
    assert e["state"] == "mixed"
    assert e["counts"] == {"forwarded": 5, "dropped": 1, "audit": 0, "error": 0, "other": 0}
    put = next(x for x in e["l7"] if x["what"] == "PUT /v1/exhaust-port")
    assert (put["protocol"], put["forwarded"], put["dropped"]) == ("http", 0, 1)
    assert [(a["code"], a["count"]) for a in put["answers"]] == [("403", 1)]
    assert [r["text"] for r in e["rules"]] == ["CiliumNetworkPolicy default/rule1 ingress[0]"]
    assert (e["rules"][0]["allowed"], e["rules"][0]["denied"]) == (1, 1)
    assert e["filter"] == ("--from-namespace default --from-identity 257 "
                           "--to-namespace default --to-identity 256")


def test_demo_xwing_edge_is_dropped_and_counts_each_attempt_once() -> None:
    result = built(demo_flows())
    e = edge(result, "xwing", "deathstar")
    assert e["state"] == "dropped"
    # two connection attempts, each SYN sent twice, each written as a policy-verdict and a
    # drop record
    assert e["counts"]["dropped"] == 2
    assert e["ports"] == [{"port": "TCP/80", "forwarded": 0, "dropped": 2, "audit": 0,
                           "error": 0, "other": 0}]
    assert result["retried_syns"] == 4


def test_decisions_agree_with_accesslog_summary() -> None:
    flows = demo_flows()
    summary = SummaryBuilder()
    for flow in flows:
        summary.add(flow)
    expected = summary.result().to_dict()["verdicts"]["decisions"]
    del expected["total"]
    got = dict.fromkeys(expected, 0)
    for e in built(flows)["edges"]:
        for verdict, n in e["counts"].items():
            got[verdict] += n
    assert got == expected


def test_demo_grpc_and_kafka_detail() -> None:
    result = built(demo_flows())
    grpc = edge(result, "guard", "door-manager")
    denied = next(x for x in grpc["l7"] if x["what"] == "doors.DoorManager/SetAccessCode")
    assert [a["text"] for a in denied["answers"]] == ["7 PERMISSION_DENIED"]
    kafka = edge(result, "empire-hq", "kafka")
    plans = next(x for x in kafka["l7"] if x["what"] == "metadata topic deathstar-plans")
    assert plans["dropped"] == 1
    assert [a["code"] for a in plans["answers"]] == ["29"]


def test_rule_totals_agree_with_accesslog_summary() -> None:
    flows = demo_flows()
    summary = SummaryBuilder()
    for flow in flows:
        summary.add(flow)
    expected = [(r.key.text, r.allowed, r.denied, r.audited) for r in summary.result().rules]
    got = [(r["text"], r["allowed"], r["denied"], r["audited"]) for r in built(flows)["rules"]]
    assert got == expected


def test_never_matched_and_audited() -> None:
    flows = demo_flows()
    audited = copy.deepcopy(next(f for f in flows if f.get("l7", {}).get("http", {}).get(
        "method") == "PUT" and not f.get("is_reply")))
    audited["verdict"] = "AUDIT"
    builder = ServiceMapBuilder()
    for flow in [*flows, audited]:
        builder.add(flow)
    unused = RuleKey("CiliumNetworkPolicy", "default", "rule1", "egress[0]")
    result = builder.result(known_rules=[unused, RuleKey("CiliumNetworkPolicy", "default",
                                                        "rule1", "ingress[0]")])
    assert [r["text"] for r in result["never_matched"]] == [unused.text]
    assert result["audited"] == [{
        "source": "default/257", "target": "default/256", "protocol": "http",
        "what": "PUT /v1/exhaust-port", "count": 1,
        "rules": ["CiliumNetworkPolicy default/rule1 ingress[0]"],
    }]
    rule1 = next(r for r in result["rules"] if r["name"] == "rule1")
    assert (rule1["allowed"], rule1["denied"], rule1["audited"]) == (1, 1, 1)


def test_merged_halves_equal_the_whole_and_survive_pickling() -> None:
    flows = demo_flows()
    for cut in (1, 10, 40, 80):
        first, second = ServiceMapBuilder(), ServiceMapBuilder()
        for flow in flows[:cut]:
            first.add(flow)
        for flow in flows[cut:]:
            second.add(flow)
        first = pickle.loads(pickle.dumps(first))
        first.merge(pickle.loads(pickle.dumps(second)))
        assert first.result() == built(flows), cut


def test_many_endpoints_group_by_namespace() -> None:
    flows = []
    for i in range(1000):
        flows.append({
            "time": "2026-12-05T12:00:00.000000000Z", "verdict": "FORWARDED", "Type": "L3_L4",
            "event_type": {"type": 5}, "is_reply": False,
            "l4": {"TCP": {"source_port": 40000, "destination_port": 80}},
            "source": {"identity": 1000 + i, "namespace": f"team{i % 3}",
                       "pod_name": f"client-{i}", "labels": [f"k8s:app=client{i}"]},
            "destination": {"identity": 999, "namespace": "shop", "pod_name": "web",
                            "labels": ["k8s:app=web"]},
        })
    result = built(flows)
    assert result["grouped"] is True
    assert sorted(n["name"] for n in result["nodes"]) == ["shop", "team0", "team1", "team2"]
    assert sum(e["counts"]["forwarded"] for e in result["edges"]) == 1000
    assert {e["target"] for e in result["edges"]} == {"shop/-1"}
    assert sorted(e["filter"] for e in result["edges"]) == [
        f"--from-namespace team{i} --to-namespace shop" for i in range(3)]


def test_past_max_nodes_namespaces_the_quietest_are_one_node() -> None:
    flows = []
    for i in range(300):
        for _ in range(1 + (i % 7 == 0) * 5):  # every 7th namespace is busier
            flows.append({
                "verdict": "DROPPED", "Type": "L3_L4", "event_type": {"type": 1},
                "l4": {"TCP": {"destination_port": 443}},
                "source": {"identity": 5000 + i, "namespace": f"ns{i:03d}", "pod_name": "a"},
                "destination": {"identity": 2, "labels": ["reserved:world"]},
            })
    builder = ServiceMapBuilder()
    for flow in flows:
        builder.add(flow)
    result = builder.result(max_nodes=50)
    names = {n["name"] for n in result["nodes"]}
    assert len(result["nodes"]) == 50
    assert "(other namespaces)" in names
    assert {f"ns{i:03d}" for i in range(0, 300, 7)} <= names  # the busy ones are kept
    assert sum(e["counts"]["dropped"] for e in result["edges"]) == len(flows)
    other = next(e for e in result["edges"] if e["source"] == "(other namespaces)/-1")
    assert other["filter"] == "" and other["state"] == "dropped"


@pytest.mark.parametrize("bad", [
    None, 3, "text", [], {"source": [1, 2]}, {"l7": "x", "Type": "L7"},
    {"Type": "L7", "l7": {"http": {"url": 5, "code": "x"}}, "is_reply": True},
    {"Type": "L3_L4", "event_type": "drop", "verdict": ["DROPPED"]},
    {"ingress_allowed_by": [{"name": ["x"]}], "Type": "L7", "l7": {"kafka": {"topics": 7}}},
    {"source": {"identity": {"a": 1}, "namespace": ["x"], "pod_name": {}}},
    *({"time": t, "verdict": "DROPPED", "Type": "L3_L4", "event_type": {"type": 1},
       "l4": {"TCP": {"source_port": 1, "destination_port": 2, "flags": {"SYN": True}}},
       "source": {"ip": "198.18.0.1"}, "destination": {"ip": "198.18.0.2"}}
      for t in ("2026-13-99T99:99:99.999999999Z", "2026-12-05T12:00:00.abcdefghiZ")),
])
def test_hostile_records_never_crash(bad: Any) -> None:
    builder = ServiceMapBuilder()
    builder.add(bad)
    for flow in demo_flows()[:5]:
        builder.add(flow)
    orjson.dumps(builder.result())


def test_labels_and_paths_are_data_not_markup() -> None:
    flows = demo_flows()
    hostile = copy.deepcopy(flows[10])
    hostile["source"]["labels"] = ["k8s:app=<script>alert(1)</script>"]
    hostile["source"]["identity"] = 4242
    hostile["l7"]["http"]["url"] = "http://x/<img src=x onerror=alert(1)>"
    result = built([hostile])
    node = next(n for n in result["nodes"] if n["identity"] == 4242)
    assert node["labels"] == ["app=<script>alert(1)</script>"]
    assert result["edges"][0]["l7"][0]["what"] == "PUT /<img src=x onerror=alert(1)>"


def test_an_aggregated_record_counts_every_flow_it_stands_for() -> None:
    """A proxy may record repeated identical denials once, with Hubble's `aggregate`
    counters (the Kafka proxy does): the map counts each flow, on the edge, its L7 entry,
    its answer and the rule that denied it."""
    flows = demo_flows()
    request, response = (
        f for f in flows if f.get("l7", {}).get("http", {}).get("method") == "PUT"
    )
    before = edge(built(flows), "tiefighter", "deathstar")
    repeated = [copy.deepcopy(request), copy.deepcopy(response)]
    for record in repeated:
        record["aggregate"] = {"ingress_flow_count": 41}
    after = edge(built([*flows, *repeated]), "tiefighter", "deathstar")
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 41
    put = next(x for x in after["l7"] if x["what"] == "PUT /v1/exhaust-port")
    assert put["dropped"] == 42
    assert [(a["code"], a["count"]) for a in put["answers"]] == [("403", 42)]
    assert after["rules"][0]["denied"] == before["rules"][0]["denied"] + 41


def test_a_reserved_identity_without_pods_is_named_by_its_reserved_name() -> None:
    """World traffic (identity 2) has no pod: the node is `world`, not an error."""
    result = built([{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED",
                     "source": {"identity": 2, "ip": "198.51.100.7"},
                     "destination": {"identity": 256, "namespace": "default",
                                     "pod_name": "deathstar-1"},
                     "l4": {"TCP": {"destination_port": 80}}}])
    names = {n["id"]: n["name"] for n in result["nodes"]}
    assert names == {"2": "world", "default/256": "deathstar-1"}
