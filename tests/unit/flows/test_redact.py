"""Sensitive values never reach a stored or written record."""

from __future__ import annotations

import pytest

from garrison.flows.build import l7_grpc_request, l7_http_request, l7_http_response
from garrison.flows.record import HTTP, HTTPHeader, Verdict
from garrison.flows.redact import (
    DEFAULT_REDACTION,
    REDACTED,
    RedactionConfig,
    redact_url,
)
from tests.unit.flows import samples


def _request(
    headers: list[tuple[str | bytes, str | bytes]],
    path: str = "/v1/",
    redaction: RedactionConfig = DEFAULT_REDACTION,
) -> HTTP:
    record = l7_http_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        method="GET",
        path=path,
        host="deathstar",
        headers=headers,
        redaction=redaction,
    )
    assert record.l7 is not None and record.l7.http is not None
    return record.l7.http


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "AUTHORIZATION",
        "Proxy-Authorization",
        "Cookie",
        "Set-Cookie",
        "X-Api-Key",
        "x-api-key",
    ],
)
def test_default_headers_redacted(name: str) -> None:
    http = _request([(name, "secret"), ("Accept", "*/*")])
    assert http.headers == (HTTPHeader(name, REDACTED), HTTPHeader("Accept", "*/*"))


def test_bytes_headers_decoded_and_redacted() -> None:
    http = _request([(b"Cookie", b"a=1"), (b"X-Caf\xe9", b"\xff")])
    assert http.headers == (HTTPHeader("Cookie", REDACTED), HTTPHeader("X-Café", "ÿ"))


def test_every_value_of_a_repeated_header() -> None:
    http = _request([("Cookie", "a=1"), ("cookie", "b=2")])
    assert [h.value for h in http.headers] == [REDACTED, REDACTED]


def test_configurable_list_replaces_the_default() -> None:
    config = RedactionConfig(headers=frozenset({"X-Secret-Token"}))
    http = _request([("x-secret-token", "t"), ("Authorization", "Basic x")], redaction=config)
    assert http.headers == (
        HTTPHeader("x-secret-token", REDACTED),
        HTTPHeader("Authorization", "Basic x"),
    )


def test_query_values_kept_by_default() -> None:
    http = _request([], path="/v1/search?q=plans&token=abc")
    assert http.url == "http://deathstar/v1/search?q=plans&token=abc"


def test_query_values_redacted_when_asked() -> None:
    config = RedactionConfig(query_params=frozenset({"q", "token"}))
    record = l7_http_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        method="GET",
        path="/v1/search?q=plans&token=abc&flag",
        host="deathstar",
        redaction=config,
    )
    expected = f"http://deathstar/v1/search?q={REDACTED}&token={REDACTED}&flag"
    assert record.l7 is not None and record.l7.http is not None
    assert record.l7.http.url == expected
    assert record.summary == f"HTTP/1.1 GET {expected}"  # the summary shows no secret either
    assert "abc" not in record.to_json()


@pytest.mark.parametrize(
    ("url", "config", "expected"),
    [
        ("http://luke:force@host/x", DEFAULT_REDACTION, f"http://luke:{REDACTED}@host/x"),
        ("http://luke@host/x", DEFAULT_REDACTION, "http://luke@host/x"),
        ("http://host/x@y", DEFAULT_REDACTION, "http://host/x@y"),
        ("/a?b=c#frag", RedactionConfig(query_params=frozenset({"b"})), f"/a?b={REDACTED}#frag"),
        ("/a?", RedactionConfig(query_params=frozenset({"b"})), "/a?"),
        ("/a", RedactionConfig(query_params=frozenset({"b"})), "/a"),
    ],
)
def test_redact_url(url: str, config: RedactionConfig, expected: str) -> None:
    assert redact_url(url, config) == expected


def test_response_set_cookie() -> None:
    record = l7_http_response(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DEATHSTAR,
        method="GET",
        path="/",
        code=200,
        latency_ns=1,
        headers=[("Set-Cookie", "session=hunter2")],
    )
    assert "hunter2" not in record.to_json()


def test_grpc_metadata() -> None:
    record = l7_grpc_request(
        time_ns=samples.T0,
        verdict=Verdict.FORWARDED,
        direction="ingress",
        client=samples.TIEFIGHTER,
        server=samples.DOOR,
        service="door.DoorManager",
        method="GetName",
        headers=[(b"authorization", b"Bearer jwt"), (b"x-request-id", b"1")],
    )
    assert record.l7 is not None and record.l7.http is not None
    assert record.l7.http.headers == (
        HTTPHeader("authorization", REDACTED),
        HTTPHeader("x-request-id", "1"),
    )

