"""Sans-io HTTP/2 connections for the L7 proxy on nghttp2 (the C library behind curl, h2load).

`H2ServerConnection` faces the client, `H2ClientConnection` the upstream; both are pure: bytes in
(`receive_data(data, now)`), typed events out (`garrison.parsers.http2`'s event classes), bytes
to write from `data_to_send()`. nghttp2 is reached through a cffi extension built by
`make setup` (`garrison.parsers.nghttp2_build`); a missing or stale build is an ImportError
that names the command to run, never a silent fallback.

What nghttp2 does: framing, HPACK (never-indexed fields stay never-indexed: a field the peer
marked so arrives as a `NeverIndexed` pair and is sent on with NGHTTP2_NV_FLAG_NO_INDEX, as are
`authorization`, `proxy-authorization` and short cookies), stream states, RFC 9113 messaging
rules on received header blocks (a malformed request or response is a stream error: the stream
is reset with PROTOCOL_ERROR and reported as `StreamReset(remote=False)` with nghttp2's
reason), flow-control accounting, GOAWAY (a peer's graceful GOAWAY lets streams up to its
`last_stream_id` finish; ours above it are reported as `StreamReset(REFUSED_STREAM)`).

What this module adds (garrison's own limits, `H2Limits`): the frame-header guard (first frame
SETTINGS, frame size, CONTINUATION count, RST_STREAM and PING/SETTINGS rates, stream errors the
peer provokes counted as resets), the decoded header list size, the bounded outbound queues
(`send_data` sends within the peer's window, queues the rest up to the caps, reports queued
bytes sent later as `DataFlushed`), and manual inbound flow control: windows reopen only when
the engine calls `acknowledge_received_data` (nghttp2 sends the WINDOW_UPDATE once half a window
is consumed, and credits padding itself, so `DataReceived.flow_controlled_length` is the
payload length).

Errors: anything the peer does wrong at connection level raises `H2Error` with the GOAWAY in
`data_to_send()`; misuse by the engine raises `LocalProtocolError`.
"""

from __future__ import annotations

import re
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.grpc import (
    GrpcCall,
    grpc_call,
    grpc_status,
    is_grpc_content_type,
)
from garrison.parsers.http2 import (
    H2_PREFACE,
    ConnectionClosed,
    ConnectionTerminated,
    DataFlushed,
    DataReceived,
    H2Error,
    H2ErrorCode,
    H2Event,
    H2Limits,
    Header,
    NeverIndexed,
    RequestReceived,
    ResponseReceived,
    SendBufferFullError,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)

try:
    from garrison.parsers import _nghttp2  # type: ignore[attr-defined]
except ImportError as _exc:  # pragma: no cover - the message is the point
    raise ImportError(
        f"garrison's nghttp2 binding is not built ({_exc}): run `make setup` (or "
        "`.venv/bin/python -m garrison.parsers.nghttp2_build`)"
    ) from None

from garrison.parsers import nghttp2_build as _build

ffi: Any = _nghttp2.ffi
lib: Any = _nghttp2.lib

if ffi.string(lib.garrison_build_digest()).decode() != _build.digest():
    raise ImportError(
        "garrison's nghttp2 binding is stale (built from other declarations): run `make setup` "
        "(or `.venv/bin/python -m garrison.parsers.nghttp2_build`)"
    )

__all__ = ["H2ClientConnection", "H2ServerConnection"]

HeadersIn = Iterable[tuple[bytes | str, bytes | str]]

_MAX_FRAME_SIZE = 16_384
_ENCODER_TABLE_SIZE = 4_096
_LARGEST_WINDOW = 2**31 - 1
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x5, 0x6, 0x7, 0x9,
)
_FLAG_ACK = 0x1
_FLAG_END_HEADERS = 0x4
_END_STREAM = int(lib.NGHTTP2_FLAG_END_STREAM)
_NO_INDEX = int(lib.NGHTTP2_NV_FLAG_NO_INDEX)
# An HTTP/1.x request line's start (a method token, then a space or not yet anything).
_HTTP1_START = re.compile(rb"[A-Z]{1,20}(?: |$)")
_EOF = int(lib.NGHTTP2_DATA_FLAG_EOF)
_NO_END_STREAM = int(lib.NGHTTP2_DATA_FLAG_NO_END_STREAM)
_ERR_DEFERRED = int(lib.NGHTTP2_ERR_DEFERRED)
_ERR_CALLBACK = int(lib.NGHTTP2_ERR_CALLBACK_FAILURE)
_HCAT_REQUEST = int(lib.NGHTTP2_HCAT_REQUEST)
_CREDENTIAL_FIELDS = frozenset({b"authorization", b"proxy-authorization"})
_CONNECTION_FIELDS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


class _LimitExceeded(Exception):
    def __init__(self, message: str, error_code: int) -> None:
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
    """Reads only the 9-byte frame headers of the inbound byte stream, before nghttp2 sees
    them: CONTINUATION count, RST_STREAM and PING/SETTINGS rates, frame length and SETTINGS as
    the first frame are garrison's limits, checked before a byte is parsed."""

    __slots__ = (
        "_continuations", "_control", "_first_frame", "_head", "_limits", "_preface",
        "_resets", "_skip",
    )

    def __init__(self, limits: H2Limits, *, server: bool) -> None:
        self._limits = limits
        self._preface = len(H2_PREFACE) if server else 0
        self._head = bytearray()
        self._skip = 0
        self._continuations = -1  # -1: not inside a header block
        self._first_frame = True
        self._resets = _RateLimit(limits.max_resets_per_second)
        self._control = _RateLimit(limits.max_control_frames_per_second)

    def scan(self, data: bytes, now: float) -> None:
        pos, end = 0, len(data)
        if self._preface:
            taken = min(self._preface, end)
            seen = len(H2_PREFACE) - self._preface
            if data[:taken] != H2_PREFACE[seen : seen + taken]:
                if _HTTP1_START.match(H2_PREFACE[:seen] + data[:8]):
                    raise _LimitExceeded(
                        "the peer speaks HTTP/1.x, not HTTP/2: this port takes HTTP/2 "
                        "cleartext (h2c) only",
                        H2ErrorCode.PROTOCOL_ERROR,
                    )
                raise _LimitExceeded(
                    "the peer did not send the HTTP/2 client preface",
                    H2ErrorCode.PROTOCOL_ERROR,
                )
            self._preface -= taken
            pos = taken
        while pos < end:
            if self._skip:
                taken = min(self._skip, end - pos)
                self._skip -= taken
                pos += taken
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
            pos += need
            if self._first_frame and head.startswith(b"HTTP/"):
                raise _LimitExceeded(
                    "the peer answered in HTTP/1.x, not HTTP/2: it does not speak HTTP/2 "
                    "cleartext (h2c) with prior knowledge",
                    H2ErrorCode.PROTOCOL_ERROR,
                )
            length = int.from_bytes(head[0:3], "big")
            self._check(length, head[3], head[4], now)
            self._skip = length

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
            self._continuations = -1  # nghttp2 itself rejects an interrupted header block
        if ftype == _RST_STREAM:
            self.count_reset(now)
        if ftype in (_PING, _SETTINGS) and not flags & _FLAG_ACK and not self._control.take(now):
            raise _LimitExceeded(
                f"more than {self._limits.max_control_frames_per_second:g} PING/SETTINGS "
                "frames per second",
                H2ErrorCode.ENHANCE_YOUR_CALM,
            )


@dataclass(slots=True)
class _Outbound:
    """A stream's DATA source: bytes not yet taken by nghttp2, and how the stream ends."""

    buffer: bytearray
    end_stream: bool = False
    trailers: list[Any] | None = None


def _goaway_frame(last_stream_id: int, error_code: int, debug: bytes) -> bytes:
    payload = last_stream_id.to_bytes(4, "big") + int(error_code).to_bytes(4, "big") + debug
    return len(payload).to_bytes(3, "big") + bytes((_GOAWAY, 0)) + b"\0\0\0\0" + payload


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _as_bytes(header: tuple[bytes | str, bytes | str]) -> tuple[bytes, bytes]:
    name, value = header[0], header[1]
    if type(name) is not bytes:
        name = name.encode("utf-8") if isinstance(name, str) else bytes(name)
    if type(value) is not bytes:
        value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return name, value


class _H2Connection:
    _client_side = False

    def __init__(
        self, limits: H2Limits | None = None, *, prevalidated_headers: bool = False
    ) -> None:
        """`prevalidated_headers`: every header block sent was validated on receipt by
        another connection object under the same rules, or is a garrison constant: the
        outbound field checks are skipped (never-indexing credentials is not)."""
        self.limits = limits = limits if limits is not None else H2Limits()
        self.prevalidated_headers = prevalidated_headers
        self._guard = _FrameGuard(limits, server=not self._client_side)
        self._out = bytearray()
        self._send: dict[int, _Outbound] = {}
        self._sendable: set[int] = set()
        self._open: dict[int, None] = {}
        self._buffered_total = 0
        self._unacked: dict[int, int] = {}
        self._reset_ids: OrderedDict[int, None] = OrderedDict()
        self._remote_rst: set[int] = set()
        self._terminated = False
        self._local_goaway: int | None = None
        self._remote_goaway: int | None = None
        self._highest_inbound = 0
        self._highest_outbound = 0
        # per-receive state, filled by the callbacks
        self._events: list[H2Event] = []
        self._flushed: dict[int, int] = {}
        self._fatal: tuple[str, int] | None = None
        self._invalid: str | None = None
        self._invalid_stream: tuple[int, str] | None = None  # the last, for its StreamReset
        self._closing_locally = False
        self._now = 0.0
        self._bufp = ffi.new("const uint8_t **")
        self._provider = ffi.new("nghttp2_data_provider *")
        self._provider.read_callback = lib.garrison_read_data

        handle = ffi.new_handle(self)
        block = lib.garrison_block_new(handle, limits.max_header_list_size)
        if block == ffi.NULL:
            raise MemoryError("garrison_block_new")
        self._block = block
        cbs = ffi.new("nghttp2_session_callbacks **")
        if lib.nghttp2_session_callbacks_new(cbs) != 0:
            raise MemoryError("nghttp2_session_callbacks_new")
        cb = cbs[0]
        # Header fields are collected in C (garrison_block, nghttp2_build.py) and read here
        # once per header block.
        on_begin = ffi.addressof(lib, "garrison_on_begin_headers_c")
        lib.nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin)
        on_header = ffi.addressof(lib, "garrison_on_header_c")
        lib.nghttp2_session_callbacks_set_on_header_callback(cb, on_header)
        # So are a DATA frame's chunks, read once per frame (`_on_data`).
        on_chunk = ffi.addressof(lib, "garrison_on_data_chunk_c")
        lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_chunk)
        on_begin_frame = ffi.addressof(lib, "garrison_on_begin_frame_c")
        lib.nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame)
        # C filters in front of the Python callbacks: only DATA, HEADERS, RST_STREAM and
        # GOAWAY received, RST_STREAM and GOAWAY sent, reach Python.
        on_recv = ffi.addressof(lib, "garrison_on_frame_recv_c")
        lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_recv)
        on_send = ffi.addressof(lib, "garrison_on_frame_send_c")
        lib.nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_send)
        lib.nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(
            cb, lib.garrison_on_invalid_frame
        )
        lib.nghttp2_session_callbacks_set_on_stream_close_callback(cb, lib.garrison_on_stream_close)
        opts = ffi.new("nghttp2_option **")
        if lib.nghttp2_option_new(opts) != 0:
            lib.nghttp2_session_callbacks_del(cb)
            raise MemoryError("nghttp2_option_new")
        opt = opts[0]
        lib.nghttp2_option_set_no_auto_window_update(opt, 1)
        lib.nghttp2_option_set_peer_max_concurrent_streams(opt, 100)
        lib.nghttp2_option_set_max_deflate_dynamic_table_size(opt, _ENCODER_TABLE_SIZE)
        # garrison's guard counts CONTINUATION frames first and answers ENHANCE_YOUR_CALM
        lib.nghttp2_option_set_max_continuations(opt, limits.max_continuation_frames + 1)
        lib.nghttp2_option_set_no_closed_streams(opt, 1)
        # nghttp2's rapid-reset guard (1000 streams, then 33/s) would end a legitimate busy
        # connection before garrison's own limit (max_resets_per_second) is reached: it is
        # set above that limit, so garrison's typed ENHANCE_YOUR_CALM answers first.
        rate = int(limits.max_resets_per_second) * 2 + 1
        lib.nghttp2_option_set_stream_reset_rate_limit(opt, rate * 10, rate)
        session = ffi.new("nghttp2_session **")
        new = (
            lib.nghttp2_session_client_new2
            if self._client_side
            else lib.nghttp2_session_server_new2
        )
        rv = new(session, cb, block, opt)
        lib.nghttp2_session_callbacks_del(cb)
        lib.nghttp2_option_del(opt)
        if rv != 0:
            lib.garrison_block_free(block)
            raise MemoryError(f"nghttp2_session_new: {ffi.string(lib.nghttp2_strerror(rv))!r}")
        # The session is freed when this object is; the destructor keeps the handle and the
        # block alive until then, so no callback can ever see either freed.
        self._session = ffi.gc(session[0], lambda s, _h=handle, _b=block: _free(s, _b))
        _connections[ffi.cast("void *", block)] = weakref.ref(self)
        entries = (
            (lib.NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
            (lib.NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
            (lib.NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, limits.initial_window_size),
            (lib.NGHTTP2_SETTINGS_ENABLE_PUSH, 0),
        )
        iv = ffi.new("nghttp2_settings_entry[]", len(entries))
        for i, (sid, value) in enumerate(entries):
            iv[i].settings_id = sid
            iv[i].value = value
        self._check(lib.nghttp2_submit_settings(self._session, 0, iv, len(entries)))
        self._check(
            lib.nghttp2_session_set_local_window_size(
                self._session, 0, 0, limits.connection_window_size
            )
        )
        self._pump()

    # -- state ----------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """A GOAWAY was sent or received, or the connection failed: open no new streams."""
        return self._terminated or self._local_goaway is not None or self._remote_goaway is not None

    @property
    def terminated(self) -> bool:
        return self._terminated

    @property
    def open_streams(self) -> tuple[int, ...]:
        return tuple(self._open)

    def buffered_bytes(self, stream_id: int) -> int:
        out = self._send.get(stream_id)
        return len(out.buffer) if out is not None else 0

    @property
    def buffered_bytes_total(self) -> int:
        return self._buffered_total

    def send_capacity(self, stream_id: int) -> int:
        """How many bytes `send_data(stream_id, ...)` accepts now without raising."""
        window = 0 if self.buffered_bytes(stream_id) else self._window(stream_id)
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
            self._drop_queues()
            return [ConnectionClosed(open_streams)]
        try:
            self._guard.scan(data, now)
        except _LimitExceeded as exc:
            raise self._fail(exc.message, exc.error_code) from None
        self._now = now
        events = self._events = []
        rv = lib.nghttp2_session_mem_recv(self._session, data, len(data))
        if self._fatal is not None:
            raise self._fail(*self._fatal)
        if rv < 0 and self._block.oversize:
            raise self._fail(
                f"header list larger than {self.limits.max_header_list_size} bytes",
                H2ErrorCode.ENHANCE_YOUR_CALM,
            )
        if rv < 0:
            raise self._fail(self._lib_error(rv), self._error_code(rv))
        self._pump()
        if self._fatal is not None:
            if self._terminated:  # nghttp2 sent its GOAWAY
                raise H2Error(*self._fatal)
            raise self._fail(*self._fatal)
        if self._flushed:
            for sid, n in self._flushed.items():
                events.append(DataFlushed(sid, n, self.buffered_bytes(sid)))
            self._flushed.clear()
        self._events = []
        return events

    # -- output ---------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything to write to the peer now, in order."""
        self._pump()
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_headers(self, stream_id: int, headers: HeadersIn, end_stream: bool = False) -> None:
        """Send a header block: request or response headers, or trailers with end_stream.
        A stream reset by either side meanwhile is ignored silently; so is every send on a
        connection that is over."""
        if self._dead(stream_id):
            return
        if self.closing and not self._known(stream_id):
            raise LocalProtocolError("connection is closing: no new streams")
        # Checked and made bytes here only when not pre-validated; `_submit_headers` turns
        # text into bytes in its own pass.
        fields = list(headers) if self.prevalidated_headers else self._outbound(headers)
        out = self._send.get(stream_id)
        if out is not None:
            if not end_stream:
                raise LocalProtocolError(f"stream {stream_id}: headers after queued data")
            if out.end_stream or out.trailers is not None:
                raise LocalProtocolError(
                    f"stream {stream_id}: trailers after the end of the stream"
                )
            out.trailers = fields
            lib.nghttp2_session_resume_data(self._session, stream_id)
            self._pump()  # out now if the queue is empty: a reset may follow at once
            return
        outbound = stream_id % 2 == int(self._client_side)
        if outbound and stream_id > self._highest_outbound:
            if not self._client_side:
                raise LocalProtocolError(f"stream {stream_id} never existed")
            if stream_id != lib.nghttp2_session_get_next_stream_id(self._session):
                raise LocalProtocolError(f"stream {stream_id} is not the next stream id")
            submitted = self._submit_headers(-1, fields, end_stream)
            self._highest_outbound = submitted
            self._open[submitted] = None
            if not end_stream:
                self._sendable.add(submitted)
            return
        if stream_id not in self._sendable:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        self._submit_headers(stream_id, fields, end_stream)
        if end_stream:
            self._sendable.discard(stream_id)

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
        if out is None and stream_id not in self._sendable:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        if not data and not end_stream:
            return 0
        if data:
            window = 0 if out is not None and out.buffer else self._window(stream_id)
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
            out = self._send[stream_id] = _Outbound(bytearray(data), end_stream)
            rv = lib.nghttp2_submit_data(self._session, _END_STREAM, stream_id, self._provider)
            if rv != 0:
                del self._send[stream_id]
                raise LocalProtocolError(f"stream {stream_id}: {self._lib_error(rv)}")
        else:
            out.buffer += data
            out.end_stream = end_stream
            lib.nghttp2_session_resume_data(self._session, stream_id)
        self._buffered_total += len(data)
        if end_stream:
            self._sendable.discard(stream_id)
        self._pump()
        return self._flushed.pop(stream_id, 0)

    def reset_stream(self, stream_id: int, error_code: int = H2ErrorCode.CANCEL) -> None:
        """RST_STREAM; queued data of the stream is dropped. A closed stream is left alone."""
        if self._terminated or stream_id in self._reset_ids:
            return
        if not self._known(stream_id):
            raise LocalProtocolError(f"reset of stream {stream_id}, which never existed")
        self._forget(stream_id)
        if stream_id in self._open:
            self._check(lib.nghttp2_submit_rst_stream(self._session, 0, stream_id, error_code))

    def close(
        self, error_code: int = H2ErrorCode.NO_ERROR, last_stream_id: int | None = None
    ) -> None:
        """GOAWAY. NO_ERROR is graceful: streams up to `last_stream_id` (default: the last
        the peer opened) may finish, newer ones from the peer are refused. Any other code
        ends the connection: write `data_to_send()` and close the socket."""
        if self._terminated or self._local_goaway is not None:
            return
        last = self._highest_inbound if last_stream_id is None else last_stream_id
        self._closing_locally = True
        if error_code == H2ErrorCode.NO_ERROR:
            self._check(lib.nghttp2_submit_goaway(self._session, 0, last, 0, ffi.NULL, 0))
            self._local_goaway = last
        else:
            self._check(lib.nghttp2_session_terminate_session2(self._session, last, error_code))
            self._pump()
            self._terminated = True
            self._drop_queues()

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """The other side has taken `n` bytes of `stream_id`: reopen the windows (nghttp2
        sends the WINDOW_UPDATE once half a window is consumed). Acknowledging more than is
        outstanding (e.g. after the stream was reset and credited) is harmless."""
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
        lib.nghttp2_session_consume(self._session, stream_id, n)

    def open_window(self, stream_id: int, n: int) -> None:
        """Let the peer send `n` bytes on `stream_id` without waiting for a WINDOW_UPDATE, and
        `n` more on the connection: for a body the engine throws away as it comes (a denied
        request's), as nginx opens a discarded body's windows. A closed or reset stream is
        ignored."""
        if self._dead(stream_id) or n <= 0 or stream_id not in self._open:
            return
        s = self._session
        conn = lib.nghttp2_session_get_effective_local_window_size(s)
        if conn >= 0:
            lib.nghttp2_session_set_local_window_size(s, 0, 0, min(_LARGEST_WINDOW, conn + n))
        size = lib.nghttp2_session_get_stream_effective_local_window_size(s, stream_id)
        used = lib.nghttp2_session_get_stream_effective_recv_data_length(s, stream_id)
        if size >= 0 and used >= 0 and size - used < n:
            lib.nghttp2_session_set_local_window_size(
                s, 0, stream_id, min(_LARGEST_WINDOW, used + n)
            )

    # -- callbacks (from nghttp2, through the extern "Python" functions below) ------------------

    def _on_headers(self, sid: int, cat: int, end: bool) -> None:
        block = self._block
        n = block.count
        blob = ffi.buffer(block.buf, block.len)[:]
        lengths = ffi.unpack(block.lengths, 2 * n)
        flags = ffi.buffer(block.flags, n)[:]
        fields: list[Header] = []
        pos = 0
        for i in range(n):
            end_name = pos + lengths[2 * i]
            end_value = end_name + lengths[2 * i + 1]
            pair = (blob[pos:end_name], blob[end_name:end_value])
            fields.append(NeverIndexed(pair) if flags[i] & _NO_INDEX else pair)
            pos = end_value
        headers = tuple(fields)
        if cat == _HCAT_REQUEST and sid > self._highest_inbound:
            self._highest_inbound = sid
            self._open[sid] = None
            self._sendable.add(sid)
        if sid in self._reset_ids:
            return
        if cat == _HCAT_REQUEST:
            if self._local_goaway is not None and sid > self._local_goaway:
                # Crossed our graceful GOAWAY: never processed, safe to retry elsewhere.
                self._forget(sid)
                lib.nghttp2_submit_rst_stream(self._session, 0, sid, H2ErrorCode.REFUSED_STREAM)
                return
            self._events.append(self._request(sid, headers, end))
        elif headers and headers[0][0] == b":status":
            self._events.append(self._response(sid, headers, end))
        else:
            trailer = dict(headers)
            self._events.append(
                TrailersReceived(
                    sid,
                    headers,
                    grpc_status(trailer.get(b"grpc-status")),
                )
            )
        if end:
            self._events.append(StreamEnded(sid))

    def _on_data(self, sid: int, end: bool) -> None:
        n = self._block.data_len
        data = ffi.buffer(self._block.data, n)[:] if n else b""
        if sid in self._reset_ids:
            if n:
                lib.nghttp2_session_consume_connection(self._session, n)
            return
        if n:
            self._unacked[sid] = self._unacked.get(sid, 0) + n
        if n or end:
            self._events.append(DataReceived(sid, data, n, end))
        if end:
            self._events.append(StreamEnded(sid))

    def _on_goaway(self, code: int, last: int) -> None:
        self._remote_goaway = last
        self._events.append(ConnectionTerminated(code, last))
        if code != H2ErrorCode.NO_ERROR:
            self._terminated = True

    def _on_stream_close(self, sid: int, code: int) -> int:
        self._open.pop(sid, None)
        self._sendable.discard(sid)
        remote = sid in self._remote_rst
        self._remote_rst.discard(sid)
        if sid in self._reset_ids:
            return 0
        refused = (
            self._remote_goaway is not None
            and sid > self._remote_goaway
            and sid % 2 == int(self._client_side)
        )
        if remote or refused or code != H2ErrorCode.NO_ERROR:
            self._forget(sid)
            invalid = self._invalid_stream
            reason = ""
            if invalid is not None and invalid[0] == sid:
                reason = invalid[1]
                self._invalid_stream = None
            self._events.append(StreamReset(sid, code, remote or refused, reason))
        else:
            self._credit(sid)
        return 0

    def _on_rst_sent(self, sid: int) -> int:
        if sid in self._reset_ids:
            return 0  # the engine asked for it
        # nghttp2 reset (or refused) a stream because of the peer (MadeYouReset,
        # CVE-2025-8671): counted with the peer's own resets.
        try:
            self._guard.count_reset(self._now)
        except _LimitExceeded as exc:
            self._fatal = (exc.message, exc.error_code)
            return _ERR_CALLBACK
        return 0

    def _on_goaway_sent(self, code: int, debug: bytes) -> None:
        if self._closing_locally or code == H2ErrorCode.NO_ERROR:
            return
        reason = debug.decode("ascii", "replace") or self._invalid or H2ErrorCode(code).name
        self._fatal = (reason, code)
        self._terminated = True
        self._drop_queues()

    def _read(self, sid: int, buf: Any, length: int, flags: Any) -> int:
        out = self._send.get(sid)
        if out is None:
            flags[0] = _EOF
            return 0
        n = min(len(out.buffer), length)
        if n:
            ffi.memmove(buf, out.buffer, n)
            del out.buffer[:n]
            self._buffered_total -= n
            self._flushed[sid] = self._flushed.get(sid, 0) + n
        if not out.buffer:
            if out.trailers is not None:
                flags[0] = _EOF | _NO_END_STREAM
                del self._send[sid]
                self._submit_headers(sid, out.trailers, True)  # nghttp2's submit_trailer
                self._sendable.discard(sid)
            elif out.end_stream:
                flags[0] = _EOF
                del self._send[sid]
            elif not n:
                return _ERR_DEFERRED
        return n

    # -- helpers --------------------------------------------------------------------------------

    def _pump(self) -> None:
        s, bufp, out = self._session, self._bufp, self._out
        while True:
            n = lib.nghttp2_session_mem_send(s, bufp)
            if n > 0:
                out += ffi.buffer(bufp[0], n)
            elif n == 0:
                return
            else:
                if self._fatal is None:
                    self._fatal = (self._lib_error(n), self._error_code(n))
                return

    def _submit_headers(
        self, stream_id: int, fields: list[Any], end_stream: bool
    ) -> int:
        parts: list[bytes] = []
        lengths: list[int] = []
        flags = bytearray(len(fields))
        for i, header in enumerate(fields):
            name, value = header
            if type(name) is not bytes or type(value) is not bytes:
                name, value = _as_bytes(header)
            parts += (name, value)
            lengths += (len(name), len(value))
            if (
                type(header) is NeverIndexed
                or name in _CREDENTIAL_FIELDS
                or (name == b"cookie" and len(value) < 20)
            ):
                flags[i] = _NO_INDEX
        rv = lib.garrison_submit_headers(
            self._session, _END_STREAM if end_stream else 0, stream_id, b"".join(parts),
            lengths, bytes(flags), len(fields),
        )
        if rv < 0:
            raise LocalProtocolError(f"stream {stream_id}: {self._lib_error(rv)}")
        return int(rv)

    def _outbound(self, headers: HeadersIn) -> list[Header]:
        """The fields as bytes pairs (a `NeverIndexed` stays one), checked as RFC 9113 §8.2
        wants them sent: nghttp2 sends what it is given."""
        out: list[Header] = []
        for header in headers:
            if type(header[0]) is bytes and type(header[1]) is bytes:
                out.append(header)  # type: ignore[arg-type]
            else:
                pair = _as_bytes(header)
                out.append(NeverIndexed(pair) if type(header) is NeverIndexed else pair)
        for name, value in out:
            bare = name[1:] if name[:1] == b":" else name
            if not bare or not lib.nghttp2_check_header_name(bare, len(bare)):
                raise LocalProtocolError(f"invalid header field name {name!r}")
            if not lib.nghttp2_check_header_value(value, len(value)) or (
                value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t")
            ):
                raise LocalProtocolError(f"invalid value of header field {name!r}")
            if name in _CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
                raise LocalProtocolError(f"connection-specific header field {name!r}")
        return out

    def _window(self, stream_id: int) -> int:
        """The peer's window for a stream we may send DATA on; LocalProtocolError otherwise."""
        if stream_id not in self._sendable and stream_id not in self._send:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        window = lib.nghttp2_session_get_stream_remote_window_size(self._session, stream_id)
        if window < 0:  # a request not serialized yet: nghttp2 opens the stream when it is
            self._pump()
            window = lib.nghttp2_session_get_stream_remote_window_size(self._session, stream_id)
        return max(0, int(window))

    def _known(self, stream_id: int) -> bool:
        if stream_id % 2 == int(self._client_side):
            return 0 < stream_id <= self._highest_outbound
        return 0 < stream_id <= self._highest_inbound

    def _dead(self, stream_id: int) -> bool:
        return self._terminated or stream_id in self._reset_ids

    def _forget(self, stream_id: int) -> None:
        """The stream was reset: drop its queue, credit its unacknowledged bytes."""
        out = self._send.pop(stream_id, None)
        if out is not None:
            self._buffered_total -= len(out.buffer)
        self._sendable.discard(stream_id)
        self._reset_ids[stream_id] = None
        while len(self._reset_ids) > self.limits.max_closed_streams:
            self._reset_ids.popitem(last=False)
        self._credit(stream_id)

    def _credit(self, stream_id: int) -> None:
        n = self._unacked.pop(stream_id, 0)
        if n and not self._terminated:
            lib.nghttp2_session_consume_connection(self._session, n)

    def _drop_queues(self) -> None:
        self._send.clear()
        self._buffered_total = 0

    def _fail(self, message: str, code: int) -> H2Error:
        if not self._terminated:
            self._out += _goaway_frame(
                self._highest_inbound, code, message.encode("ascii", "replace")[:128]
            )
        self._terminated = True
        self._drop_queues()
        return H2Error(message, int(code))

    def _check(self, rv: int) -> None:
        if rv < 0:
            raise LocalProtocolError(self._lib_error(rv))

    @staticmethod
    def _lib_error(rv: int) -> str:
        return f"nghttp2: {ffi.string(lib.nghttp2_strerror(rv)).decode()}"

    @staticmethod
    def _error_code(rv: int) -> int:
        if rv == lib.NGHTTP2_ERR_FLOODED:
            return H2ErrorCode.ENHANCE_YOUR_CALM
        if rv == lib.NGHTTP2_ERR_BAD_CLIENT_MAGIC:
            return H2ErrorCode.PROTOCOL_ERROR
        return H2ErrorCode.INTERNAL_ERROR

    def _request(self, sid: int, headers: tuple[Header, ...], end: bool) -> RequestReceived:
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
            stream_id=sid,
            method=method,
            scheme=_latin1(pseudo.get(b":scheme")),
            authority=_latin1(pseudo.get(b":authority", host)),
            path=path,
            headers=headers,
            end_stream=end,
            grpc=call,
            grpc_error=error,
        )

    @staticmethod
    def _response(sid: int, headers: tuple[Header, ...], end: bool) -> ResponseReceived:
        fields = dict(headers)
        status_raw = fields.get(b":status", b"0")
        return ResponseReceived(
            sid,
            int(status_raw) if status_raw.isdigit() else 0,
            headers,
            end,
            grpc_status(fields.get(b"grpc-status")) if end else None,
        )


class H2ServerConnection(_H2Connection):
    """Faces the client: receives requests, sends responses (and deny answers)."""

    _client_side = False

    def send_trailers_only(self, stream_id: int, headers: HeadersIn) -> None:
        """A complete response in ONE HEADERS frame with END_STREAM: gRPC's trailers-only
        form (`:status`, content-type, grpc-status, grpc-message), used for deny answers."""
        self.send_headers(stream_id, headers, end_stream=True)


class H2ClientConnection(_H2Connection):
    """Faces the upstream: sends requests (the allowed ones), receives responses."""

    _client_side = True

    @property
    def available_streams(self) -> int:
        """How many more streams the upstream allows right now (its MAX_CONCURRENT_STREAMS)."""
        if self.closing:
            return 0
        limit = lib.nghttp2_session_get_remote_settings(
            self._session, lib.NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        )
        return max(0, int(limit) - len(self._open))  # a client opens only odd streams

    def new_stream(self) -> int:
        """The id for the next request; open it with `send_headers` before calling again."""
        if self.closing:
            raise LocalProtocolError("connection is closing: no new streams")
        if not self.available_streams:
            raise LocalProtocolError("upstream's MAX_CONCURRENT_STREAMS reached")
        return int(lib.nghttp2_session_get_next_stream_id(self._session))

    def send_request(self, headers: HeadersIn, end_stream: bool = False) -> int:
        """Open a stream with `headers`; returns its id."""
        stream_id = self.new_stream()
        self.send_headers(stream_id, headers, end_stream)
        return stream_id


# ---- the callbacks nghttp2 calls ----------------------------------------------------------------
# Each finds its connection object from the session's user data; an exception must not cross
# into C, so it fails the session (the connection then raises H2Error with the cause).


# The connection object of a session's user data (its garrison_block): a dict lookup is five
# times cheaper than reading the handle through a cast, and callbacks are frequent.
_connections: dict[Any, weakref.ref[_H2Connection]] = {}


def _free(session: Any, block: Any) -> None:
    lib.nghttp2_session_del(session)
    _connections.pop(ffi.cast("void *", block), None)
    lib.garrison_block_free(block)


def _me(user: Any) -> Any:
    ref = _connections.get(user)
    me = ref() if ref is not None else None
    return me if me is not None else ffi.from_handle(ffi.cast("garrison_block *", user).handle)


def _guarded_failure(me: _H2Connection, exc: BaseException) -> int:
    me._fatal = (f"internal error in the HTTP/2 codec: {type(exc).__name__}: {exc}",
                 H2ErrorCode.INTERNAL_ERROR)
    return _ERR_CALLBACK


@ffi.def_extern()  # type: ignore[untyped-decorator]
def garrison_on_stream_frame(user: Any, ftype: int, sid: int, flags: int, cat: int) -> int:
    """A DATA, HEADERS (`cat`: nghttp2's header category) or RST_STREAM frame received."""
    me: _H2Connection = _me(user)
    try:
        if ftype == _DATA:
            me._on_data(sid, bool(flags & _END_STREAM))
        elif ftype == _HEADERS:
            me._on_headers(sid, cat, bool(flags & _END_STREAM))
        else:
            me._remote_rst.add(sid)
    except Exception as exc:
        return _guarded_failure(me, exc)
    return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def garrison_on_frame_recv(session: Any, frame: Any, user: Any) -> int:
    """A GOAWAY received (the only other frame the C filter passes on)."""
    me: _H2Connection = _me(user)
    try:
        g = frame.goaway
        me._on_goaway(g.error_code, g.last_stream_id)
    except Exception as exc:
        return _guarded_failure(me, exc)
    return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def garrison_on_frame_send(session: Any, frame: Any, user: Any) -> int:
    if frame.hd.type == _RST_STREAM:
        me_: _H2Connection = _me(user)
        return me_._on_rst_sent(frame.hd.stream_id)
    if frame.hd.type == _GOAWAY:
        me: _H2Connection = _me(user)
        g = frame.goaway
        debug = ffi.buffer(g.opaque_data, g.opaque_data_len)[:] if g.opaque_data_len else b""
        me._on_goaway_sent(g.error_code, debug)
    return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def garrison_on_invalid_frame(session: Any, frame: Any, error: int, user: Any) -> int:
    me: _H2Connection = _me(user)
    me._invalid = ffi.string(lib.nghttp2_strerror(error)).decode()
    if frame.hd.stream_id:
        me._invalid_stream = (frame.hd.stream_id, me._invalid)
    return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def garrison_on_stream_close(session: Any, sid: int, code: int, user: Any) -> int:
    me: _H2Connection = _me(user)
    try:
        return me._on_stream_close(sid, code)
    except Exception as exc:
        return _guarded_failure(me, exc)


@ffi.def_extern()  # type: ignore[untyped-decorator]
def garrison_read_data(
    session: Any, sid: int, buf: Any, length: int, flags: Any, source: Any, user: Any
) -> int:
    me: _H2Connection = _me(user)
    try:
        return me._read(sid, buf, length, flags)
    except Exception as exc:
        return _guarded_failure(me, exc)
