"""HTTP/2 and gRPC enforcement engine (sans-io): one proxied client connection.

    engine = H2Engine(context, config)               # a gRPC port (rules.grpc)
    engine = H2Engine(context, config, rules="http")  # h2c on an HTTP port (rules.http)

Two HTTP/2 endpoints per proxied connection (`garrison.parsers.nghttp2`, nghttp2 through cffi):
an `H2ServerConnection` facing the client and an `H2ClientConnection` facing the upstream.
Frames are never relayed raw (HPACK state is per connection); what policy allows is re-sent
with the other object's `send_*` methods, header pairs exactly as received. The client's
streams are multiplexed onto ONE upstream connection
opened for this client connection (no pool shared between clients: a client's calls never
wait behind another client's, and closing one side closes its pair).

Per client stream, on its request headers:

- `rules="grpc"`: a well-formed gRPC call (`RequestReceived.grpc`) is matched with
  `GRPCMatcher` on (service, method); a request whose content-type says gRPC but that is not a
  well-formed call (`grpc_error`), and any non-gRPC request, is denied.
- `rules="http"`: `HTTPMatcher` on method, normalized path, authority and headers (a gRPC call
  is `POST /pkg.Service/Method`). The normalized path is what is forwarded; a path that cannot
  be normalized safely, an authority HTTP/1.1 would refuse as a Host (userinfo,
  percent-escapes, a bad port), and a `host` field that names another authority than
  `:authority` (what host rules match), are answered 400. `headerMatches` edits apply to the
  forwarded headers.
- Allowed: an upstream stream is opened (queued while the upstream's MAX_CONCURRENT_STREAMS is
  reached), headers, DATA and trailers are relayed both ways; records: the request, and the
  response (gRPC: at the end of the call, status from the trailers or the trailers-only
  answer; HTTP: at the response headers), each with its latency from the request.
- Denied: gRPC-content-type requests get the trailers-only PERMISSION_DENIED answer, others
  `403 Access denied` (to a HEAD: the header block alone, with END_STREAM). A denied call's
  request body still open at the end of the read that carried the headers is cut with
  RST_STREAM(NO_ERROR) after the answer (RFC 9113 §8.1; grpcio sends a unary call's HEADERS
  and DATA together, so its denied calls need no reset). A plain HTTP request's body is
  drained instead: its windows are opened for it at once (`DENIED_BODY_CREDIT`, as nginx
  does for a discarded body), its DATA is acknowledged and thrown away until END_STREAM, up
  to `DENIED_BODY_LIMIT`, past which the stream is reset. 403 + DATA +
  RST_STREAM(NO_ERROR) is legal, but curl 7.88 and httpx report the upload failed. Nothing
  reaches the upstream; records DROPPED, naming the policy rules whose L7 rules the request
  failed (`*_denied_by`, as the HTTP/1.1 engine does). Sibling streams are untouched.
- Audit mode (`context.audit`): everything is forwarded; what would have been denied is
  logged AUDIT (with `*_denied_by` and POLICY_DENIED as the reason it would have had). The
  400 answers above are no policy decision: they stand in audit mode too, as HTTP/1.1's
  parse errors do. Their records are DROPPED with PARSE_ERROR and say why in `error`
  (`HTTP/2 request refused: ...`); metrics count them as parse errors, not denials.

Flow control. Inbound DATA is acknowledged to its sender only once the other side took it:
the bytes `send_data` sent now at once, the rest when `DataFlushed` reports them (padding at
once). A slow reader therefore stalls its writer through HTTP/2 windows, and what is held here
never exceeds the windows garrison advertised (`H2Limits`). Bytes a queue cap would refuse
(`send_capacity`), and bytes of a stream still waiting for an upstream stream slot, stay in
the call's own holding buffer: still unacknowledged, so still bounded by those windows.

Resets propagate both ways (a stream the peer broke a rule on reaches the other side as
CANCEL). A client stream nghttp2 reset because the client broke a stream-level rule (a
malformed request, RFC 9113 §8.1.1; a flow-control error) is an ERROR record (PARSE_ERROR)
naming the stream and nghttp2's reason: the connection and its other streams go on; an
upstream stream reset for a malformed response is one too (UPSTREAM_ERROR). An
upstream RST_STREAM(NO_ERROR) after a complete response ("stop sending, you have your
answer") reaches the client only after that response has been written out. A reset call gets
no response record.

Errors. A peer that breaks HTTP/2 (`H2Error`) gets the GOAWAY its connection object queued;
the other side gets a graceful GOAWAY; both are closed and an ERROR record says which side
failed. An upstream that closes or fails closes the client connection the same way (one
upstream per client: there is nothing else to carry the client's calls). A graceful GOAWAY
from the upstream is passed on to the client (new calls go elsewhere, calls in flight finish).
A relayed frame the other connection refuses to send (`LocalProtocolError`) fails that call
only: both streams are reset (INTERNAL_ERROR) and an ERROR record is written. An unexpected
exception aborts the connection (`abort`): nothing fails open.

Commands. All bytes towards one side come from that connection object's single
`data_to_send()`, since frame order and HPACK state are per connection. The engine drains it
around each deny answer, so a deny's frames (and the GOAWAY of an error) form their own
`Inject(CLIENT, ...)` command (the RST_STREAM frames that cut denied bodies at the end of a
read form one more), while relayed frames, and the SETTINGS, WINDOW_UPDATE and PING frames
that go with relaying, are `Forward` commands. Commands keep the wire order per side. The
upstream connection's first bytes (its preface) are produced with the first allowed request
or the first bytes the upstream sends (a shell that connects eagerly gets them then), so a
client whose calls are all denied needs no upstream connection.

It is an `EngineCore` (`garrison.proxy.engine`, driven by `EventEngine`): `waiting` (what the
timers should watch), `timeout()`, `upstream_unavailable()`, `update_ruleset()` (policy
reload: new requests are matched against the new rules, calls already decided keep their
verdict), `stop()`; its upstream connection is its own (never pooled).

`now` is seconds since the epoch (`time.time()`): record times and latencies come from it, and
the HTTP/2 rate limits only need it to advance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

from garrison.flows.build import (
    l7_grpc_request,
    l7_grpc_response,
    l7_http_request,
    l7_http_response,
    proxy_error,
)
from garrison.flows.record import DropReasonDesc, FlowRecord, Verdict
from garrison.flows.redact import RedactionConfig
from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.grpc import GrpcCall
from garrison.parsers.http2 import (
    H2_PREFACE,
    ConnectionTerminated,
    DataFlushed,
    DataReceived,
    H2Error,
    H2ErrorCode,
    H2Event,
    Header,
    RequestReceived,
    ResponseReceived,
    SendBufferFullError,
    StreamReset,
    TrailersReceived,
)
from garrison.parsers.nghttp2 import H2ClientConnection, H2ServerConnection
from garrison.parsers.pathnorm import UnsafeTargetError, normalize_path, valid_authority
from garrison.policies.l7rules import HeaderEdit, L7RuleSet, L7Verdict, MismatchAction, audit_refs
from garrison.policies.match_grpc import GRPCMatcher
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.refs import RuleRef
from garrison.proxy.commands import (
    Close,
    Command,
    ConnectionContext,
    Forward,
    Inject,
    Log,
    Side,
    client_endpoint,
    flow_endpoint,
)
from garrison.proxy.config import ProxyConfig
from garrison.proxy.deny import (
    GRPC_PERMISSION_DENIED,
    grpc_permission_denied_headers,
    http2_access_denied,
    http2_error_response,
)

__all__ = ["H2Engine"]

RuleKind = Literal["grpc", "http"]
_Conn = H2ServerConnection | H2ClientConnection


class _Half:
    """One direction of a call: bytes from `src` (stream `src_sid`) to `dst` (`dst_sid`).

    `held`: bytes received but not yet handed to `dst` (its stream is not open yet, or its
    queue is at its cap); `end`/`trailers`: how the direction ends once `held` is out.
    `ended`: the sender finished the direction (END_STREAM seen).
    """

    __slots__ = ("dst", "dst_sid", "end", "ended", "held", "src", "src_sid", "trailers")

    def __init__(self, src: _Conn, src_sid: int, dst: _Conn, dst_sid: int) -> None:
        self.src = src
        self.src_sid = src_sid
        self.dst = dst
        self.dst_sid = dst_sid  # 0: no stream on dst yet
        self.held: bytearray | None = None
        self.end = False
        self.trailers: list[Header] | None = None
        self.ended = False

    def data(self, data: bytes, flow_controlled_length: int, end: bool) -> None:
        if end:
            self.ended = True
        padding = flow_controlled_length - len(data)
        if self.held is not None or not self.dst_sid:
            if self.held is None:
                self.held = bytearray()
            self.held += data
            self.end = self.end or end
            sent = 0
        else:
            try:
                sent = self.dst.send_data(self.dst_sid, data, end)
            except SendBufferFullError:
                self.held = bytearray(data)
                self.end = end
                sent = self.push()
        if sent + padding:
            self.src.acknowledge_received_data(self.src_sid, sent + padding)

    def finish(self, trailers: list[Header]) -> None:
        """The sender's trailing header block (it ends the direction)."""
        self.ended = True
        if self.held is not None or not self.dst_sid:
            if self.held is None:
                self.held = bytearray()
            self.trailers = trailers
        else:
            self.dst.send_trailers(self.dst_sid, trailers)

    def push(self) -> int:
        """Hand held bytes to `dst` as far as it accepts them; returns the bytes sent now
        (the caller acknowledges them, except from `data`, which adds them to its own)."""
        held = self.held
        if held is None or not self.dst_sid:
            return 0
        room = self.dst.send_capacity(self.dst_sid)
        n = min(room, len(held))
        if n < len(held):
            if not n:
                return 0
            chunk = bytes(held[:n])
            del held[:n]
            return self.dst.send_data(self.dst_sid, chunk)
        self.held = None
        last_end = self.end and self.trailers is None
        sent = self.dst.send_data(self.dst_sid, bytes(held), last_end) if held or last_end else 0
        if self.trailers is not None:
            self.dst.send_trailers(self.dst_sid, self.trailers)
            self.trailers = None
        return sent

    def flushed(self, length: int) -> None:
        """`dst` wrote `length` more queued bytes: acknowledge them, hand it more."""
        sent = length + self.push() if self.held is not None else length
        if sent:
            self.src.acknowledge_received_data(self.src_sid, sent)

    @property
    def drained(self) -> bool:
        """Finished by the sender and entirely written to `dst`."""
        return (
            self.ended
            and self.held is None
            and (not self.dst_sid or not self.dst.buffered_bytes(self.dst_sid))
        )


class _Outcome(NamedTuple):
    """A request's verdict as its records carry it."""

    verdict: Verdict
    allowed_by: tuple[RuleRef, ...]
    denied_by: tuple[RuleRef, ...]
    drop_reason: DropReasonDesc | None


class _Call:
    """One allowed (or audited) client stream and its upstream stream."""

    __slots__ = (
        "down",
        "grpc",
        "headers_out",
        "http_code",
        "logged",
        "outcome",
        "path",
        "request",
        "reset_when_drained",
        "response_headers",
        "start",
        "up",
    )

    def __init__(
        self,
        request: RequestReceived,
        headers_out: list[Header],
        outcome: _Outcome,
        path: str,
        start: float,
        up: _Half,
        down: _Half,
    ) -> None:
        self.request = request
        self.grpc: GrpcCall | None = request.grpc
        self.headers_out = headers_out
        self.outcome = outcome
        self.path = path  # as forwarded (normalized under HTTP rules)
        self.start = start
        self.up = up  # client -> upstream
        self.down = down  # upstream -> client
        self.http_code = 0
        self.response_headers: tuple[Header, ...] = ()
        self.logged = False
        self.reset_when_drained: int | None = None


# The client's first bytes: the connection preface and at least one frame header.
_PREFACE_AND_FRAME = len(H2_PREFACE) + 9
# The most request body bytes of one denied (non-gRPC) stream drained for nothing before the
# stream is reset: as much as the HTTP/1.1 proxy reads in a lingering close.
DENIED_BODY_LIMIT = 64 * 1024 * 1024
# The windows opened at once for a denied body (its content-length, at most this): a client
# must not wait on flow control for a body nobody reads (httpx's HTTP/2 uploads stall when
# several wait at once).
DENIED_BODY_CREDIT = 1024 * 1024


def _plain(headers: Iterable[Header]) -> list[Header]:
    """The regular fields of a header block (pseudo-headers are in the record's own fields)."""
    return [h for h in headers if h[0][:1] != b":"]


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class H2Engine:
    """The enforcement state machine of one HTTP/2 client connection (module docstring)."""

    def __init__(
        self, context: ConnectionContext, config: ProxyConfig, rules: RuleKind = "grpc"
    ) -> None:
        self._ctx = context
        self._rules = rules
        self._audit = context.audit
        # Towards the client go the upstream's header blocks, validated on receipt by
        # `_upstream` (nghttp2's messaging rules) and relayed unchanged, and garrison's
        # constant deny answers: they need no outbound field checks. Towards the upstream the
        # same holds for gRPC rules (requests and trailers relayed exactly as `_client`
        # received them); HTTP rules may rewrite the path and edit fields, which are checked.
        self._client = H2ServerConnection(config.http2, prevalidated_headers=True)
        self._upstream = H2ClientConnection(config.http2, prevalidated_headers=rules == "grpc")
        self._upstream_started = False
        self._grpc_matcher: GRPCMatcher | None = None
        self._http_matcher: HTTPMatcher | None = None
        self._denied_by: tuple[RuleRef, ...] = ()
        self.update_ruleset(context.ruleset)
        self._client_ep = client_endpoint(context)
        self._server_ep = flow_endpoint(context.destination)
        self._redaction = RedactionConfig(query_params=frozenset(config.redact_query_params))
        self._calls: dict[int, _Call] = {}  # by client stream id
        self._by_upstream: dict[int, _Call] = {}
        self._waiting: deque[_Call] = deque()  # allowed, no upstream stream slot yet
        # Denied gRPC calls whose request body is still open: reset at the end of the batch
        # unless the body ends in it (grpcio sends HEADERS and DATA together), or, when the
        # answer still waits for the client's window, once it is out.
        self._denied_open: dict[int, None] = {}
        self._deny_resets: set[int] = set()
        # Denied plain HTTP requests whose body is being drained: bytes thrown away so far.
        self._draining: dict[int, int] = {}
        self._closed = False
        self._client_bytes = 0
        self._now = 0.0
        self._out: list[Command] = []
        self._client_handlers: dict[type, Callable[[_Call | None, H2Event], None]] = {
            RequestReceived: self._on_request,
            DataReceived: self._on_client_data,
            TrailersReceived: self._on_client_trailers,
            StreamReset: self._on_client_reset,
            DataFlushed: self._on_client_flushed,
        }
        self._upstream_handlers: dict[type, Callable[[_Call | None, H2Event], None]] = {
            ResponseReceived: self._on_response,
            DataReceived: self._on_upstream_data,
            TrailersReceived: self._on_upstream_trailers,
            StreamReset: self._on_upstream_reset,
            DataFlushed: self._on_upstream_flushed,
        }

    # -- state -------------------------------------------------------------------------------------

    @property
    def open_calls(self) -> int:
        """Calls forwarded (or waiting for an upstream stream) and not finished yet."""
        return len(self._calls)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes held for either side: queued in the connection objects for a peer's
        window, or held by calls. Bounded by the windows garrison advertises (module doc)."""
        held = sum(
            len(half.held)
            for call in self._calls.values()
            for half in (call.up, call.down)
            if half.held is not None
        )
        return self._client.buffered_bytes_total + self._upstream.buffered_bytes_total + held

    @property
    def waiting(self) -> str:
        """What the connection waits for, read by the server's timers: `head` until the
        client's connection preface and first frame arrived (header_read timeout), `idle`
        with no call open (idle timeout), `upstream` while calls are open (upstream_reply:
        silence both ways for that long ends the connection, so a streaming call that is
        quiet longer than that needs HTTP/2 PINGs, as gRPC keepalive sends)."""
        if self._client_bytes < _PREFACE_AND_FRAME:
            return "head"
        return "upstream" if self._calls else "idle"

    def timeout(self, waiting: str, now: float) -> Sequence[Command]:
        """The server's timer fired for `waiting`. An idle connection is closed gracefully
        (GOAWAY NO_ERROR, no record); any other timeout is an error (`abort`)."""
        if waiting != "idle" or self._calls:
            return self.abort(f"timeout ({waiting})", now)
        if self._closed:
            return ()
        self._begin(now)
        self._closed = True
        self._client.close()
        if self._upstream_started:
            self._upstream.close()
        self._flush(Forward)
        self._out.append(Close(Side.BOTH, "idle timeout"))
        return self._out

    def upstream_unavailable(self, reason: str, now: float) -> Sequence[Command]:
        """The upstream could not be connected: the client is told with a GOAWAY that
        processed none of its streams (gRPC clients see UNAVAILABLE), ERROR record."""
        if self._closed:
            return ()
        self._begin(now)
        self._closed = True
        self._log(
            self._error_record(f"upstream unavailable: {reason}", DropReasonDesc.UPSTREAM_ERROR)
        )
        self._client.close(H2ErrorCode.NO_ERROR, last_stream_id=0)
        self._flush(Forward, upstream=False)
        self._out.append(Close(Side.BOTH, f"upstream unavailable: {reason}", error=True))
        return self._out

    # `EngineCore`: the upstream connection is this client's own, opened at once.
    pooled_upstream = False
    upstream_protocol = "h2"
    upstream_reusable = False
    pipeline_full = False

    def compact(self) -> None:
        pass

    def stop(self, reason: str, now: float) -> Sequence[Command]:
        """The connection ends now: nothing is owed (every record is written as it comes)."""
        self._closed = True
        return ()

    def update_ruleset(self, ruleset: L7RuleSet) -> None:
        """A reloaded policy: requests from now on are matched against `ruleset`; calls
        already decided keep their verdict."""
        if self._rules == "grpc":
            self._grpc_matcher = GRPCMatcher(ruleset)
        else:
            self._http_matcher = HTTPMatcher(ruleset)
        self._denied_by = audit_refs(ruleset)

    # -- the ConnectionEngine interface ------------------------------------------------------------

    def client_data(self, data: bytes, now: float) -> Sequence[Command]:
        if self._closed:
            return ()
        if not data:
            return self.client_eof(now)
        self._begin(now)
        self._client_bytes += len(data)
        try:
            try:
                events = self._client.receive_data(data, now)
            except H2Error as broken:
                return self._peer_failed(Side.CLIENT, broken)
            calls = self._calls
            handlers = self._client_handlers
            for ev in events:
                handler = handlers.get(type(ev))
                if handler is not None:
                    self._guarded(handler, calls.get(getattr(ev, "stream_id", 0)), ev)
                elif type(ev) is ConnectionTerminated:
                    self._client_goaway(ev)
                # StreamEnded: acted on with the event whose end_stream it follows;
                # ConnectionClosed only comes from client_eof.
            if self._denied_open and not self._closed:
                self._settle_denies()
            self._open_waiting()
            return self._end()
        except Exception as exc:  # a bug here must not leave the connection half-enforced
            return self.abort(f"internal error: {type(exc).__name__}: {exc}", now)

    def upstream_data(self, data: bytes, now: float) -> Sequence[Command]:
        if self._closed:
            return ()
        if not data:
            return self.upstream_eof(now)
        self._begin(now)
        self._upstream_started = True
        try:
            try:
                events = self._upstream.receive_data(data, now)
            except H2Error as broken:
                return self._peer_failed(Side.UPSTREAM, broken)
            calls = self._by_upstream
            handlers = self._upstream_handlers
            for ev in events:
                handler = handlers.get(type(ev))
                if handler is not None:
                    self._guarded(handler, calls.get(getattr(ev, "stream_id", 0)), ev)
                elif type(ev) is ConnectionTerminated:
                    self._upstream_goaway(ev)
                    if self._closed:
                        return self._out
            self._open_waiting()
            return self._end()
        except Exception as exc:
            return self.abort(f"internal error: {type(exc).__name__}: {exc}", now)

    def client_eof(self, now: float) -> Sequence[Command]:
        """The client closed: its calls are cancelled upstream, the pair is closed."""
        if self._closed:
            return ()
        self._begin(now)
        self._client.receive_data(b"", now)
        if self._upstream_started:
            self._upstream.close()
        self._closed = True
        self._flush(Forward)
        self._out.append(Close(Side.BOTH, "client closed the connection"))
        return self._out

    def upstream_eof(self, now: float) -> Sequence[Command]:
        """The upstream closed: the client is told with a GOAWAY and closed too."""
        if self._closed:
            return ()
        self._begin(now)
        self._upstream.receive_data(b"", now)
        in_flight = len(self._calls)
        error = in_flight > 0
        if error:
            self._log(
                self._error_record(
                    f"upstream closed the connection with {in_flight} call(s) in flight",
                    DropReasonDesc.UPSTREAM_ERROR,
                )
            )
        self._client.close()
        self._closed = True
        self._flush(Forward)
        self._out.append(Close(Side.BOTH, "upstream closed the connection", error=error))
        return self._out

    def abort(self, reason: str, now: float) -> Sequence[Command]:
        """A timeout or an internal error: GOAWAY both ways, close, ERROR record."""
        if self._closed:
            return ()
        self._begin(now)
        self._closed = True
        self._log(self._error_record(reason, DropReasonDesc.PROXY_ERROR))
        for side, conn in ((Side.CLIENT, self._client), (Side.UPSTREAM, self._upstream)):
            if side is Side.UPSTREAM and not self._upstream_started:
                continue
            try:
                conn.close(H2ErrorCode.INTERNAL_ERROR)
                goaway = conn.data_to_send()
            except Exception:  # the connection object itself may be what failed
                goaway = b""
            if goaway:
                self._out.append(Inject(side, goaway))
        self._out.append(Close(Side.BOTH, reason, error=True))
        return self._out

    # -- command assembly -----------------------------------------------------------------------

    def _begin(self, now: float) -> None:
        self._now = now
        self._out = []

    def _flush(self, kind: type[Forward] | type[Inject], upstream: bool = True) -> None:
        """Drain both connection objects into commands (client bytes as `kind`)."""
        if upstream and self._upstream_started:
            data = self._upstream.data_to_send()
            if data:
                self._out.append(Forward(Side.UPSTREAM, data))
        data = self._client.data_to_send()
        if data:
            self._out.append(kind(Side.CLIENT, data))

    def _end(self) -> list[Command]:
        if not self._closed:
            self._flush(Forward)
        return self._out

    def _log(self, record: FlowRecord) -> None:
        self._out.append(Log(record))

    def _guarded(
        self, handler: Callable[[_Call | None, H2Event], None], call: _Call | None, ev: H2Event
    ) -> None:
        try:
            handler(call, ev)
        except LocalProtocolError as exc:
            # A frame the other side's connection refuses to send: this call fails, alone.
            if call is None and type(ev) is RequestReceived:
                call = self._calls.get(ev.stream_id)  # opened by this very event
            if call is None:
                raise
            self._fail_call(call, f"cannot relay on stream {call.request.stream_id}: {exc}")

    # -- client events --------------------------------------------------------------------------

    def _on_request(self, _call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is RequestReceived
        verdict, path, unsafe = self._decide(ev)
        outcome = self._outcome(verdict, unsafe)
        if outcome.verdict is Verdict.DROPPED:
            self._deny(ev, outcome, path, unsafe, verdict.reason if unsafe else "")
            return
        headers = self._forwarded_headers(ev, verdict, path)
        sid = ev.stream_id
        up = _Half(self._client, sid, self._upstream, 0)
        down = _Half(self._upstream, 0, self._client, sid)
        call = _Call(ev, headers, outcome, path, self._now, up, down)
        up.ended = ev.end_stream
        self._calls[sid] = call
        self._log(self._request_record(ev, outcome, path))
        if self._waiting or not self._upstream.available_streams:
            self._waiting.append(call)
        else:
            self._open_upstream(call)

    def _on_client_data(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is DataReceived
        if call is None or call.reset_when_drained is not None:
            # A denied stream's body, or a call the upstream has stopped reading: the body
            # goes nowhere.
            sid = ev.stream_id
            self._client.acknowledge_received_data(sid, ev.flow_controlled_length)
            if ev.end_stream:
                self._denied_body_ended(sid)
            elif sid in self._draining:
                drained = self._draining[sid] = self._draining[sid] + ev.flow_controlled_length
                if drained > DENIED_BODY_LIMIT:
                    del self._draining[sid]
                    self._denied_open[sid] = None  # enough: reset it after its answer
            return
        call.up.data(ev.data, ev.flow_controlled_length, ev.end_stream)
        if ev.end_stream:
            self._maybe_done(call)

    def _on_client_trailers(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is TrailersReceived
        if call is None:
            self._denied_body_ended(ev.stream_id)
            return
        call.up.finish(list(ev.headers))
        self._maybe_done(call)

    def _on_client_reset(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is StreamReset
        self._denied_body_ended(ev.stream_id)
        if not ev.remote:  # the client broke a stream-level rule: say so, as HTTP/1.1 does
            self._log(self._error_record(_stream_error("client", ev), DropReasonDesc.PARSE_ERROR))
        if call is None:
            return
        code = ev.error_code if ev.remote else H2ErrorCode.CANCEL
        if call.up.dst_sid:
            self._upstream.reset_stream(call.up.dst_sid, code)
        self._forget(call)

    def _on_client_flushed(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is DataFlushed
        if call is None:
            if ev.buffered == 0 and ev.stream_id in self._deny_resets:
                self._deny_resets.discard(ev.stream_id)
                self._client.reset_stream(ev.stream_id, H2ErrorCode.NO_ERROR)
            return
        call.down.flushed(ev.length)
        if ev.buffered == 0:
            if call.reset_when_drained is not None and call.down.drained:
                self._client.reset_stream(call.request.stream_id, call.reset_when_drained)
                self._forget(call)
                return
            self._maybe_done(call)

    def _client_goaway(self, ev: ConnectionTerminated) -> None:
        if ev.error_code != H2ErrorCode.NO_ERROR:
            # The client ended the connection with an error: nothing more will come from it.
            for call in list(self._calls.values()):
                if call.up.dst_sid:
                    self._upstream.reset_stream(call.up.dst_sid, H2ErrorCode.CANCEL)
                self._forget(call)
        # Graceful: calls in flight finish; the client closes the transport when done.

    # -- upstream events ------------------------------------------------------------------------

    def _on_response(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is ResponseReceived
        if call is None:
            return
        sid = call.request.stream_id
        self._client.send_headers(sid, ev.headers, ev.end_stream)
        if ev.status < 200:
            return  # informational: the final response follows
        call.http_code = ev.status
        call.response_headers = ev.headers
        if ev.end_stream:
            call.down.ended = True
            if call.grpc is not None:
                self._log_response(call, ev.grpc_status)
        if call.grpc is None:
            self._log_response(call, None)
        if ev.end_stream:
            self._maybe_done(call)

    def _on_upstream_data(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is DataReceived
        if call is None:
            self._upstream.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
            return
        call.down.data(ev.data, ev.flow_controlled_length, ev.end_stream)
        if ev.end_stream:
            if call.grpc is not None:
                self._log_response(call, None)  # a gRPC answer without trailers: no status
            self._maybe_done(call)

    def _on_upstream_trailers(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is TrailersReceived
        if call is None:
            return
        call.down.finish(list(ev.headers))
        if call.grpc is not None:
            call.response_headers += ev.headers
            self._log_response(call, ev.grpc_status)
        self._maybe_done(call)

    def _on_upstream_reset(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is StreamReset
        if call is None:
            return
        if not ev.remote:  # a malformed response (RFC 9113 §8.1.1): say so, as HTTP/1.1 does
            self._log(
                self._error_record(_stream_error("upstream", ev), DropReasonDesc.UPSTREAM_ERROR)
            )
        sid = call.request.stream_id
        code = ev.error_code if ev.remote else H2ErrorCode.CANCEL
        call.up.dst_sid = 0
        call.up.held = None
        self._by_upstream.pop(ev.stream_id, None)
        if code == H2ErrorCode.NO_ERROR and call.down.ended and not call.down.drained:
            # "Stop sending, you have your answer": the answer must reach the client first.
            call.reset_when_drained = code
            return
        self._client.reset_stream(sid, code)
        self._forget(call)

    def _on_upstream_flushed(self, call: _Call | None, ev: H2Event) -> None:
        assert type(ev) is DataFlushed
        if call is None:
            return
        call.up.flushed(ev.length)
        if ev.buffered == 0:
            self._maybe_done(call)

    def _upstream_goaway(self, ev: ConnectionTerminated) -> None:
        # Graceful or not, no new call can go to this upstream: the client must go elsewhere.
        # Calls the upstream never took arrive as StreamReset(REFUSED_STREAM) and are
        # refused to the client the same way (safe to retry).
        for call in list(self._waiting):
            self._client.reset_stream(call.request.stream_id, H2ErrorCode.REFUSED_STREAM)
            self._forget(call)
        self._waiting.clear()
        self._client.close()
        if ev.error_code != H2ErrorCode.NO_ERROR:
            self._log(
                self._error_record(
                    f"upstream sent GOAWAY with error {ev.error_code}",
                    DropReasonDesc.UPSTREAM_ERROR,
                )
            )
            self._closed = True
            self._flush(Forward)
            self._out.append(Close(Side.BOTH, "upstream sent GOAWAY", error=True))

    # -- decisions ------------------------------------------------------------------------------

    def _decide(self, ev: RequestReceived) -> tuple[L7Verdict, str, bool]:
        """(verdict, path to forward and log, True when the path could not be normalized)."""
        path = ev.path or ""
        if self._grpc_matcher is not None:
            if ev.grpc is not None:
                return self._grpc_matcher.match(ev.grpc.service, ev.grpc.method), path, False
            if ev.grpc_error is not None:
                return L7Verdict(allowed=False, reason=ev.grpc_error), path, False
            return (
                L7Verdict(allowed=False, reason=f"not a gRPC call: {ev.method} {path}"),
                path,
                False,
            )
        assert self._http_matcher is not None
        other_host = _host_differing_from_authority(ev.headers)
        if other_host is not None:
            reason = f"host field {other_host!r} differs from :authority {ev.authority!r}"
            return L7Verdict(allowed=False, reason=reason), path, True
        if ev.authority is not None and not valid_authority(ev.authority):
            # userinfo, percent-escapes, a bad port: servers split such a value differently
            # from the host rule that matched it (HTTP/1.1 refuses the same Host with 400)
            reason = f"invalid authority {ev.authority[:200]!r}"
            return L7Verdict(allowed=False, reason=reason), path, True
        if ev.method == "OPTIONS" and path == "*":
            normalized = path
        else:
            try:
                normalized = normalize_path(path.encode("latin-1"))
            except UnsafeTargetError as exc:
                return L7Verdict(allowed=False, reason=str(exc)), path, True
        fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in _plain(ev.headers)]
        return (
            self._http_matcher.match(ev.method, normalized, ev.authority, fields),
            normalized,
            False,
        )

    def _forwarded_headers(
        self, ev: RequestReceived, verdict: L7Verdict, path: str
    ) -> list[Header]:
        if self._http_matcher is None:
            return list(ev.headers)  # gRPC: forwarded exactly as received
        headers = list(ev.headers)
        if ev.path is not None and path != ev.path:
            encoded = path.encode("latin-1")
            headers = [(n, encoded) if n == b":path" else (n, v) for n, v in headers]
        for edit in verdict.header_edits:
            headers = _edit(headers, edit)
        return headers

    def _deny(
        self, ev: RequestReceived, outcome: _Outcome, path: str, unsafe: bool, why: str = ""
    ) -> None:
        """A denied request's answer; `unsafe`: refused as malformed (400), `why` says how."""
        sid = ev.stream_id
        self._flush(Forward, upstream=False)  # what was owed before stays a Forward
        client = self._client
        if ev.is_grpc and not unsafe:
            client.send_trailers_only(sid, grpc_permission_denied_headers())
            code = 200
        else:
            code = 400 if unsafe else 403
            headers, body = http2_error_response(400) if unsafe else http2_access_denied()
            if ev.method == "HEAD":  # same fields, no body (RFC 9110 §9.3.2)
                client.send_headers(sid, headers, end_stream=True)
            else:
                client.send_headers(sid, headers)
                client.send_data(sid, body, end_stream=True)
        if not ev.end_stream:
            if ev.is_grpc:
                self._denied_open[sid] = None
            else:
                self._draining[sid] = 0
                declared = _content_length(ev.headers)
                credit = DENIED_BODY_CREDIT if declared is None else declared
                client.open_window(sid, min(credit, DENIED_BODY_CREDIT))
        self._flush(Inject, upstream=False)
        self._log_denied(ev, outcome, path, code, f"HTTP/2 request refused: {why}" if why else "")

    def _denied_body_ended(self, sid: int) -> None:
        self._denied_open.pop(sid, None)
        self._draining.pop(sid, None)
        self._deny_resets.discard(sid)

    def _settle_denies(self) -> None:
        """End of a client batch: cut the bodies of denied requests that are still open
        (RST_STREAM NO_ERROR, RFC 9113 §8.1), after their answers."""
        client = self._client
        for sid in self._denied_open:
            if client.buffered_bytes(sid):
                self._deny_resets.add(sid)  # the answer waits for the client's window
            else:
                client.reset_stream(sid, H2ErrorCode.NO_ERROR)
        self._denied_open.clear()
        self._flush(Inject, upstream=False)

    # -- upstream streams -----------------------------------------------------------------------

    def _open_upstream(self, call: _Call) -> None:
        self._upstream_started = True
        end = call.up.ended and call.up.held is None and call.up.trailers is None
        usid = self._upstream.send_request(call.headers_out, end)
        call.up.dst_sid = usid
        call.down.src_sid = usid
        self._by_upstream[usid] = call
        if call.up.held is not None:
            sent = call.up.push()
            if sent:
                self._client.acknowledge_received_data(call.request.stream_id, sent)

    def _open_waiting(self) -> None:
        waiting = self._waiting
        while waiting and not self._closed:
            call = waiting[0]
            if call.request.stream_id not in self._calls:
                waiting.popleft()  # reset while waiting
                continue
            if not self._upstream.available_streams:
                return
            waiting.popleft()
            try:
                self._open_upstream(call)
            except LocalProtocolError as exc:
                self._fail_call(call, f"cannot open an upstream stream: {exc}")

    def _maybe_done(self, call: _Call) -> None:
        if call.up.drained and call.down.drained:
            self._forget(call)

    def _forget(self, call: _Call) -> None:
        self._calls.pop(call.request.stream_id, None)
        if call.up.dst_sid:
            self._by_upstream.pop(call.up.dst_sid, None)

    def _fail_call(self, call: _Call, message: str) -> None:
        self._client.reset_stream(call.request.stream_id, H2ErrorCode.INTERNAL_ERROR)
        if call.up.dst_sid:
            self._upstream.reset_stream(call.up.dst_sid, H2ErrorCode.INTERNAL_ERROR)
        self._forget(call)
        self._log(self._error_record(message, DropReasonDesc.PROXY_ERROR))

    def _peer_failed(self, side: Side, exc: H2Error) -> list[Command]:
        """`side` broke HTTP/2: its GOAWAY (queued by its connection object) is injected, the
        other side gets a graceful GOAWAY, both close."""
        self._closed = True
        failed, other = (
            (self._client, self._upstream)
            if side is Side.CLIENT
            else (self._upstream, self._client)
        )
        other_side = Side.UPSTREAM if side is Side.CLIENT else Side.CLIENT
        reason = (
            DropReasonDesc.PARSE_ERROR if side is Side.CLIENT else DropReasonDesc.UPSTREAM_ERROR
        )
        self._log(self._error_record(f"HTTP/2 error from {side.value}: {exc}", reason))
        goaway = failed.data_to_send()
        if goaway:
            self._out.append(Inject(side, goaway))
        if other_side is Side.CLIENT or self._upstream_started:
            other.close()
            data = other.data_to_send()
            if data:
                self._out.append(Forward(other_side, data))
        self._out.append(Close(Side.BOTH, f"HTTP/2 error from {side.value}", error=True))
        return self._out

    # -- records --------------------------------------------------------------------------------

    def _outcome(self, verdict: L7Verdict, unsafe: bool = False) -> _Outcome:
        """How a decision is recorded. Denied and audited requests name the policy rules
        whose L7 rules they failed to match (`*_denied_by`), as the HTTP/1.1 engine does."""
        if verdict.audited:  # allowed, but an audited policy would deny it
            return _Outcome(
                Verdict.AUDIT, (), verdict.audit_denied_by, DropReasonDesc.POLICY_DENIED
            )
        if verdict.allowed:
            return _Outcome(Verdict.FORWARDED, (verdict.rule,) if verdict.rule else (), (), None)
        if unsafe:  # not a policy decision: refused in audit mode too, as HTTP/1.1 does
            return _Outcome(Verdict.DROPPED, (), (), DropReasonDesc.PARSE_ERROR)
        kind = Verdict.AUDIT if self._audit else Verdict.DROPPED
        denied_by = (verdict.denied_by,) if verdict.denied_by is not None else self._denied_by
        return _Outcome(kind, (), denied_by, DropReasonDesc.POLICY_DENIED)

    def _request_record(
        self, ev: RequestReceived, outcome: _Outcome, path: str, error: str = ""
    ) -> FlowRecord:
        ctx = self._ctx
        authority = ev.authority or ctx.host_hint or ""
        if ev.grpc is not None:
            return l7_grpc_request(
                time_ns=_ns(self._now),
                verdict=outcome.verdict,
                direction=ctx.direction,
                client=self._client_ep,
                server=self._server_ep,
                service=ev.grpc.service,
                method=ev.grpc.method,
                authority=authority,
                headers=_plain(ev.headers),
                allowed_by=outcome.allowed_by,
                denied_by=outcome.denied_by,
                drop_reason=outcome.drop_reason,
                node_name=ctx.node_name,
                redaction=self._redaction,
                raw_target=ev.path or "",
            )
        return l7_http_request(
            time_ns=_ns(self._now),
            verdict=outcome.verdict,
            direction=ctx.direction,
            client=self._client_ep,
            server=self._server_ep,
            method=ev.method,
            path=path,
            host=authority,
            scheme=ev.scheme or "http",
            protocol="HTTP/2",
            headers=_plain(ev.headers),
            allowed_by=outcome.allowed_by,
            denied_by=outcome.denied_by,
            drop_reason=outcome.drop_reason,
            node_name=ctx.node_name,
            redaction=self._redaction,
            raw_target=ev.path or "",
            error=error,
        )

    def _response_record(
        self,
        ev: RequestReceived,
        outcome: _Outcome,
        path: str,
        *,
        http_code: int,
        grpc_status: int | None,
        latency_ns: int,
        headers: Iterable[Header] = (),
        error: str = "",
    ) -> FlowRecord:
        ctx = self._ctx
        authority = ev.authority or ctx.host_hint or ""
        if ev.grpc is not None:
            return l7_grpc_response(
                time_ns=_ns(self._now),
                verdict=outcome.verdict,
                direction=ctx.direction,
                client=self._client_ep,
                server=self._server_ep,
                service=ev.grpc.service,
                method=ev.grpc.method,
                status=grpc_status,
                latency_ns=latency_ns,
                http_code=http_code,
                authority=authority,
                headers=_plain(headers),
                allowed_by=outcome.allowed_by,
                denied_by=outcome.denied_by,
                drop_reason=outcome.drop_reason,
                node_name=ctx.node_name,
                redaction=self._redaction,
            )
        return l7_http_response(
            time_ns=_ns(self._now),
            verdict=outcome.verdict,
            direction=ctx.direction,
            client=self._client_ep,
            server=self._server_ep,
            method=ev.method,
            path=path,
            code=http_code,
            latency_ns=latency_ns,
            host=authority,
            scheme=ev.scheme or "http",
            protocol="HTTP/2",
            headers=_plain(headers),
            allowed_by=outcome.allowed_by,
            denied_by=outcome.denied_by,
            drop_reason=outcome.drop_reason,
            node_name=ctx.node_name,
            redaction=self._redaction,
            error=error,
        )

    def _log_response(self, call: _Call, status: int | None) -> None:
        if call.logged:
            return
        call.logged = True
        self._log(
            self._response_record(
                call.request,
                call.outcome,
                call.path,
                http_code=call.http_code,
                grpc_status=status,
                latency_ns=max(0, _ns(self._now - call.start)),
                headers=call.response_headers,
            )
        )

    def _log_denied(
        self, ev: RequestReceived, outcome: _Outcome, path: str, code: int, error: str = ""
    ) -> None:
        self._log(self._request_record(ev, outcome, path, error))
        status = GRPC_PERMISSION_DENIED if ev.grpc is not None and code == 200 else None
        self._log(
            self._response_record(
                ev, outcome, path, http_code=code, grpc_status=status, latency_ns=0,
                error=error,
            )
        )

    def _error_record(self, error: str, reason: DropReasonDesc) -> FlowRecord:
        ctx = self._ctx
        return proxy_error(
            time_ns=_ns(self._now),
            direction=ctx.direction,
            client=self._client_ep,
            server=self._server_ep,
            protocol=ctx.protocol,
            error=error,
            reason=reason,
            node_name=ctx.node_name,
        )


def _stream_error(side: str, ev: StreamReset) -> str:
    """What a peer did wrong on one stream, for the operator."""
    try:
        code = H2ErrorCode(ev.error_code).name
    except ValueError:
        code = str(ev.error_code)
    why = f": {ev.reason}" if ev.reason else ""
    return f"{side} stream {ev.stream_id} reset with {code}{why}"


def _host_differing_from_authority(headers: Iterable[Header]) -> str | None:
    """A `host` field naming another authority than `:authority`, which host rules match:
    an upstream that routes by `host` would serve a site the policy did not allow (RFC 9113
    §8.3.1 makes such a request malformed). Names are case-insensitive."""
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        if name == b":authority":
            authority = value
        elif name == b"host":
            host = value
    if authority is None or host is None or host.lower() == authority.lower():
        return None
    return host.decode("latin-1")


def _content_length(headers: Iterable[Header]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # nghttp2 checks it against DATA
    return None


def _edit(headers: list[Header], edit: HeaderEdit) -> list[Header]:
    name = edit.name.lower().encode("latin-1")
    value = edit.value.encode("latin-1")
    if edit.action is MismatchAction.ADD:
        return [*headers, (name, value)]
    kept = [h for h in headers if h[0] != name]
    if edit.action is MismatchAction.REPLACE:
        kept.append((name, value))
    return kept
