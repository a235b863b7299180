"""Proxy metrics: Cilium's names with the garrison_ prefix, values, and a real scrape."""

from __future__ import annotations

import dataclasses
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from garrison.flows.record import Aggregate
from garrison.proxy.metrics import MetricsConfig, ProxyMetrics
from tests.unit.flows import samples


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def _exercise(m: ProxyMetrics) -> None:
    """Records as the proxy's sink counts them (one loop turn), then connections, the pool and
    an access-log error."""
    m.count_records(
        [
            samples.http_request_allowed(),
            samples.http_response_allowed(),
            samples.http_request_allowed(),
            dataclasses.replace(samples.http_response_allowed(), l7=dataclasses.replace(
                samples.http_response_allowed().l7, latency_ns=400_000)),
            samples.http_request_denied(),
            samples.proxy_parse_error(),
        ]
    )
    m.connection_opened("http")
    m.connection_opened("http")
    m.connection_opened("grpc")
    m.connection_closed("http")
    m.set_upstream_pool(idle=4, busy=2)
    m.access_log_error()


BUCKET = "garrison_proxy_upstream_reply_seconds_bucket"
EXPECTED = {
    _key("garrison_policy_l7_total", rule="received", proxy_type="http", direction="ingress"): 3,
    _key("garrison_policy_l7_total", rule="forwarded", proxy_type="http", direction="ingress"): 2,
    _key("garrison_policy_l7_total", rule="denied", proxy_type="http", direction="ingress"): 1,
    _key(
        "garrison_policy_l7_total", rule="parse_errors", proxy_type="kafka", direction="ingress"
    ): 1,
    _key("garrison_policy_l7_total", rule="denied", proxy_type="grpc", direction="egress"): 0,
    _key("garrison_proxy_upstream_reply_seconds_count", protocol="http", scope="headers"): 2,
    _key("garrison_proxy_upstream_reply_seconds_sum", protocol="http", scope="headers"): 0.0029,
    _key(BUCKET, protocol="http", scope="headers", le="0.0005"): 1,
    _key(BUCKET, protocol="http", scope="headers", le="0.005"): 2,
    _key("garrison_proxy_connections", proxy_type="http"): 1,
    _key("garrison_proxy_connections", proxy_type="grpc"): 1,
    _key("garrison_proxy_connections", proxy_type="kafka"): 0,
    _key("garrison_proxy_upstream_pool_connections", state="idle"): 4,
    _key("garrison_proxy_upstream_pool_connections", state="busy"): 2,
    _key("garrison_proxy_access_log_errors_total"): 1,
    _key("garrison_proxy_flows_total", verdict="DROPPED"): 1,
    _key("garrison_proxy_flows_total", verdict="FORWARDED"): 4,
    _key("garrison_proxy_flows_total", verdict="ERROR"): 1,
}


def _check(values: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    for key, expected in EXPECTED.items():
        assert values[key] == pytest.approx(expected), key


def test_values_in_the_text_format() -> None:
    m = ProxyMetrics()
    _exercise(m)
    _check(_samples(m.render().decode()))


def test_value_lookup() -> None:
    m = ProxyMetrics()
    _exercise(m)
    labels = {"rule": "received", "proxy_type": "http", "direction": "ingress"}
    assert m.value("garrison_policy_l7_total", labels) == 3
    assert m.value("garrison_proxy_access_log_errors_total") == 1
    assert m.value("garrison_no_such_metric") is None


def test_every_policy_series_exists_at_zero() -> None:
    values = _samples(ProxyMetrics().render().decode())
    for rule in ("received", "forwarded", "denied", "parse_errors"):
        for proxy_type in ("http", "grpc", "kafka"):
            for direction in ("ingress", "egress"):
                key = _key(
                    "garrison_policy_l7_total",
                    rule=rule,
                    proxy_type=proxy_type,
                    direction=direction,
                )
                assert values[key] == 0


def test_each_instance_has_its_own_registry() -> None:
    a, b = ProxyMetrics(), ProxyMetrics()
    a.access_log_error()
    assert a.value("garrison_proxy_access_log_errors_total") == 1
    assert b.value("garrison_proxy_access_log_errors_total") == 0


def test_custom_buckets() -> None:
    m = ProxyMetrics(MetricsConfig(latency_buckets=(0.001, 1.0)))
    m.count_records([samples.http_response_allowed()])  # 2.5 ms
    values = _samples(m.render().decode())
    assert values[_key(BUCKET, protocol="http", scope="headers", le="0.001")] == 0
    assert values[_key(BUCKET, protocol="http", scope="headers", le="1.0")] == 1


def test_scrape_over_loopback() -> None:
    m = ProxyMetrics()
    _exercise(m)
    server = m.serve("127.0.0.1", 0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
        _check(_samples(body))
        m.count_records([samples.http_request_denied()])  # a later scrape sees later values
        with urllib.request.urlopen(url, timeout=5) as response:
            values = _samples(response.read().decode())
        key = _key("garrison_policy_l7_total", rule="denied", proxy_type="http",
                   direction="ingress")
        assert values[key] == 2
    finally:
        server.close()


def test_a_turns_records_are_counted_into_their_series() -> None:
    """What the proxy's sink counts per loop turn: requests received and forwarded or denied,
    answer latencies, parse errors, flows by verdict; an aggregated record counts as the
    flows it stands for."""
    m = ProxyMetrics()
    repeated = dataclasses.replace(
        samples.kafka_request_denied(), aggregate=Aggregate(ingress_flow_count=41)
    )
    m.count_records(
        [
            samples.http_request_allowed(),
            samples.http_response_allowed(),
            samples.http_request_allowed(),
            samples.http_request_denied(),
            samples.kafka_request_denied(),
            repeated,
            samples.proxy_parse_error(),
            samples.l3_drop_denied(),
        ]
    )
    got = _samples(m.render().decode())
    policy = "garrison_policy_l7_total"
    assert got[_key(policy, rule="received", proxy_type="http", direction="ingress")] == 3
    assert got[_key(policy, rule="forwarded", proxy_type="http", direction="ingress")] == 2
    assert got[_key(policy, rule="denied", proxy_type="http", direction="ingress")] == 1
    assert got[_key(policy, rule="received", proxy_type="kafka", direction="ingress")] == 42
    assert got[_key(policy, rule="denied", proxy_type="kafka", direction="ingress")] == 42
    assert got[_key(policy, rule="forwarded", proxy_type="kafka", direction="ingress")] == 0
    assert got[_key(policy, rule="parse_errors", proxy_type="kafka", direction="ingress")] == 1
    reply = "garrison_proxy_upstream_reply_seconds"
    assert got[_key(f"{reply}_count", protocol="http", scope="headers")] == 1
    assert got[_key(f"{reply}_sum", protocol="http", scope="headers")] == pytest.approx(0.0025)
    flows = "garrison_proxy_flows_total"
    assert got[_key(flows, verdict="FORWARDED")] == 3
    assert got[_key(flows, verdict="DROPPED")] == 1 + 1 + 41 + 1
    assert got[_key(flows, verdict="ERROR")] == 1


def test_a_request_refused_as_malformed_counts_as_a_parse_error_not_a_denial() -> None:
    """HTTP/2 answers a request it cannot forward safely (say `/%2e%2e/`) with 400 and goes
    on with the connection: its two records are DROPPED with PARSE_ERROR. That is a parse
    error, as HTTP/1.1's ERROR record for the same request is, never a policy denial."""
    from garrison.flows.build import l7_http_request, l7_http_response
    from garrison.flows.record import DropReasonDesc, Verdict

    common = dict(time_ns=samples.T0, verdict=Verdict.DROPPED, direction="ingress",
                  client=samples.TIEFIGHTER, server=samples.DEATHSTAR, method="GET",
                  path="/v1/%2e%2e/etc", host="deathstar", protocol="HTTP/2",
                  drop_reason=DropReasonDesc.PARSE_ERROR,
                  error="HTTP/2 request refused: dot-segment")
    m = ProxyMetrics()
    m.count_records([
        l7_http_request(**common),  # type: ignore[arg-type]
        l7_http_response(code=400, latency_ns=0, **common),  # type: ignore[arg-type]
    ])
    got = _samples(m.render().decode())
    l7 = "garrison_policy_l7_total"
    assert got[_key(l7, rule="parse_errors", proxy_type="http", direction="ingress")] == 1
    assert got[_key(l7, rule="denied", proxy_type="http", direction="ingress")] == 0
    assert got[_key(l7, rule="received", proxy_type="http", direction="ingress")] == 0
