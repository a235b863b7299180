"""Sans-io Kafka parser: bytes from a client or a broker in, typed request/response events out.

Framing is Kafka's: a 4-byte big-endian size, then the message. Requests start with a request
header (v0/v1/v2 by API key and version: flexible versions use v2 with tagged fields), responses
with a response header (v0, or v1 with tagged fields for flexible versions, except ApiVersions
which always answers with v0). Bodies are decoded with kafka-python's protocol classes, every
version they know, flexible versions included.

    parser = KafkaRequestParser(KafkaLimits(), topic_ids=registry)
    parser.receive_data(chunk)          # b"" = end of stream
    while (request := parser.next_event()) is not None:
        ...                             # decide, forward request.raw unchanged or deny

A request whose API key kafka-python has no class for (librdkafka's GetTelemetrySubscriptions,
71) becomes a header-only event (`decoded is None`), decided on its header: never a crash.
A known key at a version kafka-python does not know is a protocol error, as it is for a Kafka
broker (which closes the connection), except ApiVersions: clients send their newest ApiVersions
first and expect an UNSUPPORTED_VERSION answer, so it stays a header-only event.

Every length and count is checked against the schema and the frame before kafka-python reads
it (`garrison.parsers.kafka_lengths`): one the protocol cannot carry (negative other than -1,
null where the schema allows none, past the end, more elements than the frame could hold, an
overflowing varint) is a `KafkaLengthError`, never "empty".

Every malformed input raises a `KafkaError` (a `RemoteProtocolError`), from `next_event()` /
`events()` at the position of the bad frame, in stream order. Buffers are bounded: a frame
header is checked as soon as its 4 bytes arrive, and at most one partial frame (of at most
the configured maximum size) is buffered; after an error the parser buffers nothing more.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from garrison.parsers.errors import LocalProtocolError, RemoteProtocolError
from garrison.parsers.kafka_apis import (
    API_VERSIONS,
    API_VERSIONS_FIRST_FLEXIBLE,
    PRODUCE,
    TOPICLESS_WITHOUT_CLASS,
    kafka_api,
    request_codec,
    response_codec,
)
from garrison.parsers.kafka_lengths import LengthError, skip_tagged_fields
from garrison.parsers.kafka_topics import (
    KafkaBrokerAddress,
    KafkaCluster,
    TopicIdRegistry,
    request_topics,
)

__all__ = [
    "KafkaBrokerAddress",
    "KafkaCluster",
    "KafkaCorrelationError",
    "KafkaDecodeError",
    "KafkaError",
    "KafkaFrameSizeError",
    "KafkaLengthError",
    "KafkaLimits",
    "KafkaRequest",
    "KafkaRequestParser",
    "KafkaResponse",
    "KafkaResponseParser",
    "KafkaTruncatedError",
    "KafkaUnsupportedVersionError",
    "TopicIdRegistry",
    "decode_response_body",
    "parse_request_frame",
]

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class KafkaLimits:
    """Bounds of one connection's parsers.

    `max_request_frame`: largest request accepted (Kafka's `socket.request.max.bytes`,
    100 MiB by default). `max_request_elements`: most array elements and record batches one
    request may hold in all (each costs a Python object to decode; 250,000 is about half a
    second of CPU, and more than the partitions any client fetches or commits in one request;
    a 100 MiB request of tiny entries would otherwise hold 26 million).
    `max_response_frame`: largest response (clients' `receive.message.max.bytes`, 100 MB by
    default). `max_in_flight`: requests forwarded and not
    answered yet. `max_unanswered_acks0`: Produce requests with acks=0 remembered in case the
    broker answers them after all (Kafka never does, tansu does). `repeat_window`: seconds
    during which denials identical to an earlier one on the same connection are counted into
    one record (Hubble's `aggregate`) instead of one record each; 0 records every one.
    """

    max_request_frame: int = 100 * _MIB
    max_request_elements: int = 250_000
    max_response_frame: int = 100 * _MIB
    max_in_flight: int = 1024
    max_unanswered_acks0: int = 64
    repeat_window: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "max_request_frame", "max_request_elements", "max_response_frame", "max_in_flight"
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_unanswered_acks0 < 0:
            raise ValueError("max_unanswered_acks0 must not be negative")
        if self.repeat_window < 0:
            raise ValueError("repeat_window must not be negative")


# ---- errors -----------------------------------------------------------------------------------


class KafkaError(RemoteProtocolError):
    """The peer's bytes are not Kafka as garrison accepts it. The connection must close."""


class KafkaFrameSizeError(KafkaError):
    """A frame size is negative, too small for a header, or larger than the configured limit."""


class KafkaTruncatedError(KafkaError):
    """The stream ended inside a frame."""


class KafkaDecodeError(KafkaError):
    """A frame's header or body does not decode (garbage, or sizes that lie)."""


class KafkaLengthError(KafkaDecodeError):
    """A length or count the protocol cannot carry: negative other than -1 (null), null where
    the schema allows none, past the end of the frame, more elements than the bytes left could
    hold, a varint that overflows (`garrison.parsers.kafka_lengths`). Never read as "empty"."""


class KafkaUnsupportedVersionError(KafkaError):
    """A known API key at a version kafka-python cannot decode."""


class KafkaCorrelationError(KafkaError):
    """A response that does not answer the oldest request in flight."""


# ---- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KafkaRequest:
    """One request frame from a client.

    `topics`: the topic names the request acts on (ids resolved), in order, no duplicates.
    `all_topics`: Metadata for every topic (a null topic list; v0: an empty one).
    `unresolved_topic_ids`: topic ids the registry did not know when the request arrived.
    `topics_unknown`: the request may act on topics that could not be read: its body was not
    decoded (`decoded is None`, except for keys known to name no topic) or it asks for "every
    topic" outside Metadata. With `unresolved_topic_ids`, only a rule allowing any topic may
    allow it (`topics_complete` is False).
    `acks`: Produce only; 0 means the client expects no response.
    `raw`: the whole frame as received, size prefix included, for forwarding unchanged.
    `decoded`: the kafka-python request object (without header), None for a header-only event.
    """

    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    topics: tuple[str, ...] = ()
    all_topics: bool = False
    unresolved_topic_ids: tuple[UUID, ...] = ()
    topics_unknown: bool = False
    acks: int | None = None
    raw: bytes = field(default=b"", repr=False)
    decoded: Any = field(default=None, repr=False, hash=False)

    def __init__(
        self,
        api_key: int,
        api_version: int,
        correlation_id: int,
        client_id: str | None,
        topics: tuple[str, ...] = (),
        all_topics: bool = False,
        unresolved_topic_ids: tuple[UUID, ...] = (),
        topics_unknown: bool = False,
        acks: int | None = None,
        raw: bytes = b"",
        decoded: Any = None,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "api_key", api_key)
        object.__setattr__(self, "api_version", api_version)
        object.__setattr__(self, "correlation_id", correlation_id)
        object.__setattr__(self, "client_id", client_id)
        object.__setattr__(self, "topics", topics)
        object.__setattr__(self, "all_topics", all_topics)
        object.__setattr__(self, "unresolved_topic_ids", unresolved_topic_ids)
        object.__setattr__(self, "topics_unknown", topics_unknown)
        object.__setattr__(self, "acks", acks)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "decoded", decoded)

    @property
    def expects_response(self) -> bool:
        return self.acks != 0

    @property
    def topics_complete(self) -> bool:
        """Every topic the request acts on is in `topics` (or it asks for all, Metadata)."""
        return not self.topics_unknown and not self.unresolved_topic_ids


@dataclass(frozen=True, slots=True)
class KafkaResponse:
    """One response frame from the broker, matched to the request it answers.

    `decoded`: the kafka-python response object (without header); None where the request was
    header-only or the caller did not ask for this API's responses to be decoded.
    `unsolicited`: the broker answered a Produce with acks=0. Kafka never does, tansu does;
    the client does not expect the answer, so it must not be forwarded.
    """

    request: KafkaRequest
    correlation_id: int
    raw: bytes = field(repr=False)
    decoded: Any = field(default=None, repr=False, hash=False)

    def __init__(
        self,
        request: KafkaRequest,
        correlation_id: int,
        raw: bytes,
        decoded: Any = None,
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "request", request)
        object.__setattr__(self, "correlation_id", correlation_id)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "decoded", decoded)

    @property
    def unsolicited(self) -> bool:
        return not self.request.expects_response

    @property
    def error_code(self) -> int | None:
        """The response's top-level error code, else the first non-zero one of its topics or
        partitions (0 if none); None if not decoded."""
        if self.decoded is None:
            return None
        return _first_error_code(self.decoded, depth=3)


def _first_error_code(node: Any, depth: int) -> int:
    code = getattr(node, "error_code", None)
    if isinstance(code, int) and code != 0:
        return code
    if depth == 0:
        return 0
    for name in node.fields:
        value = getattr(node, name)
        if isinstance(value, list) and value and hasattr(value[0], "fields"):
            for element in value:
                found = _first_error_code(element, depth - 1)
                if found:
                    return found
    return 0


# ---- framing ----------------------------------------------------------------------------------

_SIZE = struct.Struct(">i")
_REQUEST_HEADER = struct.Struct(">hhih")  # api key, api version, correlation id, client id len
_MIN_REQUEST = _REQUEST_HEADER.size
_MIN_RESPONSE = 4  # correlation id
_COMPACT_AT = 64 * 1024


class _FrameReader:
    """Splits a byte stream into size-prefixed frames, bounded by `max_frame`.

    A read that is exactly one whole frame, with nothing buffered before it (a client waiting
    for each answer, the broker answering it), is handed out as it came, without going through
    the buffer; anything else is buffered and cut there.
    """

    def __init__(self, max_frame: int, min_frame: int, peer: str) -> None:
        self._max = max_frame
        self._min = min_frame
        self._peer = peer
        self._whole: bytes | None = None  # one whole frame as read, not buffered
        self._buffer = bytearray()
        self._start = 0  # first byte of the next frame to hand out
        self._checked = 0  # first byte whose frame header has not been validated yet
        self._error: KafkaError | None = None
        self._error_at = -1  # where the frame with the bad header starts
        self.eof = False

    @property
    def buffered(self) -> int:
        whole = self._whole
        return len(self._buffer) - self._start + (len(whole) if whole is not None else 0)

    def feed(self, data: bytes) -> None:
        if self.eof:
            raise LocalProtocolError("receive_data() after end of stream")
        if not data:
            self.eof = True
            return
        if self._error is not None:
            return  # nothing more is read after a bad frame header
        whole = self._whole
        if whole is not None:  # not handed out yet: it goes first
            self._whole = None
            self._buffer += whole
        elif not self._buffer and len(data) >= 4 and type(data) is bytes:
            (size,) = _SIZE.unpack_from(data, 0)
            if len(data) == 4 + size and self._min <= size <= self._max:
                self._whole = data
                return
        self._buffer += data
        self._check_headers()

    def _check_headers(self) -> None:
        buffer = self._buffer
        while len(buffer) - self._checked >= 4:
            (size,) = _SIZE.unpack_from(buffer, self._checked)
            if size < self._min or size > self._max:
                self._error = KafkaFrameSizeError(
                    f"{self._peer} frame size {size} outside [{self._min}, {self._max}]"
                )
                self._error_at = self._checked
                del buffer[self._checked + 4 :]  # keep nothing past the bad header
                return
            if len(buffer) - self._checked < 4 + size:
                return
            self._checked += 4 + size

    def next_frame(self) -> bytes | None:
        """The next whole frame (size prefix included); None if more bytes are needed."""
        whole = self._whole
        if whole is not None:
            self._whole = None
            return whole
        if self._start == self._error_at and self._error is not None:
            raise self._error
        available = len(self._buffer) - self._start
        if available >= 4:
            (size,) = _SIZE.unpack_from(self._buffer, self._start)
            if available >= 4 + size:
                end = self._start + 4 + size
                frame = bytes(self._buffer[self._start : end])
                self._start = end
                self._compact()
                return frame
        if self.eof and available:
            raise KafkaTruncatedError(
                f"{self._peer} stream ended inside a frame ({available} bytes buffered)"
            )
        return None

    def _compact(self) -> None:
        if self._start == len(self._buffer):
            self._buffer.clear()
        elif self._start < _COMPACT_AT:
            return
        else:
            del self._buffer[: self._start]
        self._checked -= self._start
        if self._error_at >= 0:
            self._error_at -= self._start
        self._start = 0


def _skip_tagged_fields(data: bytes, pos: int) -> int:
    try:
        return skip_tagged_fields(data, pos)
    except LengthError as exc:
        raise KafkaLengthError(str(exc)) from None


# ---- requests ---------------------------------------------------------------------------------


def parse_request_frame(
    frame: bytes, topic_ids: TopicIdRegistry | None = None, max_elements: int | None = None
) -> KafkaRequest:
    """Decode one whole request frame (size prefix included) into a `KafkaRequest`.

    `max_elements`: `KafkaLimits.max_request_elements` (None: no limit)."""
    if len(frame) < 4 + _MIN_REQUEST:
        raise KafkaDecodeError(f"request frame of {len(frame)} bytes has no complete header")
    api_key, api_version, correlation_id, client_id_len = _REQUEST_HEADER.unpack_from(frame, 4)
    pos = 4 + _MIN_REQUEST
    if api_key < 0:
        raise KafkaDecodeError(f"negative api key {api_key}")
    client_id = None
    if client_id_len >= 0:
        if pos + client_id_len > len(frame):
            raise KafkaLengthError("client id runs past the end of the frame")
        try:
            client_id = frame[pos : pos + client_id_len].decode("utf-8")
        except UnicodeDecodeError as bad_text:
            raise KafkaDecodeError("client id is not UTF-8") from bad_text
        pos += client_id_len
    elif client_id_len != -1:
        raise KafkaLengthError(f"client id length {client_id_len}")

    codec = request_codec(api_key, api_version)
    if codec is None:
        api = kafka_api(api_key)
        if api is None:
            topics_unknown = api_key not in TOPICLESS_WITHOUT_CLASS
        elif api_key == API_VERSIONS and api_version > api.max_version:
            if api_version >= API_VERSIONS_FIRST_FLEXIBLE:
                _skip_tagged_fields(frame, pos)  # the header must still be well-formed
            topics_unknown = False
        else:
            raise KafkaUnsupportedVersionError(
                f"{api.name} v{api_version} (kafka-python knows v0-v{api.max_version})"
            )
        return KafkaRequest(
            api_key,
            api_version,
            correlation_id,
            client_id,
            topics_unknown=topics_unknown,
            raw=frame,
        )
    if codec.flexible:
        pos = _skip_tagged_fields(frame, pos)
    try:
        decoded = codec.decode(memoryview(frame)[pos:], max_elements)
    except LengthError as length:
        raise KafkaLengthError(f"{codec.api.name} v{api_version}: {length}") from None
    except Exception as exc:  # kafka-python raises struct.error, ValueError, IndexError, ...
        raise KafkaDecodeError(f"{codec.api.name} v{api_version} does not decode: {exc}") from exc
    try:
        names, unresolved, all_topics, unknown = request_topics(
            api_key, api_version, decoded, topic_ids
        )
    except (AttributeError, TypeError) as bug:  # a field of an unexpected type (bug guard)
        raise KafkaDecodeError(
            f"{codec.api.name} v{api_version}: topics unreadable: {bug}"
        ) from bug
    return KafkaRequest(
        api_key,
        api_version,
        correlation_id,
        client_id,
        names,
        all_topics,
        unresolved,
        unknown,
        decoded.acks if api_key == PRODUCE else None,
        frame,
        decoded,
    )


class KafkaRequestParser:
    """Client → broker direction of one connection.

    `topic_ids` resolves topics named by id; share one registry with the response parser of
    the same connection (and, if wanted, with other connections to the same broker).
    """

    def __init__(
        self, limits: KafkaLimits | None = None, topic_ids: TopicIdRegistry | None = None
    ) -> None:
        self.limits = limits or KafkaLimits()
        self.topic_ids = topic_ids
        self._frames = _FrameReader(self.limits.max_request_frame, _MIN_REQUEST, "client")
        self._error: KafkaError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as events."""
        return self._frames.buffered

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" = the client closed its side."""
        self._frames.feed(data)

    def next_event(self) -> KafkaRequest | None:
        """The next request, or None until more bytes arrive. Errors are sticky."""
        if self._error is not None:
            raise self._error
        try:
            frame = self._frames.next_frame()
            if frame is None:
                return None
            return parse_request_frame(
                frame, self.topic_ids, self.limits.max_request_elements
            )
        except KafkaError as exc:
            self._error = exc
            raise

    def events(self) -> list[KafkaRequest]:
        """Every complete request; raises at the first bad frame (use `next_event()` to handle
        the requests before it)."""
        found = []
        while (event := self.next_event()) is not None:
            found.append(event)
        return found


# ---- responses --------------------------------------------------------------------------------


class KafkaResponseParser:
    """Broker → client direction of one connection.

    Kafka answers the requests of one connection in order, so each response must carry the
    correlation id of the oldest request in flight; `expect(request)` must be called for every
    forwarded request, in the order they were forwarded. Requests that were denied (and
    answered by garrison) are not expected.

    `decode_api_keys`: the APIs whose responses are decoded (None = all). Responses of other
    APIs are matched and passed through with `decoded=None`, which saves decoding large Fetch
    answers nobody reads. Metadata, CreateTopics and DescribeTopicPartitions answers feed
    `topic_ids` when they are decoded.
    """

    def __init__(
        self,
        limits: KafkaLimits | None = None,
        topic_ids: TopicIdRegistry | None = None,
        decode_api_keys: Collection[int] | None = None,
    ) -> None:
        self.limits = limits or KafkaLimits()
        self.topic_ids = topic_ids
        self.decode_api_keys = frozenset(decode_api_keys) if decode_api_keys is not None else None
        self._frames = _FrameReader(self.limits.max_response_frame, _MIN_RESPONSE, "broker")
        self._in_flight: deque[tuple[int, KafkaRequest]] = deque()
        self._acks0: deque[tuple[int, KafkaRequest]] = deque(
            maxlen=self.limits.max_unanswered_acks0
        )
        self._sequence = 0
        self._error: KafkaError | None = None

    @property
    def in_flight(self) -> int:
        """Forwarded requests the broker has not answered yet."""
        return len(self._in_flight)

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    def expect(self, request: KafkaRequest) -> None:
        """A request was forwarded to the broker: its response comes after those before it.

        Raises `KafkaError` when more than `max_in_flight` requests are unanswered (the client
        pipelines without reading: the connection must close).
        """
        self._sequence += 1
        if not request.expects_response:
            if self._acks0.maxlen:
                self._acks0.append((self._sequence, request))
            return
        if len(self._in_flight) >= self.limits.max_in_flight:
            raise KafkaError(f"more than {self.limits.max_in_flight} requests in flight")
        self._in_flight.append((self._sequence, request))

    def receive_data(self, data: bytes) -> None:
        """Bytes from the broker; b"" = the broker closed its side."""
        self._frames.feed(data)

    def next_event(self) -> KafkaResponse | None:
        if self._error is not None:
            raise self._error
        try:
            frame = self._frames.next_frame()
            if frame is None:
                return None
            return self._parse(frame)
        except KafkaError as exc:
            self._error = exc
            raise

    def events(self) -> list[KafkaResponse]:
        found = []
        while (event := self.next_event()) is not None:
            found.append(event)
        return found

    def _match(self, correlation_id: int) -> KafkaRequest:
        head = self._in_flight[0] if self._in_flight else None
        if head is not None and head[1].correlation_id == correlation_id:
            self._in_flight.popleft()
            return head[1]
        # An answer to an acks=0 Produce sent before the head request (tansu answers them).
        while self._acks0 and (head is None or self._acks0[0][0] < head[0]):
            _, unanswered = self._acks0.popleft()
            if unanswered.correlation_id == correlation_id:
                return unanswered
        if head is None:
            raise KafkaCorrelationError(f"response {correlation_id} but no request in flight")
        raise KafkaCorrelationError(
            f"response {correlation_id} but request {head[1].correlation_id} is next"
        )

    def _parse(self, frame: bytes) -> KafkaResponse:
        (correlation_id,) = _SIZE.unpack_from(frame, 4)
        request = self._match(correlation_id)
        decoded = None
        if self.decode_api_keys is None or request.api_key in self.decode_api_keys:
            decoded = decode_response_body(request, frame)
            if decoded is not None and self.topic_ids is not None:
                self.topic_ids.learn_from_response(request.api_key, decoded)
        return KafkaResponse(request, correlation_id, frame, decoded)


def decode_response_body(request: KafkaRequest, frame: bytes) -> Any:
    """The kafka-python object of a response frame to `request`; None if it has no class."""
    version = request.api_version
    if request.api_key == API_VERSIONS:
        pos = 8  # ApiVersions answers always use response header v0
        # On an error (UNSUPPORTED_VERSION to a too-new request) the body is v0.
        if len(frame) >= pos + 2 and struct.unpack_from(">h", frame, pos)[0] != 0:
            version = 0
        codec = response_codec(API_VERSIONS, version)
        if codec is None:
            return None
    else:
        codec = response_codec(request.api_key, version)
        if codec is None or request.decoded is None:
            return None
        pos = _skip_tagged_fields(frame, 8) if codec.flexible else 8
    try:
        return codec.decode(memoryview(frame)[pos:])
    except LengthError as length:
        raise KafkaLengthError(f"{codec.api.response_class.name} v{version}: {length}") from None
    except Exception as exc:  # kafka-python raises struct.error, ValueError, IndexError, ...
        raise KafkaDecodeError(
            f"{codec.api.response_class.name} v{version} does not decode: {exc}"
        ) from exc
