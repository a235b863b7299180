"""Memos for the header work that repeats on every call of a busy HTTP/2 connection.

A gRPC channel sends the same header block for every call of a method, and its upstream
answers each call with the same response and trailer blocks. Once the first call has put its
fields into the HPACK tables, every later block is indexed only: decoding it, encoding it again
for the other connection and h2's inbound normalization and validation of its fields then
return the same result each time, and were most of what a proxied call cost (BENCHMARKS.md,
gRPC). These classes keep those results per connection and answer a repeat from the memo.

When a memo answers, the work would have given the same answer:

- `MemoDecoder.decode`: the same block (bytes), the same `raw`, and since the result was kept
  no change to the decoder's table (a generation counter moves on every insertion, eviction
  and resize), to `max_header_list_size` or to `max_allowed_table_size`. Only a decode that
  left the table as it was is kept: one that inserted must run again to insert again.
- `MemoEncoder.encode`: the same fields in the same order and of the same tuple types (a
  `NeverIndexedHeaderTuple` equals a plain tuple with the same items, so the types are part
  of the key: a credential's never-indexed mark is never lost or invented), the same
  `huffman`, no table-size update pending, no change to the table, and the encode itself left
  the table as it was.
- `MemoStream._process_received_headers`: the same fields of the same types and the same
  `HeaderValidationFlags`, the only inputs of h2's `normalize_inbound_headers` and
  `validate_headers`; with `header_encoding` set (garrison never sets it) it does the work.

Errors are never kept: a bad block raises every time it arrives. Each memo holds at most
`MEMO_ENTRIES` results of blocks up to `MEMO_BLOCK_BYTES` and is emptied when its table changes,
since its entries can never be valid again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from h2.stream import H2Stream
from hpack.hpack import Decoder, Encoder
from hpack.table import HeaderTable

MEMO_ENTRIES = 16
MEMO_BLOCK_BYTES = 1024
MEMO_FIELDS = 32

_Key = tuple[tuple[Any, ...], tuple[type, ...], Any]


class CountingHeaderTable(HeaderTable):
    """hpack's table with a generation number that moves whenever its contents may change."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return int(self._maxsize)

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        setter = cast(property, HeaderTable.__dict__["maxsize"]).fset
        assert setter is not None
        setter(self, newmax)


def _fields_key(fields: tuple[Any, ...], extra: Any) -> _Key | None:
    if len(fields) > MEMO_FIELDS:
        return None
    key = (fields, tuple(map(type, fields)), extra)
    try:
        hash(key)
    except TypeError:  # a field that is not a tuple of str/bytes: let hpack say what is wrong
        return None
    return key


class MemoDecoder(Decoder):
    header_table: CountingHeaderTable

    def __init__(self) -> None:
        super().__init__()
        self.header_table = CountingHeaderTable()
        self.memo: dict[tuple[bytes, bool], tuple[Any, ...]] = {}
        self._memo_state: tuple[int, int, int] = (-1, 0, 0)

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        table = self.header_table
        state = (table.generation, self.max_header_list_size, self.max_allowed_table_size)
        memo = self.memo
        if state != self._memo_state:
            memo.clear()
            self._memo_state = state
        elif type(data) is bytes:
            hit = memo.get((data, raw))
            if hit is not None:
                return list(hit)
        headers = list(super().decode(data, raw))
        if table.generation == state[0] and type(data) is bytes and len(data) <= MEMO_BLOCK_BYTES:
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[(data, raw)] = tuple(headers)
        return headers


class MemoEncoder(Encoder):
    header_table: CountingHeaderTable

    def __init__(self) -> None:
        super().__init__()
        self.header_table = CountingHeaderTable()
        self.memo: dict[_Key, bytes] = {}
        self._memo_generation = -1

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        table = self.header_table
        if isinstance(headers, dict) or table.resized:
            return bytes(super().encode(headers, huffman))
        fields = tuple(headers)
        key = _fields_key(fields, huffman)
        if key is None:
            return bytes(super().encode(fields, huffman))
        memo = self.memo
        generation = table.generation
        if generation != self._memo_generation:
            memo.clear()
            self._memo_generation = generation
        else:
            hit = memo.get(key)
            if hit is not None:
                return hit
        encoded = bytes(super().encode(fields, huffman))
        if table.generation == generation and len(encoded) <= MEMO_BLOCK_BYTES:
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[key] = encoded
        return encoded


class MemoStream(H2Stream):
    """h2's stream with its inbound header processing kept in the connection's `memo`.

    The connection turns the streams it creates into this class (`adopt`)."""

    memo: dict[_Key, tuple[Any, ...]]

    @classmethod
    def adopt(cls, stream: H2Stream, memo: dict[_Key, tuple[Any, ...]]) -> None:
        stream.__class__ = cls
        cast("MemoStream", stream).memo = memo

    def _process_received_headers(
        self, headers: Iterable[Any], header_validation_flags: Any, header_encoding: Any
    ) -> list[Any]:
        if header_encoding:
            return list(
                super()._process_received_headers(headers, header_validation_flags, header_encoding)
            )
        fields = tuple(headers)
        key = _fields_key(fields, header_validation_flags)
        if key is None:
            return list(super()._process_received_headers(fields, header_validation_flags, None))
        memo = self.memo
        hit = memo.get(key)
        if hit is not None:
            return list(hit)
        result = list(super()._process_received_headers(fields, header_validation_flags, None))
        if sum(len(f[0]) + len(f[1]) for f in fields) <= MEMO_BLOCK_BYTES:
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[key] = tuple(result)
        return result
