"""Per-connection enforcement engines (sans-io): parser events in, commands out.

`make_engine` picks the engine for the connection's L7 protocol. Each engine lives in its own
module (`engine_http1`, `engine_h2`, `engine_kafka`) and implements
`garrison.proxy.commands.ConnectionEngine`.
"""

from __future__ import annotations

from garrison.policies.l7rules import L7Protocol
from garrison.proxy.commands import ConnectionContext, ConnectionEngine
from garrison.proxy.config import ProxyConfig


def make_engine(context: ConnectionContext, config: ProxyConfig) -> ConnectionEngine:
    if context.protocol is L7Protocol.HTTP:
        from garrison.proxy.engine_http1 import HTTPEngine

        return HTTPEngine(context, config)
    if context.protocol is L7Protocol.GRPC:
        from garrison.proxy.engine_h2 import H2Engine

        return H2Engine(context, config)
    from garrison.proxy.engine_kafka import KafkaEngine

    return KafkaEngine(context, config)
