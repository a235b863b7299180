"""HTTP/2 (and gRPC) for the L7 proxy: the vocabulary of the sans-io connections.

The connections themselves are `garrison.parsers.nghttp2` (nghttp2 through cffi):
`H2ServerConnection` faces the client, `H2ClientConnection` the upstream. This module holds what
they and the engine share: the events, `H2Limits`, the errors, the error codes, and the preface.

Transport. The server side expects the client connection preface straight away: cleartext
prior-knowledge h2c, which is what gRPC uses. HTTP/2 over TLS (ALPN `h2`) uses the very same
preface, so the same object serves it: the I/O shell terminates TLS, checks that ALPN selected
`h2`, and feeds the plaintext. HTTP/1.1 `Upgrade: h2c` is not supported (no gRPC client uses
it); `starts_with_h2_preface()` lets the shell route a cleartext connection to the HTTP/1.1 or
the HTTP/2 parser by its first bytes.

Events (frozen, slotted dataclasses; see `H2Event`). Header blocks are `tuple[Header, ...]`
with `Header = tuple[bytes, bytes]`: names lower-case as on the wire, pseudo-headers first, in
received order, values as received. Those pairs are exactly what `send_headers` takes back, so
an allowed request is forwarded unchanged, including the HPACK "never indexed" mark a sender put
on a sensitive field (such a pair is a `NeverIndexed`, which compares equal to a plain pair).
The convenience `str` fields (`method`, `path`, ...) are decoded as latin-1, which maps every
byte to one character and never fails.

Errors. Anything the peer does wrong, or any configured limit it exceeds, raises `H2Error`
(a `RemoteProtocolError`) carrying the HTTP/2 `error_code`; the connection's `data_to_send()`
then holds the GOAWAY to write before closing the socket. Misuse by the engine raises
`LocalProtocolError`; a `send_data` over the queue caps raises `SendBufferFullError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from garrison.parsers.errors import LocalProtocolError, RemoteProtocolError
from garrison.parsers.grpc import GrpcCall

__all__ = [
    "H2_PREFACE",
    "ConnectionClosed",
    "ConnectionTerminated",
    "DataFlushed",
    "DataReceived",
    "GrpcCall",
    "H2Error",
    "H2ErrorCode",
    "H2Event",
    "H2Limits",
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

_DEFAULT_WINDOW = 65_535


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Per-connection limits. Defaults suit a proxy in front of gRPC services.

    - `max_concurrent_streams`: advertised in SETTINGS; a stream over it is refused
      (RST_STREAM REFUSED_STREAM, RFC 9113 §5.1.2; its header block is still decoded, so the
      HPACK state stays in step).
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
    - `max_closed_streams`: ids of streams reset by either side remembered, so that a send or
      a frame for one is ignored rather than taken for misuse.
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

    `grpc_status` is set for a trailers-only gRPC response (end_stream).
    """

    stream_id: int
    status: int
    headers: tuple[Header, ...]
    end_stream: bool
    grpc_status: int | None = None


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


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer finished sending on the stream. Follows the event whose `end_stream` is set:
    act on one or the other, not both."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone. `remote`: the peer sent RST_STREAM (or refused it with its GOAWAY);
    otherwise we reset it because the peer broke a stream-level rule (e.g. window overflow, a
    malformed header block), and `reason` says which when the codec told."""

    stream_id: int
    error_code: int
    remote: bool = True
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY. With NO_ERROR, streams up to `last_stream_id` may still finish;
    with any other code the connection is over and further input is ignored."""

    error_code: int
    last_stream_id: int


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
