"""Flow records (Hubble's field names), their builders, redaction, rendering, store, access log.

Everything here is pure except `writer` and `reader` (file I/O). The proxy engine and the
datapath event reader build records with `garrison.flows.build`; the server stores them in a
`FlowStore` and writes them with an `AccessLogWriter`. `query` filters flows, `render` and
`export` print them, `summary` sums them up for a review.
"""

from garrison.flows.build import (
    l3_l4_drop,
    l3_l4_trace,
    l3_l4_verdict,
    l7_grpc_request,
    l7_grpc_response,
    l7_http_request,
    l7_http_response,
    l7_kafka_request,
    l7_kafka_response,
    proxy_error,
)
from garrison.flows.query import FilterError, FlowQuery
from garrison.flows.record import (
    DropReasonDesc,
    Endpoint,
    FlowDecodeError,
    FlowRecord,
    FlowType,
    L4Protocol,
    TCPFlags,
    TraceObservationPoint,
    TrafficDirection,
    Verdict,
)
from garrison.flows.redact import DEFAULT_REDACTION, RedactionConfig
from garrison.flows.render import RenderOptions, render_compact
from garrison.flows.store import FlowStore, StoreConfig

__all__ = [
    "DEFAULT_REDACTION",
    "DropReasonDesc",
    "Endpoint",
    "FilterError",
    "FlowDecodeError",
    "FlowQuery",
    "FlowRecord",
    "FlowStore",
    "FlowType",
    "L4Protocol",
    "RedactionConfig",
    "RenderOptions",
    "StoreConfig",
    "TCPFlags",
    "TraceObservationPoint",
    "TrafficDirection",
    "Verdict",
    "l3_l4_drop",
    "l3_l4_trace",
    "l3_l4_verdict",
    "l7_grpc_request",
    "l7_grpc_response",
    "l7_http_request",
    "l7_http_response",
    "l7_kafka_request",
    "l7_kafka_response",
    "proxy_error",
    "render_compact",
]
