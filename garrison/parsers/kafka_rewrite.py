"""Pure rewrites of broker responses the proxy cannot forward unchanged.

- An all-topics Metadata request is forwarded and its answer filtered to the topics the client
  may see, as a Kafka broker with ACLs does (`rewrite_metadata_response`).
- A proxy that fronts one broker must keep clients talking to it: broker addresses in Metadata,
  FindCoordinator and DescribeCluster answers, and the new-leader endpoints of Produce/Fetch
  answers (KIP-951), are rewritten (`rewrite_broker_addresses`). Those Produce/Fetch answers
  must then be decoded (`KafkaResponseParser(decode_api_keys=...)` includes 0 and 1).

Each function re-encodes with kafka-python's class, same API version and correlation id, and
returns the complete frame (size prefix included). The decoded response is not modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from typing import Any

from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.kafka import KafkaResponse
from garrison.parsers.kafka_apis import (
    DESCRIBE_CLUSTER,
    FETCH,
    FIND_COORDINATOR,
    METADATA,
    PRODUCE,
    kafka_api,
)

# (node id, advertised host, advertised port) → (host, port) the client should use.
AddressMap = Callable[[int, str, int], tuple[str, int]]


def encode_response(api_key: int, api_version: int, correlation_id: int, message: Any) -> bytes:
    """A kafka-python response object as a complete frame (header v0/v1 as the API needs)."""
    # The message carries its version (decoded or built with it); kafka-python's version
    # setter cannot be used on responses (it writes a request header field).
    built_as = message.API_VERSION
    if built_as != api_version:
        raise LocalProtocolError(
            f"api key {api_key}: message is v{built_as}, the answer must be v{api_version}"
        )
    message.with_header(correlation_id=correlation_id)
    return bytes(message.encode(header=True, framed=True))


def rewrite_metadata_response(
    response: KafkaResponse,
    *,
    allowed_topics: Collection[str] | None = None,
    address_for: AddressMap | None = None,
) -> bytes:
    """Metadata answer with only `allowed_topics` (None: all) and brokers moved by
    `address_for` (None: unchanged)."""
    decoded = _decoded(response, METADATA)
    rewritten = copy.copy(decoded)
    if allowed_topics is not None:
        allowed = frozenset(allowed_topics)
        rewritten.topics = [t for t in decoded.topics or () if t.name in allowed]
    if address_for is not None:
        rewritten.brokers = [_moved(broker, address_for) for broker in decoded.brokers or ()]
    return _encode(response, rewritten)


# Responses that carry broker addresses, by API key.
ADDRESS_BEARING_APIS = frozenset({PRODUCE, FETCH, METADATA, FIND_COORDINATOR, DESCRIBE_CLUSTER})

# The first version of the Produce and Fetch answers with KIP-951's `node_endpoints` (new
# leaders' addresses); older answers have no such field, and asking kafka-python's object for
# it raises and catches an AttributeError on every answer, most of the traffic.
NODE_ENDPOINTS_SINCE = {PRODUCE: 10, FETCH: 16}


def carries_broker_addresses(response: KafkaResponse) -> bool:
    """Whether `rewrite_broker_addresses` has anything to move in this (decoded) response:
    Metadata, FindCoordinator, DescribeCluster, and Produce/Fetch answers listing new leaders
    (KIP-951 `node_endpoints`, Produce v10+ and Fetch v16+)."""
    request, decoded = response.request, response.decoded
    api_key = request.api_key
    if api_key not in ADDRESS_BEARING_APIS or decoded is None:
        return False
    since = NODE_ENDPOINTS_SINCE.get(api_key)
    if since is not None:
        return request.api_version >= since and bool(decoded.node_endpoints)
    return True


def rewrite_broker_addresses(response: KafkaResponse, address_for: AddressMap) -> bytes:
    """A response whose broker addresses go through `address_for` (see
    `carries_broker_addresses`); a response with none comes back unchanged.

    FindCoordinator v0-3 carries one coordinator, v4+ a list (one per key); coordinators that
    failed (node id -1) are left as they are.
    """
    api_key = response.request.api_key
    if api_key == METADATA:
        return rewrite_metadata_response(response, address_for=address_for)
    if api_key not in ADDRESS_BEARING_APIS or response.decoded is None:
        raise LocalProtocolError(
            f"api key {api_key} (decoded: {response.decoded is not None}) carries no broker "
            "addresses garrison can rewrite"
        )
    if not carries_broker_addresses(response):
        return response.raw
    decoded = response.decoded
    rewritten = copy.copy(decoded)
    if api_key in (PRODUCE, FETCH):
        rewritten.node_endpoints = [_moved(e, address_for) for e in decoded.node_endpoints]
    elif api_key == DESCRIBE_CLUSTER:
        rewritten.brokers = [_moved(b, address_for, "broker_id") for b in decoded.brokers or ()]
    elif response.request.api_version >= 4:
        rewritten.coordinators = [
            _moved(coordinator, address_for) if coordinator.node_id >= 0 else coordinator
            for coordinator in decoded.coordinators or ()
        ]
    elif decoded.node_id >= 0:
        rewritten.host, rewritten.port = address_for(decoded.node_id, decoded.host, decoded.port)
    return _encode(response, rewritten)


def _moved(entry: Any, address_for: AddressMap, node_attribute: str = "node_id") -> Any:
    moved = copy.copy(entry)
    node_id = getattr(entry, node_attribute)
    moved.host, moved.port = address_for(node_id, entry.host, entry.port)
    return moved


def _decoded(response: KafkaResponse, api_key: int) -> Any:
    if response.request.api_key != api_key or response.decoded is None:
        api = kafka_api(api_key)
        raise LocalProtocolError(
            f"expected a decoded {api.response_class.name if api else api_key} response, got "
            f"api key {response.request.api_key} (decoded: {response.decoded is not None})"
        )
    return response.decoded


def _encode(response: KafkaResponse, message: Any) -> bytes:
    request = response.request
    return encode_response(request.api_key, request.api_version, response.correlation_id, message)
