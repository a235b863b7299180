"""`accesslog summary` as a reviewer reads it: a retried SYN is one decision, parse errors are
among the top denied, sources and destinations are named alike, and the time table has no
runs of empty rows."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from garrison.cli.accesslog_view import render_summary
from garrison.flows.codec import format_time
from garrison.flows.summary import AccessLogSummary, RetriedSyns, SummaryBuilder, SummaryConfig

T0 = 1_764_936_000 * 1_000_000_000  # 2025-12-05T12:00:00Z


def syn_drop(seconds: float, sport: int = 40000, *, event: int = 1, flags: dict[str, bool]
             | None = None, dst: str = "10.0.0.2", **fields: Any) -> dict[str, Any]:
    flow: dict[str, Any] = {
        "time": format_time(T0 + round(seconds * 1e9)),
        "verdict": "DROPPED",
        "IP": {"source": "10.0.0.1", "destination": dst, "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": sport, "destination_port": 80,
                       "flags": {"SYN": True} if flags is None else flags}},
        "source": {"identity": 1001, "namespace": "default", "pod_name": "client-1",
                   "labels": ["k8s:app=client"], "ip": "10.0.0.1", "port": sport},
        "destination": {"identity": 1002, "namespace": "default", "pod_name": "server-1",
                        "labels": ["k8s:app=server"], "ip": dst, "port": 80},
        "Type": "L3_L4",
        "event_type": {"type": event, "sub_type": 133} if event == 1 else {"type": event},
        "drop_reason_desc": "POLICY_DENIED",
        "ingress_denied_by": [{"name": "deny", "namespace": "default",
                               "kind": "CiliumNetworkPolicy", "rule": "ingressDeny[0]"}],
    }
    flow.update(fields)
    return flow


def summarise(flows: list[dict[str, Any]], config: SummaryConfig | None = None
              ) -> AccessLogSummary:
    builder = SummaryBuilder(config or SummaryConfig())
    for flow in flows:
        builder.add(flow)
    return builder.result()


def rendered(summary: AccessLogSummary) -> list[str]:
    out = io.StringIO()
    render_summary(summary, Console(file=out, width=200, color_system=None))
    return [line.rstrip() for line in out.getvalue().splitlines()]


# --- a retried SYN is one decision ----------------------------------------------------------


def test_retransmitted_syns_of_one_connection_are_one_decision() -> None:
    # Linux retransmits an unanswered SYN after 1, 2, 4 s: four records, one attempt
    s = summarise([syn_drop(t) for t in (0, 1, 3, 7)])
    assert (s.records_read, s.decision_verdicts.dropped, s.retried_syns) == (4, 1, 3)
    (group,) = s.top_denied
    assert group.count == 1
    assert [r.denied for r in s.rules] == [1]  # the deny rule decided once
    assert [b.count for b in s.rate.buckets if b.count] == [1]


def test_a_new_connection_attempt_is_a_new_decision() -> None:
    flows = [
        syn_drop(0), syn_drop(1),
        syn_drop(2, sport=40001),  # curl tries again: a new source port
        syn_drop(3, dst="10.0.0.3"),  # another destination
        syn_drop(100),  # the same 5-tuple long after: not a retransmission (window 64 s)
    ]
    s = summarise(flows)
    assert (s.decision_verdicts.dropped, s.retried_syns) == (4, 1)


def test_only_denied_syns_are_merged() -> None:
    ack = {"SYN": True, "ACK": True}
    flows = [syn_drop(0, flags=ack), syn_drop(1, flags=ack),  # SYN-ACKs
             syn_drop(2, flags={"ACK": True}), syn_drop(3, flags={"ACK": True}),  # data
             syn_drop(4, verdict="FORWARDED"), syn_drop(5, verdict="FORWARDED")]
    s = summarise(flows)
    assert s.retried_syns == 0
    assert s.decision_verdicts.total == 6


def test_drop_and_policy_verdict_records_are_merged_each_with_their_kind() -> None:
    flows = [syn_drop(0, event=5), syn_drop(0, event=1), syn_drop(1, event=5),
             syn_drop(1, event=1)]
    s = summarise(flows)
    assert (s.decision_verdicts.dropped, s.retried_syns) == (1, 2)
    # a retransmission logged a little out of order is still one
    s = summarise([syn_drop(1), syn_drop(0.999)])
    assert (s.decision_verdicts.dropped, s.retried_syns) == (1, 1)


def test_the_window_is_configurable_and_zero_counts_every_copy() -> None:
    flows = [syn_drop(t) for t in (0, 1, 3)]
    assert summarise(flows, SummaryConfig(syn_retry_window_s=0)).decision_verdicts.dropped == 3
    assert summarise(flows, SummaryConfig(syn_retry_window_s=1.5)).decision_verdicts.dropped == 2


def test_syns_without_addresses_are_not_merged() -> None:
    def anonymous(seconds: float) -> dict[str, Any]:
        flow = syn_drop(seconds)
        del flow["IP"]
        del flow["source"]["ip"]
        return flow

    assert summarise([anonymous(0), anonymous(1)]).decision_verdicts.dropped == 2


# --- parse errors among the top denied ------------------------------------------------------


def l7_error(seconds: float, reason: str, **l7: Any) -> dict[str, Any]:
    flow = syn_drop(seconds, verdict="ERROR", Type="L7", event_type={"type": 129},
                    is_reply=False, drop_reason_desc=reason,
                    l7={"type": "REQUEST", **l7}, error="frame too long")
    del flow["ingress_denied_by"]
    return flow


def test_parse_errors_are_among_the_top_denied() -> None:
    flows = [l7_error(0, "PARSE_ERROR", kafka={}), l7_error(1, "PARSE_ERROR", kafka={}),
             l7_error(2, "PARSE_ERROR", http={"method": "GET", "url": "http://s/v1/x"}),
             l7_error(3, "UPSTREAM_ERROR", http={"method": "GET", "url": "http://s/v1/x"})]
    s = summarise(flows)
    assert [(g.count, g.protocol, g.what, g.verdict) for g in s.top_denied] == [
        (2, "kafka", "PARSE_ERROR", "ERROR"),
        (1, "http", "GET /v1/x PARSE_ERROR", "ERROR"),
    ]
    assert s.decision_verdicts.error == 4  # an upstream failure is no denial
    lines = rendered(s)
    assert "Top denied (2 of 2 groups)" in lines
    assert any("PARSE_ERROR" in line and line.lstrip().startswith("2 ") for line in lines)
    assert summarise(flows).to_dict()["top_denied"]["groups"][0]["verdict"] == "ERROR"


# --- sources and destinations named alike ---------------------------------------------------


def test_source_and_destination_are_named_the_same_way() -> None:
    flow = syn_drop(0)
    flow["destination"] = dict(flow["source"])  # the same endpoint on both sides
    (group,) = summarise([flow]).top_denied
    assert group.source == group.destination
    assert group.source.text == group.destination.text == "default app=client (ID:1001)"
    # an endpoint without labels is named by its pod on either side, then by its address
    flow = syn_drop(0)
    for side in ("source", "destination"):
        del flow[side]["labels"]
    del flow["destination"]["pod_name"]
    (group,) = summarise([flow]).top_denied
    assert (group.source.text, group.destination.text) == (
        "default/client-1 (ID:1001)", "default 10.0.0.2 (ID:1002)")


def test_replicas_on_either_side_are_one_group_with_their_pods() -> None:
    flows = []
    for i, (client, server) in enumerate([("client-1", "server-1"), ("client-2", "server-2"),
                                          ("client-1", "server-2")]):
        flow = syn_drop(i, sport=40000 + i)
        flow["source"]["pod_name"], flow["destination"]["pod_name"] = client, server
        flows.append(flow)
    (group,) = summarise(flows).top_denied
    assert group.count == 3
    assert (group.source_pods, group.destination_pods) == (
        ("client-1", "client-2"), ("server-1", "server-2"))
    assert any("default app=client (ID:1001) pods: client-1, client-2" in line
               for line in rendered(summarise(flows)))


# --- the time table -------------------------------------------------------------------------


def test_the_time_table_has_no_runs_of_empty_rows() -> None:
    # two bursts 50 minutes apart: 1-minute buckets, 48 of them empty in between
    flows = [syn_drop(t, sport=41000 + i) for i, t in enumerate((0, 10, 3000, 3010))]
    s = summarise(flows)
    assert s.rate.interval_s == 60 and len(s.rate.buckets) == 51
    lines = rendered(s)
    table = lines[lines.index("Decisions over time (per 1 min)") + 2:]
    table = table[:table.index("")]
    assert len(table) == 3
    assert "no decisions until" in table[1] and "(49 intervals)" in table[1]
    zero_rows = [line for line in table if line.split()[3] == "0"]
    assert len(zero_rows) == 1


def test_retried_syns_on_its_own_for_other_counters() -> None:
    # the service map and other counters can tell retries apart the same way
    retries = RetriedSyns(64)
    at = [T0 + s * 1_000_000_000 for s in (0, 1, 3, 70, 200)]
    assert [retries.is_retry(syn_drop(0), 1, ns) for ns in at] == [
        False, True, True, False, False]  # 70 s is 67 s after the last copy: a new attempt
    assert not retries.is_retry(syn_drop(0), 5, at[1])  # another record kind: its own first


def test_an_aggregated_record_counts_every_flow_it_stands_for() -> None:
    """Repeated identical denials recorded once with Hubble's `aggregate` counters (the Kafka
    proxy does this) count as that many decisions, denials and rule hits."""
    log = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"
    flows = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.strip()]
    put = next(f for f in flows if f.get("l7", {}).get("http", {}).get("method") == "PUT")

    def summed(records: list[dict[str, object]]) -> dict[str, object]:
        builder = SummaryBuilder()
        for record in records:
            builder.add(record)
        return builder.result().to_dict()

    repeated = copy.deepcopy(put)
    repeated["aggregate"] = {"ingress_flow_count": 41}
    before, after = summed(flows), summed([*flows, repeated])
    decisions = after["verdicts"]["decisions"]  # type: ignore[index]
    assert decisions["dropped"] == before["verdicts"]["decisions"]["dropped"] + 41  # type: ignore[index]
    top = {(g["what"], g["count"]) for g in after["top_denied"]["groups"]}  # type: ignore[index]
    assert ("PUT /v1/exhaust-port", 42) in top
