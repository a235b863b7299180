"""Sans-io HTTP/2 (and gRPC) for the L7 proxy: a bounded, typed wrapper around `h2`.

The proxy holds one connection object per side of a proxied connection:
`H2ServerConnection` faces the client, `H2ClientConnection` faces the upstream. HPACK state is
per connection, so frames are never forwarded raw: the engine re-sends what it allows with the
other object's `send_*` methods. Both objects are pure: bytes in (`receive_data(data, now)`),
typed events out, bytes to write from `data_to_send()`; `now` (seconds, any monotonic origin)
only feeds the rate limits.

Transport. The server side expects the client connection preface straight away: cleartext
prior-knowledge h2c, which is what gRPC uses. HTTP/2 over TLS (ALPN `h2`) uses the very same
preface, so the same object serves it: the I/O shell terminates TLS (asyncio `start_tls` or
`ssl.MemoryBIO`), checks that ALPN selected `h2`, and feeds the plaintext here. HTTP/1.1
`Upgrade: h2c` is not supported (no gRPC client uses it); `starts_with_h2_preface()` lets the
shell route a cleartext connection to the HTTP/1.1 or the HTTP/2 parser by its first bytes.

Events (frozen, slotted dataclasses; see `H2Event`). Header blocks are `tuple[Header, ...]`
with `Header = tuple[bytes, bytes]`: names lower-case as on the wire (h2 rejects upper-case
names), pseudo-headers first, in received order, values as received. Those pairs are exactly
what `send_headers` takes back, so an allowed request is forwarded unchanged, including the
HPACK "never indexed" mark a client put on a sensitive field (the pairs are hpack's
`HeaderTuple` / `NeverIndexedHeaderTuple`, which compare equal to plain tuples). The convenience
`str` fields (`method`, `path`, ...) are decoded as latin-1, which maps every byte to one
character and never fails.

Flow control, both directions:

- inbound: the windows we advertise open only when the engine calls
  `acknowledge_received_data(stream_id, n)`, i.e. when the other side has taken the bytes
  (`DataFlushed` / the return value of `send_data`). A slow upstream therefore slows the client
  down instead of filling our memory. Bytes of a stream that is reset are credited back
  automatically (the engine need not remember them).
- outbound: `send_data` never sends past the peer's window. What does not fit is queued per
  stream and sent when WINDOW_UPDATE (or a SETTINGS change) opens the window, reported as
  `DataFlushed`. Queues are capped per stream and per connection (`H2Limits`): a `send_data`
  that would exceed a cap raises `SendBufferFullError` and queues nothing. `send_capacity()`
  says how much would be accepted; with the engine acknowledging inbound data only when it
  has been flushed on the other side, a queue never holds more than the window advertised on
  the other side, so the caps are a guard, not a flow-control mechanism.

Errors. Anything the peer does wrong, or any configured limit it exceeds, raises `H2Error`
(a `RemoteProtocolError`) carrying the HTTP/2 `error_code`; `data_to_send()` then holds the
GOAWAY to write before closing the socket, and the object ignores further input. No exception
of h2, hpack or hyperframe escapes `receive_data`. Misuse by the engine raises
`LocalProtocolError`. Stream-level problems that h2 recovers from become `StreamReset` events.

GOAWAY. h2 treats any GOAWAY as the end of the connection (python-hyper/h2#1181). RFC 9113
§6.8 lets streams up to `last_stream_id` finish after a NO_ERROR GOAWAY, which is what gRPC
servers send on graceful shutdown, so this wrapper keeps those streams running: a peer's
graceful GOAWAY yields `ConnectionTerminated` and the in-flight streams go on; our outbound
streams above its `last_stream_id` were never processed and are reported as
`StreamReset(error_code=REFUSED_STREAM)` (safe to retry). `close()` without an error code is
graceful the same way: new streams from the peer are refused with REFUSED_STREAM.

Memory is bounded over arbitrarily long connections: h2's per-stream objects are dropped as
soon as streams close, the record of closed streams (needed to tell a late frame from a
protocol error) keeps at most `max_closed_streams` ids, and this wrapper's own per-stream
state exists only while a stream has queued or unacknowledged bytes.

Repeated header blocks (every call of a gRPC channel) are answered from small per-connection
memos instead of being decoded, validated and encoded again (`garrison.parsers.h2memo`, which
says when a memo may answer); what goes out on the wire is byte for byte the same.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.utilities import authority_from_headers, extract_method_header, is_informational_response
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from garrison.parsers.errors import LocalProtocolError, RemoteProtocolError
from garrison.parsers.grpc import (
    GrpcCall,
    grpc_call,
    grpc_message,
    grpc_status,
    is_grpc_content_type,
)
from garrison.parsers.h2memo import MemoDecoder, MemoEncoder, MemoStream

__all__ = [
    "H2_PREFACE",
    "ConnectionClosed",
    "ConnectionTerminated",
    "DataFlushed",
    "DataReceived",
    "GrpcCall",
    "H2ClientConnection",
    "H2Error",
    "H2ErrorCode",
    "H2Event",
    "H2Limits",
    "H2ServerConnection",
    "Header",
    "NeverIndexed",
    "RequestReceived",
    "ResponseReceived",
    "SendBufferFullError",
    "StreamEnded",
    "StreamReset",
    "TrailersReceived",
    "starts_with_h2_preface",
]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Header = tuple[bytes, bytes]
HeadersIn = Iterable[tuple[bytes | str, bytes | str]]


class H2ErrorCode(IntEnum):
    """RFC 9113 §7 error codes (RST_STREAM and GOAWAY)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def starts_with_h2_preface(prefix: bytes) -> bool | None:
    """True/False once `prefix` shows whether a connection speaks HTTP/2; None: need more."""
    n = min(len(prefix), len(H2_PREFACE))
    if prefix[:n] != H2_PREFACE[:n]:
        return False
    return True if n == len(H2_PREFACE) else None


# ---- configuration and errors -----------------------------------------------------------------

# The largest frame we accept is the protocol default; we never advertise a larger one.
_MAX_FRAME_SIZE = 16_384
# Our HPACK encoder never keeps a dynamic table larger than this, whatever the peer allows:
# a peer advertising a 4 GiB table must not make us remember every header we ever sent.
_ENCODER_TABLE_SIZE = 4_096
_DEFAULT_WINDOW = 65_535
_LARGEST_WINDOW = 2**31 - 1  # RFC 9113 §6.9.1


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Per-connection limits. Defaults suit a proxy in front of gRPC services.

    - `max_concurrent_streams`: advertised in SETTINGS and enforced from the first frame; a
      peer that opens more is a connection error (PROTOCOL_ERROR: h2 refuses the HEADERS before
      HPACK-decoding it, so the header table would be out of step if the stream were merely
      refused).
    - `max_header_list_size`: advertised; a larger decoded header block (RFC 9113 §6.5.2 size:
      name + value + 32 per field) is ENHANCE_YOUR_CALM.
    - `max_continuation_frames`: CONTINUATION frames per header block (CONTINUATION flood,
      CVE-2024-27316 class) → ENHANCE_YOUR_CALM. Encoded header blocks are therefore at most
      `(1 + max_continuation_frames) * 16384` bytes.
    - `max_resets_per_second`: RST_STREAM frames from the peer (rapid reset, CVE-2023-44487),
      and the stream errors by which a peer makes us reset its streams (MadeYouReset,
      CVE-2025-8671), together → ENHANCE_YOUR_CALM. A token bucket holding one second's worth,
      refilled from `now`.
    - `max_control_frames_per_second`: PING and SETTINGS frames that we must acknowledge
      (ping/settings flood, CVE-2019-9512/9515) → ENHANCE_YOUR_CALM. Same kind of bucket.
    - `initial_window_size`, `connection_window_size`: the inbound windows we advertise.
    - `max_buffered_per_stream`, `max_buffered_per_connection`: caps of the outbound queues.
    - `max_closed_streams`: closed stream ids remembered, so that a frame that crossed our
      RST_STREAM on the wire is ignored rather than taken for a protocol error.
    """

    max_concurrent_streams: int = 100
    max_header_list_size: int = 65_536
    max_continuation_frames: int = 16
    max_resets_per_second: float = 100.0
    max_control_frames_per_second: float = 500.0
    initial_window_size: int = 262_144
    connection_window_size: int = 1_048_576
    max_buffered_per_stream: int = 262_144
    max_buffered_per_connection: int = 1_048_576
    max_closed_streams: int = 1_024

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_streams",
            "max_header_list_size",
            "max_buffered_per_stream",
            "max_buffered_per_connection",
            "max_closed_streams",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"H2Limits.{name} must be at least 1")
        if self.max_continuation_frames < 0:
            raise ValueError("H2Limits.max_continuation_frames must not be negative")
        if self.max_resets_per_second <= 0 or self.max_control_frames_per_second <= 0:
            raise ValueError("H2Limits rates must be positive")
        if not 1 <= self.initial_window_size <= 2**31 - 1:
            raise ValueError("H2Limits.initial_window_size must be in 1..2**31-1")
        if not _DEFAULT_WINDOW <= self.connection_window_size <= 2**31 - 1:
            raise ValueError("H2Limits.connection_window_size must be in 65535..2**31-1")


class H2Error(RemoteProtocolError):
    """The peer broke HTTP/2 or a limit. `error_code` (an `H2ErrorCode` value) is what the
    GOAWAY now waiting in `data_to_send()` carries."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message, error_code=error_code)


class SendBufferFullError(LocalProtocolError):
    """`send_data` would queue more than `H2Limits` allows; nothing was queued."""


class NeverIndexed(tuple[bytes, bytes]):
    """A header field its sender marked never-indexed (HPACK, RFC 7541 §7.1.3): a credential.
    The nghttp2 connections hand such fields out as this pair type and send a pair of this type
    on never-indexed; it compares equal to the plain pair."""

    __slots__ = ()


# ---- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request's header block (server side).

    `authority` is `:authority`, else the `host` header. `scheme` and `path` are None only
    for CONNECT. `grpc` is set for a well-formed gRPC call (content-type `application/grpc*`,
    POST, `/pkg.Service/Method`); `grpc_error` says why a request with a gRPC content-type is
    not one: the engine must deny such a request, it never reaches the matcher.
    """

    stream_id: int
    method: str
    scheme: str | None
    authority: str | None
    path: str | None
    headers: tuple[Header, ...]
    end_stream: bool
    grpc: GrpcCall | None = None
    grpc_error: str | None = None

    @property
    def is_grpc(self) -> bool:
        """The content-type says gRPC (well-formed or not): deny it the gRPC way."""
        return self.grpc is not None or self.grpc_error is not None


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A response's header block (client side); 1xx informational ones too, before the final.

    `grpc_status`/`grpc_message` are set for a trailers-only gRPC response (end_stream).
    """

    stream_id: int
    status: int
    headers: tuple[Header, ...]
    end_stream: bool
    grpc_status: int | None = None
    grpc_message: str | None = None


@dataclass(frozen=True, slots=True)
class DataReceived:
    """DATA payload. Acknowledge `flow_controlled_length` (payload + padding), not len(data)."""

    stream_id: int
    data: bytes
    flow_controlled_length: int
    end_stream: bool


@dataclass(frozen=True, slots=True)
class TrailersReceived:
    """A trailing header block; it always ends the stream. gRPC puts its status here."""

    stream_id: int
    headers: tuple[Header, ...]
    grpc_status: int | None = None
    grpc_message: str | None = None


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer finished sending on the stream. Follows the event whose `end_stream` is set:
    act on one or the other, not both."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone. `remote`: the peer sent RST_STREAM (or refused it with its GOAWAY);
    otherwise we reset it because the peer broke a stream-level rule (e.g. window overflow)."""

    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY. With NO_ERROR, streams up to `last_stream_id` may still finish;
    with any other code the connection is over and further input is ignored."""

    error_code: int
    last_stream_id: int
    additional_data: bytes = b""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the transport (`receive_data(b"")`); `open_streams` never finished."""

    open_streams: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DataFlushed:
    """`length` queued bytes of the stream were sent after the peer opened its window;
    `buffered` bytes remain queued. Acknowledge them on the side they came from."""

    stream_id: int
    length: int
    buffered: int


H2Event = (
    RequestReceived
    | ResponseReceived
    | DataReceived
    | TrailersReceived
    | StreamEnded
    | StreamReset
    | ConnectionTerminated
    | ConnectionClosed
    | DataFlushed
)


# ---- internals --------------------------------------------------------------------------------

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x5,
    0x6,
    0x7,
    0x9,
)
_SENDING_STATES = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE})
_FLAG_ACK = 0x1
_CREDENTIAL_FIELDS = frozenset({b"authorization", b"proxy-authorization"})
_FLAG_END_HEADERS = 0x4


class _LimitExceeded(Exception):
    def __init__(self, message: str, error_code: H2ErrorCode) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code


class _RateLimit:
    """Token bucket: `rate` per second, holding at most one second's worth (at least 1)."""

    __slots__ = ("_capacity", "_last", "_rate", "_tokens")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._capacity = max(rate, 1.0)
        self._tokens = self._capacity
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is None:
            self._last = now
        elif now > self._last:  # a clock that goes backwards refills nothing
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class _FrameGuard:
    """Reads only the 9-byte frame headers of the inbound byte stream, before h2 sees them.

    That is where limits h2 lacks or enforces too late are checked: CONTINUATION count,
    RST_STREAM and PING/SETTINGS rates, frame length (h2 would buffer a whole oversized frame
    before rejecting it) and SETTINGS as the first frame. It also returns the offsets around
    GOAWAY frames, which must be fed to h2 on their own (see `_H2Connection._feed_segments`).
    """

    __slots__ = (
        "_continuations",
        "_control",
        "_first_frame",
        "_head",
        "_limits",
        "_preface",
        "_resets",
        "_skip",
        "_skip_goaway",
    )

    def __init__(self, limits: H2Limits, *, server: bool) -> None:
        self._limits = limits
        self._preface = len(H2_PREFACE) if server else 0
        self._head = bytearray()
        self._skip = 0
        self._skip_goaway = False
        self._continuations = -1  # -1: not inside a header block
        self._first_frame = True
        self._resets = _RateLimit(limits.max_resets_per_second)
        self._control = _RateLimit(limits.max_control_frames_per_second)

    def scan(self, data: bytes, now: float) -> list[int]:
        cuts: list[int] = []
        pos, end = 0, len(data)
        if self._preface:
            taken = min(self._preface, end)
            self._preface -= taken
            pos = taken
        while pos < end:
            if self._skip:
                taken = min(self._skip, end - pos)
                self._skip -= taken
                pos += taken
                if not self._skip and self._skip_goaway:
                    cuts.append(pos)
                continue
            need = 9 - len(self._head)
            if end - pos < need:
                self._head += data[pos:]
                break
            if self._head:
                head = bytes(self._head) + data[pos : pos + need]
                self._head.clear()
            else:
                head = data[pos : pos + 9]
            frame_start = pos - (9 - need)
            pos += need
            length = int.from_bytes(head[0:3], "big")
            self._check(length, head[3], head[4], now)
            self._skip = length
            self._skip_goaway = head[3] == _GOAWAY
            if self._skip_goaway:
                cuts.append(max(frame_start, 0))
                if not length:
                    cuts.append(pos)
        return cuts

    def count_reset(self, now: float) -> None:
        if not self._resets.take(now):
            raise _LimitExceeded(
                f"more than {self._limits.max_resets_per_second:g} stream resets per second",
                H2ErrorCode.ENHANCE_YOUR_CALM,
            )

    def _check(self, length: int, ftype: int, flags: int, now: float) -> None:
        if self._first_frame:
            self._first_frame = False
            if ftype != _SETTINGS or flags & _FLAG_ACK:
                raise _LimitExceeded(
                    f"first frame is type {ftype}, not SETTINGS", H2ErrorCode.PROTOCOL_ERROR
                )
        if length > _MAX_FRAME_SIZE:
            raise _LimitExceeded(
                f"frame of {length} bytes exceeds {_MAX_FRAME_SIZE}", H2ErrorCode.FRAME_SIZE_ERROR
            )
        if ftype == _CONTINUATION and self._continuations >= 0:
            self._continuations += 1
            if self._continuations > self._limits.max_continuation_frames:
                raise _LimitExceeded(
                    f"more than {self._limits.max_continuation_frames} CONTINUATION frames",
                    H2ErrorCode.ENHANCE_YOUR_CALM,
                )
            if flags & _FLAG_END_HEADERS:
                self._continuations = -1
        elif ftype in (_HEADERS, _PUSH_PROMISE) and not flags & _FLAG_END_HEADERS:
            self._continuations = 0
        else:
            self._continuations = -1  # h2 itself rejects an interrupted header block
        if ftype == _RST_STREAM:
            self.count_reset(now)
        if ftype in (_PING, _SETTINGS) and not flags & _FLAG_ACK and not self._control.take(now):
            raise _LimitExceeded(
                f"more than {self._limits.max_control_frames_per_second:g} PING/SETTINGS "
                "frames per second",
                H2ErrorCode.ENHANCE_YOUR_CALM,
            )


class _BoundedH2Connection(h2.connection.H2Connection):
    """h2's connection with our settings and a bounded record of closed streams."""

    def __init__(self, config: h2.config.H2Configuration, limits: H2Limits) -> None:
        # Read by H2Connection.__init__ to size its closed-stream record (default 65536).
        self.MAX_CLOSED_STREAMS = limits.max_closed_streams
        super().__init__(config)
        codes = h2.settings.SettingCodes
        initial = {
            codes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            codes.INITIAL_WINDOW_SIZE: limits.initial_window_size,
            codes.ENABLE_PUSH: 0,
        }
        # Enforced from the first frame, not only once the peer acknowledges them: values a
        # peer may not exceed before it has seen them are those that are looser than
        # RFC 9113's defaults, which only INITIAL_WINDOW_SIZE is, and h2 accounts for that.
        self.local_settings = h2.settings.Settings(
            client=config.client_side, initial_values=initial
        )
        # Same codecs, with memos for the header blocks a busy connection repeats (h2memo).
        self.encoder = MemoEncoder()
        self.decoder = MemoDecoder()
        self.decoder.max_header_list_size = limits.max_header_list_size
        self.header_memo: dict[Any, tuple[Any, ...]] = {}

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        # h2's own method without its first line, `logger.trace("Received frame: %s",
        # repr(frame))`: the repr is built even though the log is off, and formatting the
        # flags and a hex preview of the body was ~12 % of the engine's time per gRPC call
        # (BENCHMARKS.md). The rest is h2's code as it is; a test holds the two equal,
        # statement for statement.
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)

        return events

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        _Stream.adopt(stream, self.header_memo)
        return stream


class _Stream(MemoStream):
    """h2's stream with the memos, and a shorter `send_headers` for pre-validated blocks."""

    def send_headers(
        self, headers: Any, encoder: Any, end_stream: bool = False
    ) -> list[Any]:
        # On a connection with outbound normalization and validation off (garrison's
        # `prevalidated_headers`), h2's own method minus two steps whose results nothing then
        # uses: `utf8_encode_headers` (every block arrives here as bytes pairs from
        # `_never_index_credentials`) and the validation flags (read only by the two passes
        # that are off); ~6 % of the engine's time per gRPC call. The rest is h2's code as it
        # is; a test holds the two equal, statement for statement.
        if self.config.normalize_outbound_headers or self.config.validate_outbound_headers:
            return list(super().send_headers(headers, encoder, end_stream))
        self.config.logger.debug("Send headers %s on %r", headers, self)

        input_ = h2.stream.StreamInputs.SEND_HEADERS

        bytes_headers = headers

        if (not self.state_machine.client) and is_informational_response(bytes_headers):
            if end_stream:
                msg = "Cannot set END_STREAM on informational responses."
                raise h2.exceptions.ProtocolError(msg)

            input_ = h2.stream.StreamInputs.SEND_INFORMATIONAL_HEADERS

        self.state_machine.process_input(input_)

        hf = HeadersFrame(self.stream_id)
        frames = self._build_headers_frames(
            bytes_headers, encoder, hf, None  # type: ignore[arg-type]  # read by no pass here
        )

        if end_stream:
            self.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            frames[0].flags.add("END_STREAM")

        if self.state_machine.trailers_sent and not end_stream:
            msg = "Trailers must have END_STREAM set."
            raise h2.exceptions.ProtocolError(msg)

        if self.state_machine.client and self._authority is None:
            self._authority = authority_from_headers(bytes_headers)

        self.request_method = extract_method_header(bytes_headers)

        return frames


@dataclass(slots=True)
class _Outbound:
    buffer: bytearray
    end_stream: bool = False
    trailers: Sequence[tuple[bytes | str, bytes | str]] | None = None


def _headers(raw: object) -> tuple[Header, ...]:
    # header_encoding=None: h2 hands out (bytes, bytes) pairs as hpack HeaderTuples, a tuple
    # subclass. They are kept as they are: a NeverIndexedHeaderTuple (a field the peer asked
    # never to be compressed, e.g. a credential) stays one when send_headers forwards it.
    return tuple(cast("list[Header]", raw))


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _never_index_credentials(headers: HeadersIn) -> list[Header]:
    """What h2's outbound normalization does for HPACK safety, without the rest of it:
    `authorization`, `proxy-authorization` and a cookie shorter than 20 bytes are sent
    never-indexed, so that no compression context learns a credential (h2 `_secure_headers`,
    after Firefox and nghttp2). Also what h2's `utf8_encode_headers` does: every name and
    value comes out as bytes (UTF-8), a header tuple keeping its type (`_Stream.send_headers`
    relies on it)."""
    out: list[Header] = []
    for header in headers:
        name, value = header[0], header[1]
        if type(name) is not bytes or type(value) is not bytes:
            name = name.encode("utf-8") if isinstance(name, str) else name
            value = value.encode("utf-8") if isinstance(value, str) else value
            if isinstance(header, HeaderTuple):
                header = header.__class__(name, value)
            else:
                header = (name, value)
        if name in _CREDENTIAL_FIELDS or (name == b"cookie" and len(value) < 20):
            header = NeverIndexedHeaderTuple(name, value)
        out.append(cast(Header, header))
    return out


class _H2Connection:
    _client_side = False

    def __init__(
        self, limits: H2Limits | None = None, *, prevalidated_headers: bool = False
    ) -> None:
        """`prevalidated_headers`: every header block this object will send was already
        validated on receipt by another connection object of this module, under the same
        rules (a request as a request, a response as a response, trailers as trailers), or
        is one of garrison's constant deny answers. h2's outbound validation and
        normalization are then skipped: for such a block they are no-ops, since inbound
        validation rejects everything they would reject or rewrite (upper-case names,
        surrounding whitespace, connection-specific fields, TE other than `trailers`, bad
        pseudo-headers, :authority/Host mismatch, empty :path), and they cost about a
        tenth of a proxied call. The one rewrite that is not a no-op, sending credentials
        never-indexed, is kept. Inbound validation is always on. A block that was edited
        (a rewritten path, added fields) is not prevalidated."""
        self.limits = limits if limits is not None else H2Limits()
        self.prevalidated_headers = prevalidated_headers
        config = h2.config.H2Configuration(
            client_side=self._client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=not prevalidated_headers,
            normalize_outbound_headers=not prevalidated_headers,
        )
        self._h2 = _BoundedH2Connection(config, self.limits)
        self._guard = _FrameGuard(self.limits, server=not self._client_side)
        self._out = bytearray()
        self._send: dict[int, _Outbound] = {}
        self._buffered_total = 0
        self._unacked: dict[int, int] = {}
        self._reset_ids: OrderedDict[int, None] = OrderedDict()
        self._terminated = False
        self._local_goaway: int | None = None
        self._remote_goaway: int | None = None
        self._h2.initiate_connection()
        extra = self.limits.connection_window_size - _DEFAULT_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self._drain()

    # -- state ----------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """A GOAWAY was sent or received, or the connection failed: open no new streams."""
        return self._terminated or self._local_goaway is not None or self._remote_goaway is not None

    @property
    def terminated(self) -> bool:
        """The connection is over (error GOAWAY either way, or the transport closed)."""
        return self._terminated

    @property
    def open_streams(self) -> tuple[int, ...]:
        return tuple(sid for sid, s in self._h2.streams.items() if not s.closed)

    def buffered_bytes(self, stream_id: int) -> int:
        """Bytes queued on `stream_id` waiting for the peer's flow-control window."""
        out = self._send.get(stream_id)
        return len(out.buffer) if out is not None else 0

    @property
    def buffered_bytes_total(self) -> int:
        return self._buffered_total

    def send_capacity(self, stream_id: int) -> int:
        """How many bytes `send_data(stream_id, ...)` accepts now without raising."""
        window = 0 if stream_id in self._send else self._window(stream_id)
        queue_room = min(
            self.limits.max_buffered_per_stream - self.buffered_bytes(stream_id),
            self.limits.max_buffered_per_connection - self._buffered_total,
        )
        return max(0, window + queue_room)

    # -- input ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[H2Event]:
        """Feed bytes read from the peer; `b""` means the peer closed the transport.

        Raises `H2Error` (GOAWAY queued) when the peer breaks the protocol or a limit; the
        events of that call are then void, the connection is over.
        """
        if self._terminated:
            return []
        if not data:
            open_streams = self.open_streams
            self._terminated = True
            self._send.clear()
            self._buffered_total = 0
            return [ConnectionClosed(open_streams)]
        try:
            cuts = self._guard.scan(data, now)
        except _LimitExceeded as exc:
            raise self._fail(exc.message, exc.error_code) from None
        events: list[H2Event] = []
        start = 0
        for cut in [*cuts, len(data)]:
            if cut > start:
                self._translate(self._feed(data[start:cut]), events, now)
                start = cut
                if self._terminated:
                    break
        # h2 forgets a closed stream's object only when asked to count open streams.
        _ = self._h2.open_inbound_streams
        if self._h2.encoder.header_table_size > _ENCODER_TABLE_SIZE:
            self._h2.encoder.header_table_size = _ENCODER_TABLE_SIZE
        self._drain()
        return events

    def _feed(self, chunk: bytes) -> list[h2.events.Event]:
        # h2 discards its unsent output when it processes a GOAWAY; take it out first.
        self._drain()
        state = self._h2.state_machine.state
        try:
            raw = self._h2.receive_data(chunk)
        except h2.exceptions.ProtocolError as exc:
            # h2 queues a GOAWAY for most errors but not all (a bad preface): replace what it
            # queued during this call with ours, the connection is over either way.
            self._h2.clear_outbound_data_buffer()
            code = int(getattr(exc, "error_code", H2ErrorCode.PROTOCOL_ERROR))
            raise self._fail(str(exc) or type(exc).__name__, code) from exc
        except Exception as exc:
            # Not a protocol error h2 recognised (an assertion or a codec error in a path h2
            # does not guard): still the peer's bytes, so still a clean typed close.
            raise self._fail(
                f"{type(exc).__name__} while parsing: {exc}", H2ErrorCode.INTERNAL_ERROR
            ) from exc
        if any(isinstance(e, h2.events.ConnectionTerminated) for e in raw):
            self._after_goaway(raw, state)
        return raw

    def _after_goaway(self, raw: list[h2.events.Event], state: object) -> None:
        goaway = next(e for e in raw if isinstance(e, h2.events.ConnectionTerminated))
        if int(goaway.error_code or 0) != H2ErrorCode.NO_ERROR:
            self._terminated = True
            return
        # Graceful: keep the connection usable for the streams it lets finish (module doc).
        self._h2.state_machine.state = cast("h2.connection.ConnectionState", state)

    def _fail(self, message: str, code: int) -> H2Error:
        frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=self._h2.highest_inbound_stream_id,
            error_code=int(code),
            additional_data=message.encode("ascii", "replace")[:128],
        )
        self._drain()
        self._out += frame.serialize()
        self._terminated = True
        self._send.clear()
        self._buffered_total = 0
        return H2Error(message, int(code))

    def _translate(self, raw: list[h2.events.Event], events: list[H2Event], now: float) -> None:
        flush_all = False
        flush: list[int] = []
        for ev in raw:
            sid = getattr(ev, "stream_id", None)
            if sid and sid in self._reset_ids:
                # Already reset (and reported, or refused by our graceful GOAWAY earlier in
                # this same batch): nothing more is reported for it.
                if isinstance(ev, h2.events.DataReceived):
                    self._credit(sid, ev.flow_controlled_length)
                continue
            if isinstance(ev, h2.events.StreamReset):
                if not ev.remote_reset:  # the peer broke a stream rule: a reset it caused
                    try:
                        self._guard.count_reset(now)
                    except _LimitExceeded as exc:
                        raise self._fail(exc.message, exc.error_code) from None
                self._forget(ev.stream_id)
                events.append(StreamReset(ev.stream_id, int(ev.error_code), ev.remote_reset))
            elif isinstance(ev, h2.events.DataReceived):
                fcl = ev.flow_controlled_length
                self._unacked[ev.stream_id] = self._unacked.get(ev.stream_id, 0) + fcl
                events.append(DataReceived(ev.stream_id, ev.data, fcl, ev.stream_ended is not None))
            elif isinstance(ev, h2.events.RequestReceived):
                if self._local_goaway is not None and ev.stream_id > self._local_goaway:
                    self._h2.reset_stream(ev.stream_id, H2ErrorCode.REFUSED_STREAM)
                    self._remember_reset(ev.stream_id)
                    continue
                events.append(self._request(ev))
            elif isinstance(
                ev, h2.events.ResponseReceived | h2.events.InformationalResponseReceived
            ):
                events.append(self._response(ev))
            elif isinstance(ev, h2.events.TrailersReceived):
                headers = _headers(ev.headers)
                fields = dict(headers)
                events.append(
                    TrailersReceived(
                        ev.stream_id,
                        headers,
                        grpc_status(fields.get(b"grpc-status")),
                        grpc_message(fields.get(b"grpc-message")),
                    )
                )
            elif isinstance(ev, h2.events.StreamEnded):
                events.append(StreamEnded(ev.stream_id))
            elif isinstance(ev, h2.events.WindowUpdated):
                if ev.stream_id:
                    flush.append(ev.stream_id)
                else:
                    flush_all = True
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                flush_all = True  # INITIAL_WINDOW_SIZE / MAX_FRAME_SIZE may have grown
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._goaway_received(ev, events)
            # PING, SETTINGS ACK, PRIORITY, ALTSVC, unknown frames: h2 answered what needed it.
        for sid in list(self._send) if flush_all else flush:
            if sid in self._send:
                sent = self._flush(sid)
                if sent:
                    events.append(DataFlushed(sid, sent, self.buffered_bytes(sid)))

    def _goaway_received(self, ev: h2.events.ConnectionTerminated, events: list[H2Event]) -> None:
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        self._remote_goaway = last
        events.append(
            ConnectionTerminated(int(ev.error_code or 0), last, ev.additional_data or b"")
        )
        if self._terminated:
            return
        outbound = int(self._client_side)
        for sid in self.open_streams:
            if sid > last and sid % 2 == outbound:
                # The peer never processed it (RFC 9113 §6.8): safe to retry elsewhere.
                self._h2.reset_stream(sid, H2ErrorCode.CANCEL)
                self._forget(sid)
                events.append(StreamReset(sid, H2ErrorCode.REFUSED_STREAM, remote=True))

    def _request(self, ev: h2.events.RequestReceived) -> RequestReceived:
        headers = _headers(ev.headers)
        pseudo: dict[bytes, bytes] = {}
        host: bytes | None = None
        content_types: list[bytes] = []
        for name, value in headers:
            if name[:1] == b":":
                pseudo[name] = value
            elif name == b"content-type":
                content_types.append(value)
            elif name == b"host" and host is None:
                host = value
        method = pseudo.get(b":method", b"").decode("latin-1")
        path = _latin1(pseudo.get(b":path"))
        call: GrpcCall | None = None
        error: str | None = None
        if any(is_grpc_content_type(v) for v in content_types):
            if len(content_types) > 1:
                error = "gRPC request with more than one content-type"
            else:
                call, error = grpc_call(method, path)
        return RequestReceived(
            stream_id=ev.stream_id,
            method=method,
            scheme=_latin1(pseudo.get(b":scheme")),
            authority=_latin1(pseudo.get(b":authority", host)),
            path=path,
            headers=headers,
            end_stream=ev.stream_ended is not None,
            grpc=call,
            grpc_error=error,
        )

    def _response(
        self, ev: h2.events.ResponseReceived | h2.events.InformationalResponseReceived
    ) -> ResponseReceived:
        headers = _headers(ev.headers)
        fields = dict(headers)
        status_raw = fields.get(b":status", b"0")
        ended = isinstance(ev, h2.events.ResponseReceived) and ev.stream_ended is not None
        return ResponseReceived(
            ev.stream_id,
            int(status_raw) if status_raw.isdigit() else 0,
            headers,
            ended,
            grpc_status(fields.get(b"grpc-status")),
            grpc_message(fields.get(b"grpc-message")),
        )

    # -- output ---------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything to write to the peer now, in order."""
        self._drain()
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_headers(self, stream_id: int, headers: HeadersIn, end_stream: bool = False) -> None:
        """Send a header block: request or response headers, or trailers with end_stream.

        A stream reset by either side meanwhile is ignored silently (its StreamReset event is
        the answer); a connection that is over ignores every send.
        """
        if self._dead(stream_id):
            return
        if self.closing and not self._known(stream_id):
            raise LocalProtocolError("connection is closing: no new streams")
        out = self._send.get(stream_id)
        if out is not None:
            if not end_stream:
                raise LocalProtocolError(f"stream {stream_id}: headers after queued data")
            self._queue_trailers(out, stream_id, headers)
            return
        self._call(self._h2.send_headers, stream_id, self._outbound_headers(headers), end_stream)

    def send_trailers(self, stream_id: int, headers: HeadersIn) -> None:
        """End the stream with trailers, after whatever data is still queued on it."""
        self.send_headers(stream_id, headers, end_stream=True)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        """Send within the peer's window, queue the rest; returns the bytes sent now.

        Raises `SendBufferFullError` (queuing nothing) when the queue would exceed a cap.
        """
        if self._dead(stream_id):
            return 0
        out = self._send.get(stream_id)
        if out is not None and (out.end_stream or out.trailers is not None):
            raise LocalProtocolError(f"stream {stream_id}: data after the end of the stream")
        if not data and not end_stream:
            return 0
        window = 0 if out is not None else self._window(stream_id)
        if 0 < len(data) <= min(window, self._h2.max_outbound_frame_size):
            # Nothing queued and it fits one frame (every unary gRPC message does): send it
            # as is, without a queue entry and its copies.
            self._h2.send_data(stream_id, data, end_stream=end_stream)
            self._drain()
            return len(data)
        queued = len(data) - min(len(data), window)
        if queued:
            if self.buffered_bytes(stream_id) + queued > self.limits.max_buffered_per_stream:
                raise SendBufferFullError(
                    f"stream {stream_id}: queue would exceed "
                    f"{self.limits.max_buffered_per_stream} bytes"
                )
            if self._buffered_total + queued > self.limits.max_buffered_per_connection:
                raise SendBufferFullError(
                    f"connection send queue would exceed "
                    f"{self.limits.max_buffered_per_connection} bytes"
                )
        if out is None:
            out = self._send[stream_id] = _Outbound(bytearray())
        out.buffer += data
        out.end_stream = end_stream
        self._buffered_total += len(data)
        sent = self._flush(stream_id)
        self._drain()
        return sent

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side after the data already queued."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = H2ErrorCode.CANCEL) -> None:
        """RST_STREAM; queued data of the stream is dropped. A closed stream is left alone."""
        if self._terminated or stream_id in self._reset_ids:
            return
        if not self._known(stream_id):
            raise LocalProtocolError(f"reset of stream {stream_id}, which never existed")
        self._forget(stream_id)
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.closed:
            return
        self._call(self._h2.reset_stream, stream_id, error_code)
        _ = self._h2.open_inbound_streams

    def close(
        self, error_code: int = H2ErrorCode.NO_ERROR, last_stream_id: int | None = None
    ) -> None:
        """GOAWAY. NO_ERROR is graceful: streams up to `last_stream_id` (default: the last
        the peer opened) may finish, newer ones from the peer are refused. Any other code
        ends the connection: write `data_to_send()` and close the socket."""
        if self._terminated or self._local_goaway is not None:
            return
        last = self._h2.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        state = self._h2.state_machine.state
        self._call(self._h2.close_connection, error_code, None, last)
        if error_code == H2ErrorCode.NO_ERROR:
            self._local_goaway = last
            self._h2.state_machine.state = state
        else:
            self._terminated = True
            self._send.clear()
            self._buffered_total = 0

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """The other side has taken `n` flow-controlled bytes of `stream_id`: reopen windows.

        Acknowledging more than is outstanding (e.g. after the stream was reset, when its
        bytes were credited automatically) is harmless.
        """
        if self._terminated or n <= 0:
            return
        pending = self._unacked.get(stream_id, 0)
        n = min(n, pending)
        if not n:
            return
        if pending - n:
            self._unacked[stream_id] = pending - n
        else:
            del self._unacked[stream_id]
        self._call(self._h2.acknowledge_received_data, n, stream_id)

    def open_window(self, stream_id: int, n: int) -> None:
        """Let the peer send `n` bytes on `stream_id` without waiting for a WINDOW_UPDATE, and
        `n` more on the connection: for a body the engine throws away as it comes (a denied
        request's), as nginx opens a discarded body's windows. The connection's window stays
        that much larger while the body does not come. A closed or reset stream is ignored.
        """
        stream = self._h2.streams.get(stream_id)
        if self._dead(stream_id) or n <= 0 or stream is None or stream.closed:
            return
        conn = min(n, _LARGEST_WINDOW - self._h2.inbound_flow_control_window)
        if conn > 0:
            self._call(self._h2.increment_flow_control_window, conn)
        more = min(n, _LARGEST_WINDOW) - stream.inbound_flow_control_window
        if more > 0:
            self._call(self._h2.increment_flow_control_window, more, stream_id)

    # -- helpers --------------------------------------------------------------------------------

    def _drain(self) -> None:
        pending = self._h2.data_to_send()
        if pending:
            self._out += pending

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except h2.exceptions.H2Error as exc:
            raise LocalProtocolError(f"{type(exc).__name__}: {exc}") from exc
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from exc
        self._drain()

    def _known(self, stream_id: int) -> bool:
        h = self._h2
        if stream_id % 2 == int(self._client_side):
            return stream_id <= h.highest_outbound_stream_id
        return stream_id <= h.highest_inbound_stream_id

    def _dead(self, stream_id: int) -> bool:
        return self._terminated or stream_id in self._reset_ids

    def _window(self, stream_id: int) -> int:
        """The peer's window for a stream we may send DATA on; LocalProtocolError otherwise."""
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in _SENDING_STATES:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        return self._h2.local_flow_control_window(stream_id)

    def _queue_trailers(self, out: _Outbound, stream_id: int, headers: HeadersIn) -> None:
        if out.end_stream or out.trailers is not None:
            raise LocalProtocolError(f"stream {stream_id}: trailers after the end of the stream")
        out.trailers = self._outbound_headers(headers)

    def _outbound_headers(self, headers: HeadersIn) -> Sequence[tuple[bytes | str, bytes | str]]:
        if self.prevalidated_headers:
            return _never_index_credentials(headers)
        return list(headers)

    def _flush(self, stream_id: int) -> int:
        out = self._send[stream_id]
        h = self._h2
        sent = 0
        ended = False
        while out.buffer:
            n = min(
                len(out.buffer), h.local_flow_control_window(stream_id), h.max_outbound_frame_size
            )
            if n <= 0:
                break
            last = n == len(out.buffer)
            ended = last and out.end_stream and out.trailers is None
            h.send_data(stream_id, bytes(out.buffer[:n]), end_stream=ended)
            del out.buffer[:n]
            sent += n
        self._buffered_total -= sent
        if not out.buffer:
            del self._send[stream_id]
            if out.trailers is not None:
                h.send_headers(stream_id, out.trailers, end_stream=True)
            elif out.end_stream and not ended:
                h.end_stream(stream_id)
        return sent

    def _forget(self, stream_id: int) -> None:
        """The stream was reset: drop its queue, credit its unacknowledged bytes."""
        out = self._send.pop(stream_id, None)
        if out is not None:
            self._buffered_total -= len(out.buffer)
        self._remember_reset(stream_id)
        self._credit(stream_id, self._unacked.pop(stream_id, 0))

    def _credit(self, stream_id: int, n: int) -> None:
        if n:
            self._h2.acknowledge_received_data(n, stream_id)

    def _remember_reset(self, stream_id: int) -> None:
        self._reset_ids[stream_id] = None
        while len(self._reset_ids) > self.limits.max_closed_streams:
            self._reset_ids.popitem(last=False)


class H2ServerConnection(_H2Connection):
    """Faces the client: receives requests, sends responses (and deny answers)."""

    _client_side = False

    def send_trailers_only(self, stream_id: int, headers: HeadersIn) -> None:
        """A complete response in ONE HEADERS frame with END_STREAM: gRPC's trailers-only
        form (`:status`, content-type, grpc-status, grpc-message), used for deny answers."""
        self.send_headers(stream_id, headers, end_stream=True)


class H2ClientConnection(_H2Connection):
    """Faces the upstream: sends requests (the allowed ones, re-encoded), receives responses."""

    _client_side = True

    @property
    def available_streams(self) -> int:
        """How many more streams the upstream allows right now (its MAX_CONCURRENT_STREAMS)."""
        if self.closing:
            return 0
        h = self._h2
        return max(0, h.remote_settings.max_concurrent_streams - h.open_outbound_streams)

    def new_stream(self) -> int:
        """The id for the next request; open it with `send_headers` before calling again."""
        if self.closing:
            raise LocalProtocolError("connection is closing: no new streams")
        if not self.available_streams:
            raise LocalProtocolError("upstream's MAX_CONCURRENT_STREAMS reached")
        try:
            return self._h2.get_next_available_stream_id()
        except h2.exceptions.H2Error as exc:
            raise LocalProtocolError(str(exc)) from exc

    def send_request(self, headers: HeadersIn, end_stream: bool = False) -> int:
        """Open a stream with `headers`; returns its id."""
        stream_id = self.new_stream()
        self.send_headers(stream_id, headers, end_stream)
        return stream_id
