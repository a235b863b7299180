"""Every length and count of a Kafka message checked against its schema and its frame.

kafka-python's compiled decoders trust the lengths they read: an array count below -1 decodes
as an empty array, a string or bytes length below -1 as null, a null in a field the schema says
cannot be null as None, an unsigned varint of any length as a number, a known tagged field as
whatever it reads past its declared size. Each is a place where garrison and the broker could
read one frame two ways. It happened: a Produce whose topic array count was 0x80000000 decoded
as "no topics", was allowed on its API key alone and forwarded with its record batch.

So before kafka-python decodes a body, `check_message` walks it with a plan built once per
(API key, version, direction) from kafka-python's own schema (`message_plan`) and raises
`LengthError` for any length or count the protocol cannot carry:

- an array count, string or bytes length below -1, or -1 (compact: 0) where the schema does not
  allow null; a nullable struct whose marker byte is neither -1 nor 1;
- a string or bytes length past the end of the frame; a string longer than 32767 bytes (Kafka's
  limit); an array count larger than the bytes left could hold at the element's smallest size;
- an unsigned varint longer than 5 bytes or above 2**32 - 1;
- tagged fields: a count larger than the bytes left could hold, tags not strictly ascending, a
  size past the end, a known tag whose contents do not take exactly its declared size;
- record batches in a Produce request (`records` fields): each batch's length must fit the
  records field exactly and be at least its magic's header size, the magic known (0, 1, 2), and
  an uncompressed v2 batch's record count non-negative and no larger than its bytes could hold;
- with `max_elements`: more array elements and record batches in the whole message than that
  (each costs a Python object to decode: a 100 MiB Produce of 4-byte topic entries would hold
  26 million, minutes of CPU and gigabytes of memory in one request).

The caller then decodes with kafka-python and checks both agree on where the message ends.
Kafka's own readers are laxer in places (they read any negative length of a nullable field as
null): no client sends those shapes, and a proxy must not be the laxer reader of the two.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["FieldPlan", "LengthError", "check_message", "message_plan", "skip_tagged_fields"]

_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")

_MAX_STRING = 0x7FFF  # Kafka refuses longer strings
_MAX_UVARINT = 0xFFFFFFFF

# Field kinds of a plan.
FIXED = 0
STRING = 1
BYTES = 2
RECORDS = 3  # bytes holding record batches (checked in requests)
ARRAY = 4
STRUCT = 5

_FIXED_SIZES = {
    "int8": 1,
    "bool": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "bitfield": 4,
    "int64": 8,
    "float64": 8,
    "uuid": 16,
}

# Record batches: offset (8) + length (4), then at least this many bytes per magic.
_BATCH_PREFIX = 12
_MIN_BATCH = {0: 14, 1: 22, 2: 49}
_V2_ATTRIBUTES = 21  # from the start of a batch
_V2_COUNT = 57
_V2_HEADER = 61
_MIN_RECORD = 7  # length, attributes, timestamp delta, offset delta, key, value, headers


class LengthError(ValueError):
    """A length or count in a Kafka message that the protocol cannot carry."""


class _Budget:
    """Array elements and record batches a message may still hold (`max_elements`)."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.limit = limit

    def spend(self, count: int, name: str) -> None:
        self.left -= count
        if self.left < 0:
            raise LengthError(
                f"{name}: more than {self.limit} array elements and record batches in one "
                "message (the limit bounds what one request may cost to decode)"
            )


_UNLIMITED = 2**62


@dataclass(frozen=True, slots=True)
class FieldPlan:
    """How to check one field (or a whole message: a STRUCT).

    `size`: the byte size of a FIXED field; of a STRUCT made of fixed-size fields only (its
    tagged fields aside), else 0. `nullable`: null is allowed in this version.
    `element`: an ARRAY's element. `fields`, `tagged` (tag → plan): a STRUCT's untagged fields
    in order and its known tagged fields. `flexible`: compact lengths and tagged fields.
    `minimum`: the fewest bytes the field can take (bounds array counts).
    """

    kind: int
    name: str
    minimum: int
    size: int = 0
    nullable: bool = False
    element: FieldPlan | None = None
    fields: tuple[FieldPlan, ...] = ()
    tagged: dict[int, FieldPlan] | None = None
    flexible: bool = False


# ---- plans from kafka-python's schema ---------------------------------------------------------


def message_plan(message_class: Any, version: int, flexible: bool, request: bool) -> FieldPlan:
    """The plan of a kafka-python request or response class at `version`.

    Record batches are checked in requests only: a Fetch answer may end with a partial batch.
    """
    return _struct_plan(message_class._struct, version, flexible, False, request, "message")


def _struct_plan(
    struct_field: Any, version: int, flexible: bool, nullable: bool, request: bool, name: str
) -> FieldPlan:
    fields = _merge_fixed(
        [_field_plan(f, version, flexible, request) for f in struct_field.untagged_fields(version)]
    )
    tagged = None
    if flexible:
        tagged = {
            f.tag: _field_plan(f, version, True, request)
            for f in struct_field.fields.values()
            if f.for_version_q(version) and f.tagged_field_q(version)
        }
    minimum = 1 if nullable else sum(f.minimum for f in fields) + (1 if flexible else 0)
    # A struct of fixed-size fields only (most partition entries) is walked without a call.
    size = fields[0].size if len(fields) == 1 and fields[0].kind == FIXED else 0
    return FieldPlan(
        STRUCT,
        name,
        minimum,
        size=size,
        nullable=nullable,
        fields=fields,
        tagged=tagged,
        flexible=flexible,
    )


def _merge_fixed(fields: list[FieldPlan]) -> tuple[FieldPlan, ...]:
    """Runs of fixed-size fields become one (fewer steps per message)."""
    merged: list[FieldPlan] = []
    for field in fields:
        if field.kind == FIXED and merged and merged[-1].kind == FIXED:
            size = merged[-1].size + field.size
            merged[-1] = FieldPlan(FIXED, f"{merged[-1].name}+{field.name}", size, size=size)
        else:
            merged.append(field)
    return tuple(merged)


def _field_plan(field: Any, version: int, flexible: bool, request: bool) -> FieldPlan:
    nullable = bool(field.nullable_for_version_q(version))
    name = field.name
    length_size = 1 if flexible else 4
    if field.is_struct_array():
        element = _struct_plan(field.array_of, version, flexible, False, request, name)
        return FieldPlan(ARRAY, name, length_size, nullable=nullable, element=element)
    if field.is_array():
        element = _simple_plan(field.array_of, flexible, False, request)
        return FieldPlan(ARRAY, name, length_size, nullable=nullable, element=element)
    if field.is_struct():
        return _struct_plan(field, version, flexible, nullable, request, name)
    return _simple_plan(field, flexible, nullable, request)


def _simple_plan(field: Any, flexible: bool, nullable: bool, request: bool) -> FieldPlan:
    kind = field.type_str
    if kind in _FIXED_SIZES:
        size = _FIXED_SIZES[kind]
        return FieldPlan(FIXED, field.name, size, size=size)
    if kind == "string":
        return FieldPlan(STRING, field.name, 1 if flexible else 2, nullable=nullable)
    if kind in ("bytes", "records"):
        checked = RECORDS if kind == "records" and request else BYTES
        return FieldPlan(checked, field.name, 1 if flexible else 4, nullable=nullable)
    raise ValueError(f"kafka-python field {field.name} has a type garrison cannot check: {kind}")


# ---- the walk ---------------------------------------------------------------------------------


def check_message(
    plan: FieldPlan, data: bytes | memoryview, max_elements: int | None = None
) -> int:
    """Walk a message body (no header) with `plan`; the offset where it ends.

    `max_elements`: the most array elements and record batches the message may hold in all
    (None: no limit)."""
    budget = _Budget(_UNLIMITED if max_elements is None else max_elements)
    return _struct(plan, data, 0, len(data), budget)


def _uvarint(data: bytes | memoryview, pos: int, end: int, name: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise LengthError(f"{name}: varint runs past the end of the frame")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > _MAX_UVARINT:
                raise LengthError(f"{name}: unsigned varint {value} overflows 32 bits")
            return value, pos
        shift += 7
        if shift > 28:
            raise LengthError(f"{name}: varint longer than 5 bytes")


def _length(
    plan: FieldPlan,
    data: bytes | memoryview,
    pos: int,
    end: int,
    compact: bool,
    unpack: struct.Struct,
) -> tuple[int, int]:
    """A length or count and the position after it; -1 = null, checked against the schema."""
    if compact:
        if pos < end and data[pos] < 0x80:  # one-byte varints: nearly every length
            value = data[pos] - 1
            pos += 1
        else:
            raw, pos = _uvarint(data, pos, end, plan.name)
            value = raw - 1
    else:
        if pos + unpack.size > end:
            raise LengthError(f"{plan.name}: length runs past the end of the frame")
        (value,) = unpack.unpack_from(data, pos)
        pos += unpack.size
    if value < -1:
        raise LengthError(f"{plan.name}: length {value} is negative (only -1 means null)")
    if value == -1 and not plan.nullable:
        raise LengthError(f"{plan.name}: null where the schema allows none")
    return value, pos


def _struct(
    plan: FieldPlan, data: bytes | memoryview, pos: int, end: int, budget: _Budget
) -> int:
    """A whole message, or a struct inside one (its null marker read by the caller)."""
    compact = plan.flexible
    for field in plan.fields:
        pos = _field(field, data, pos, end, compact, budget)
    if plan.tagged is not None:
        pos = _tagged_fields(data, pos, end, plan.tagged, plan.name, budget)
    return pos


def _field(
    plan: FieldPlan,
    data: bytes | memoryview,
    pos: int,
    end: int,
    compact: bool,
    budget: _Budget,
) -> int:
    kind = plan.kind
    if kind == FIXED:
        pos += plan.size
        if pos > end:
            raise LengthError(f"{plan.name}: runs past the end of the frame")
        return pos
    if kind == STRING:
        size, pos = _length(plan, data, pos, end, compact, _I16)
        if size > _MAX_STRING:
            raise LengthError(f"{plan.name}: string of {size} bytes (Kafka allows 32767)")
        if pos + size > end:
            raise LengthError(f"{plan.name}: string of {size} bytes runs past the end")
        return pos + max(size, 0)
    if kind in (BYTES, RECORDS):
        size, pos = _length(plan, data, pos, end, compact, _I32)
        if pos + size > end:
            raise LengthError(f"{plan.name}: {size} bytes run past the end of the frame")
        if size <= 0:
            return pos
        if kind == RECORDS:
            _record_batches(data, pos, pos + size, plan.name, budget)
        return pos + size
    if kind == ARRAY:
        element = plan.element
        assert element is not None
        count, pos = _length(plan, data, pos, end, compact, _I32)
        if count * element.minimum > end - pos:
            raise LengthError(
                f"{plan.name}: {count} elements cannot fit in the {end - pos} bytes left"
            )
        if count > 0:
            budget.spend(count, plan.name)
        if element.kind == STRUCT and element.size and not element.nullable:
            size, tagged = element.size, element.tagged
            for _ in range(count):
                pos += size
                if tagged is None:
                    continue
                if pos < end and data[pos] == 0:
                    pos += 1
                else:
                    pos = _tagged_fields(data, pos, end, tagged, element.name, budget)
            if pos > end:
                raise LengthError(f"{element.name}: runs past the end of the frame")
            return pos
        for _ in range(count):
            pos = _field(element, data, pos, end, compact, budget)
        return pos
    # STRUCT: a nested struct, with a null marker where the schema allows null.
    if plan.nullable:
        if pos >= end:
            raise LengthError(f"{plan.name}: runs past the end of the frame")
        (marker,) = _I8.unpack_from(data, pos)
        pos += 1
        if marker == -1:
            return pos
        if marker != 1:
            raise LengthError(f"{plan.name}: null marker {marker} (only -1 or 1)")
    return _struct(plan, data, pos, end, budget)


def _tagged_fields(
    data: bytes | memoryview,
    pos: int,
    end: int,
    known: dict[int, FieldPlan],
    name: str,
    budget: _Budget,
) -> int:
    if pos < end and data[pos] == 0:  # no tagged fields: nearly every struct
        return pos + 1
    where = f"{name} tagged fields"
    count, pos = _uvarint(data, pos, end, where)
    if count * 2 > end - pos:  # a tag and a size at least
        raise LengthError(f"{where}: {count} fields cannot fit in the {end - pos} bytes left")
    previous = -1
    for _ in range(count):
        tag, pos = _uvarint(data, pos, end, where)
        if tag <= previous:
            raise LengthError(f"{where}: tag {tag} after tag {previous} (must ascend)")
        previous = tag
        size, pos = _uvarint(data, pos, end, where)
        if size > end - pos:
            raise LengthError(f"{where}: tag {tag} of {size} bytes runs past the end")
        plan = known.get(tag)
        if plan is not None:
            stop = _field(plan, data, pos, pos + size, True, budget)
            if stop != pos + size:
                raise LengthError(
                    f"{where}: tag {tag} ({plan.name}) declares {size} bytes, holds {stop - pos}"
                )
        pos += size
    return pos


def skip_tagged_fields(data: bytes | memoryview, pos: int, name: str = "header") -> int:
    """The position after a tagged-field section none of whose tags garrison reads (request
    header v2, response header v1), checked as `check_message` checks one."""
    return _tagged_fields(data, pos, len(data), {}, name, _Budget(_UNLIMITED))


def _record_batches(
    data: bytes | memoryview, pos: int, end: int, name: str, budget: _Budget
) -> None:
    """Record batches (or legacy message sets) must fill a Produce records field exactly."""
    while pos < end:
        budget.spend(1, name)
        if end - pos < _BATCH_PREFIX + 5:
            raise LengthError(f"{name}: {end - pos} bytes left, too few for a record batch")
        (length,) = _I32.unpack_from(data, pos + 8)
        magic = data[pos + 16]
        minimum = _MIN_BATCH.get(magic)
        if minimum is None:
            raise LengthError(f"{name}: record batch magic {magic} (Kafka knows 0, 1 and 2)")
        if length < minimum or length > end - pos - _BATCH_PREFIX:
            raise LengthError(
                f"{name}: record batch length {length} outside [{minimum}, "
                f"{end - pos - _BATCH_PREFIX}]"
            )
        if magic == 2:
            (attributes,) = _I16.unpack_from(data, pos + _V2_ATTRIBUTES)
            (records,) = _I32.unpack_from(data, pos + _V2_COUNT)
            room = length + _BATCH_PREFIX - _V2_HEADER
            if records < 0 or (not attributes & 0x07 and records * _MIN_RECORD > room):
                raise LengthError(
                    f"{name}: record batch of {length} bytes claims {records} records"
                )
        pos += _BATCH_PREFIX + length
