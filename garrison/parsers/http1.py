"""HTTP/1.1 sans-io parsers for the L7 proxy: client requests and upstream responses.

Bytes in (`receive_data`, `b""` = end of stream), typed events out (`next_event` / `events`).
llhttp (httptools >= 0.9, strict: no leniency is ever set) is the single judge of grammar:
every byte of a message is fed to it, in order, and its callbacks (`on_url`, `on_status`,
`on_header`, `on_headers_complete`, `on_message_complete`) give the target, the fields and
keep-alive. The code here adds exact message boundaries (the first CRLF CRLF ends a head; a
body ends after Content-Length bytes or at the end of the chunked framing, walked line by
line) so that `raw_head` and `BodyReceived` are slices of the input as llhttp accepted it,
never re-joined, a denied body can be discarded and the next pipelined request is not lost;
llhttp must fire `on_headers_complete` / `on_message_complete` exactly at each boundary, or the
message is refused. And the checks below, each marked `# check <name>` in the code and tested
(with bytes httptools alone accepts) in tests/unit/parsers/test_http1_llhttp.py:

- `request_line_exact`: llhttp lets through runs of SP (`GET  /  HTTP/1.1`), bytes before the
  method and a line without a version; garrison refuses with 400: one SP each (RFC 9112 3).
- `version_1x`: llhttp lets through HTTP/0.9 and HTTP/2.0; garrison refuses with 505 (502 for
  a response) because only 1.0 and 1.1 are proxied. `h2_preface`: llhttp pauses silently on
  `PRI * HTTP/2.0`; garrison refuses with 505.
- `host_exactly_one`: llhttp lets through HTTP/1.1 without Host, several Host fields, a Host
  that is no authority; garrison refuses with 400 (RFC 9112 3.2): policy matches on one Host.
- `absolute_form_authority`: llhttp lets through an absolute-form target whose authority is
  not the Host; garrison refuses with 400: which host is meant would be ambiguous.
- `upgrade_field`: llhttp lets `Upgrade` through without `Connection: upgrade`; garrison
  refuses with 501: no rule can allow a tunnel (CONNECT and `Connection: upgrade` are llhttp's
  `HttpParserUpgrade`: 501 as well; a 101 response: 502).
- `connection_close`: llhttp keeps an HTTP/1.0 `Connection: keep-alive, close` alive; garrison
  closes: `close` wins.
- `transfer_coding_chunked`: llhttp lets `gzip, chunked` and `,chunked` through; garrison
  refuses with 501 (400 for an empty or non-token coding): only chunked framing is proxied.
- `transfer_encoding_http10`: llhttp frames an HTTP/1.0 message by Transfer-Encoding; garrison
  refuses with 400 (RFC 9112 6.1): a 1.0 upstream would frame it differently.
- `content_length_digits`: llhttp lets through 19-20 digits below 2^64; garrison refuses with
  400: past int63 upstreams wrap. `chunk_size_digits`: the same for chunk sizes of more than 16
  hex digits or over 2^63-1.
- `chunk_ext_value`: llhttp lets through an empty extension value (`5;a=`); garrison refuses
  with 400: it is not chunk-ext grammar (a quoted value holding `=;` is refused too).
- `status_100_plus` (status 000-099) and `response_expected` (no request asked for it):
  llhttp lets them through; garrison answers its client 502.
- Limits (`HTTP1Limits`; llhttp has none): 414 request line, 431 head, field count or trailer
  section, 413 body, 400 chunk-size line. The end of the stream inside a message: 400 (httptools
  cannot be told the stream ended).

Everything else is llhttp's verdict (its reason is in the error's message): 400 (HTTP1HeadError
for a head or trailers, HTTP1FramingError for Content-Length, Transfer-Encoding and a body),
501 for a token method llhttp does not know, 505 for HTTP/1.2, 501 for a final coding other
than chunked that is a token (RFC 9112 6.1). Every error from `HTTP1ResponseParser` carries 502,
the answer the proxy gives its own client when upstream misbehaves. HTTP1TargetError 400: a
target `pathnorm` cannot normalize safely.

Pinned behaviour:
- Chunk extensions llhttp accepts are forwarded untouched if the line fits `max_chunk_line`.
- Empty lines (CRLF) before a request line are skipped and not forwarded (RFC 9112 2.2).
- Keep-alive is llhttp's `should_keep_alive()`, read in `on_headers_complete`, but for
  `connection_close` and the answer to a HEAD request (llhttp cannot be told the method, and
  takes a response without length for one that runs until EOF): HTTP/1.1 unless `Connection:
  close`, HTTP/1.0 only with `keep-alive`. A response without a length runs until the end of
  the stream, never keep-alive. After a message that closes the connection every further byte
  is discarded, never parsed, so nothing after it can be forwarded.
- `headers` are the field lines as sent: names with their case, values without the
  surrounding whitespace (OWS). Trailers of a chunked body are validated and forwarded as part
  of the body bytes; they are not reported as headers (rules never match them).
- Errors are raised by `next_event()` / `events()` after the events that precede them on the
  wire, so a valid request pipelined before a bad one is still served. After an error the parser
  is dead: `receive_data` raises the same error. Body bytes llhttp accepted before the error are
  reported first (not forwarded by the parser; an engine that streams bodies closes the upstream
  side on the error). llhttp sees no byte past a limit and a framing line is fed to it whole or
  in arriving pieces alike, so the outcome does not depend on how the bytes were split.
- Memory: a partial head is buffered only up to `max_header_block`, a partial chunk-size or
  trailer line up to its limit; body bytes become `BodyReceived` events in the call that
  delivered them (`buffered` tells how much is held).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn, overload

import httptools

from garrison.parsers.errors import LocalProtocolError, RemoteProtocolError
from garrison.parsers.pathnorm import (
    UnsafeTargetError,
    normalize_path,
    normalize_target,
    valid_authority,
)

__all__ = [
    "BodyReceived",
    "ConnectionClosed",
    "HTTP1Error",
    "HTTP1Event",
    "HTTP1FramingError",
    "HTTP1HeadError",
    "HTTP1LimitError",
    "HTTP1Limits",
    "HTTP1RequestParser",
    "HTTP1ResponseParser",
    "HTTP1TargetError",
    "HTTP1UpgradeRefusedError",
    "HeaderText",
    "MessageCompleted",
    "RequestReceived",
    "ResponseReceived",
]


# ---- errors ---------------------------------------------------------------------------------


class HTTP1Error(RemoteProtocolError):
    """A peer's HTTP/1.1 bytes were refused; `status` is the HTTP status to answer with."""

    status: int

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, status=status)


class HTTP1HeadError(HTTP1Error):
    """Malformed request/status line or field lines (400), unknown method (501), version (505)."""


class HTTP1FramingError(HTTP1Error):
    """The message length is ambiguous or the body framing is malformed (400, 501)."""


class HTTP1LimitError(HTTP1Error):
    """A configured limit was passed: request line (414), head (431), body (413)."""


class HTTP1TargetError(HTTP1Error):
    """The request-target cannot be normalized safely (400)."""


class HTTP1UpgradeRefusedError(HTTP1Error):
    """CONNECT or a protocol upgrade: no rule can allow one yet (501; 502 for a 101 response)."""


# ---- configuration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HTTP1Limits:
    """Bounds on what one peer may make the parser hold or accept.

    `max_request_line`: bytes of the request line (status line for responses), CRLF excluded.
    `max_header_block`: bytes of the whole head (start line, field lines, final empty line),
    also the budget of a chunked body's trailer section. `max_headers`: field lines in the head
    (and in the trailers). `max_body`: body bytes after decoding the chunked framing
    (None = unlimited). `max_chunk_line`: a chunk-size line with its extensions and CRLF.
    """

    max_request_line: int = 8192
    max_header_block: int = 65536
    max_headers: int = 100
    max_body: int | None = None
    max_chunk_line: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_request_line", "max_header_block", "max_headers", "max_chunk_line"):
            if getattr(self, name) < 1:
                raise ValueError(f"HTTP1Limits.{name} must be positive")
        if self.max_body is not None and self.max_body < 0:
            raise ValueError("HTTP1Limits.max_body must be >= 0 or None")
        if self.max_header_block < 4 or self.max_chunk_line < 3:
            raise ValueError("HTTP1Limits: max_header_block >= 4 and max_chunk_line >= 3")


# ---- events ---------------------------------------------------------------------------------

Headers = tuple[tuple[bytes, bytes], ...]


class HeaderText(Sequence[tuple[str, str]]):
    """A read-only view of wire fields as text: latin-1, so every byte maps to one character
    and nothing can fail to decode. Decodes on access: rules without header conditions cost
    nothing."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Headers) -> None:
        self._fields = fields

    def __len__(self) -> int:
        return len(self._fields)

    @overload
    def __getitem__(self, index: int) -> tuple[str, str]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[str, str]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, str] | Sequence[tuple[str, str]]:
        if isinstance(index, slice):
            return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._fields[index]]
        name, value = self._fields[index]
        return name.decode("latin-1"), value.decode("latin-1")

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for name, value in self._fields:
            yield name.decode("latin-1"), value.decode("latin-1")


# Framing fields a header edit must never touch: they decide where this message ends.
_FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection"})


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request head, validated. `path` is the normalized target: what rules match and
    what `forward_head()` sends upstream. `host` is the Host header value (or the authority of
    an absolute-form target), None only for an HTTP/1.0 request without one.
    `content_length` None with `chunked` False means no body.
    """

    method: str
    target: str
    path: str
    version: bytes
    headers: Headers
    host: str | None
    keep_alive: bool
    chunked: bool
    content_length: int | None
    raw_head: bytes

    def __init__(
        self,
        method: str,
        target: str,
        path: str,
        version: bytes,
        headers: Headers,
        host: str | None,
        keep_alive: bool,
        chunked: bool,
        content_length: int | None,
        raw_head: bytes,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "keep_alive", keep_alive)
        object.__setattr__(self, "chunked", chunked)
        object.__setattr__(self, "content_length", content_length)
        object.__setattr__(self, "raw_head", raw_head)

    @property
    def text_headers(self) -> HeaderText:
        """`headers` as text for the rule matcher, decoded only if it looks at them."""
        return HeaderText(self.headers)

    @property
    def expect_continue(self) -> bool:
        """The client waits for `100 Continue` before it sends the body."""
        return any(
            name.lower() == b"expect" and value.lower() == b"100-continue"
            for name, value in self.headers
        )

    def forward_head(
        self,
        *,
        add: Sequence[tuple[bytes, bytes]] = (),
        remove: Collection[bytes] = (),
    ) -> bytes:
        """The head to send upstream: `raw_head` with the target replaced by `path`.

        Everything else is byte-identical. `remove` drops every field with one of these names
        (case-insensitive) and `add` appends fields before the final empty line: together they
        apply header edits (REPLACE = remove + add). Framing fields (Content-Length,
        Transfer-Encoding, Host, Connection) cannot be edited: changing them would make
        upstream frame the message differently from what was validated.
        """
        if not add and not remove and self.path == self.target:
            return self.raw_head  # the bytes llhttp accepted, as received
        line_end = self.raw_head.index(b"\r\n")
        if self.path == self.target:
            request_line = self.raw_head[:line_end]
        else:
            request_line = b"%s %s %s" % (self.method.encode(), self.path.encode(), self.version)
        if not add and not remove:
            return request_line + self.raw_head[line_end:]
        drop = {name.lower() for name in remove}
        for name in drop | {name.lower() for name, _ in add}:
            if name in _FRAMING_FIELDS:
                raise LocalProtocolError(f"refusing to edit framing field {name!r}")
        for name, value in add:  # a policy's value must not smuggle a line break upstream
            if not name or name.translate(None, _TCHAR) or value.translate(None, _VALUE_BYTES):
                raise LocalProtocolError(f"refusing to add an invalid field {name[:40]!r}")
        lines = [request_line]
        for line in self.raw_head[line_end + 2 : -4].split(b"\r\n") if self.headers else ():
            if line.split(b":", 1)[0].lower() not in drop:
                lines.append(line)
        lines.extend(name + b": " + value for name, value in add)
        return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A response head, validated. 1xx responses come before the final one of the same
    request. `content_length` None with `chunked` False: no body, or (keep_alive False and
    the request was not HEAD, status not 204/304) a body that runs to the end of the stream.
    """

    status: int
    reason: bytes
    version: bytes
    headers: Headers
    raw_head: bytes
    keep_alive: bool
    chunked: bool
    content_length: int | None

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Headers,
        raw_head: bytes,
        keep_alive: bool,
        chunked: bool,
        content_length: int | None,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "raw_head", raw_head)
        object.__setattr__(self, "keep_alive", keep_alive)
        object.__setattr__(self, "chunked", chunked)
        object.__setattr__(self, "content_length", content_length)


@dataclass(frozen=True, slots=True)
class BodyReceived:
    """Body bytes exactly as on the wire (chunk framing and trailers included)."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class MessageCompleted:
    """The message whose head came last is complete; `keep_alive` False: nothing follows."""

    keep_alive: bool

    def __init__(self, keep_alive: bool) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "keep_alive", keep_alive)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended the stream between messages."""


# Events without a payload worth a fresh object: equal facts, shared instances.
_KEEPING = MessageCompleted(True)
_CLOSING = MessageCompleted(False)
_CLOSED_EVENT = ConnectionClosed()

HTTP1Event = RequestReceived | ResponseReceived | BodyReceived | MessageCompleted | ConnectionClosed


# ---- what llhttp lets through ---------------------------------------------------------------

_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Bytes a field value may hold (VCHAR, SP, obs-text, HTAB): what `forward_head(add=...)` checks.
_VALUE_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t"
_SUPPORTED_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# Request fields the head's meaning depends on (lower-case).
_REQUEST_FIELDS = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"upgrade", b"connection"}
)
# Their lengths, and those of the response fields read (content-length, transfer-encoding,
# connection): a field of another length is none of them, without lower-casing its name.
_REQUEST_FIELD_LENGTHS = frozenset(len(name) for name in _REQUEST_FIELDS)
_RESPONSE_FIELD_LENGTHS = frozenset((14, 17, 10))
_MAX_CONTENT_LENGTH_DIGITS = 18
_MAX_CHUNK_SIZE = 0x7FFF_FFFF_FFFF_FFFF


def _is_token(value: bytes) -> bool:
    return bool(value) and not value.translate(None, _TCHAR)


def _check_transfer_coding(te_values: list[bytes], status: int) -> None:
    """Exactly `chunked`: llhttp has refused it not being last."""
    codings = [c.strip(b" \t").lower() for v in te_values for c in v.split(b",")]
    if codings != [b"chunked"]:
        if not all(_is_token(c) for c in codings):
            raise HTTP1FramingError("invalid Transfer-Encoding value", status=status)
        raise HTTP1FramingError(
            f"unsupported transfer-coding {b', '.join(codings)!r}: only chunked is proxied",
            status=501 if status == 400 else status,
        )


def _content_length(value: bytes, limits: HTTP1Limits, status: int) -> int:
    """The length, within `max_body`; llhttp has checked the value is 1*DIGIT."""
    if len(value) > _MAX_CONTENT_LENGTH_DIGITS:  # check content_length_digits
        raise HTTP1FramingError("Content-Length out of range", status=status)
    length = int(value)
    max_body = limits.max_body
    if max_body is not None and length > max_body:
        raise HTTP1LimitError(
            f"body larger than {max_body} bytes", status=413 if status == 400 else status
        )
    return length


def _keep_alive(version: bytes, connection: list[bytes]) -> bool:
    """Keep-alive from the Connection fields: for what llhttp gets wrong (`connection_close`:
    HTTP/1.0 with `keep-alive, close`; a response to HEAD, taken for one that runs to EOF)."""
    tokens = {t.strip(b" \t").lower() for v in connection for t in v.split(b",")}
    if b"close" in tokens:
        return False
    return version == b"HTTP/1.1" or b"keep-alive" in tokens


# Parser states.
_HEAD = 0
_LENGTH = 1  # Content-Length body
_CHUNK_LINE = 2
_CHUNK_DATA = 3
_CHUNK_CRLF = 4  # the CRLF after chunk data: fed to llhttp as one unit, which checks it
_TRAILER = 5
_UNTIL_EOF = 6  # response body delimited by the end of the stream
_CLOSED = 7  # a message said the connection closes: further bytes are discarded
_EOF = 8

_LLHTTP = httptools.HttpRequestParser | httptools.HttpResponseParser


class _Sink:
    """llhttp's callbacks (the httptools protocol): what it told about the message being
    parsed. It holds llhttp only while llhttp runs, so no reference cycle outlives a call."""

    __slots__ = (
        "completed",
        "fields",
        "headers_complete",
        "keep_alive",
        "llhttp",
        "method",
        "reason",
        "status_code",
        "url",
    )

    def __init__(self) -> None:
        self.llhttp: _LLHTTP | None = None
        self.url = b""
        self.reason = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.headers_complete = False
        self.keep_alive = True  # should_keep_alive(): llhttp forgets it once a message ends
        self.method = b""
        self.status_code = 0
        self.completed = 0  # messages llhttp completed

    def on_url(self, url: bytes) -> None:
        self.url += url  # llhttp hands a span over in pieces when the input was split

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops leading OWS only; few values end in OWS (a method call costs)
        if value and (value[-1] == 0x20 or value[-1] == 0x09):
            value = value.rstrip(b" \t")
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_complete = True
        llhttp = self.llhttp
        assert llhttp is not None
        self.keep_alive = llhttp.should_keep_alive()
        if isinstance(llhttp, httptools.HttpRequestParser):
            self.method = llhttp.get_method()
        else:
            self.status_code = llhttp.get_status_code()

    def on_message_complete(self) -> None:
        self.completed += 1

    def next_message(self) -> None:
        self.url = b""
        self.reason = b""
        self.fields = []
        self.headers_complete = False


# ---- the shared machinery -------------------------------------------------------------------


class _HTTP1Parser:
    _is_request = True

    def __init__(self, limits: HTTP1Limits | None = None) -> None:
        self._limits = limits if limits is not None else HTTP1Limits()
        self._events: deque[HTTP1Event] = deque()
        self._error: HTTP1Error | None = None
        self._state = _HEAD
        self._buf = b""  # partial head (or chunk-size / trailer line) not yet a whole
        self._fed = 0  # bytes of `_buf` llhttp has been fed
        self._remaining = 0  # bytes left in a Content-Length body or a chunk
        self._body_size = 0  # decoded body bytes so far (max_body)
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._pending: list[bytes] = []  # body bytes llhttp accepted, not yet in an event
        self._keep_alive = True
        self._discard = False
        self._head_event: HTTP1Event | None = None  # the head of the message being parsed
        self._sink = _Sink()
        self._ended = 0  # messages whose end our framing found
        self._llhttp: _LLHTTP | None = self._new_llhttp()

    # -- public ------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a head or a framing line."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; `b""` means the peer ended the stream."""
        if self._error is not None:
            raise self._error
        if self._state == _EOF:
            raise LocalProtocolError("receive_data after the end of the stream")
        try:
            if data:
                self._process(data)
            else:
                self._receive_eof()
        except HTTP1Error as exc:
            # Body bytes accepted before the error are facts too: report them, so the events
            # do not depend on how the bytes were split into receive_data calls.
            if self._pending and not self._discard:
                self._events.append(BodyReceived(b"".join(self._pending)))
            self._error = exc
            self._buf = b""
            self._pending = []

    def next_event(self) -> HTTP1Event | None:
        """The next event, None if more data is needed; raises the parser's error in order."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return None

    def events(self) -> Iterator[HTTP1Event]:
        """Every queued event, then the parser's error if one ends them."""
        queue = self._events
        while queue:
            yield queue.popleft()
        if self._error is not None:
            raise self._error

    # -- subclass hooks ----------------------------------------------------------------------

    def _new_llhttp(self) -> _LLHTTP:
        raise NotImplementedError

    def _on_head(self, head: bytes) -> None:
        raise NotImplementedError

    def _status(self, status: int) -> int:
        return status

    # -- llhttp ------------------------------------------------------------------------------

    def _feed(self, chunk: bytes, head: bytes = b"") -> None:
        """Give llhttp the next bytes of the stream; `head`: the head so far, for errors."""
        sink = self._sink
        sink.llhttp = self._llhttp
        try:
            assert sink.llhttp is not None
            sink.llhttp.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            raise HTTP1UpgradeRefusedError(
                "CONNECT or protocol upgrade refused: no rule can allow a tunnel",
                status=self._status(501),
            ) from None
        except httptools.HttpParserError as exc:
            raise self._llhttp_error(exc, head) from None
        finally:
            sink.llhttp = None

    def _llhttp_error(self, exc: httptools.HttpParserError, head: bytes) -> HTTP1Error:
        """llhttp's verdict as a typed error with the status a client should get."""
        reason = str(exc)
        state = self._state
        message = f"llhttp: {reason}"
        if state == _TRAILER:
            return HTTP1HeadError(f"{message} (trailer)", status=self._status(400))
        if state != _HEAD:
            return HTTP1FramingError(message, status=self._status(400))
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            # A token method llhttp does not know is not implemented; anything else is garbage.
            method, space, _ = head.partition(b" ")
            status = 501 if space and _is_token(method) else 400
            return HTTP1HeadError(message, status=self._status(status))
        if reason == "Invalid HTTP version" or reason.startswith("Pause on PRI"):
            return HTTP1HeadError(message, status=self._status(505))
        if reason.startswith("Pause on CONNECT"):  # a 101 answer
            return HTTP1UpgradeRefusedError(message, status=self._status(501))
        if reason.endswith("has invalid `Transfer-Encoding`"):
            # The final coding is not chunked: 501 for a token coding (RFC 9112 6.1).
            te = [v for n, v in self._sink.fields if n.lower() == b"transfer-encoding"]
            codings = [c.strip(b" \t") for v in te for c in v.split(b",")]
            status = 501 if codings and all(_is_token(c) for c in codings) else 400
            return HTTP1FramingError(message, status=self._status(status))
        if "Content-Length" in reason or "Transfer-Encoding" in reason:
            return HTTP1FramingError(message, status=self._status(400))
        return HTTP1HeadError(message, status=self._status(400))

    def _disagree(self) -> NoReturn:
        raise HTTP1FramingError(
            "llhttp disagrees on where the message ends", status=self._status(400)
        )

    # -- the byte loop -----------------------------------------------------------------------

    def _process(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                pos = self._read_head(data, pos)
            elif state in (_LENGTH, _CHUNK_DATA):
                size = min(self._remaining, end - pos)
                chunk = data if size == end else data[pos : pos + size]
                self._feed(chunk)
                self._pending.append(chunk)
                pos += size
                self._remaining -= size
                if not self._remaining:
                    if state == _LENGTH:
                        self._complete()
                    else:
                        self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                crlf = self._buf + data[pos : pos + 2 - len(self._buf)]
                pos += len(crlf) - len(self._buf)
                if len(crlf) < 2:
                    self._buf = crlf
                else:
                    self._buf = b""
                    self._feed(crlf)
                    self._pending.append(crlf)
                    self._state = _CHUNK_LINE
            elif state == _CHUNK_LINE:
                pos = self._read_chunk_line(data, pos)
            elif state == _TRAILER:
                pos = self._read_trailer_line(data, pos)
            elif state == _UNTIL_EOF:
                self._pending.append(data if pos == 0 else data[pos:])
                pos = end
            else:  # _CLOSED: the connection is done; nothing after it is parsed
                pos = end
        if self._pending:
            self._flush_body()

    def _receive_eof(self) -> None:
        state = self._state
        if state == _UNTIL_EOF:
            self._flush_body()
            self._events.append(_CLOSING)
        elif not (state == _CLOSED or (state == _HEAD and not self._buf)):
            raise HTTP1FramingError("end of stream inside a message", status=self._status(400))
        self._events.append(_CLOSED_EVENT)
        self._state = _EOF

    def _read_head(self, data: bytes, pos: int) -> int:
        limits = self._limits
        max_head = limits.max_header_block
        line_cap = limits.max_request_line + 2
        buf = self._buf
        if not buf:
            if self._is_request:
                while data.startswith(b"\r\n", pos):
                    pos += 2
                if pos == len(data):
                    return pos
                if len(data) - pos == 1 and data[pos] == 0x0D:
                    self._buf = b"\r"  # maybe the first half of an empty line: not fed yet
                    self._fed = 0
                    return pos + 1
            end = data.find(b"\r\n\r\n", pos, pos + max_head)
            if end >= 0:
                end += 4
                head = data if pos == 0 and end == len(data) else data[pos:end]
                if head.find(b"\r\n", 0, line_cap) < 0:
                    self._feed(head[:line_cap], head[:line_cap])
                    self._raise_line_too_long()
                self._feed(head, head)
                self._end_head(head)
                return end
            combined = data[pos : pos + max_head]
            taken = len(combined)
            fed = 0
        else:
            take = data[pos : pos + max_head - len(buf)]
            taken = len(take)
            combined = buf + take
            fed = self._fed
            if self._is_request and fed == 0 and combined.startswith(b"\r\n"):
                skipped = 0
                while combined.startswith(b"\r\n", skipped):
                    skipped += 2
                self._buf = b""
                return pos + skipped - len(buf)  # on to a fresh head after the empty lines
        # A partial head: feed llhttp what arrived, within the limits, so it refuses bad bytes
        # as soon as they come (a head with bare LFs would otherwise never end); but not a
        # method before its SP: whether it is a token decides between 400 and 501.
        if combined.find(b"\r\n", 0, line_cap) < 0:
            if fed == 0 and len(combined) < line_cap and combined.find(b" ") < 0:
                self._buf = combined
                return pos + taken
            if len(combined) > fed:
                self._feed(combined[fed:line_cap], combined[:line_cap])
            if len(combined) >= line_cap:
                self._raise_line_too_long()
            self._buf = combined
            self._fed = len(combined)
            return pos + taken
        end = combined.find(b"\r\n\r\n", max(0, fed - 3))
        if end >= 0:
            end += 4
            head = combined[:end]
            self._feed(head[fed:], head)
            self._buf = b""
            self._fed = 0
            self._end_head(head)
            return pos + end - len(buf)
        self._feed(combined[fed:], combined)
        if self._sink.headers_complete:
            self._disagree()
        if len(combined) >= max_head:
            raise HTTP1LimitError(f"head larger than {max_head} bytes", status=self._status(431))
        self._buf = combined
        self._fed = len(combined)
        return pos + taken

    def _end_head(self, head: bytes) -> None:
        if not self._sink.headers_complete:
            if head.startswith(b"PRI * HTTP/2.0\r\n"):  # check h2_preface: llhttp just pauses
                raise HTTP1HeadError("HTTP/2 connection preface", status=self._status(505))
            self._disagree()
        if len(self._sink.fields) > self._limits.max_headers:
            raise HTTP1LimitError(
                f"more than {self._limits.max_headers} header fields", status=self._status(431)
            )
        self._on_head(head)

    def _raise_line_too_long(self) -> NoReturn:
        raise HTTP1LimitError(
            f"start line longer than {self._limits.max_request_line} bytes",
            status=self._status(414),
        )

    def _read_line(self, data: bytes, pos: int, limit: int) -> tuple[bytes | None, int]:
        """A CRLF-terminated line of at most `limit` bytes (CRLF included), fed to llhttp as
        it arrives, or None for now; `b""` when `limit` bytes came without a CRLF."""
        buf = self._buf
        if not buf:
            found = data.find(b"\r\n", pos, pos + limit)
            if found >= 0:
                line = data[pos : found + 2]
                self._feed(line)
                return line, found + 2
            rest = data[pos : pos + limit]
            self._feed(rest)
            if len(rest) >= limit:
                return b"", pos + len(rest)
            self._buf = rest
            return None, pos + len(rest)
        take = data[pos : pos + limit - len(buf)]
        found = (buf[-1:] + take).find(b"\r\n")
        if found >= 0:
            take = take[: found + 1]
            self._feed(take)
            self._buf = b""
            return buf + take, pos + len(take)
        self._feed(take)
        combined = buf + take
        if len(combined) >= limit:
            return b"", pos + len(take)
        self._buf = combined
        return None, pos + len(take)

    def _read_chunk_line(self, data: bytes, pos: int) -> int:
        line, pos = self._read_line(data, pos, self._limits.max_chunk_line)
        if line is None:
            return pos
        status = self._status(400)
        if not line:
            raise HTTP1FramingError(
                f"chunk-size line longer than {self._limits.max_chunk_line} bytes", status=status
            )
        size_hex = line[:-2].partition(b";")[0]  # llhttp has checked HEXDIG+ [ext]
        if len(size_hex) > 16:  # check chunk_size_digits
            raise HTTP1FramingError("chunk-size of more than 16 hex digits", status=status)
        size = int(size_hex, 16)
        if size > _MAX_CHUNK_SIZE:
            raise HTTP1FramingError("chunk size out of range", status=status)
        if b"=;" in line or line.endswith(b"=\r\n"):  # check chunk_ext_value
            raise HTTP1FramingError("chunk extension without a value", status=status)
        self._body_size += size
        max_body = self._limits.max_body
        if max_body is not None and self._body_size > max_body:
            raise HTTP1LimitError(f"body larger than {max_body} bytes", status=self._status(413))
        self._pending.append(line)
        if size:
            self._remaining = size
            self._state = _CHUNK_DATA
        else:
            self._trailer_bytes = 0
            self._trailer_fields = 0
            self._state = _TRAILER
        return pos

    def _read_trailer_line(self, data: bytes, pos: int) -> int:
        limits = self._limits
        line, pos = self._read_line(data, pos, limits.max_header_block - self._trailer_bytes)
        if line is None:
            return pos
        if not line:
            raise HTTP1LimitError(
                f"trailer section larger than {limits.max_header_block} bytes",
                status=self._status(431),
            )
        self._pending.append(line)
        if line == b"\r\n":
            self._complete()
            return pos
        self._trailer_bytes += len(line)
        self._trailer_fields += 1
        if self._trailer_fields > limits.max_headers:
            raise HTTP1LimitError(
                f"more than {limits.max_headers} trailer fields", status=self._status(431)
            )
        return pos

    def _flush_body(self) -> None:
        pending = self._pending
        if not pending:
            return
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        if not self._discard:
            self._events.append(BodyReceived(chunk))

    def _start_body(self, content_length: int | None, chunked: bool) -> None:
        """After a head llhttp accepted: pick the body state, or complete at once."""
        self._discard = False
        if chunked:
            self._body_size = 0
            self._state = _CHUNK_LINE
        elif content_length:
            self._remaining = content_length
            self._state = _LENGTH
        else:
            self._complete()
            return
        if self._sink.completed != self._ended:
            self._disagree()  # llhttp took the message for bodyless

    def _complete(self) -> None:
        """Our framing says the message ends here: llhttp must have said so too."""
        if self._pending:
            self._flush_body()
        self._ended += 1
        if self._sink.completed != self._ended:
            self._disagree()
        self._events.append(_KEEPING if self._keep_alive else _CLOSING)
        self._discard = False
        self._head_event = None  # an idle connection's parser holds no message
        self._state = _HEAD if self._keep_alive else _CLOSED
        self._sink.next_message()


# ---- requests -------------------------------------------------------------------------------


class HTTP1RequestParser(_HTTP1Parser):
    """Client → proxy. Emits RequestReceived, BodyReceived*, MessageCompleted per request,
    ConnectionClosed at the end of the stream.
    """

    _is_request = True

    def __init__(self, limits: HTTP1Limits | None = None) -> None:
        super().__init__(limits)
        # The last Host and origin-form target, validated / normalized, with their text: a
        # keep-alive client sends the same again and again (memos of pure functions).
        self._last_host: bytes | None = None
        self._last_host_text = ""
        self._last_target: bytes | None = None
        self._last_target_text = ""
        self._last_path = ""

    def _new_llhttp(self) -> _LLHTTP:
        return httptools.HttpRequestParser(self._sink)

    def discard_body(self) -> None:
        """Stop reporting the body of the request whose RequestReceived came last.

        For a denied request: the body is still parsed and validated (the next pipelined
        request starts after it), but no BodyReceived events are queued for it, already
        queued ones included. MessageCompleted still marks its end.
        """
        events = self._events
        while events and isinstance(events[0], BodyReceived):
            events.popleft()
        in_body = self._state not in (_HEAD, _CLOSED, _EOF)
        if in_body and not any(event is self._head_event for event in events):
            self._discard = True  # the message being parsed is the one whose head was taken

    def _on_head(self, head: bytes) -> None:
        method = self._sink.method
        target = self._sink.url
        line_end = head.find(b"\r\n")
        # check request_line_exact: `method SP target SP HTTP/x.y`, nothing around them
        if len(method) + len(target) + 10 != line_end or not head.startswith(method + b" "):
            raise HTTP1HeadError(
                "request line is not `method SP target SP HTTP-version`", status=400
            )
        version = head[line_end - 8 : line_end]
        if version not in _SUPPORTED_VERSIONS:  # check version_1x
            raise HTTP1HeadError(
                f"unsupported version {version!r}",
                status=505 if version.startswith(b"HTTP/") else 400,
            )
        fields = self._sink.fields
        host_value: bytes | None = None
        te_values: list[bytes] = []
        cl_value: bytes | None = None
        connection: list[bytes] = []
        for name, value in fields:
            if len(name) not in _REQUEST_FIELD_LENGTHS:
                continue
            lname = name.lower()
            if lname not in _REQUEST_FIELDS:
                continue
            if lname == b"connection":
                connection.append(value)
            elif lname == b"host":
                if host_value is not None:  # check host_exactly_one
                    raise HTTP1HeadError("several Host fields", status=400)
                host_value = value
            elif lname == b"content-length":
                cl_value = value  # llhttp refuses a second one
            elif lname == b"transfer-encoding":
                te_values.append(value)
            else:  # check upgrade_field
                raise HTTP1UpgradeRefusedError("protocol upgrade refused", status=501)

        content_length: int | None = None
        chunked = False
        if te_values:  # llhttp refuses it together with Content-Length
            if version != b"HTTP/1.1":  # check transfer_encoding_http10
                raise HTTP1FramingError("Transfer-Encoding in an HTTP/1.0 message", status=400)
            _check_transfer_coding(te_values, 400)  # check transfer_coding_chunked
            chunked = True
        elif cl_value is not None:
            content_length = _content_length(cl_value, self._limits, 400)

        host: str | None = None
        if host_value is not None:
            if host_value == self._last_host:
                host = self._last_host_text
            else:
                host = host_value.decode("latin-1")
                if not valid_authority(host):  # check host_exactly_one
                    raise HTTP1HeadError(f"invalid Host {host[:60]!r}", status=400)
                self._last_host, self._last_host_text = host_value, host
        elif version == b"HTTP/1.1":
            raise HTTP1HeadError("HTTP/1.1 request without Host", status=400)
        try:
            if target[0] == 0x2F:  # "/": origin-form, by far the most common
                if target != self._last_target:
                    self._last_path = normalize_path(target)
                    self._last_target_text = target.decode("ascii")
                    self._last_target = target
                path = self._last_path
                target_text = self._last_target_text
            else:
                normalized = normalize_target(target, allow_asterisk=method == b"OPTIONS")
                target_text = target.decode("ascii")  # normalize_target allows only ASCII
                path = normalized.path
                if normalized.authority is not None:
                    # check absolute_form_authority
                    if host is not None and host.lower() != normalized.authority.lower():
                        raise HTTP1TargetError(
                            "absolute-form authority differs from the Host field", status=400
                        )
                    host = normalized.authority
        except UnsafeTargetError as exc:
            raise HTTP1TargetError(exc.message, status=400) from exc

        keep_alive = self._sink.keep_alive
        if keep_alive and connection:  # check connection_close
            keep_alive = _keep_alive(version, connection)
        self._keep_alive = keep_alive
        self._head_event = event = RequestReceived(
            method.decode("ascii"),
            target_text,
            path,
            version,
            tuple(fields),
            host,
            keep_alive,
            chunked,
            content_length,
            head,
        )
        self._events.append(event)
        self._start_body(content_length, chunked)


# ---- responses ------------------------------------------------------------------------------


class HTTP1ResponseParser(_HTTP1Parser):
    """Upstream → proxy. Tell it, in order, the method of every request forwarded on the
    connection (`expect_response`): responses to HEAD, and 1xx/204/304, have no body whatever
    their headers say (RFC 9112 §6.3). Every error carries status 502.
    """

    _is_request = False

    def __init__(self, limits: HTTP1Limits | None = None) -> None:
        super().__init__(limits)
        self._methods: deque[str] = deque()

    def expect_response(self, method: str) -> None:
        """A request with this method was forwarded; its response comes after earlier ones."""
        self._methods.append(method)

    def _new_llhttp(self) -> _LLHTTP:
        return httptools.HttpResponseParser(self._sink)

    def _status(self, status: int) -> int:
        return 502

    def _on_head(self, head: bytes) -> None:
        version = head[:8]
        if version not in _SUPPORTED_VERSIONS:  # check version_1x
            raise HTTP1HeadError(f"unsupported version {version!r}", status=502)
        status = self._sink.status_code
        if status < 100:  # check status_100_plus
            raise HTTP1HeadError(f"invalid status {status}", status=502)
        informational = status < 200  # 101 never gets here: llhttp raises an upgrade
        method: str | None = None
        if not informational:
            if not self._methods:  # check response_expected
                raise HTTP1HeadError("response without a request", status=502)
            method = self._methods.popleft()

        fields = self._sink.fields
        te_values: list[bytes] = []
        cl_value: bytes | None = None
        connection: list[bytes] = []
        for name, value in fields:
            if len(name) not in _RESPONSE_FIELD_LENGTHS:
                continue
            lname = name.lower()
            if lname == b"content-length":
                cl_value = value
            elif lname == b"transfer-encoding":
                te_values.append(value)
            elif lname == b"connection":
                connection.append(value)

        head_answer = method == "HEAD"
        bodyless = informational or status == 204 or status == 304 or head_answer
        content_length: int | None = None
        chunked = False
        if not bodyless:
            if te_values:
                if version != b"HTTP/1.1":  # check transfer_encoding_http10
                    raise HTTP1FramingError("Transfer-Encoding in an HTTP/1.0 message", status=502)
                _check_transfer_coding(te_values, 502)  # check transfer_coding_chunked
                chunked = True
            elif cl_value is not None:
                content_length = _content_length(cl_value, self._limits, 502)
        until_eof = not bodyless and content_length is None and not chunked
        if head_answer and not informational:
            keep_alive = _keep_alive(version, connection)
            if self._sink.completed == self._ended:
                # llhttp cannot be told the request was HEAD: it waits for a body. Start afresh.
                self._llhttp = self._new_llhttp()
                self._sink.completed += 1
        else:
            keep_alive = self._sink.keep_alive
        self._keep_alive = keep_alive
        self._head_event = event = ResponseReceived(
            status=status,
            reason=self._sink.reason,
            version=version,
            headers=tuple(fields),
            raw_head=head,
            keep_alive=keep_alive,
            chunked=chunked,
            content_length=content_length,
        )
        self._events.append(event)
        if until_eof:
            self._llhttp = None  # llhttp cannot be told about the end of the stream
            self._discard = False
            self._state = _UNTIL_EOF
            return
        self._start_body(content_length, chunked)
