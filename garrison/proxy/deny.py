"""Every deny answer garrison sends, in the protocol's own words, in one module for review.

Pure: bytes and values in, bytes out. HTTP/1.1 `403 Access denied`, gRPC trailers-only
PERMISSION_DENIED, Kafka responses with TOPIC/GROUP/CLUSTER_AUTHORIZATION_FAILED.
"""

from __future__ import annotations

# ---- HTTP/1.1 -------------------------------------------------------------------------------

# ---- end HTTP/1.1 ---------------------------------------------------------------------------

# ---- gRPC / HTTP/2 --------------------------------------------------------------------------

GRPC_PERMISSION_DENIED = 7
HTTP2_DENIED_BODY = b"Access denied\r\n"


def grpc_permission_denied_headers() -> list[tuple[bytes, bytes]]:
    """A denied gRPC call: a trailers-only response, HTTP/2 200 with grpc-status 7.

    Send it as ONE HEADERS frame with END_STREAM (`H2ServerConnection.send_trailers_only`):
    gRPC clients read the status from that single block and report PERMISSION_DENIED with
    details `Access denied`. Only the call's own stream ends; its siblings go on.
    """
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(GRPC_PERMISSION_DENIED).encode()),
        (b"grpc-message", b"Access denied"),  # percent-encoding leaves it unchanged
    ]


def http2_access_denied() -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A denied plain HTTP request over HTTP/2: (response headers, body) — 403 with the same
    15-byte body as HTTP/1.1. Send the headers, then the body with END_STREAM."""
    headers = [
        (b":status", b"403"),
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(HTTP2_DENIED_BODY)).encode()),
    ]
    return headers, HTTP2_DENIED_BODY


# ---- end gRPC / HTTP/2 ----------------------------------------------------------------------

# ---- Kafka ----------------------------------------------------------------------------------

# ---- end Kafka ------------------------------------------------------------------------------
