"""The HTTP/1.1 enforcement engine: one proxied client connection, bytes in, commands out.

Pure (STYLE 3): no sockets, no clock, no logging. The asyncio server feeds it the client's and
the upstream's bytes and executes the `Forward` / `Inject` / `Close` / `Log` commands it returns,
in order.

Per request (`RequestReceived` from `HTTP1RequestParser`): the HTTP rules of the connection's
L7 rule set are matched against method, normalized path, host and headers.

- Allowed: the head goes upstream as `forward_head()` makes it (normalized target, header
  edits of `headerMatches`), the body streams behind it event by event, and a FORWARDED
  request record is logged. The upstream's response is forwarded unchanged and logged with its
  status and the latency from the request head to the response head.
- Denied: the request is never forwarded; its body is parsed and thrown away
  (`discard_body()`), the client gets `http1_access_denied` in request order (no body for a
  HEAD), and a DROPPED request record and a DROPPED 403 response record are logged. In audit
  mode the request is forwarded instead, with an AUDIT record.
- A parse error: the status answer (`http1_error_response`) after the responses still owed,
  then the connection closes; one ERROR record. Nothing after the bad bytes is forwarded.

Ordering (the rules in `garrison.proxy.deny`): every request gets an entry in one queue, in
arrival order. Entries of forwarded requests wait for the upstream's response; entries of
denied ones carry their answer and are written as soon as they reach the head of the queue,
so a 403 for a request pipelined behind an allowed one goes out after that one's response.

A denied request's connection stays open unless: the client asked to close; it announced
`Expect: 100-continue` with a body (it gets the 403 instead of `100 Continue`, and the body
may never come); its body is larger than `DISCARD_LIMIT` (Content-Length at once, a chunked
body as soon as that much was read for nothing). Then the answer says `Connection: close`,
and the close lingers (`Close(linger=True)`): the server half-closes after the answer and
reads and throws away what the client still sends, so a client that sends its whole body
before reading (urllib, http.client, Node) reads the 403 instead of a reset. Every close
after an answer the client may not have read yet (a parse error's, a 502/503/504, a response
that closes) lingers the same way. Every close is announced: a chunked body's answer waits
until the body ended (keep-alive) or grew past `DISCARD_LIMIT` (close), since only then is it
known which the answer must say.

Upstream failures: a response the upstream botches, or an upstream that closes with requests
owed, gives the client a 502 if nothing of that response was sent yet (else just a close);
`upstream_unavailable()` (connect failure: 503) and `timeout()` (408 for a head that does not
come, 504 for an upstream that does not answer) are called by the server. Each logs one ERROR.

Upstream connections: the engine keeps no upstream of its own. The server attaches one when
the engine first forwards to it and may detach it whenever `upstream_reusable` is True
(nothing in flight, the last response kept the connection alive) to share it with other
client connections (`garrison.proxy.upstream`). After the upstream closed between messages,
the next request simply goes to a new upstream connection.

h2c with prior knowledge: when the client's first bytes are the HTTP/2 preface, the
connection is handed to `garrison.proxy.engine_h2.H2Engine(context, config, rules="http")`,
which applies the same HTTP rules to HTTP/2 requests.

Policy reload: `update_ruleset()` swaps the rule set; it applies from the next request head
on (a request already being forwarded finishes under the rules that let it through).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Final

from garrison.flows.build import l7_http_request, l7_http_response, proxy_error
from garrison.flows.record import DropReasonDesc, Endpoint, FlowRecord, Verdict
from garrison.flows.record import TrafficDirection as FlowDirection
from garrison.flows.redact import RedactionConfig
from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.http1 import (
    BodyReceived,
    ConnectionClosed,
    HTTP1Error,
    HTTP1RequestParser,
    HTTP1ResponseParser,
    MessageCompleted,
    RequestReceived,
    ResponseReceived,
)
from garrison.parsers.http2 import starts_with_h2_preface
from garrison.policies.l7rules import L7Protocol, L7RuleSet, L7Verdict, MismatchAction, audit_refs
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.refs import RuleRef
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
    client_endpoint,
    flow_endpoint,
)
from garrison.proxy.config import ProxyConfig
from garrison.proxy.deny import http1_access_denied, http1_error_response
from garrison.proxy.engine import EngineCore

__all__ = ["DISCARD_LIMIT", "HTTPEngine", "Waiting"]

# The most body bytes of a denied request the engine reads (and throws away) to keep the
# connection: beyond it, closing is cheaper than reading.
DISCARD_LIMIT = 64 * 1024

_MATCHERS_KEY = "http1.matchers"  # in ConnectionContext.shared: compiled matchers by rule set
_REDACTION_KEY = "http1.redaction"
_ENDPOINTS_KEY = "http1.endpoints"
_MAX_CACHED_MATCHERS = 64
# Requests queued on one connection (pipelined, waiting for earlier answers) before the server
# stops reading from the client (`pipeline_full`).
MAX_PIPELINE = 32


class Waiting:
    """What a connection waits for (`HTTPEngine.waiting`), for the server's timers."""

    IDLE: Final = "idle"  # nothing in flight: between requests on a keep-alive connection
    HEAD: Final = "head"  # part of a request head has come; the rest has not
    CLIENT: Final = "client"  # the body of a request is still coming from the client
    UPSTREAM: Final = "upstream"  # a response is owed by the upstream
    CLOSED: Final = "closed"


_UP = Side.UPSTREAM
_CLIENT = Side.CLIENT
_BOTH = Side.BOTH


class _Exchange:
    """One request on the connection, from its head to its answer."""

    __slots__ = (
        "answer",
        "close_after",
        "headers",
        "host",
        "method",
        "path",
        "refs",
        "responded",
        "start",
        "verdict",
        "version",
    )

    def __init__(
        self,
        event: RequestReceived,
        host: str,
        start: float,
        verdict: Verdict,
        refs: tuple[RuleRef, ...],
    ) -> None:
        self.method = event.method
        self.path = event.path
        self.version = event.version
        self.headers = event.headers
        self.host = host
        self.start = start
        self.verdict = verdict
        self.refs = refs
        self.answer: bytes | None = None  # set for requests garrison answers itself
        self.close_after = not event.keep_alive
        self.responded = False  # response bytes went to the client


class HTTPEngine:
    """HTTP/1.1 enforcement for one client connection (implements `ConnectionEngine`).

    Memory: an idle keep-alive connection is this object and its client's endpoint (issue 17,
    at most 2 KB each with the server's part): `compact()` drops both parsers once nothing
    has been in flight a moment, each is made again by the next message that needs it; what every
    connection of one upstream has alike (matchers, denial refs, the server's endpoint, label
    texts, redaction) is shared through `ConnectionContext.shared`.
    """

    __slots__ = (
        "_audit",
        "_client",
        "_client_done",
        "_closed",
        "_config",
        "_context",
        "_current",
        "_delegate",
        "_denied_by",
        "_direction",
        "_discarded",
        "_forwarding",
        "_host_hint",
        "_ignore_rest",
        "_informational",
        "_matcher",
        "_node",
        "_preface",
        "_queue",
        "_redaction",
        "_requests",
        "_responses",
        "_ruleset",
        "_server",
        "_upstream_ok",
    )

    @property
    def pooled_upstream(self) -> bool:
        """The server may share this engine's upstream connections through a pool (borrowed,
        given back when idle); not once handed to h2c, whose upstream connection is the
        session's own (`EventEngine` reads it again then)."""
        return self._delegate is None

    def __init__(self, context: ConnectionContext, config: ProxyConfig) -> None:
        self._context = context
        self._config = config
        self._requests: HTTP1RequestParser | None = None
        self._responses: HTTP1ResponseParser | None = None
        self._queue: list[_Exchange] = []  # a handful at most: a list is smaller than a deque
        self._current: _Exchange | None = None  # the request whose body is being read
        self._forwarding = False  # the current request's body goes upstream
        self._discarded = 0  # bytes read for a denied request's body
        self._informational = False  # the response being read is a 1xx
        self._client_done = False  # the client ended its stream
        self._closed = False
        self._ignore_rest = False  # a request was answered with close: read nothing more
        # The upstream conversation can go on (no error, no `Connection: close` either way).
        self._upstream_ok = True
        self._preface: bytes | None = b""  # bytes held until HTTP/2's preface is ruled out
        self._delegate: EngineCore | None = None
        self._redaction = _redaction(context, config)
        # The records' own enum: the builders convert anything else on every record.
        self._direction = FlowDirection(str(context.direction))
        self._node = context.node_name
        self._client = client_endpoint(context)
        self._server = _shared_endpoint(context, context.destination)
        self._host_hint = context.host_hint or ""
        self._ruleset = context.ruleset
        self._matcher, self._denied_by = _matcher(context, context.ruleset)
        self._audit = context.audit

    # -- state the server reads ---------------------------------------------------------------

    @property
    def upstream_reusable(self) -> bool:
        """Nothing is in flight to the upstream, its last response kept the connection, and it
        sent nothing after it."""
        responses = self._responses
        return (
            self._upstream_ok
            and not self._forwarding
            and not self._informational
            and self._delegate is None
            and not self._queue_has_forwarded()
            and (responses is None or not responses.buffered)
        )

    @property
    def upstream_protocol(self) -> str:
        """What this connection speaks upstream: the pool never mixes the two."""
        return "http/1.1" if self._delegate is None else "h2"

    @property
    def waiting(self) -> str:
        if self._closed:
            return Waiting.CLOSED
        if self._delegate is not None:
            return self._delegate.waiting  # h2c: idle between calls, like any HTTP/2 client
        if self._current is not None:
            return Waiting.CLIENT
        if self._queue_has_forwarded():
            return Waiting.UPSTREAM
        requests = self._requests
        if (requests is not None and requests.buffered) or self._preface:
            return Waiting.HEAD
        return Waiting.IDLE

    def compact(self) -> None:
        """Drop the parsers of an idle connection (`EventEngine` calls it once nothing has been
        in flight for `release_idle_after`); the next request makes new ones."""
        if self.waiting == Waiting.IDLE and not self._informational and not self._ignore_rest:
            self._requests = None
            self._responses = None

    @property
    def pipeline_full(self) -> bool:
        """Enough requests wait for answers: the server should stop reading the client."""
        return len(self._queue) >= MAX_PIPELINE

    def _queue_has_forwarded(self) -> bool:
        return any(ex.answer is None for ex in self._queue)

    # -- policy -------------------------------------------------------------------------------

    def update_ruleset(self, ruleset: L7RuleSet) -> None:
        """A reloaded policy: requests whose head comes from now on are matched against it."""
        if self._delegate is not None:
            self._delegate.update_ruleset(ruleset)
            return
        self._ruleset = ruleset
        self._matcher, self._denied_by = _matcher(self._context, ruleset)

    # -- client side --------------------------------------------------------------------------

    def client_data(self, data: bytes, now: float) -> Sequence[Command]:
        if self._delegate is not None:
            return self._delegate.client_data(data, now)
        if self._closed or self._ignore_rest or not data:
            return ()
        if self._preface is not None:
            held = self._preface + data
            is_h2 = starts_with_h2_preface(held)
            if is_h2 is None:
                self._preface = held
                return ()
            self._preface = None
            if is_h2:
                return self._hand_to_h2(held, now)
            data = held
        out: list[Command] = []
        if self._current is not None and not self._forwarding:
            self._discarded += len(data)
        requests = self._requests
        if requests is None:
            requests = self._requests = HTTP1RequestParser(self._config.http1)
        try:
            requests.receive_data(data)
            self._client_events(requests, now, out)
        except HTTP1Error as exc:
            self._client_error(exc, now, out)
        if self._current is not None and not self._forwarding and self._discarded > DISCARD_LIMIT:
            self._stop_discarding(out, now)
        return out

    def client_eof(self, now: float) -> Sequence[Command]:
        if self._delegate is not None:
            return self._delegate.client_eof(now)
        if self._closed:
            return ()
        self._client_done = True
        requests = self._requests
        if requests is None:
            requests = self._requests = HTTP1RequestParser(self._config.http1)
        if self._ignore_rest:  # the answer owed closes the connection anyway
            if not self._queue:
                self._closed = True
                return (Close(_BOTH, "client closed"),)
            return ()
        if self._preface:  # a partial preface or request line, then nothing
            self._preface = None
            with contextlib.suppress(HTTP1Error):
                requests.receive_data(b"")
            self._closed = True
            return (Close(_BOTH, "client closed before a request"),)
        self._preface = None
        out: list[Command] = []
        try:
            requests.receive_data(b"")
            self._client_events(requests, now, out)
        except HTTP1Error as exc:
            if self._current is not None and self._forwarding:
                # The client gave up in the middle of a request body: nothing to answer.
                self._fail(out, now, f"client closed inside a request: {exc.message}",
                           DropReasonDesc.PARSE_ERROR, answer=None)
                return out
            self._client_error(exc, now, out)
            return out
        if not self._closed and not self._queue:
            self._closed = True
            out.append(Close(_BOTH, "client closed"))
        return out

    def _client_events(
        self, requests: HTTP1RequestParser, now: float, out: list[Command]
    ) -> None:
        for event in requests.events():
            kind = type(event)
            if kind is BodyReceived:
                if self._forwarding:
                    out.append(Forward(_UP, event.data))  # type: ignore[union-attr]
            elif kind is RequestReceived:
                self._request(event, now, out)  # type: ignore[arg-type]
            elif kind is MessageCompleted:
                ex = self._current
                self._forwarding = False
                self._current = None
                self._discarded = 0
                if ex is not None and ex.answer is None and ex.verdict is Verdict.DROPPED:
                    self._denied_answer(ex, out, now)  # a chunked body, read to its end
            elif kind is ConnectionClosed:
                pass
            if self._closed or self._ignore_rest:
                return

    def _request(self, event: RequestReceived, now: float, out: list[Command]) -> None:
        verdict = self._matcher.match(event.method, event.path, event.host, event.text_headers)
        host = event.host or self._host_hint
        has_body = event.chunked or bool(event.content_length)
        if verdict.allowed or self._audit:
            if verdict.audited:  # allowed, but an audited policy would deny it
                ex = _Exchange(event, host, now, Verdict.AUDIT, verdict.audit_denied_by)
            elif verdict.allowed:
                ex = _Exchange(event, host, now, Verdict.FORWARDED, _one(verdict.rule))
            else:
                ex = _Exchange(event, host, now, Verdict.AUDIT, _denied(verdict, self._denied_by))
            try:
                head = _head(event, verdict.header_edits) if verdict.header_edits else (
                    event.forward_head()
                )
            except LocalProtocolError as exc:
                # The policy asks for an edit the proxy refuses (a framing field): deny.
                self._fail(out, now, f"header edit refused: {exc}", DropReasonDesc.PROXY_ERROR,
                           answer=500)
                return
            if ex.close_after:
                self._upstream_ok = False  # it carries `Connection: close` upstream
            self._queue.append(ex)
            responses = self._responses
            if responses is None:
                responses = self._responses = HTTP1ResponseParser(self._config.http1)
            responses.expect_response(event.method)
            out.append(Forward(_UP, head))
            out.append(Log.later(self._request_record, ex, now, event))
            if has_body:
                self._current = ex
                self._forwarding = True
            return
        # Denied: never forwarded; the body is read and thrown away.
        ex = _Exchange(event, host, now, Verdict.DROPPED, _denied(verdict, self._denied_by))
        out.append(Log.later(self._request_record, ex, now, event))
        if has_body:
            assert self._requests is not None
            self._requests.discard_body()
            self._current = ex
            self._forwarding = False
            self._discarded = 0
            if (event.content_length or 0) > DISCARD_LIMIT or event.expect_continue:
                ex.close_after = True
            elif event.chunked:
                return  # answered when the body ends or grows too large (`_denied_answer`)
        self._denied_answer(ex, out, now)

    def _denied_answer(self, ex: _Exchange, out: list[Command], now: float) -> None:
        """Queue a denied request's 403 (in request order) and write what is due."""
        ex.answer = _access_denied(ex.version, not ex.close_after, ex.method == "HEAD")
        if ex.close_after:
            self._ignore_rest = True  # nothing after it may be forwarded
        self._queue.append(ex)
        self._flush(out, now)

    def _stop_discarding(self, out: list[Command], now: float) -> None:
        """A denied chunked body is too large to read for nothing: answer with close."""
        ex = self._current
        assert ex is not None
        if ex.close_after or ex.answer is not None:
            return
        ex.close_after = True
        self._denied_answer(ex, out, now)

    def _client_error(self, exc: HTTP1Error, now: float, out: list[Command]) -> None:
        """Answer `exc.status` after the responses owed, then close; one ERROR record."""
        if self._closed:
            return
        status = exc.status or 400
        if self._current is not None and self._forwarding:
            # The failing request is partly upstream: its response will never be forwarded.
            self._upstream_ok = False
            with contextlib.suppress(ValueError):
                self._queue.remove(self._current)
        self._current = None
        self._forwarding = False
        out.append(Log(self._error_record(now, f"HTTP/1.1 parse error: {exc.message}",
                                          DropReasonDesc.PARSE_ERROR)))
        if not self._queue_has_forwarded() or self._client_done:
            self._queue.clear()
            self._closed = True
            out.append(Inject(_CLIENT, http1_error_response(status)))
            out.append(Close(_BOTH, f"parse error: {exc.message}", error=True, linger=True))
            return
        # Earlier requests still wait for upstream: answer after them, then close.
        marker = _ErrorExchange(http1_error_response(status))
        self._queue.append(marker)

    # -- upstream side ------------------------------------------------------------------------

    def upstream_data(self, data: bytes, now: float) -> Sequence[Command]:
        if self._delegate is not None:
            return self._delegate.upstream_data(data, now)
        if self._closed or not data:
            return ()
        out: list[Command] = []
        responses = self._responses
        if responses is None:  # bytes nobody asked for: the parser refuses them
            responses = self._responses = HTTP1ResponseParser(self._config.http1)
        try:
            responses.receive_data(data)
            self._upstream_events(responses, now, out)
        except HTTP1Error as exc:
            self._upstream_error(f"bad response from upstream: {exc.message}", now, out)
        return out

    def upstream_eof(self, now: float) -> Sequence[Command]:
        self._upstream_ok = False
        if self._delegate is not None:
            return self._delegate.upstream_eof(now)
        if self._closed:
            return ()
        out: list[Command] = []
        responses = self._responses
        if responses is None:
            responses = self._responses = HTTP1ResponseParser(self._config.http1)
        try:
            responses.receive_data(b"")
            self._upstream_events(responses, now, out)
        except HTTP1Error as exc:
            self._upstream_error(f"upstream closed inside a response: {exc.message}", now, out)
            return out
        if self._closed:
            return out
        if self._queue_has_forwarded():
            self._upstream_error("upstream closed before answering", now, out)
            return out
        # Closed between messages with nothing owed: the next request gets a new upstream.
        self._responses = None
        self._upstream_ok = True
        return out

    def upstream_unavailable(self, reason: str, now: float) -> Sequence[Command]:
        """The server could not connect to the upstream: 503 for the request owed, close."""
        if self._delegate is not None:
            return self._delegate.upstream_unavailable(reason, now)
        out: list[Command] = []
        if not self._closed:
            self._fail(out, now, f"upstream unavailable: {reason}",
                       DropReasonDesc.UPSTREAM_ERROR, answer=503)
        return out

    def _upstream_events(
        self, responses: HTTP1ResponseParser, now: float, out: list[Command]
    ) -> None:
        for event in responses.events():
            kind = type(event)
            if kind is BodyReceived:
                out.append(Forward(_CLIENT, event.data))  # type: ignore[union-attr]
            elif kind is ResponseReceived:
                self._response(event, now, out)  # type: ignore[arg-type]
            elif kind is MessageCompleted:
                if self._informational:
                    self._informational = False
                    continue
                ex = self._queue.pop(0)
                if not event.keep_alive or ex.close_after:  # type: ignore[union-attr]
                    self._upstream_ok = False
                    self._closed = True
                    out.append(Close(_BOTH, "connection closes after this response",
                                     linger=True))
                    return
                self._flush(out, now)
            if self._closed:
                return

    def _response(self, event: ResponseReceived, now: float, out: list[Command]) -> None:
        out.append(Forward(_CLIENT, event.raw_head))
        if event.status < 200:
            self._informational = True
            return
        ex = self._queue[0]
        ex.responded = True
        out.append(Log.later(self._response_record, ex, now, event.status, event.version,
                             event.headers))

    def _upstream_error(self, reason: str, now: float, out: list[Command]) -> None:
        head = self._head_forwarded()
        answer = 502 if head is not None and not head.responded else None
        self._fail(out, now, reason, DropReasonDesc.UPSTREAM_ERROR, answer=answer)

    def _head_forwarded(self) -> _Exchange | None:
        for ex in self._queue:
            if ex.answer is None:
                return ex
        return None

    # -- shared -------------------------------------------------------------------------------

    def _flush(self, out: list[Command], now: float) -> None:
        """Write the answers garrison owes that have reached the head of the queue."""
        queue = self._queue
        while queue and queue[0].answer is not None:
            ex = queue.pop(0)
            assert ex.answer is not None
            out.append(Inject(_CLIENT, ex.answer))
            if isinstance(ex, _ErrorExchange):
                self._closed = True
                out.append(Close(_BOTH, "parse error", error=True, linger=True))
                return
            out.append(Log.later(self._response_record, ex, now, 403, ex.version, ()))
            if ex.close_after:
                self._closed = True
                # The client may still be sending the body garrison did not read.
                out.append(Close(_BOTH, "connection closes after this answer", linger=True))
                return
        if not queue and self._client_done and not self._closed:
            self._closed = True
            out.append(Close(_BOTH, "client closed"))

    def _fail(
        self,
        out: list[Command],
        now: float,
        reason: str,
        drop: DropReasonDesc,
        *,
        answer: int | None,
    ) -> None:
        """Give up on the connection: answer the request owed (if any), close, log ERROR."""
        self._upstream_ok = False
        out.append(Log(self._error_record(now, reason, drop)))
        failing = self._head_forwarded()
        head = failing is not None and failing.method == "HEAD"
        # Answers garrison already owes before the failing request still go out first.
        queue = self._queue
        while queue and queue[0].answer is not None and not isinstance(queue[0], _ErrorExchange):
            ex = queue.pop(0)
            assert ex.answer is not None
            out.append(Inject(_CLIENT, ex.answer))
            if ex.close_after:
                answer = None
                break
        if answer is not None:
            out.append(Inject(_CLIENT, http1_error_response(answer, head=head)))
        queue.clear()
        self._closed = True
        out.append(Close(_BOTH, reason, error=True, linger=answer is not None))

    def timeout(self, waiting: str, now: float) -> Sequence[Command]:
        """The server's timer for `waiting` (a `Waiting` value) ran out."""
        if self._delegate is not None:
            return self._delegate.timeout(waiting, now)
        if self._closed:
            return ()
        if waiting == Waiting.IDLE:
            self._closed = True
            return (Close(_BOTH, "idle keep-alive connection"),)
        out: list[Command] = []
        if waiting == Waiting.UPSTREAM:
            head = self._head_forwarded()
            answer = 504 if head is not None and not head.responded else None
            self._fail(out, now, "upstream did not answer in time",
                       DropReasonDesc.UPSTREAM_ERROR, answer=answer)
        else:
            answer = 408 if not self._queue_has_forwarded() else None
            self._fail(out, now, f"client too slow ({waiting})",
                       DropReasonDesc.PARSE_ERROR, answer=answer)
        return out

    def stop(self, reason: str, now: float) -> Sequence[Command]:
        """The connection ends now: every record was written as it came, nothing is owed."""
        if self._delegate is not None:
            return self._delegate.stop(reason, now)
        self._closed = True
        return ()

    def abort(self, reason: str, now: float) -> Sequence[Command]:
        if self._delegate is not None:
            return self._delegate.abort(reason, now)
        if self._closed:
            return ()
        self._closed = True
        self._upstream_ok = False
        self._queue.clear()
        return (
            Log(self._error_record(now, reason, DropReasonDesc.PROXY_ERROR)),
            Close(_BOTH, reason, error=True),
        )

    def _hand_to_h2(self, held: bytes, now: float) -> Sequence[Command]:
        from garrison.proxy.engine_h2 import H2Engine

        self._delegate = H2Engine(self._context, self._config, rules="http")
        # From here the upstream speaks h2: the pool must never hand over (or take back) an
        # HTTP/1.1 connection for it.
        return [OpenUpstream("h2", pooled=True), *self._delegate.client_data(held, now)]

    # -- records ------------------------------------------------------------------------------

    def _request_record(self, ex: _Exchange, now: float, event: RequestReceived) -> FlowRecord:
        allowed = ex.verdict is Verdict.FORWARDED
        return l7_http_request(
            time_ns=int(now * 1e9),
            verdict=ex.verdict,
            direction=self._direction,
            client=self._client,
            server=self._server,
            method=ex.method,
            path=ex.path,
            host=ex.host,
            protocol=_protocol(event.version),
            headers=event.headers,
            allowed_by=ex.refs if allowed else (),
            denied_by=() if allowed else ex.refs,
            node_name=self._node,
            redaction=self._redaction,
            raw_target=event.target,
        )

    def _response_record(
        self,
        ex: _Exchange,
        now: float,
        code: int,
        version: bytes,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> FlowRecord:
        """A response's record; garrison's own answers (`code` 403) carry no headers."""
        forwarded = ex.verdict is Verdict.FORWARDED
        return l7_http_response(
            time_ns=int(now * 1e9),
            verdict=ex.verdict,
            direction=self._direction,
            client=self._client,
            server=self._server,
            method=ex.method,
            path=ex.path,
            code=code,
            latency_ns=int((now - ex.start) * 1e9),
            host=ex.host,
            protocol=_protocol(version),
            headers=headers,
            allowed_by=ex.refs if forwarded else (),
            denied_by=() if forwarded else ex.refs,
            node_name=self._node,
            redaction=self._redaction,
        )

    def _error_record(self, now: float, reason: str, drop: DropReasonDesc) -> FlowRecord:
        return proxy_error(
            time_ns=int(now * 1e9),
            direction=self._direction,
            client=self._client,
            server=self._server,
            protocol=L7Protocol.HTTP,
            error=reason,
            reason=drop,
            node_name=self._node,
        )


class _ErrorExchange(_Exchange):
    """A parse error's answer, queued behind the responses owed; the connection closes."""

    __slots__ = ()

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.close_after = True
        self.responded = False


def _one(ref: RuleRef | None) -> tuple[RuleRef, ...]:
    return (ref,) if ref is not None else ()


def _denied(verdict: L7Verdict, failed: tuple[RuleRef, ...]) -> tuple[RuleRef, ...]:
    """What a denied request's record names: the L7 deny rule (garrison extension) that
    matched it, else the rules whose L7 rules it failed to match."""
    return (verdict.denied_by,) if verdict.denied_by is not None else failed


# garrison's 403 answers by (version, keep-alive, HEAD): the parser lets only HTTP/1.0 and
# HTTP/1.1 through, so eight at most, each made once (`http1_access_denied` formats bytes).
_DENIED_ANSWERS: dict[tuple[bytes, bool, bool], bytes] = {}


def _access_denied(version: bytes, keep_alive: bool, head: bool) -> bytes:
    key = (version, keep_alive, head)
    answer = _DENIED_ANSWERS.get(key)
    if answer is None:
        answer = http1_access_denied(version, keep_alive=keep_alive, head=head)
        _DENIED_ANSWERS[key] = answer
    return answer


def _protocol(version: bytes) -> str:
    return "HTTP/1.0" if version == b"HTTP/1.0" else "HTTP/1.1"


def _head(event: RequestReceived, edits: Sequence[object]) -> bytes:
    add: list[tuple[bytes, bytes]] = []
    remove: list[bytes] = []
    for edit in edits:
        action = edit.action  # type: ignore[attr-defined]
        name = edit.name.encode("latin-1")  # type: ignore[attr-defined]
        if action is MismatchAction.ADD:
            add.append((name, edit.value.encode("latin-1")))  # type: ignore[attr-defined]
        elif action is MismatchAction.DELETE:
            remove.append(name)
        else:  # REPLACE
            remove.append(name)
            add.append((name, edit.value.encode("latin-1")))  # type: ignore[attr-defined]
    return event.forward_head(add=add, remove=remove)


def _shared_endpoint(context: ConnectionContext, peer: PeerInfo) -> Endpoint:
    """One Endpoint per destination for all its connections: its JSON text (cached in the
    Endpoint) is then made once, and idle connections do not each hold a copy."""
    cache = context.shared.get(_ENDPOINTS_KEY)
    if not isinstance(cache, dict):
        cache = {}
        context.shared[_ENDPOINTS_KEY] = cache
    endpoint = cache.get(peer)
    if isinstance(endpoint, Endpoint):
        return endpoint
    if len(cache) >= _MAX_CACHED_MATCHERS:
        cache.clear()
    endpoint = cache[peer] = flow_endpoint(peer)
    return endpoint


def _matcher(
    context: ConnectionContext, ruleset: L7RuleSet
) -> tuple[HTTPMatcher, tuple[RuleRef, ...]]:
    """The compiled matcher of `ruleset` and the rules a denial names (`audit_refs`), shared by
    the connections of one upstream: compiling an RE2 set per connection would cost more than
    the requests of a short connection."""
    cache = context.shared.get(_MATCHERS_KEY)
    if not isinstance(cache, dict):
        cache = {}
        context.shared[_MATCHERS_KEY] = cache
    hit = cache.get(id(ruleset))
    if hit is not None and hit[0] is ruleset:
        matcher: HTTPMatcher = hit[1]
        refs: tuple[RuleRef, ...] = hit[2]
        return matcher, refs
    if len(cache) >= _MAX_CACHED_MATCHERS:
        cache.clear()
    matcher = HTTPMatcher(ruleset)
    refs = audit_refs(ruleset)
    cache[id(ruleset)] = (ruleset, matcher, refs)
    return matcher, refs


def _redaction(context: ConnectionContext, config: ProxyConfig) -> RedactionConfig:
    cached = context.shared.get(_REDACTION_KEY)
    if isinstance(cached, tuple) and cached[0] is config:
        redaction: RedactionConfig = cached[1]
        return redaction
    redaction = RedactionConfig(query_params=frozenset(config.redact_query_params))
    context.shared[_REDACTION_KEY] = (config, redaction)
    return redaction
