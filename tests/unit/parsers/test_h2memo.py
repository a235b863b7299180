"""The header memos answer exactly what hpack and h2 would have answered: same fields, same
never-indexed marks, same bytes, same tables, same errors; and they are really used."""

from __future__ import annotations

import re
from typing import Any

import h2.connection
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.hpack import Decoder, Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.parsers.h2memo import MEMO_ENTRIES, MemoDecoder, MemoEncoder
from garrison.parsers.http2 import H2Error, H2ServerConnection, RequestReceived

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/doors.DoorManager/GetName"),
    (b":authority", b"doors"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def outcome(fn: Any, *args: Any) -> Any:
    try:
        result = fn(*args)
    except Exception as exc:  # the memo must fail exactly as hpack does
        # hpack names the buffer it read by address (`<memory at 0x...>`): not the same twice
        return ("error", type(exc), re.sub(r" at 0x[0-9a-f]+", "", str(exc)))
    if isinstance(result, list):
        return [(type(h), tuple(h)) for h in result]
    return result


# --- HPACK decoding ---------------------------------------------------------------------------

_NAMES = st.sampled_from([b"x-a", b"x-b", b"authorization", b":path", b"content-type"])
_VALUES = st.sampled_from([b"1", b"22", b"application/grpc", b"Bearer s3cret"])
_FIELD = st.tuples(_NAMES, _VALUES, st.booleans())
_GARBAGE = [b"\xff", b"\x7f\x80", b"\x40\x05ab"]  # bad index, bad integer, truncated
_STEP = st.one_of(
    st.tuples(st.just("block"), st.lists(_FIELD, max_size=4), st.booleans()),
    st.tuples(st.just("resize"), st.sampled_from([0, 64, 256, 4096]), st.just(False)),
    st.tuples(st.just("garbage"), st.sampled_from(_GARBAGE), st.just(False)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, max_size=25), st.sampled_from([64, 100, 4096]))
def test_decoder_memo_decodes_like_hpack(steps: list[Any], header_list_size: int) -> None:
    """Blocks from a real encoder (repeats, insertions, evictions, size updates, sensitive
    fields) and bad blocks: the memo's results, errors and table match hpack's after every
    block."""
    encoder = Encoder()
    plain, memo = Decoder(), MemoDecoder()
    plain.max_header_list_size = memo.max_header_list_size = header_list_size
    blocks: list[bytes] = []
    for kind, arg, huffman in steps:
        if kind == "resize":
            encoder.header_table_size = arg
            continue
        block = arg if kind == "garbage" else encoder.encode(arg, huffman=huffman)
        blocks.append(block)
        for data in (block, *blocks[-3:]):  # and replays: hits, or the same error twice
            assert outcome(memo.decode, data, True) == outcome(plain.decode, data, True)
            assert memo.header_table.dynamic_entries == plain.header_table.dynamic_entries
            assert memo.header_table_size == plain.header_table_size


def test_decoder_memo_answers_a_repeated_indexed_block() -> None:
    encoder, memo = Encoder(), MemoDecoder()
    first = encoder.encode(REQUEST)  # inserts: not kept
    memo.decode(first, raw=True)
    assert memo.memo == {}
    again = encoder.encode(REQUEST)  # indexed only now
    assert again != first
    decoded = memo.decode(again, raw=True)
    assert list(memo.memo) == [(again, True)]
    assert memo.decode(again, raw=True) == decoded == REQUEST
    memo.max_allowed_table_size = 0  # a new limit: nothing kept survives it
    with pytest.raises(Exception, match="did not shrink"):
        memo.decode(again, raw=True)


def test_decoder_memo_is_bounded() -> None:
    encoder, memo = Encoder(), MemoDecoder()
    for i in range(3 * MEMO_ENTRIES):
        block = encoder.encode([(b"x-n", str(i).encode())], huffman=False)
        block = bytes([block[0] & 0x0F]) + block[1:]  # literal without indexing: no insertion
        memo.decode(block, raw=True)
        assert len(memo.memo) <= MEMO_ENTRIES


# --- HPACK encoding ---------------------------------------------------------------------------

_SHAPE = st.sampled_from(["tuple", "header", "never", "triple-true", "triple-false"])


def shaped(name: bytes, value: bytes, shape: str) -> Any:
    if shape == "header":
        return HeaderTuple(name, value)
    if shape == "never":
        return NeverIndexedHeaderTuple(name, value)
    if shape.startswith("triple"):
        return (name, value, shape == "triple-true")
    return (name, value)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.lists(st.tuples(_NAMES, _VALUES, _SHAPE), max_size=4), st.booleans()),
            st.tuples(st.just("resize"), st.sampled_from([0, 64, 256, 4096])),
        ),
        max_size=25,
    )
)
def test_encoder_memo_encodes_like_hpack(steps: list[Any]) -> None:
    """Each header list encoded twice in a row and again later, in every tuple shape hpack
    accepts: the memo's bytes and table match hpack's every time."""
    plain, memo = Encoder(), MemoEncoder()
    seen: list[tuple[list[Any], bool]] = []
    for fields, huffman in steps:
        if fields == "resize":
            plain.header_table_size = memo.header_table_size = huffman
            continue
        headers = [shaped(n, v, s) for n, v, s in fields]
        seen.append((headers, huffman))
        for again, again_huffman in (seen[-1], seen[-1], *seen[-3:]):
            assert memo.encode(again, again_huffman) == plain.encode(again, again_huffman)
            assert memo.header_table.dynamic_entries == plain.header_table.dynamic_entries


def test_encoder_memo_keeps_the_never_indexed_mark_apart() -> None:
    """A plain field and the same field marked never-indexed compare equal as tuples; the
    memo must not answer one with the other's bytes."""
    plain, memo, decoder = Encoder(), MemoEncoder(), Decoder()
    field = (b"x-token", b"v")
    never = NeverIndexedHeaderTuple(*field)
    marks = []
    # Never-indexed first (hpack sends a field already in its table indexed, marked or not).
    for headers in ([never], [never], [field], [field]):
        block = memo.encode(headers)
        assert block == plain.encode(headers)
        marks.append(isinstance(decoder.decode(block, raw=True)[0], NeverIndexedHeaderTuple))
    assert marks == [True, True, False, False]
    assert list(memo.memo) == [(((field,), (tuple,), True))]


def test_encoder_memo_sends_a_pending_table_size_update() -> None:
    plain, memo = Encoder(), MemoEncoder()
    assert memo.encode(REQUEST) == plain.encode(REQUEST)
    assert memo.encode(REQUEST) == plain.encode(REQUEST)
    plain.header_table_size = memo.header_table_size = 256
    update = memo.encode(REQUEST)
    assert update == plain.encode(REQUEST)
    assert update[0] & 0xE0 == 0x20  # starts with the size update, not a memo answer


# --- h2's inbound validation, through the connection ------------------------------------------


def client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    return conn


def test_validation_memo_is_used_and_keeps_marks() -> None:
    """The same request on many streams: one validation kept, and each request's fields come
    out with the marks its own block carried (never-indexed or not)."""
    peer, server = client(), H2ServerConnection()
    peer.config.normalize_outbound_headers = False  # h2 would drop the mark on x-token
    server.receive_data(peer.data_to_send(), 0.0)
    # Never-indexed first: once the field is in the peer's table, hpack sends it indexed.
    marks = [True, True, False, False, False]
    requests = []
    for never in marks:
        token = (b"x-token", b"v")
        sid = peer.get_next_available_stream_id()
        token_field = NeverIndexedHeaderTuple(*token) if never else HeaderTuple(*token)
        peer.send_headers(sid, [*REQUEST, token_field], end_stream=True)
        events = server.receive_data(peer.data_to_send(), 0.0)
        requests += [e for e in events if isinstance(e, RequestReceived)]
    assert [isinstance(r.headers[-1], NeverIndexedHeaderTuple) for r in requests] == marks
    assert all(r.headers[:-1] == tuple(REQUEST) for r in requests)
    assert len(server._h2.header_memo) == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "bad",
    [(b"connection", b"close"), (b"te", b"gzip"), (b"X-Upper", b"1"), (b"x-a", b"a\r\nb")],
)
def test_validation_memo_never_keeps_a_refusal(bad: tuple[bytes, bytes]) -> None:
    """A request h2 refuses is refused on every connection it arrives on, also after the
    same fields were refused before (nothing about a refusal is remembered)."""
    for _ in range(2):
        peer, server = client(), H2ServerConnection()
        server.receive_data(peer.data_to_send(), 0.0)
        for _ in range(2):  # a valid request first, so the memo holds something
            peer.send_headers(peer.get_next_available_stream_id(), REQUEST, end_stream=True)
            server.receive_data(peer.data_to_send(), 0.0)
        # h2 would refuse to send these fields itself: bypass its outbound checks.
        peer.config.validate_outbound_headers = False
        peer.config.normalize_outbound_headers = False
        peer.send_headers(peer.get_next_available_stream_id(), [*REQUEST, bad], end_stream=True)
        with pytest.raises(H2Error):
            server.receive_data(peer.data_to_send(), 0.0)
