"""HTTP/1.1 parser behaviour: pipelining, keep-alive, error order, body discarding,
forwarding heads, responses (HEAD, 1xx, 204/304, read-until-close)."""

from __future__ import annotations

import dataclasses

import pytest

from garrison.parsers.errors import LocalProtocolError, RemoteProtocolError
from garrison.parsers.http1 import (
    BodyReceived,
    ConnectionClosed,
    HTTP1Error,
    HTTP1FramingError,
    HTTP1Limits,
    HTTP1RequestParser,
    HTTP1ResponseParser,
    MessageCompleted,
    RequestReceived,
    ResponseReceived,
)
from tests.unit.parsers.test_http1_support import (
    bodies_of,
    feed,
    feed_error,
    requests_of,
    responses_of,
)

GET = b"GET /v1/ HTTP/1.1\r\nHost: deathstar\r\n\r\n"
POST = b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_HEAD = b"PUT /v1/logs HTTP/1.1\r\nHost: deathstar\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED = CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n\r\n"


def test_a_simple_request() -> None:
    parser = HTTP1RequestParser()
    assert parser.next_event() is None
    parser.receive_data(GET)
    request = parser.next_event()
    assert request == RequestReceived(
        method="GET",
        target="/v1/",
        path="/v1/",
        version=b"HTTP/1.1",
        headers=((b"Host", b"deathstar"),),
        host="deathstar",
        keep_alive=True,
        chunked=False,
        content_length=None,
        raw_head=GET,
    )
    assert parser.next_event() == MessageCompleted(True)
    assert parser.next_event() is None
    parser.receive_data(b"")
    assert list(parser.events()) == [ConnectionClosed()]


def test_events_are_frozen_facts() -> None:
    parser = HTTP1RequestParser()
    parser.receive_data(GET)
    request = parser.next_event()
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.path = "/admin"  # type: ignore[misc,union-attr]


def test_pipelined_requests_come_out_in_order_without_losing_bytes() -> None:
    events = feed(HTTP1RequestParser(), [GET + POST + CHUNKED + GET])
    assert [type(e).__name__ for e in events] == [
        "RequestReceived",
        "MessageCompleted",
        "RequestReceived",
        "BodyReceived",
        "MessageCompleted",
        "RequestReceived",
        "BodyReceived",
        "MessageCompleted",
        "RequestReceived",
        "MessageCompleted",
        "ConnectionClosed",
    ]
    assert [r.method for r in requests_of(events)] == ["GET", "POST", "PUT", "GET"]
    assert bodies_of(events) == [b"hello", b"5\r\nhello\r\n0\r\n\r\n"]


def test_body_bytes_are_emitted_as_they_arrive() -> None:
    parser = HTTP1RequestParser()
    head, body = POST[:-5], POST[-5:]
    parser.receive_data(head + body[:2])
    assert [type(e) for e in parser.events()] == [RequestReceived, BodyReceived]
    assert parser.buffered == 0
    parser.receive_data(body[2:])
    assert list(parser.events()) == [BodyReceived(b"llo"), MessageCompleted(True)]


def test_trailers_are_part_of_the_body_bytes() -> None:
    data = CHUNKED.replace(b"0\r\n\r\n", b"0\r\nX-Checksum: 42\r\n\r\n")
    events = feed(HTTP1RequestParser(), [data])
    assert bodies_of(events) == [b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n"]


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"HTTP/1.1", None, True),
        (b"HTTP/1.1", b"close", False),
        (b"HTTP/1.1", b"Keep-Alive, CLOSE", False),
        (b"HTTP/1.1", b"keep-alive", True),
        (b"HTTP/1.0", None, False),
        (b"HTTP/1.0", b"keep-alive", True),
        (b"HTTP/1.0", b"Keep-Alive", True),
        (b"HTTP/1.0", b"keep-alive, close", False),
    ],
)
def test_keep_alive(version: bytes, connection: bytes | None, keep_alive: bool) -> None:
    head = b"GET / " + version + b"\r\nHost: deathstar\r\n"
    if connection is not None:
        head += b"Connection: " + connection + b"\r\n"
    (request,) = requests_of(feed(HTTP1RequestParser(), [head + b"\r\n"]))
    assert request.keep_alive is keep_alive


def test_http10_without_host() -> None:
    (request,) = requests_of(feed(HTTP1RequestParser(), [b"GET / HTTP/1.0\r\n\r\n"]))
    assert request.host is None and request.keep_alive is False


def test_nothing_after_a_closing_request_is_parsed() -> None:
    closing = b"GET / HTTP/1.1\r\nHost: deathstar\r\nConnection: close\r\n\r\n"
    events = feed(HTTP1RequestParser(), [closing + GET + b"\x00garbage"])
    assert [type(e) for e in events] == [RequestReceived, MessageCompleted, ConnectionClosed]
    assert events[1] == MessageCompleted(False)


def test_empty_lines_before_a_request_are_skipped() -> None:
    data = b"\r\n\r\n" + GET + b"\r\n" + GET
    whole = feed(HTTP1RequestParser(), [data])
    assert len(requests_of(whole)) == 2
    assert all(r.raw_head == GET for r in requests_of(whole))
    assert feed(HTTP1RequestParser(), [data[i : i + 1] for i in range(len(data))]) == whole


def test_errors_come_after_the_events_before_them_and_the_parser_stays_dead() -> None:
    parser = HTTP1RequestParser()
    parser.receive_data(GET + b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n" + GET)
    assert isinstance(parser.next_event(), RequestReceived)
    assert parser.next_event() == MessageCompleted(True)
    with pytest.raises(HTTP1Error) as first:
        parser.next_event()
    assert first.value.status == 400
    with pytest.raises(HTTP1Error) as again:
        parser.next_event()
    assert again.value is first.value
    with pytest.raises(HTTP1Error) as on_input:
        parser.receive_data(GET)
    assert on_input.value is first.value
    assert isinstance(first.value, RemoteProtocolError)


def test_events_iterator_raises_after_yielding_the_valid_events() -> None:
    parser = HTTP1RequestParser()
    parser.receive_data(POST + b"BAD REQUEST LINE\r\n\r\n")
    seen: list[object] = []
    with pytest.raises(HTTP1Error):
        for event in parser.events():
            seen.append(event)
    assert [type(e) for e in seen] == [RequestReceived, BodyReceived, MessageCompleted]


def test_data_after_the_end_of_the_stream_is_a_caller_bug() -> None:
    parser = HTTP1RequestParser()
    parser.receive_data(b"")
    assert list(parser.events()) == [ConnectionClosed()]
    with pytest.raises(LocalProtocolError):
        parser.receive_data(GET)


def test_partial_heads_and_lines_are_bounded() -> None:
    limits = HTTP1Limits(max_header_block=128, max_chunk_line=16)
    parser = HTTP1RequestParser(limits)
    parser.receive_data(b"GET / HTTP/1.1\r\nHost: deathstar\r\nX: ")
    assert 0 < parser.buffered < 128
    parser.receive_data(b"a\r\n\r\n")
    assert parser.buffered == 0
    parser = HTTP1RequestParser(limits)
    parser.receive_data(CHUNKED_HEAD + b"5;a=b")  # a partial chunk-size line
    assert parser.buffered == 5
    parser.receive_data(b"bbbbbbbbbbbb")
    with pytest.raises(HTTP1FramingError):
        list(parser.events())
    assert parser.buffered == 0


def test_discard_body_of_a_denied_request_keeps_the_next_one() -> None:
    parser = HTTP1RequestParser()
    parser.receive_data(POST + GET)
    denied = parser.next_event()
    assert isinstance(denied, RequestReceived) and denied.content_length == 5
    parser.discard_body()
    assert list(parser.events()) == [
        MessageCompleted(True),
        requests_of(feed(HTTP1RequestParser(), [GET]))[0],
        MessageCompleted(True),
    ]


def test_discard_body_applies_to_body_bytes_still_to_come_only() -> None:
    parser = HTTP1RequestParser()
    parser.receive_data(CHUNKED[:-12])
    assert isinstance(parser.next_event(), RequestReceived)
    parser.discard_body()
    assert list(parser.events()) == []
    parser.receive_data(CHUNKED[-12:] + POST)
    events = list(parser.events())
    assert events[0] == MessageCompleted(True)
    assert isinstance(events[1], RequestReceived)
    assert events[2:] == [BodyReceived(b"hello"), MessageCompleted(True)]


def test_discard_body_still_validates_the_body() -> None:
    parser = HTTP1RequestParser()
    parser.receive_data(CHUNKED_HEAD + b"5\r\nhel")
    parser.next_event()
    parser.discard_body()
    parser.receive_data(b"loXX")
    with pytest.raises(HTTP1FramingError):
        list(parser.events())


def test_forward_head_with_header_edits() -> None:
    data = b"GET /a/../b HTTP/1.1\r\nHost: deathstar\r\nX-Token: old\r\nAccept: */*\r\n\r\n"
    (request,) = requests_of(feed(HTTP1RequestParser(), [data]))
    assert request.forward_head() == data.replace(b"/a/../b", b"/b")
    assert request.forward_head(remove=[b"x-token"], add=[(b"X-Token", b"new")]) == (
        b"GET /b HTTP/1.1\r\nHost: deathstar\r\nAccept: */*\r\nX-Token: new\r\n\r\n"
    )
    assert request.forward_head(add=[(b"X-Extra", b"1")]).endswith(
        b"Accept: */*\r\nX-Extra: 1\r\n\r\n"
    )
    with pytest.raises(LocalProtocolError):
        request.forward_head(remove=[b"Content-Length"])
    with pytest.raises(LocalProtocolError):
        request.forward_head(add=[(b"transfer-encoding", b"chunked")])
    with pytest.raises(LocalProtocolError):
        request.forward_head(add=[(b"X-Token", b"a\r\nTransfer-Encoding: chunked")])
    with pytest.raises(LocalProtocolError):
        request.forward_head(add=[(b"X Token", b"a")])
    with pytest.raises(LocalProtocolError):
        request.forward_head(add=[(b"X-Token", b"a\x00")])


def test_expect_continue() -> None:
    data = POST.replace(b"Content-Length", b"Expect: 100-continue\r\nContent-Length")[:-5]
    parser = HTTP1RequestParser()
    parser.receive_data(data)
    request = parser.next_event()
    assert isinstance(request, RequestReceived) and request.expect_continue
    (plain,) = requests_of(feed(HTTP1RequestParser(), [GET]))
    assert not plain.expect_continue


def test_absolute_form_takes_the_host_from_the_target() -> None:
    data = b"GET http://DeathStar/v1/x HTTP/1.1\r\nHost: deathstar\r\n\r\n"
    (request,) = requests_of(feed(HTTP1RequestParser(), [data]))
    assert (request.host, request.path) == ("DeathStar", "/v1/x")
    assert request.forward_head().startswith(b"GET /v1/x HTTP/1.1\r\nHost: deathstar\r\n")
    data10 = b"GET http://deathstar/ HTTP/1.0\r\n\r\n"
    (request10,) = requests_of(feed(HTTP1RequestParser(), [data10]))
    assert request10.host == "deathstar"


def test_header_values_lose_their_surrounding_whitespace_only() -> None:
    data = b"GET / HTTP/1.1\r\nHost:deathstar\r\nX-A: \t a  b \t\r\nX-B:\r\n\r\n"
    (request,) = requests_of(feed(HTTP1RequestParser(), [data]))
    assert request.headers == ((b"Host", b"deathstar"), (b"X-A", b"a  b"), (b"X-B", b""))
    assert request.raw_head == data


def test_limits_must_be_sane() -> None:
    with pytest.raises(ValueError, match="max_headers"):
        HTTP1Limits(max_headers=0)
    with pytest.raises(ValueError, match="max_body"):
        HTTP1Limits(max_body=-1)


# ---- responses ------------------------------------------------------------------------------


def _responses(methods: list[str], data: bytes) -> list[object]:
    parser = HTTP1ResponseParser()
    for method in methods:
        parser.expect_response(method)
    whole = feed(parser, [data])
    parser = HTTP1ResponseParser()
    for method in methods:
        parser.expect_response(method)
    assert feed(parser, [data[i : i + 1] for i in range(len(data))]) == whole
    return whole  # type: ignore[return-value]


def test_response_to_head_has_no_body_whatever_content_length_says() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    events = _responses(["HEAD", "GET"], data)
    assert bodies_of(events) == [b"ok"]  # type: ignore[arg-type]
    assert [type(e) for e in events] == [
        ResponseReceived,
        MessageCompleted,
        ResponseReceived,
        BodyReceived,
        MessageCompleted,
        ConnectionClosed,
    ]


def test_interim_responses_do_not_use_up_a_request() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    events = _responses(["POST", "GET", "GET"], data)
    assert [r.status for r in responses_of(events)] == [100, 204, 304, 200]  # type: ignore[arg-type]
    assert bodies_of(events) == [b"2\r\nok\r\n0\r\n\r\n"]  # type: ignore[arg-type]


def test_response_without_length_runs_to_the_end_of_the_stream() -> None:
    events = _responses(["GET"], b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nsome body")
    (response,) = responses_of(events)  # type: ignore[arg-type]
    assert response.keep_alive is False
    assert events[-3:] == [BodyReceived(b"some body"), MessageCompleted(False), ConnectionClosed()]


def test_response_keep_alive() -> None:
    events = _responses(
        ["GET", "GET"],
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    assert [r.keep_alive for r in responses_of(events)] == [True, False]  # type: ignore[arg-type]


def test_response_status_line_without_reason() -> None:
    events = _responses(["GET"], b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
    (response,) = responses_of(events)  # type: ignore[arg-type]
    assert (response.status, response.reason) == (200, b"")


def test_no_reference_cycle_outlives_a_call() -> None:
    """llhttp holds the callbacks object; that object holds llhttp only while llhttp runs, so
    a parser the engine drops is freed at once, not by the cycle collector."""
    for parser, data in (
        (HTTP1RequestParser(), GET + POST),
        (HTTP1RequestParser(), b"GET / HTTP/1.1\r\nX: \x00\r\n\r\n"),
    ):
        parser.receive_data(data)
        assert parser._sink.llhttp is None


def test_an_idle_parser_holds_no_message() -> None:
    """Between messages the parser keeps no event of the last one alive (idle memory)."""
    parser = HTTP1RequestParser()
    parser.receive_data(POST)
    events = list(parser.events())
    assert parser._head_event is None and parser._sink.fields == []
    responses = HTTP1ResponseParser()
    responses.expect_response("GET")
    responses.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert len(list(responses.events())) == 3 and len(events) == 3
    assert responses._head_event is None and responses._sink.fields == []


def test_an_unchanged_head_is_forwarded_as_the_very_bytes_received() -> None:
    parser = HTTP1RequestParser()
    data = GET + GET
    parser.receive_data(data)
    request = parser.next_event()
    assert isinstance(request, RequestReceived)
    assert request.forward_head() is request.raw_head == GET  # a slice, not re-joined


def test_each_request_of_a_keep_alive_connection_is_judged_on_its_own() -> None:
    """The parser remembers the last Host and target it validated (a keep-alive client sends
    the same ones again): what a request gets never depends on the one before it."""
    parser = HTTP1RequestParser()
    odd = b"GET /a/../b/%7e?x=%41 HTTP/1.1\r\nHost: deathstar\r\n\r\n"
    events = feed(parser, [GET, GET, odd, odd, GET], eof=False)
    assert [(r.target, r.path, r.host) for r in requests_of(events)] == [
        ("/v1/", "/v1/", "deathstar"),
        ("/v1/", "/v1/", "deathstar"),
        ("/a/../b/%7e?x=%41", "/b/~?x=A", "deathstar"),
        ("/a/../b/%7e?x=%41", "/b/~?x=A", "deathstar"),
        ("/v1/", "/v1/", "deathstar"),
    ]
    bad_host = feed_error(parser, [b"GET /v1/ HTTP/1.1\r\nHost: death star\r\n\r\n"])
    assert bad_host.status == 400
    parser = HTTP1RequestParser()
    feed(parser, [GET], eof=False)
    bad_target = feed_error(parser, [b"GET /v1/%2F HTTP/1.1\r\nHost: deathstar\r\n\r\n"])
    assert bad_target.status == 400
