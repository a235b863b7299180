"""The door-manager gRPC service (doors.proto), without generated code.

The one copy of the service: the example server and client next to this file, the HTTP/2
fixture capture script, the parser tests, the proxy's end-to-end tests and the gRPC benchmark
all use it.

Messages use the protobuf wire format, encoded by hand (string, int32 and bool fields are all
this service has). The grpcio server is built from generic handlers over raw bytes, and
clients call `channel.unary_unary("/doors.DoorManager/GetName")` etc. with bytes, so grpcio
sends and receives exactly what generated stubs would.

Imported by the scripts next to it; loaded by path elsewhere (`load_doors()`), not a package.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SERVICE = "doors.DoorManager"
UNARY = ("GetName", "GetLocation", "SetAccessCode")
CLIENT_STREAMING = ("RequestMaintenance",)
SERVER_STREAMING = ("GetStatus",)
METHODS = UNARY + CLIENT_STREAMING + SERVER_STREAMING


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


# ---- protobuf wire format -----------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are sign-extended to 64 bits
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def message(*fields: tuple[int, str | int | bool]) -> bytes:
    """Encode `(field_number, value)` pairs: str → length-delimited, int/bool → varint."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, str):
            raw = value.encode()
            out += _varint(number << 3 | 2) + _varint(len(raw)) + raw
        else:
            out += _varint(number << 3) + _varint(int(value))
    return bytes(out)


def decode(data: bytes) -> dict[int, bytes | int]:
    """Decode a flat message: {field_number: bytes (length-delimited) or int (varint)}."""
    fields: dict[int, bytes | int] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields[number] = varint()
        elif wire_type == 2:
            size = varint()
            fields[number] = data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"wire type {wire_type} not used by doors.proto")
    return fields


def frame(msg: bytes) -> bytes:
    """gRPC length-prefixed message: compressed flag 0, 4-byte big-endian length."""
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def unframe(data: bytes) -> list[bytes]:
    out = []
    while data:
        size = int.from_bytes(data[1:5], "big")
        out.append(data[5 : 5 + size])
        data = data[5 + size :]
    return out


# ---- the service ------------------------------------------------------------------------------


def _door_id(request: bytes) -> str:
    raw = decode(request).get(1, b"")
    return raw.decode() if isinstance(raw, bytes) else ""


def get_name(request: bytes, context: Any) -> bytes:
    return message((1, f"door {_door_id(request)}"))


def get_location(request: bytes, context: Any) -> bytes:
    return message((1, "HQ"), (2, 3))


def set_access_code(request: bytes, context: Any) -> bytes:
    return message((1, True))


def request_maintenance(requests: Iterator[bytes], context: Any) -> bytes:
    count = sum(1 for _ in requests)
    return message((1, "T-1"), (2, count))


def get_status(request: bytes, context: Any) -> Iterator[bytes]:
    door = _door_id(request)
    for seq in range(3):
        yield message((1, door), (2, seq % 2 == 0), (3, seq))


def handler() -> Any:
    """A grpc.GenericRpcHandler serving doors.DoorManager over raw bytes."""
    import grpc

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "GetName": grpc.unary_unary_rpc_method_handler(get_name),
            "GetLocation": grpc.unary_unary_rpc_method_handler(get_location),
            "SetAccessCode": grpc.unary_unary_rpc_method_handler(set_access_code),
            "RequestMaintenance": grpc.stream_unary_rpc_method_handler(request_maintenance),
            "GetStatus": grpc.unary_stream_rpc_method_handler(get_status),
        },
    )
