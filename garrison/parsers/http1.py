"""HTTP/1.1 sans-io parsers for the L7 proxy: client requests and upstream responses.

Bytes in (`receive_data`, `b""` = end of stream), typed events out (`next_event` / `events`).
llhttp (through httptools) checks the grammar and, fed the very same bytes, must agree with
our framing on where every message ends; the glue here finds message boundaries itself, because
a proxy must forward exactly the bytes it validated and must not lose the next pipelined
request, and rejects what llhttp tolerates or what makes the message length ambiguous.

What the parser refuses, and the status the engine answers with (`HTTP1Error.status`; every
error from `HTTP1ResponseParser` carries 502, the answer the proxy gives its own client when
upstream misbehaves):

- HTTP1HeadError 400: NUL or another control byte (not HTAB) in the head, bare CR, bare LF;
  a request line that is not `method SP target SP HTTP/x.y` (one space each); a method that
  is not a token; obs-fold, whitespace before the colon, an empty or non-token field name;
  HTTP/1.1 without Host, several Host fields, an invalid Host.
- HTTP1HeadError 501: a token method llhttp does not know (`FOO`, `get`).
  HTTP1HeadError 505: `HTTP/d.d` other than 1.0 and 1.1.
- HTTP1TargetError 400: a target `pathnorm` refuses; absolute-form authority != Host.
- HTTP1FramingError 400: Content-Length and Transfer-Encoding together; more than one
  Content-Length (even equal ones); Content-Length not 1*DIGIT (`+5`, `5, 6`) or over 18
  digits; `chunked` twice or not last (`chunked, gzip`), an empty or non-token coding;
  Transfer-Encoding in an HTTP/1.0 message; a chunk-size that is not 1-16 hex digits or has
  whitespace around it, a malformed chunk extension, a chunk-size line over `max_chunk_line`,
  chunk data not followed by CRLF, a malformed trailer field; the end of the stream inside a
  message.
- HTTP1FramingError 501: any other Transfer-Encoding than exactly `chunked` (`gzip, chunked`,
  `xchunked`, `identity`): a coding the proxy does not implement.
- HTTP1LimitError 414: request line over `max_request_line`. 431: head over
  `max_header_block` bytes, more than `max_headers` fields (trailers alike). 413: body over
  `max_body` (Content-Length at once; chunked as soon as a chunk-size would pass it).
- HTTP1UpgradeRefusedError 501: CONNECT, or any `Upgrade` field (websocket, h2c): no rule can
  allow a tunnel yet, so it is refused before anything is forwarded. A 101 response: 502.

Pinned behaviour:
- Chunk extensions are accepted when well formed (`;name`, `;name=token`, `;name="quoted"`)
  and the chunk-size line fits `max_chunk_line`; they are forwarded untouched.
- Empty lines (CRLF) before a request line are skipped and not forwarded (RFC 9112 §2.2).
- Keep-alive: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `Connection:
  keep-alive` (and no `close`); responses without a length are read until the end of the
  stream and never keep-alive. Computed from the head rather than read from llhttp's
  `should_keep_alive()`, which cannot know that a response answers a HEAD request. After a
  message that closes the connection every further byte is discarded, never parsed, so
  nothing after it can be forwarded.
- `headers` are the field lines as sent: names with their case, values without the
  surrounding whitespace (OWS). Trailers of a chunked body are validated and forwarded as part
  of the body bytes; they are not reported as headers (rules never match them).
- Errors are raised by `next_event()` / `events()` after the events that precede them on the
  wire, so a valid request pipelined before a bad one is still served. After an error the parser
  is dead: `receive_data` raises the same error. Body bytes of the failing message that the
  framing accepted before the error are reported first (they are not forwarded anywhere by
  the parser; an engine that streams bodies closes the upstream side on the error).
- Memory: a partial head is buffered only up to `max_header_block`, a partial chunk-size or
  trailer line up to its limit; body bytes become `BodyReceived` events in the call that
  delivered them (`buffered` tells how much is held).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
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


# ---- grammar --------------------------------------------------------------------------------

_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# Bytes a field value may hold: VCHAR, SP, obs-text, HTAB; a head also CR/LF (whose pairing
# is checked apart).
_VALUE_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t"
_HEAD_BYTES = _VALUE_BYTES + b"\r\n"
_FIELD_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[^\r\n]*\r\n)*")
# One match per valid field line, anchored at line starts: a line that does not match is
# skipped, so fewer matches than lines means a malformed line. The value group leaves out the
# whitespace around the value (OWS).
_FIELD = re.compile(rb"^(" + _TOKEN + rb"):[ \t]*((?:[^\r\n]*[^\r\n \t])?)[ \t]*\r\n", re.MULTILINE)
# The one shape of a valid request head, checked in one pass: request line, field lines of
# visible characters, SP, HTAB and obs-text (so no NUL, no bare CR or LF, no obs-fold).
# Anything else goes to `_refuse_head`, which says what is wrong.
_REQUEST_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) (HTTP/1\.[01])\r\n"
    rb"((?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
)
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: ([^\r\n]*))?")
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*)\r\n"
)
_SUPPORTED_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# Request fields the head's meaning depends on (lower-case).
_REQUEST_FIELDS = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"}
)
_MAX_CONTENT_LENGTH_DIGITS = 18

# Parser states.
_HEAD = 0
_LENGTH = 1  # Content-Length body
_CHUNK_LINE_STATE = 2
_CHUNK_DATA = 3
_CHUNK_CRLF = 4
_TRAILER = 5
_UNTIL_EOF = 6  # response body delimited by the end of the stream
_CLOSED = 7  # a message said the connection closes: further bytes are discarded
_EOF = 8


_LLHTTP = httptools.HttpRequestParser | httptools.HttpResponseParser


class _Witness:
    """llhttp's callbacks: only message completion matters, to compare framings."""

    __slots__ = ("completed",)

    def __init__(self) -> None:
        self.completed = 0

    def on_message_complete(self) -> None:
        self.completed += 1


# ---- the shared machinery -------------------------------------------------------------------


class _HTTP1Parser:
    _is_request = True

    def __init__(self, limits: HTTP1Limits | None = None) -> None:
        self._limits = limits if limits is not None else HTTP1Limits()
        self._events: deque[HTTP1Event] = deque()
        self._error: HTTP1Error | None = None
        self._state = _HEAD
        self._buf = b""  # partial head, chunk-size line, trailer line or chunk CRLF
        self._remaining = 0  # bytes left in a Content-Length body or a chunk
        self._body_size = 0  # decoded body bytes so far (max_body)
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._pending: list[bytes] = []  # validated body bytes not yet in an event
        self._keep_alive = True
        self._discard = False
        self._head_event: HTTP1Event | None = None  # the head of the message being parsed
        self._witness = _Witness()
        self._llhttp: _LLHTTP | None = self._new_llhttp()
        self._llhttp_completed = 0  # messages llhttp was fed in full

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
            # Body bytes our framing accepted before the error are facts too: report them, so
            # the events do not depend on how the bytes were split into receive_data calls.
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
                self._pending.append(data if size == end else data[pos : pos + size])
                pos += size
                self._remaining -= size
                if not self._remaining:
                    if state == _LENGTH:
                        self._complete()
                    else:
                        self._state = _CHUNK_CRLF
            elif state == _CHUNK_LINE_STATE:
                pos = self._read_chunk_line(data, pos)
            elif state == _CHUNK_CRLF:
                line, pos = self._read_line(data, pos, 2, self._chunk_crlf_missing)
                if line is not None:
                    self._pending.append(line)
                    self._state = _CHUNK_LINE_STATE
            elif state == _TRAILER:
                pos = self._read_trailer_line(data, pos)
            elif state == _UNTIL_EOF:
                self._pending.append(data if pos == 0 else data[pos:])
                pos = end
            else:  # _CLOSED: the connection is done; nothing after it is parsed
                pos = end
        if self._pending:
            self._flush_body(final=False)

    def _receive_eof(self) -> None:
        state = self._state
        if state == _UNTIL_EOF:
            self._flush_body(final=False)
            self._events.append(_CLOSING)
        elif not (state == _CLOSED or (state == _HEAD and not self._buf)):
            raise HTTP1FramingError("end of stream inside a message", status=self._status(400))
        self._events.append(_CLOSED_EVENT)
        self._state = _EOF

    def _read_head(self, data: bytes, pos: int) -> int:
        max_head = self._limits.max_header_block
        buf = self._buf
        if not buf:
            if self._is_request:
                while data.startswith(b"\r\n", pos):
                    pos += 2
                if pos == len(data):
                    return pos
            found = data.find(b"\r\n\r\n", pos, pos + max_head)
            if found >= 0:
                end = found + 4
                self._on_head(data if pos == 0 and end == len(data) else data[pos:end])
                return end
            rest = data[pos : pos + max_head]
            self._check_partial_head(rest)
            self._buf = rest
            return pos + len(rest)
        take = data[pos : pos + max_head - len(buf)]
        combined = buf + take
        start = max(0, len(buf) - 3)
        skipped = 0
        if self._is_request:
            while combined.startswith(b"\r\n", skipped):
                skipped += 2
            if skipped:
                combined = combined[skipped:]
                start = 0
        found = combined.find(b"\r\n\r\n", start)
        if found >= 0:
            self._buf = b""
            self._on_head(combined[: found + 4])
            return pos + skipped + found + 4 - len(buf)
        self._check_partial_head(combined)
        self._buf = combined
        return pos + len(take)

    def _check_partial_head(self, partial: bytes) -> None:
        # Refuse bad bytes as soon as they arrive: a head with bare LFs would otherwise never
        # end, and the client would wait for an answer until a timeout.
        self._check_head_bytes(partial[:-1] if partial.endswith(b"\r") else partial)
        limits = self._limits
        line_limit = limits.max_request_line + 2
        if len(partial) >= line_limit and partial.find(b"\r\n", 0, line_limit) < 0:
            self._raise_line_too_long()
        if len(partial) >= limits.max_header_block:
            raise HTTP1LimitError(
                f"head larger than {limits.max_header_block} bytes", status=self._status(431)
            )

    def _raise_line_too_long(self) -> NoReturn:
        raise HTTP1LimitError(
            f"start line longer than {self._limits.max_request_line} bytes",
            status=self._status(414),
        )

    def _read_line(
        self, data: bytes, pos: int, limit: int, too_long: Callable[[], HTTP1Error]
    ) -> tuple[bytes | None, int]:
        """A CRLF-terminated line of at most `limit` bytes (CRLF included), or None for now."""
        buf = self._buf
        if not buf:
            found = data.find(b"\r\n", pos, pos + limit)
            if found >= 0:
                return data[pos : found + 2], found + 2
            rest = data[pos : pos + limit]
            if len(rest) >= limit:
                raise too_long()
            self._buf = rest
            return None, pos + len(rest)
        take = data[pos : pos + limit - len(buf)]
        combined = buf + take
        found = combined.find(b"\r\n", max(0, len(buf) - 1))
        if found >= 0:
            self._buf = b""
            return combined[: found + 2], pos + found + 2 - len(buf)
        if len(combined) >= limit:
            raise too_long()
        self._buf = combined
        return None, pos + len(take)

    def _chunk_crlf_missing(self) -> HTTP1Error:
        return HTTP1FramingError("chunk data not followed by CRLF", status=self._status(400))

    def _chunk_line_too_long(self) -> HTTP1Error:
        return HTTP1FramingError(
            f"chunk-size line longer than {self._limits.max_chunk_line} bytes",
            status=self._status(400),
        )

    def _trailers_too_large(self) -> HTTP1Error:
        return HTTP1LimitError(
            f"trailer section larger than {self._limits.max_header_block} bytes",
            status=self._status(431),
        )

    def _read_chunk_line(self, data: bytes, pos: int) -> int:
        line, pos = self._read_line(
            data, pos, self._limits.max_chunk_line, self._chunk_line_too_long
        )
        if line is None:
            return pos
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise HTTP1FramingError(
                f"invalid chunk-size line {line[:40]!r}", status=self._status(400)
            )
        size = int(match.group(1), 16)
        if size > 0x7FFF_FFFF_FFFF_FFFF:
            raise HTTP1FramingError("chunk size out of range", status=self._status(400))
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
        budget = self._limits.max_header_block - self._trailer_bytes
        line, pos = self._read_line(data, pos, budget, self._trailers_too_large)
        if line is None:
            return pos
        self._pending.append(line)
        if line == b"\r\n":
            self._complete()
            return pos
        self._trailer_bytes += len(line)
        self._trailer_fields += 1
        if self._trailer_fields > self._limits.max_headers:
            raise HTTP1LimitError(
                f"more than {self._limits.max_headers} trailer fields", status=self._status(431)
            )
        self._check_head_bytes(line)
        if _FIELD_BLOCK.fullmatch(line) is None:
            self._raise_field_error(line[:-2])
        return pos

    def _flush_body(self, *, final: bool) -> None:
        pending = self._pending
        if pending:
            chunk = pending[0] if len(pending) == 1 else b"".join(pending)
            self._pending = []
            if self._llhttp is not None:
                self._feed_llhttp(chunk)
            if not self._discard:
                self._events.append(BodyReceived(chunk))
        if self._llhttp is not None:
            expected = self._llhttp_completed + (1 if final else 0)
            if self._witness.completed != expected:
                raise HTTP1FramingError(
                    "llhttp disagrees on where the message ends", status=self._status(400)
                )

    def _feed_llhttp(self, chunk: bytes) -> None:
        assert self._llhttp is not None
        try:
            self._llhttp.feed_data(chunk)
        except httptools.HttpParserUpgrade as exc:
            raise HTTP1UpgradeRefusedError(
                "protocol upgrade refused", status=self._status(501)
            ) from exc
        except httptools.HttpParserInvalidMethodError as exc:
            raise HTTP1HeadError(f"unknown method: {exc}", status=self._status(501)) from exc
        except httptools.HttpParserError as exc:
            raise HTTP1HeadError(f"llhttp: {exc}", status=self._status(400)) from exc

    def _start_body(self, content_length: int | None, chunked: bool) -> None:
        """After a head (already fed to llhttp): pick the body state, or complete at once."""
        self._discard = False
        if not chunked and not content_length:
            # Bodyless, the common case: what _complete() does, without a body to flush.
            if self._witness.completed != self._llhttp_completed + 1:
                raise HTTP1FramingError(
                    "llhttp disagrees on where the message ends", status=self._status(400)
                )
            self._llhttp_completed += 1
            if self._keep_alive:
                self._events.append(_KEEPING)
            else:
                self._events.append(_CLOSING)
                self._state = _CLOSED
            return
        if chunked:
            self._body_size = 0
            self._state = _CHUNK_LINE_STATE
        else:
            self._remaining = content_length or 0
            self._state = _LENGTH
        self._flush_body(final=False)  # llhttp must still be waiting for the body

    def _complete(self) -> None:
        self._flush_body(final=True)
        self._llhttp_completed += 1
        self._events.append(_KEEPING if self._keep_alive else _CLOSING)
        self._discard = False
        self._state = _HEAD if self._keep_alive else _CLOSED

    # -- head validation shared by requests and responses -----------------------------------

    def _check_head_bytes(self, head: bytes) -> None:
        bad = head.translate(None, _HEAD_BYTES)
        if bad:
            what = "NUL byte" if bad[0] == 0 else f"control byte 0x{bad[0]:02x}"
            raise HTTP1HeadError(f"{what} in head", status=self._status(400))
        crlf = head.count(b"\r\n")
        if head.count(b"\r") != crlf:
            raise HTTP1HeadError("bare CR in head", status=self._status(400))
        if head.count(b"\n") != crlf:
            raise HTTP1HeadError("bare LF in head", status=self._status(400))

    def _split_head(self, head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """(start line, field lines) of a head that passed `_check_head_bytes`."""
        line_end = head.index(b"\r\n")
        if line_end > self._limits.max_request_line:
            self._raise_line_too_long()
        block = head[line_end + 2 : -2]
        if not block:
            return head[:line_end], []
        lines = block.count(b"\r\n")
        if lines > self._limits.max_headers:
            raise HTTP1LimitError(
                f"more than {self._limits.max_headers} header fields", status=self._status(431)
            )
        fields: list[tuple[bytes, bytes]] = _FIELD.findall(block)
        if len(fields) != lines:
            for line in block.split(b"\r\n"):
                if _FIELD_BLOCK.fullmatch(line + b"\r\n") is None:
                    self._raise_field_error(line)
        return head[:line_end], fields

    def _raise_field_error(self, line: bytes) -> NoReturn:
        if line[:1] in (b" ", b"\t"):
            reason = "obsolete line folding (obs-fold)"
        elif b":" not in line:
            reason = "field line without a colon"
        else:
            name = line.split(b":", 1)[0]
            if not name:
                reason = "empty field name"
            elif name.rstrip(b" \t") != name:
                reason = "whitespace between field name and colon"
            else:
                reason = f"invalid field name {name[:40]!r}"
        raise HTTP1HeadError(reason, status=self._status(400))

    def _framing(
        self, version: bytes, te_values: list[bytes], cl_values: list[bytes]
    ) -> tuple[int | None, bool]:
        """(content_length, chunked) from the framing fields, refusing every ambiguity."""
        if te_values:
            if cl_values:
                raise HTTP1FramingError(
                    "both Content-Length and Transfer-Encoding", status=self._status(400)
                )
            if version != b"HTTP/1.1":
                raise HTTP1FramingError(
                    "Transfer-Encoding in an HTTP/1.0 message", status=self._status(400)
                )
            codings = [c.strip(b" \t").lower() for v in te_values for c in v.split(b",")]
            if codings != [b"chunked"]:
                if any(not c or c.translate(None, _TCHAR) for c in codings):
                    raise HTTP1FramingError(
                        "invalid Transfer-Encoding value", status=self._status(400)
                    )
                if codings.count(b"chunked") > 1 or codings[:-1].count(b"chunked"):
                    # The length cannot be determined: a framing error, not a missing feature.
                    raise HTTP1FramingError(
                        "chunked must be the final transfer-coding, once",
                        status=self._status(400),
                    )
                raise HTTP1FramingError(
                    f"unsupported transfer-coding {b', '.join(codings)!r}",
                    status=self._status(501),
                )
            return None, True
        if not cl_values:
            return None, False
        if len(cl_values) > 1:
            raise HTTP1FramingError("several Content-Length fields", status=self._status(400))
        value = cl_values[0]
        if not value.isdigit():
            raise HTTP1FramingError(
                f"invalid Content-Length {value[:40]!r}", status=self._status(400)
            )
        if len(value) > _MAX_CONTENT_LENGTH_DIGITS:
            raise HTTP1FramingError("Content-Length out of range", status=self._status(400))
        length = int(value)
        max_body = self._limits.max_body
        if max_body is not None and length > max_body:
            raise HTTP1LimitError(f"body larger than {max_body} bytes", status=self._status(413))
        return length, False


def _keep_alive(version: bytes, connection: list[bytes]) -> bool:
    tokens = {t.strip(b" \t").lower() for v in connection for t in v.split(b",")}
    if b"close" in tokens:
        return False
    return version == b"HTTP/1.1" or b"keep-alive" in tokens


# ---- requests -------------------------------------------------------------------------------


class HTTP1RequestParser(_HTTP1Parser):
    """Client → proxy. Emits RequestReceived, BodyReceived*, MessageCompleted per request,
    ConnectionClosed at the end of the stream.
    """

    _is_request = True

    def _new_llhttp(self) -> _LLHTTP:
        return httptools.HttpRequestParser(self._witness)

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
        match = _REQUEST_HEAD.fullmatch(head)
        if match is None:
            self._refuse_head(head)
        method, target, version, block = match.groups()
        limits = self._limits
        if match.end(3) > limits.max_request_line:
            self._raise_line_too_long()
        fields: list[tuple[bytes, bytes]] = _FIELD.findall(block) if block else []
        if len(fields) > limits.max_headers:
            raise HTTP1LimitError(f"more than {limits.max_headers} header fields", status=431)

        host_value: bytes | None = None
        te_values: list[bytes] = []
        cl_values: list[bytes] = []
        connection: list[bytes] = []
        for name, value in fields:
            lname = name.lower()
            if lname not in _REQUEST_FIELDS:
                continue
            if lname == b"host":
                if host_value is not None:
                    raise HTTP1HeadError("several Host fields", status=400)
                host_value = value
            elif lname == b"content-length":
                cl_values.append(value)
            elif lname == b"transfer-encoding":
                te_values.append(value)
            elif lname == b"connection":
                connection.append(value)
            else:  # upgrade
                raise HTTP1UpgradeRefusedError("protocol upgrade refused", status=501)
        if method == b"CONNECT":
            raise HTTP1UpgradeRefusedError("CONNECT is not supported", status=501)

        if te_values or cl_values:
            content_length, chunked = self._framing(version, te_values, cl_values)
        else:
            content_length, chunked = None, False

        host: str | None = None
        if host_value is not None:
            host = host_value.decode("latin-1")
            if not valid_authority(host):
                raise HTTP1HeadError(f"invalid Host {host[:60]!r}", status=400)
        elif version == b"HTTP/1.1":
            raise HTTP1HeadError("HTTP/1.1 request without Host", status=400)
        try:
            if target[0] == 0x2F:  # "/": origin-form, by far the most common
                path = normalize_path(target)
            else:
                normalized = normalize_target(target, allow_asterisk=method == b"OPTIONS")
                path = normalized.path
                if normalized.authority is not None:
                    if host is not None and host.lower() != normalized.authority.lower():
                        raise HTTP1TargetError(
                            "absolute-form authority differs from the Host field", status=400
                        )
                    host = normalized.authority
        except UnsafeTargetError as exc:
            raise HTTP1TargetError(exc.message, status=400) from exc

        keep_alive = _keep_alive(version, connection) if connection else version == b"HTTP/1.1"
        self._keep_alive = keep_alive
        self._feed_llhttp(head)
        self._head_event = event = RequestReceived(
            method.decode("ascii"),
            target.decode("ascii"),
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

    def _refuse_head(self, head: bytes) -> NoReturn:
        """The head is not in the one shape a valid request head has: say precisely why."""
        self._check_head_bytes(head)
        request_line, _ = self._split_head(head)
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise HTTP1HeadError("request line is not `method SP target SP version`", status=400)
        method, _target, version = parts
        if method.translate(None, _TCHAR):
            raise HTTP1HeadError(f"invalid method {method[:40]!r}", status=400)
        if version in _SUPPORTED_VERSIONS:
            raise HTTP1HeadError("malformed request head", status=400)
        if _VERSION.fullmatch(version):
            raise HTTP1HeadError(f"unsupported version {version!r}", status=505)
        raise HTTP1HeadError(f"invalid version {version[:40]!r}", status=400)


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
        self._current_method: str | None = None

    def expect_response(self, method: str) -> None:
        """A request with this method was forwarded; its response comes after earlier ones."""
        self._methods.append(method)

    def _new_llhttp(self) -> _LLHTTP:
        return httptools.HttpResponseParser(self._witness)

    def _status(self, status: int) -> int:
        return 502

    def _on_head(self, head: bytes) -> None:
        self._check_head_bytes(head)
        status_line, fields = self._split_head(head)
        match = _STATUS_LINE.fullmatch(status_line)
        if match is None:
            raise HTTP1HeadError(f"invalid status line {status_line[:60]!r}", status=502)
        version, status_bytes, reason = match.groups()
        if version not in _SUPPORTED_VERSIONS:
            raise HTTP1HeadError(f"unsupported version {version!r}", status=502)
        status = int(status_bytes)
        if status < 100:
            raise HTTP1HeadError(f"invalid status {status}", status=502)
        if status == 101:
            raise HTTP1UpgradeRefusedError("101 Switching Protocols refused", status=502)
        informational = status < 200
        if not informational:
            if not self._methods:
                raise HTTP1HeadError("response without a request", status=502)
            self._current_method = self._methods.popleft()

        te_values: list[bytes] = []
        cl_values: list[bytes] = []
        connection: list[bytes] = []
        for name, value in fields:
            lname = name.lower()
            if lname == b"content-length":
                cl_values.append(value)
            elif lname == b"transfer-encoding":
                te_values.append(value)
            elif lname == b"connection":
                connection.append(value)

        bodyless = informational or status in (204, 304) or self._current_method == "HEAD"
        content_length: int | None = None
        chunked = False
        if not bodyless:
            content_length, chunked = self._framing(version, te_values, cl_values)
        until_eof = not bodyless and content_length is None and not chunked
        keep_alive = informational or (_keep_alive(version, connection) and not until_eof)
        self._keep_alive = keep_alive

        self._feed_llhttp(head)
        if bodyless and self._witness.completed == self._llhttp_completed:
            # llhttp cannot be told the request was HEAD: it waits for a body. Start afresh
            # (-1: the completion check below counts this message as llhttp's first).
            self._witness = _Witness()
            self._llhttp = self._new_llhttp()
            self._llhttp_completed = -1
        self._head_event = event = ResponseReceived(
            status=status,
            reason=reason or b"",
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
