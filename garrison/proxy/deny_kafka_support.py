"""Helpers of the Kafka deny encoders in `garrison.proxy.deny` (the encoders live there).

Error codes are Kafka's (`org.apache.kafka.common.protocol.Errors`).
"""

from __future__ import annotations

import struct
from typing import Any

from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.kafka import KafkaRequest
from garrison.parsers.kafka_apis import KafkaApi, kafka_api
from garrison.parsers.kafka_rewrite import encode_response

__all__ = [
    "CLUSTER_AUTHORIZATION_FAILED",
    "GROUP_AUTHORIZATION_FAILED",
    "TOPIC_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    "KafkaDenyUnencodableError",
    "encode_response",
    "entry_class",
    "flexible_frame",
    "kafka_api_of",
]

TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53


class KafkaDenyUnencodableError(LocalProtocolError):
    """No deny answer can be built for this request (an API or version kafka-python cannot
    encode, or a request that was not decoded). The connection must be closed instead, with
    an ERROR flow record: the client would otherwise wait for an answer that never comes."""


def kafka_api_of(request: KafkaRequest) -> KafkaApi:
    api = kafka_api(request.api_key)
    if api is None or request.decoded is None or not api.supports(request.api_version):
        raise KafkaDenyUnencodableError(
            f"no deny answer for api key {request.api_key} v{request.api_version}"
        )
    return api


def entry_class(message_class: Any, *path: str) -> Any:
    """The kafka-python class of the entries of the array at `path` (`"responses"`, ...)."""
    fields = message_class.fields
    field = None
    for name in path:
        field = fields[name]
        fields = field.fields
    return field.data_class if field is not None else message_class


def flexible_frame(correlation_id: int, body: bytes) -> bytes:
    """Frame a flexible-version body by hand: response header v1 (no tagged fields)."""
    payload = struct.pack(">i", correlation_id) + b"\x00" + body
    return struct.pack(">i", len(payload)) + payload
