"""The HTTP/1.1 engine driven with bytes: exact bytes out each way, exact records, no sockets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from garrison.flows.record import DropReasonDesc, FlowRecord, FlowType, L7FlowType, Verdict
from garrison.policies.l7rules import HeaderMatch, HTTPRule, L7Protocol, L7RuleSet, MismatchAction
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.proxy.commands import (
    Close,
    Command,
    ConnectionContext,
    Forward,
    Inject,
    Log,
    OpenUpstream,
    PeerInfo,
    Side,
    TrafficDirection,
)
from garrison.proxy.config import ProxyConfig
from garrison.proxy.deny import http1_access_denied, http1_error_response
from garrison.proxy.engine import make_engine
from garrison.proxy.engine_http1 import DISCARD_LIMIT, MAX_PIPELINE, HTTPEngine, Waiting

RULE1 = RuleRef(PolicyKind.CNP, "default", "rule1", "ingress")
RULE2 = RuleRef(PolicyKind.CNP, "default", "rule2", "ingress", rule_index=1)
LANDING = HTTPRule(method="POST", path="/v1/request-landing")
DENIED = http1_access_denied(keep_alive=True)
T0 = 1_700_000_000.0


def ruleset(*rules: tuple[HTTPRule, RuleRef | None]) -> L7RuleSet:
    return L7RuleSet(L7Protocol.HTTP, tuple(rules))


def make(rules: L7RuleSet | None = None, *, audit: bool = False) -> HTTPEngine:
    context = ConnectionContext(
        source=PeerInfo(257, endpoint_labels(Labels.parse("org=empire,class=tiefighter")),
                        "127.0.0.2", 42690, "default"),
        destination=PeerInfo(256, endpoint_labels(Labels.parse("org=empire,class=deathstar")),
                             "127.0.0.1", 80, "default"),
        direction=TrafficDirection.INGRESS,
        protocol=L7Protocol.HTTP,
        ruleset=rules if rules is not None else ruleset((LANDING, RULE1)),
        audit=audit,
    )
    engine = make_engine(context, ProxyConfig())
    assert isinstance(engine, HTTPEngine)
    return engine


@dataclass
class Out:
    """Commands split by kind; bytes per side joined in order."""

    commands: list[Command] = field(default_factory=list)

    @property
    def upstream(self) -> bytes:
        return b"".join(c.data for c in self.commands
                        if isinstance(c, Forward | Inject) and c.side is Side.UPSTREAM)

    @property
    def client(self) -> bytes:
        return b"".join(c.data for c in self.commands
                        if isinstance(c, Forward | Inject) and c.side is Side.CLIENT)

    @property
    def injected(self) -> bytes:
        return b"".join(c.data for c in self.commands if isinstance(c, Inject))

    @property
    def records(self) -> list[FlowRecord]:
        return [c.record for c in self.commands if isinstance(c, Log)]

    @property
    def closes(self) -> list[Close]:
        return [c for c in self.commands if isinstance(c, Close)]


def out(*batches: Sequence[Command]) -> Out:
    result = Out()
    for batch in batches:
        result.commands.extend(batch)
    return result


def req(method: str, path: str, body: bytes | None = None, *, extra: str = "",
        version: str = "HTTP/1.1") -> bytes:
    head = f"{method} {path} {version}\r\nHost: deathstar\r\n{extra}"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def resp(status: int = 200, body: bytes = b"Ship landed\n", extra: str = "") -> bytes:
    reason = {200: "OK", 503: "Service Unavailable", 100: "Continue"}.get(status, "X")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


LAND = req("POST", "/v1/request-landing", b"{}")
EXHAUST = req("PUT", "/v1/exhaust-port", b"boom")


# ---- allowed and denied ---------------------------------------------------------------------


def test_allowed_request_goes_upstream_unchanged_and_is_logged() -> None:
    engine = make()
    first = out(engine.client_data(LAND, T0))
    assert first.upstream == LAND
    assert first.client == b""
    [record] = first.records
    assert record.verdict is Verdict.FORWARDED and record.type is FlowType.L7
    assert record.l7 is not None and record.l7.type is L7FlowType.REQUEST
    assert record.l7.http is not None
    assert (record.l7.http.method, record.l7.http.url, record.l7.http.protocol) == (
        "POST", "http://deathstar/v1/request-landing", "HTTP/1.1")
    assert [p.name for p in record.ingress_allowed_by] == ["rule1"]
    assert record.source.identity == 257 and record.source.ip == "127.0.0.2"
    assert record.destination.identity == 256 and record.destination.port == 80
    assert "k8s:class=deathstar" in record.destination.labels
    assert engine.waiting == Waiting.UPSTREAM and not engine.upstream_reusable

    second = out(engine.upstream_data(resp(), T0 + 0.25))
    assert second.client == resp()
    [response] = second.records
    assert response.verdict is Verdict.FORWARDED and response.is_reply is True
    assert response.l7 is not None and response.l7.http is not None
    assert response.l7.http.code == 200 and response.l7.latency_ns == 250_000_000
    assert response.source.identity == 256  # the server answers
    assert second.closes == []
    assert engine.upstream_reusable and engine.waiting == Waiting.IDLE


def test_denied_request_is_answered_403_and_never_forwarded() -> None:
    engine = make()
    result = out(engine.client_data(EXHAUST, T0))
    assert result.upstream == b""
    assert result.injected == DENIED
    assert result.closes == []
    request, response = result.records
    assert request.verdict is Verdict.DROPPED
    assert request.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert [p.name for p in request.ingress_denied_by] == ["rule1"]
    assert request.l7 is not None and request.l7.http is not None
    assert request.l7.http.method == "PUT"
    assert response.verdict is Verdict.DROPPED
    assert response.l7 is not None and response.l7.http is not None
    assert response.l7.http.code == 403
    assert engine.waiting == Waiting.IDLE


def test_every_rule_ref_of_the_rule_set_denies_once() -> None:
    rules = ruleset((LANDING, RULE1), (HTTPRule(method="GET", path="/v1/"), RULE2),
                    (HTTPRule(method="GET", path="/x"), RULE1))
    record = out(make(rules).client_data(EXHAUST, T0)).records[0]
    assert [p.name for p in record.ingress_denied_by] == ["rule1", "rule2"]


def test_allow_all_rule_set_names_its_ref() -> None:
    rules = L7RuleSet(L7Protocol.HTTP, (), allow_all=True, allow_all_ref=RULE2)
    result = out(make(rules).client_data(EXHAUST, T0))
    assert result.upstream == EXHAUST
    assert [p.name for p in result.records[0].ingress_allowed_by] == ["rule2"]


def test_path_is_normalized_before_matching_and_forwarding() -> None:
    engine = make()
    raw = req("POST", "/v1/./x/../request-landing", b"{}")
    result = out(engine.client_data(raw, T0))
    assert result.upstream == raw.replace(b"/v1/./x/../request-landing", b"/v1/request-landing")


def test_http10_denied_closes() -> None:
    engine = make()
    result = out(engine.client_data(req("PUT", "/v1/exhaust-port", version="HTTP/1.0"), T0))
    assert result.injected == http1_access_denied(b"HTTP/1.0", keep_alive=False)
    assert [c.side for c in result.closes] == [Side.BOTH]


def test_header_edits_from_header_matches() -> None:
    rule = HTTPRule(method="GET", path="/v1/", header_matches=(
        HeaderMatch("X-Token", "abc", MismatchAction.ADD),
        HeaderMatch("X-Drop", "never", MismatchAction.DELETE),
    ))
    engine = make(ruleset((rule, RULE1)))
    raw = req("GET", "/v1/", extra="X-Drop: yes\r\nAccept: */*\r\n")
    result = out(engine.client_data(raw, T0))
    assert result.upstream == (
        b"GET /v1/ HTTP/1.1\r\nHost: deathstar\r\nAccept: */*\r\nX-Token: abc\r\n\r\n"
    )


def test_header_edit_of_a_framing_field_is_refused_with_500() -> None:
    rule = HTTPRule(method="GET", path="/v1/", header_matches=(
        HeaderMatch("Content-Length", "5", MismatchAction.REPLACE),
    ))
    result = out(make(ruleset((rule, RULE1))).client_data(req("GET", "/v1/"), T0))
    assert result.upstream == b""
    assert result.injected == http1_error_response(500)
    assert result.records[0].verdict is Verdict.ERROR
    assert result.closes[0].error


def test_audit_mode_forwards_what_would_be_denied() -> None:
    engine = make(audit=True)
    result = out(engine.client_data(EXHAUST, T0))
    assert result.upstream == EXHAUST and result.injected == b""
    [record] = result.records
    assert record.verdict is Verdict.AUDIT
    assert [p.name for p in record.ingress_denied_by] == ["rule1"]
    answer = out(engine.upstream_data(resp(503, b"Panic: deathstar exploded\n"), T0 + 1))
    assert answer.records[0].verdict is Verdict.AUDIT
    assert answer.records[0].l7.http.code == 503  # type: ignore[union-attr]


# ---- keep-alive and pipelining --------------------------------------------------------------


def test_denied_request_pipelined_behind_allowed_is_answered_after_it() -> None:
    engine = make()
    landing2 = req("POST", "/v1/request-landing", b"[]")
    first = out(engine.client_data(LAND + EXHAUST + landing2, T0))
    assert first.upstream == LAND + landing2  # the denied one (and its body) is not forwarded
    assert first.client == b""  # its 403 waits for the first response
    assert [r.verdict for r in first.records] == [
        Verdict.FORWARDED, Verdict.DROPPED, Verdict.FORWARDED]

    second = out(engine.upstream_data(resp(), T0 + 1))
    assert second.client == resp() + DENIED
    third = out(engine.upstream_data(resp(body=b"again\n"), T0 + 2))
    assert third.client == resp(body=b"again\n")
    assert second.closes == third.closes == []


@pytest.mark.parametrize("split", [1, 7, 50])
def test_pipelining_survives_any_split(split: int) -> None:
    engine = make()
    data = EXHAUST + LAND + EXHAUST + EXHAUST
    result = Out()
    for i in range(0, len(data), split):
        result.commands.extend(engine.client_data(data[i:i + split], T0))
    assert result.upstream == LAND
    assert result.client == DENIED
    response = resp()
    for i in range(0, len(response), split):
        result.commands.extend(engine.upstream_data(response[i:i + split], T0))
    assert result.client == DENIED + response + DENIED + DENIED


def test_chunked_bodies_stream_upstream_and_denied_ones_are_discarded() -> None:
    engine = make(ruleset((HTTPRule(method="POST"), RULE1)))
    chunked = (b"POST /v1/echo HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
    denied = (b"PUT /v1/echo HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n0\r\n\r\n")
    result = Out()
    data = chunked + denied + chunked
    for byte in range(len(data)):  # one byte at a time
        result.commands.extend(engine.client_data(data[byte:byte + 1], T0))
    assert result.upstream == chunked + chunked
    result.commands.extend(engine.upstream_data(resp(body=b"ok") * 2, T0))
    assert result.client == resp(body=b"ok") + DENIED + resp(body=b"ok")
    assert result.closes == []


def test_allowed_body_streams_as_it_arrives() -> None:
    engine = make()
    head = b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nContent-Length: 10\r\n\r\n"
    assert out(engine.client_data(head + b"01234", T0)).upstream == head + b"01234"
    assert engine.waiting == Waiting.CLIENT
    assert out(engine.client_data(b"56789", T0)).upstream == b"56789"
    assert engine.waiting == Waiting.UPSTREAM


def test_denied_body_over_the_discard_limit_closes_after_the_answer() -> None:
    """The answer says `Connection: close` and the close lingers: a client that sends its
    whole body before reading (urllib, http.client) must read the 403, not a reset."""
    engine = make()
    big = req("PUT", "/v1/exhaust-port", extra=f"Content-Length: {DISCARD_LIMIT + 1}\r\n")
    result = out(engine.client_data(big + b"x" * 100 + LAND, T0))
    assert result.injected == http1_access_denied(keep_alive=False)
    assert result.closes == [Close(Side.BOTH, "connection closes after this answer",
                                   linger=True)]
    assert result.upstream == b""
    assert out(engine.client_data(b"x" * 100_000, T0)).commands == []  # read, thrown away


CHUNKED_PUT = b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_denied_chunked_body_is_answered_keep_alive_once_it_ended() -> None:
    """Whether the connection stays is only known at the body's end: the 403 waits for it,
    so it never says keep-alive for a connection that then closes."""
    engine = make()
    assert out(engine.client_data(CHUNKED_PUT, T0)).commands[1:] == []  # the request record
    assert engine.waiting == Waiting.CLIENT
    chunk = b"%x\r\n%s\r\n" % (1000, b"z" * 1000)
    assert out(engine.client_data(chunk * 3, T0)).client == b""
    result = out(engine.client_data(b"0\r\n\r\n" + LAND, T0))
    assert result.client == DENIED and result.closes == []
    assert result.upstream == LAND
    [answer] = [r for r in result.records if r.l7 and r.l7.type is L7FlowType.RESPONSE]
    assert answer.verdict is Verdict.DROPPED


def test_denied_chunked_body_that_keeps_coming_is_answered_with_close() -> None:
    engine = make()
    out(engine.client_data(CHUNKED_PUT, T0))
    chunk = b"%x\r\n%s\r\n" % (32 * 1024, b"z" * 32 * 1024)
    result = Out()
    for _ in range(3):
        result.commands.extend(engine.client_data(chunk, T0))
    assert result.client == http1_access_denied(keep_alive=False)  # the close is announced
    assert result.closes == [Close(Side.BOTH, "connection closes after this answer",
                                   linger=True)]
    assert result.upstream == b""


def test_denied_chunked_answer_waits_behind_an_earlier_response() -> None:
    engine = make()
    first = out(engine.client_data(LAND + CHUNKED_PUT + b"3\r\nabc\r\n0\r\n\r\n", T0))
    assert first.upstream == LAND and first.client == b""
    assert out(engine.upstream_data(resp(), T0)).client == resp() + DENIED


def test_denied_expect_continue_closes() -> None:
    """No `100 Continue`: the 403 at once, announcing the close; the close lingers in case
    the client sends its body anyway."""
    engine = make()
    raw = req("PUT", "/v1/exhaust-port", extra="Expect: 100-continue\r\nContent-Length: 5\r\n")
    result = out(engine.client_data(raw, T0))
    assert result.injected == http1_access_denied(keep_alive=False)
    assert [c.linger for c in result.closes] == [True]
    assert out(engine.client_data(b"12345" + LAND, T0)).commands == []


def test_informational_responses_go_through_before_the_final_one() -> None:
    engine = make()
    raw = req("POST", "/v1/request-landing", extra="Expect: 100-continue\r\nContent-Length: 2\r\n")
    engine.client_data(raw, T0)
    continue_ = b"HTTP/1.1 100 Continue\r\n\r\n"
    result = out(engine.upstream_data(continue_, T0))
    assert result.client == continue_ and result.records == []
    engine.client_data(b"{}", T0)
    final = out(engine.upstream_data(resp(), T0 + 1))
    assert final.client == resp()
    assert final.records[0].l7.http.code == 200  # type: ignore[union-attr]


def test_head_response_has_no_body() -> None:
    engine = make(ruleset((HTTPRule(method="HEAD"), RULE1)))
    engine.client_data(req("HEAD", "/v1/") + req("HEAD", "/v1/"), T0)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
    assert out(engine.upstream_data(head + head, T0)).client == head + head


def test_denied_head_is_answered_without_a_body_and_the_next_request_goes_on() -> None:
    """`curl -I` saw 15 excess bytes; httpx, aiohttp and Node read them as the next status
    line. A HEAD answer carries the GET answer's fields, Content-Length included, no body."""
    engine = make()
    result = out(engine.client_data(req("HEAD", "/v1/exhaust-port") + LAND, T0))
    answer = (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 15\r\nContent-Type: text/plain\r\n"
              b"\r\n")
    assert result.client == answer
    assert result.upstream == LAND and result.closes == []
    assert out(engine.upstream_data(resp(), T0)).client == resp()


def test_upstream_unavailable_for_a_head_answers_without_a_body() -> None:
    engine = make(ruleset((HTTPRule(method="HEAD"), RULE1)))
    engine.client_data(req("HEAD", "/v1/"), T0)
    result = out(engine.upstream_unavailable("connection refused", T0))
    assert result.client == (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 21\r\n"
                             b"Content-Type: text/plain\r\nConnection: close\r\n\r\n")


def test_client_connection_close_closes_after_the_response() -> None:
    engine = make()
    engine.client_data(req("POST", "/v1/request-landing", extra="Connection: close\r\n"), T0)
    result = out(engine.upstream_data(resp(), T0))
    assert result.client == resp()
    assert [c.side for c in result.closes] == [Side.BOTH]


def test_upstream_connection_close_closes_both() -> None:
    engine = make()
    engine.client_data(LAND, T0)
    answer = resp(extra="Connection: close\r\n")
    result = out(engine.upstream_data(answer, T0))
    assert result.client == answer and [c.side for c in result.closes] == [Side.BOTH]


def test_client_eof_waits_for_the_answers_owed() -> None:
    engine = make()
    engine.client_data(LAND + EXHAUST, T0)
    assert out(engine.client_eof(T0)).closes == []
    result = out(engine.upstream_data(resp(), T0))
    assert result.client == resp() + DENIED
    assert [c.side for c in result.closes] == [Side.BOTH]


def test_pipeline_full_after_many_queued_requests() -> None:
    engine = make()
    engine.client_data(LAND * MAX_PIPELINE, T0)
    assert engine.pipeline_full
    engine.upstream_data(resp(), T0)
    assert not engine.pipeline_full


def test_update_ruleset_applies_to_the_next_request() -> None:
    engine = make()
    assert out(engine.client_data(EXHAUST, T0)).injected == DENIED
    engine.update_ruleset(ruleset((HTTPRule(method="PUT"), RULE2)))
    result = out(engine.client_data(EXHAUST, T0))
    assert result.upstream == EXHAUST
    assert [p.name for p in result.records[0].ingress_allowed_by] == ["rule2"]


# ---- errors ---------------------------------------------------------------------------------


def test_parse_error_answers_and_closes_with_an_error_record() -> None:
    engine = make()
    result = out(engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", T0))
    assert result.injected == http1_error_response(400)
    assert result.upstream == b""
    [close] = result.closes
    assert close.side is Side.BOTH and close.error
    [record] = result.records
    assert record.verdict is Verdict.ERROR
    assert record.drop_reason_desc is DropReasonDesc.PARSE_ERROR
    assert "several Host fields" in record.error
    assert engine.client_data(LAND, T0) == ()  # dead


def test_parse_error_behind_an_allowed_request_is_answered_after_it() -> None:
    engine = make()
    bad = b"POST /x HTTP/1.1\r\nHost: d\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = out(engine.client_data(LAND + bad + LAND, T0))
    assert first.upstream == LAND  # nothing after the bad bytes
    assert first.client == b"" and first.closes == []
    assert first.records[-1].verdict is Verdict.ERROR
    second = out(engine.upstream_data(resp(), T0))
    assert second.client == resp() + http1_error_response(400)
    assert [c.side for c in second.closes] == [Side.BOTH]


def test_bad_chunk_in_a_forwarded_body_closes_without_forwarding_more() -> None:
    engine = make(ruleset((HTTPRule(method="POST"), RULE1)))
    head = b"POST /e HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"
    result = out(engine.client_data(head + b"3\r\nabc\r\nzz\r\n", T0))
    assert result.upstream == head + b"3\r\nabc\r\n"
    assert result.injected == http1_error_response(400)
    assert result.closes and result.closes[0].side is Side.BOTH


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"FOO / HTTP/1.1\r\nHost: d\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: d\r\n\r\n", 505),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: d\r\n\r\n", 414),
])
def test_parse_error_statuses(raw: bytes, status: int) -> None:
    result = out(make().client_data(raw, T0))
    assert result.injected == http1_error_response(status)


def test_bad_upstream_response_gets_502() -> None:
    engine = make()
    engine.client_data(LAND, T0)
    result = out(engine.upstream_data(b"HTTP/1.1 2000 Nope\r\n\r\n", T0))
    assert result.client == http1_error_response(502)
    assert result.records[0].verdict is Verdict.ERROR
    assert result.records[0].drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
    assert result.closes[0].error


def test_upstream_eof_before_answering_gets_502_after_denials_owed() -> None:
    engine = make()
    engine.client_data(LAND + EXHAUST, T0)
    result = out(engine.upstream_eof(T0))
    assert result.client == http1_error_response(502)
    assert result.closes


def test_upstream_eof_inside_a_response_just_closes() -> None:
    engine = make()
    engine.client_data(LAND, T0)
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    assert out(engine.upstream_data(partial, T0)).client == partial
    result = out(engine.upstream_eof(T0))
    assert result.client == b""
    assert result.closes and result.records[0].verdict is Verdict.ERROR


def test_upstream_eof_while_idle_keeps_the_client() -> None:
    engine = make()
    engine.client_data(LAND, T0)
    engine.upstream_data(resp(), T0)
    assert out(engine.upstream_eof(T0)).commands == []
    assert out(engine.client_data(LAND, T0)).upstream == LAND  # next upstream connection
    assert out(engine.upstream_data(resp(), T0)).client == resp()


def test_upstream_unavailable_answers_503() -> None:
    engine = make()
    engine.client_data(LAND, T0)
    result = out(engine.upstream_unavailable("connection refused", T0))
    assert result.client == http1_error_response(503)
    assert "connection refused" in result.records[0].error


def test_response_until_eof_closes_after_it() -> None:
    engine = make()
    engine.client_data(LAND, T0)
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    assert out(engine.upstream_data(head + b"stream", T0)).client == head + b"stream"
    result = out(engine.upstream_eof(T0))
    assert [c.side for c in result.closes] == [Side.BOTH]


@pytest.mark.parametrize(("waiting", "answer"), [
    (Waiting.HEAD, 408), (Waiting.UPSTREAM, 504), (Waiting.IDLE, None),
])
def test_timeouts(waiting: str, answer: int | None) -> None:
    engine = make()
    if waiting == Waiting.HEAD:
        engine.client_data(b"GET /v1/ HT", T0)
    elif waiting == Waiting.UPSTREAM:
        engine.client_data(LAND, T0)
    assert engine.waiting == waiting
    result = out(engine.timeout(waiting, T0 + 100))
    assert result.injected == (http1_error_response(answer) if answer else b"")
    assert result.closes
    assert [r.verdict for r in result.records] == ([Verdict.ERROR] if answer else [])


def test_abort_logs_an_error() -> None:
    engine = make()
    result = out(engine.abort("boom", T0))
    assert result.records[0].verdict is Verdict.ERROR and result.closes[0].error


# ---- HTTP/2 with prior knowledge -------------------------------------------------------------


def test_h2c_preface_hands_the_connection_to_the_h2_engine() -> None:
    engine = make()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert out(engine.client_data(preface[:10], T0)).commands == []
    assert engine.waiting == Waiting.HEAD
    handed = out(engine.client_data(preface[10:], T0))
    assert OpenUpstream("h2", pooled=True) in handed.commands  # the upstream speaks h2 now
    assert not engine.upstream_reusable


def test_h2c_with_an_unreachable_upstream_is_refused_as_the_h2_engine_refuses_it() -> None:
    """The upstream cannot be connected: an h2c client is told none of its streams was
    processed (GOAWAY NO_ERROR, last stream 0: safe to retry; gRPC: UNAVAILABLE) and the
    record blames the upstream, not the proxy (it said INTERNAL_ERROR and PROXY_ERROR)."""
    from garrison.parsers.http2 import ConnectionTerminated
    from garrison.parsers.nghttp2 import H2ClientConnection

    client = H2ClientConnection()
    client.send_request(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"d"),
         (b":path", b"/v1/request-landing")],
        end_stream=True,
    )
    engine = make()
    result = out(
        engine.client_data(client.data_to_send(), T0),
        engine.upstream_unavailable("cannot connect to 127.0.0.1:1: refused", T0),
    )
    events = client.receive_data(result.client, T0)
    assert [(e.error_code, e.last_stream_id) for e in events
            if isinstance(e, ConnectionTerminated)] == [(0, 0)]
    (error,) = [r for r in result.records if r.verdict is Verdict.ERROR]
    assert error.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
    assert error.error == "upstream unavailable: cannot connect to 127.0.0.1:1: refused"


def test_a_request_starting_like_the_preface_is_http1() -> None:
    engine = make(ruleset((HTTPRule(method="PRI"), RULE1)))
    result = out(engine.client_data(b"P", T0), engine.client_data(b"OST /v1/request-landing "
                                                                  b"HTTP/1.1\r\nHost: d\r\n\r\n",
                                                                  T0))
    assert not any(isinstance(c, OpenUpstream) for c in result.commands)
    assert result.injected == DENIED


# ---- the upstream connection's reuse ----------------------------------------------------------


def test_upstream_is_reusable_only_between_clean_keep_alive_exchanges() -> None:
    engine = make()
    engine.client_data(LAND, T0)
    assert not engine.upstream_reusable  # a response is owed
    engine.upstream_data(resp(), T0)
    assert engine.upstream_reusable
    engine.client_data(EXHAUST, T0)  # denied requests never touch the upstream
    assert engine.upstream_reusable
    engine.client_eof(T0)  # the client leaving does not spoil the upstream connection
    assert engine.upstream_reusable


@pytest.mark.parametrize("spoil", ["request-close", "response-close", "upstream-error", "abort"])
def test_upstream_is_not_reused_after(spoil: str) -> None:
    engine = make()
    if spoil == "request-close":
        engine.client_data(req("POST", "/v1/request-landing", extra="Connection: close\r\n"), T0)
        engine.upstream_data(resp(), T0)
    elif spoil == "response-close":
        engine.client_data(LAND, T0)
        engine.upstream_data(resp(extra="Connection: close\r\n"), T0)
    elif spoil == "upstream-error":
        engine.client_data(LAND, T0)
        engine.upstream_data(b"garbage\r\n\r\n", T0)
    else:
        engine.client_data(LAND, T0)
        engine.upstream_data(resp(), T0)
        engine.abort("internal", T0)
    assert not engine.upstream_reusable


def test_compact_drops_the_parsers_of_an_idle_connection() -> None:
    engine = make()
    engine.client_data(LAND, T0)
    engine.compact()  # not idle: kept
    engine.upstream_data(resp(), T0)
    engine.compact()
    assert engine.waiting == Waiting.IDLE
    result = out(engine.client_data(LAND, T0), engine.upstream_data(resp(), T0))
    assert result.upstream == LAND and result.client == resp()
