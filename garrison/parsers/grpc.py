"""gRPC over HTTP/2: recognise a call from its request headers, read its status from trailers.

Pure helpers used by `garrison.parsers.nghttp2`; no framing of messages (the proxy forwards DATA
unchanged and never needs to look inside a message).

What counts as a gRPC call (garrison's pinned meaning, see docs POLICY-SEMANTICS "gRPC rules"):

- `content-type` starts with `application/grpc` (case-insensitive; `+proto`, `+json` and
  `-web` variants included, as the policy semantics say `application/grpc*`);
- `:method` is `POST`;
- `:path` is exactly `/Service/Method` where Service is one or more dot-separated identifiers
  (`doors.DoorManager`, `Greeter`) and Method one identifier (`[A-Za-z_][A-Za-z0-9_]*`).

Anything else with a gRPC content-type is *malformed*: `grpc_call()` returns the reason, and
the engine denies it (the matcher never sees it). Being strict here is what makes the policy
sound: a path the matcher would read one way (`/doors.DoorManager/GetName/../SetAccessCode`,
`%2F`, a query string) can never reach an upstream that might route it another way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GRPC_CONTENT_TYPE = b"application/grpc"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_GRPC_PATH = re.compile(rf"/({_IDENT}(?:\.{_IDENT})*)/({_IDENT})")


@dataclass(frozen=True, slots=True)
class GrpcCall:
    """The gRPC method a request invokes: `service` is fully qualified (`pkg.Service`)."""

    service: str
    method: str


def is_grpc_content_type(value: bytes) -> bool:
    return value[: len(GRPC_CONTENT_TYPE)].lower() == GRPC_CONTENT_TYPE


def grpc_call(method: str, path: str | None) -> tuple[GrpcCall | None, str | None]:
    """(call, None) for a well-formed gRPC request, (None, reason) otherwise.

    Only called for requests whose content-type is gRPC.
    """
    if method != "POST":
        return None, f"gRPC request with method {method}, not POST"
    if path is None:
        return None, "gRPC request without :path"
    m = _GRPC_PATH.fullmatch(path)
    if m is None:
        return None, f"gRPC path {path!r} is not /package.Service/Method"
    return GrpcCall(m.group(1), m.group(2)), None


def grpc_status(value: bytes | None) -> int | None:
    """`grpc-status` as an int; None when absent or not a non-negative decimal number."""
    if value is None or not value.isdigit() or len(value) > 10:
        return None
    return int(value)
