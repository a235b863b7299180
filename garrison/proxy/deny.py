"""Every deny answer garrison sends, in the protocol's own words, in one module for review.

Pure: bytes and values in, bytes out. HTTP/1.1 `403 Access denied`, gRPC trailers-only
PERMISSION_DENIED, Kafka responses with TOPIC/GROUP/CLUSTER_AUTHORIZATION_FAILED.
"""

from __future__ import annotations

# ---- HTTP/1.1 -------------------------------------------------------------------------------

# ---- end HTTP/1.1 ---------------------------------------------------------------------------

# ---- gRPC / HTTP/2 --------------------------------------------------------------------------

# ---- end gRPC / HTTP/2 ----------------------------------------------------------------------

# ---- Kafka ----------------------------------------------------------------------------------

# ---- end Kafka ------------------------------------------------------------------------------
