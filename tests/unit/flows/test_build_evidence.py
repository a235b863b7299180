"""Evidence in HTTP records: the request-target as sent beside the normalized one, and named
query parameters redacted (issue 17)."""

from __future__ import annotations

import pytest

from garrison.flows.build import l7_grpc_request, l7_http_request, l7_http_response
from garrison.flows.codec import record_to_dict
from garrison.flows.record import HTTP, FlowRecord, Verdict
from garrison.flows.redact import RedactionConfig, redact_url
from garrison.flows.render import RenderOptions, render_compact
from tests.unit.flows import samples
from tests.unit.flows.test_query_hubble import q, selects

TOKEN = RedactionConfig(query_params=frozenset({"token"}))


def _request(path: str, raw_target: str = "", redaction: RedactionConfig = TOKEN,
             host: str = "deathstar") -> FlowRecord:
    return l7_http_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        method="GET",
        path=path,
        host=host,
        raw_target=raw_target,
        redaction=redaction,
    )


def _http(record: FlowRecord) -> HTTP:
    assert record.l7 is not None and record.l7.http is not None
    return record.l7.http


# --- the raw target ---------------------------------------------------------------------------


def test_a_normalized_target_keeps_both() -> None:
    http = _http(_request("/v1/y", raw_target="/v1/./x/../y"))
    assert http.url == "http://deathstar/v1/y"
    assert http.raw_target == "/v1/./x/../y"


@pytest.mark.parametrize(
    ("path", "raw", "host"),
    [
        ("/v1/y", "/v1/y", "deathstar"),  # nothing normalized
        ("/v1/y", "", "deathstar"),  # the engine did not say
        ("/v1/y", "http://deathstar/v1/y", "deathstar"),  # absolute form, same URL
    ],
)
def test_an_unchanged_target_is_not_repeated(path: str, raw: str, host: str) -> None:
    record = _request(path, raw_target=raw, host=host)
    assert _http(record).raw_target == ""
    assert "raw_target" not in record.to_json()


def test_the_exact_json_line_part() -> None:
    line = _request("/v1/y?a=A", raw_target="/v1/./x/../y?a=%41").to_json()
    assert (
        '"http":{"method":"GET","url":"http://deathstar/v1/y?a=A",'
        '"raw_target":"/v1/./x/../y?a=%41","protocol":"HTTP/1.1"}' in line
    )


def test_codec_round_trip_keeps_the_raw_target() -> None:
    record = _request("/v1/y?token=s", raw_target="/v1/%2e/y?token=s")
    again = FlowRecord.from_json(record.to_json())
    assert again == record
    assert _http(again).raw_target == "/v1/%2e/y?token=[REDACTED]"
    assert record_to_dict(again)["l7"]["http"]["raw_target"] == "/v1/%2e/y?token=[REDACTED]"


def test_grpc_raw_path_kept_when_it_differs() -> None:
    record = l7_grpc_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        service="pkg.Svc",
        method="Get",
        authority="deathstar:50051",
        raw_target="//pkg.Svc/./Get",
    )
    assert _http(record).url == "http://deathstar:50051/pkg.Svc/Get"
    assert _http(record).raw_target == "//pkg.Svc/./Get"
    same = l7_grpc_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        service="pkg.Svc",
        method="Get",
        raw_target="/pkg.Svc/Get",
    )
    assert _http(same).raw_target == ""


def test_compact_line_says_what_was_normalized() -> None:
    record = _request("/v1/y", raw_target="/v1/./x/../y")
    line = render_compact(record, RenderOptions(time=False))
    assert line == (
        "default/tiefighter:42690 (ID:31028) -> default/deathstar:80 (ID:16530) "
        "http-request FORWARDED (HTTP/1.1 GET http://deathstar/v1/y) "
        "(normalized from /v1/./x/../y)"
    )
    plain = render_compact(_request("/v1/y"), RenderOptions(time=False))
    assert plain.endswith("(HTTP/1.1 GET http://deathstar/v1/y)")


def test_http_path_filter_matches_the_normalized_path() -> None:
    flow = record_to_dict(_request("/v1/y", raw_target="/v1/./x/../y"))
    assert selects(q("--http-path", "^/v1/y$"), flow) == [True]
    assert selects(q("--http-path", "x"), flow) == [False]


# --- named query parameters -------------------------------------------------------------------


def test_named_parameter_redacted_in_url_and_raw_target() -> None:
    http = _http(_request("/v1/y?token=abc&page=2", raw_target="/v1/./y?token=abc&page=2"))
    assert http.url == "http://deathstar/v1/y?token=[REDACTED]&page=2"
    assert http.raw_target == "/v1/./y?token=[REDACTED]&page=2"


def test_summary_never_shows_the_value() -> None:
    record = _request("/v1/y?token=abc")
    assert record.summary == "HTTP/1.1 GET http://deathstar/v1/y?token=[REDACTED]"
    assert "abc" not in record.to_json()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/a?token=abc", "/a?token=[REDACTED]"),
        ("/a?%74oken=abc", "/a?%74oken=[REDACTED]"),  # percent-encoded name, decoded to compare
        ("/a?%74%6F%6B%65%6E=abc", "/a?%74%6F%6B%65%6E=[REDACTED]"),
        ("/a?Token=abc", "/a?Token=abc"),  # names are case-sensitive, as sent
        ("/a?tokens=abc&xtoken=1", "/a?tokens=abc&xtoken=1"),
        ("/a?token=1&token=2", "/a?token=[REDACTED]&token=[REDACTED]"),  # every occurrence
        ("/a?token", "/a?token"),  # no value to hide
        ("/a?token=", "/a?token=[REDACTED]"),
        ("/a?x=token", "/a?x=token"),  # a value is not a name
        ("/token=abc", "/token=abc"),  # no query
        ("http://u:pw@h/a?token=abc#f", "http://u:[REDACTED]@h/a?token=[REDACTED]#f"),
    ],
)
def test_redact_url_named(url: str, expected: str) -> None:
    assert redact_url(url, TOKEN) == expected


def test_plus_reads_as_a_space_in_a_name() -> None:
    config = RedactionConfig(query_params=frozenset({"api key"}))
    assert redact_url("/a?api+key=s&api%20key=t", config) == (
        "/a?api+key=[REDACTED]&api%20key=[REDACTED]"
    )


def test_no_names_no_change() -> None:
    assert redact_url("/a?token=abc", RedactionConfig()) == "/a?token=abc"


def test_response_records_redact_too() -> None:
    record = l7_http_response(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        method="GET",
        path="/v1/y?token=abc",
        code=200,
        latency_ns=1_000_000,
        host="deathstar",
        redaction=TOKEN,
    )
    assert _http(record).url == "http://deathstar/v1/y?token=[REDACTED]"
    assert "abc" not in record.to_json()


def test_the_same_inputs_with_another_raw_target_are_another_record() -> None:
    # the builders' memo of HTTP parts must not hand out one request's raw target for another
    first = _http(_request("/v1/y", raw_target="/v1/./y"))
    second = _http(_request("/v1/y", raw_target="/v1//y"))
    assert (first.raw_target, second.raw_target) == ("/v1/./y", "/v1//y")
