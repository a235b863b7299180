"""Every deny answer garrison sends, in the protocol's own words, in one module for review.

Pure: bytes and values in, bytes out. HTTP/1.1 `403 Access denied`, gRPC trailers-only
PERMISSION_DENIED, Kafka responses with TOPIC/GROUP/CLUSTER_AUTHORIZATION_FAILED.
"""

from __future__ import annotations

# ---- HTTP/1.1 -------------------------------------------------------------------------------
# How the engine keeps an HTTP/1.1 connection right around a denial (keep-alive, pipelining):
#
# 1. Answers go out in request order. A denied request's 403 is queued behind the responses
#    still owed for earlier requests on the connection; later requests wait behind it.
# 2. A denied request is never forwarded. If it has a body (`content_length` or `chunked` on
#    its RequestReceived), call `HTTP1RequestParser.discard_body()` right after that event: the
#    parser still parses and validates the body, so the next pipelined request starts at the
#    right byte, but queues no BodyReceived for it. The denied request ends at its
#    MessageCompleted; then go on with the next request's events as usual. Answer with
#    `keep_alive=event.keep_alive` and `version=event.version`.
# 3. Answer with keep_alive=False and close after writing when the next request cannot be
#    found or is not worth waiting for: the request carries `Expect: 100-continue`
#    (`RequestReceived.expect_continue`) and its body has not arrived (the client may never
#    send it; answer instead of `100 Continue`); the body is larger than the engine wants to
#    read for nothing (its threshold). The close lingers (`Close(linger=True)`): the client
#    may still be sending, and closing with unread bytes resets the connection before the
#    client read the answer. A chunked body's answer waits until the body ended or passed
#    the threshold, so that it says truly whether the connection stays.
# 5. A HEAD gets the same fields and no body (`head=True`).
# 4. A parse error (`HTTP1Error`): the parser is dead. Answer `http1_error_response(
#    exc.status)` after the responses owed, then close.

HTTP1_DENIED_BODY = b"Access denied\r\n"

_HTTP1_REASONS: dict[int, bytes] = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def http1_access_denied(
    version: bytes = b"HTTP/1.1", *, keep_alive: bool, head: bool = False
) -> bytes:
    """The answer to a denied HTTP/1.x request, as Cilium's proxy gives it:

    `403 Forbidden`, `Content-Length: 15`, `Content-Type: text/plain`, body
    `Access denied\\r\\n`; `Connection: close` when the connection closes after it, and
    `Connection: keep-alive` for an HTTP/1.0 client whose connection stays open (HTTP/1.0
    closes by default). `version` is the request's (`RequestReceived.version`).
    `head`: the request was a HEAD, whose answer has the same fields but no body (RFC 9110
    §9.3.2); a body there is read by the client as the start of the next response.
    """
    return _http1_answer(version, 403, HTTP1_DENIED_BODY, keep_alive, head)


def http1_error_response(
    status: int, *, keep_alive: bool = False, version: bytes = b"HTTP/1.1", head: bool = False
) -> bytes:
    """The answer to a request the parser refused (`HTTP1Error.status`: 400, 413, 414, 431,
    501, 505; 502 when upstream's response could not be parsed), body `<reason>\\r\\n`.

    Closing by default: after a parse error the parser is dead and nothing after the bad
    bytes can be trusted. `keep_alive=True` is only for answers to well-framed requests.
    """
    reason = _HTTP1_REASONS.get(status)
    if reason is None or status == 403:
        raise ValueError(f"no HTTP/1.1 error answer for status {status}")
    return _http1_answer(version, status, reason + b"\r\n", keep_alive, head)


def _http1_answer(
    version: bytes, status: int, body: bytes, keep_alive: bool, head: bool = False
) -> bytes:
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ValueError(f"no HTTP/1.x answer for version {version!r}")
    if not keep_alive:
        connection = b"Connection: close\r\n"
    elif version == b"HTTP/1.0":
        connection = b"Connection: keep-alive\r\n"
    else:
        connection = b""
    return b"%s %d %s\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n%s\r\n%s" % (
        version,
        status,
        _HTTP1_REASONS[status],
        len(body),
        connection,
        b"" if head else body,
    )


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


def http2_error_response(status: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A request over HTTP/2 the proxy refuses without a policy decision (400: a path that
    cannot be normalized safely): (response headers, body `<reason>\\r\\n`), sent like
    `http2_access_denied()`."""
    reason = _HTTP1_REASONS.get(status)
    if reason is None or status == 403:
        raise ValueError(f"no HTTP/2 error answer for status {status}")
    body = reason + b"\r\n"
    headers = [
        (b":status", str(status).encode()),
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(body)).encode()),
    ]
    return headers, body


# ---- end gRPC / HTTP/2 ----------------------------------------------------------------------

# ---- Kafka ----------------------------------------------------------------------------------
# A denied Kafka request is not forwarded; the client gets a response of the request's own API
# version and correlation id, built with kafka-python's response class (the bytes a broker with
# ACLs would send). Error codes, per what a Kafka broker answers when authorization fails:
#   29 TOPIC_AUTHORIZATION_FAILED     on every topic (and each partition) the request names;
#   30 GROUP_AUTHORIZATION_FAILED     group APIs (JoinGroup, Heartbeat, LeaveGroup, SyncGroup,
#                                     DescribeGroups, FindCoordinator for a group, OffsetFetch
#                                     without topics);
#   53 TRANSACTIONAL_ID_AUTHORIZATION_FAILED  InitProducerId with a transactional id and
#                                     FindCoordinator for a transaction, as Kafka does;
#   31 CLUSTER_AUTHORIZATION_FAILED   APIs with neither (InitProducerId of an idempotent
#                                     producer: Kafka's IDEMPOTENT_WRITE is a cluster ACL;
#                                     ListGroups with an empty list; ApiVersions; telemetry;
#                                     other topic-less APIs with a top-level error code).
#   ACL APIs: 29 on each ACL resource (or filter) of type TOPIC or ANY, 31 on the others;
#   config APIs: 29 on each TOPIC resource, 31 on the others.
# Topic APIs with an encoder here (Produce, Fetch, ListOffsets, OffsetCommit/Fetch,
# CreateTopics, DeleteTopics, DeleteRecords, OffsetForLeaderEpoch, AddPartitionsToTxn,
# TxnOffsetCommit, CreatePartitions, DescribeProducers, DescribeTopicPartitions, the ACL and
# config APIs) are answered; the others (replica and reassignment admin) close.
# Fetch partitions carry empty records (b""), not null. A denied Metadata request still lists
# the brokers (`cluster`, learnt from an earlier Metadata answer): kafka-python treats a
# broker-less answer as a failed update and retries until its timeout instead of raising
# TopicAuthorizationFailedError. An all-topics Metadata request that is denied gets an empty
# topic list, as from a broker on which the client may describe no topic.
# OffsetCommit has no field for a group-level error: without topics the answer is empty.
# Produce with acks=0: no answer (None). A request with no possible answer (no kafka-python
# class for the API key or version, or a header-only event) raises KafkaDenyUnencodableError:
# the caller must close the connection (and log an ERROR record); `kafka_deny_encodable()`
# tells in advance. GetTelemetrySubscriptions (71) and PushTelemetry (72), which librdkafka
# sends when the broker advertises them, are encoded by hand (kafka-python has no class): an
# error makes librdkafka retry telemetry after its push interval instead of reconnecting.

import struct  # noqa: E402 - each section owns its imports
from collections.abc import Callable as _Callable  # noqa: E402
from typing import Any as _Any  # noqa: E402

from garrison.parsers.errors import LocalProtocolError  # noqa: E402
from garrison.parsers.kafka import KafkaCluster, KafkaRequest  # noqa: E402
from garrison.parsers.kafka_apis import (  # noqa: E402
    API_VERSIONS,
    GET_TELEMETRY_SUBSCRIPTIONS,
    PUSH_TELEMETRY,
    KafkaApi,
    kafka_api,
)
from garrison.parsers.kafka_rewrite import encode_response  # noqa: E402

# Kafka's error codes (`org.apache.kafka.common.protocol.Errors`).
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


def entry_class(message_class: _Any, *path: str) -> _Any:
    """The kafka-python class of the entries of the array at `path` (`"responses"`, ...)."""
    fields = message_class.fields
    field = None
    for name in path:
        field = fields[name]
        fields = field.fields
    return field.data_class if field is not None else message_class


_KafkaDenyBuilder = _Callable[[_Any, int, _Any, KafkaCluster | None], _Any]
_DENIED = "Access denied"
_NO_AUTHORIZED_OPERATIONS = None  # kafka-python encodes None as INT32_MIN ("not requested")


def kafka_deny_response(
    request: KafkaRequest, cluster: KafkaCluster | None = None
) -> bytes | None:
    """The complete frame (size prefix included) answering a denied request, or None for a
    Produce with acks=0 (the client expects no answer).

    `cluster`: the brokers to list in a denied Metadata answer (`TopicIdRegistry.cluster`).
    Raises KafkaDenyUnencodableError where no answer can be built (close the connection).
    """
    if not request.expects_response:
        return None
    if request.api_key in (GET_TELEMETRY_SUBSCRIPTIONS, PUSH_TELEMETRY):
        return _kafka_deny_telemetry(request)
    api = kafka_api_of(request)
    version = request.api_version
    if request.api_key == API_VERSIONS:
        version = 0  # clients read every ApiVersions error answer as v0, as Kafka encodes it
    build = _KAFKA_DENY_BUILDERS.get(request.api_key)
    if build is not None:
        message = build(api.response_class, version, request.decoded, cluster)
    else:
        message = _kafka_deny_generic(api.response_class, version, request)
    return encode_response(request.api_key, version, request.correlation_id, message)


def kafka_deny_encodable(request: KafkaRequest) -> bool:
    """Whether `kafka_deny_response` can answer this request (else: close the connection)."""
    if not request.expects_response:
        return True
    if request.api_key in (GET_TELEMETRY_SUBSCRIPTIONS, PUSH_TELEMETRY):
        return request.api_version == 0
    api = kafka_api(request.api_key)
    if api is None or request.decoded is None or not api.supports(request.api_version):
        return False
    return request.api_key in _KAFKA_DENY_BUILDERS or _kafka_generic_deniable(
        api.response_class, request.api_version, request
    )


def _kafka_deny_produce(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    topic_cls = entry_class(cls, "responses")
    partition_cls = entry_class(cls, "responses", "partition_responses")
    return cls[version](
        throttle_time_ms=0,
        responses=[
            topic_cls(
                name=topic.name,
                topic_id=topic.topic_id,
                partition_responses=[
                    partition_cls(
                        index=partition.index,
                        error_code=TOPIC_AUTHORIZATION_FAILED,
                        base_offset=-1,
                        log_append_time_ms=-1,
                        log_start_offset=-1,
                        record_errors=[],
                        error_message=_DENIED if version >= 8 else None,
                    )
                    for partition in topic.partition_data or ()
                ],
            )
            for topic in req.topic_data or ()
        ],
    )


def _kafka_deny_fetch(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    topic_cls = entry_class(cls, "responses")
    partition_cls = entry_class(cls, "responses", "partitions")
    return cls[version](
        throttle_time_ms=0,
        # A Fetch naming no topic (an unchanged incremental fetch) is denied as a whole.
        error_code=0 if req.topics else TOPIC_AUTHORIZATION_FAILED,
        session_id=0,
        responses=[
            topic_cls(
                topic=topic.topic,
                topic_id=topic.topic_id,
                partitions=[
                    partition_cls(
                        partition_index=partition.partition,
                        error_code=TOPIC_AUTHORIZATION_FAILED,
                        high_watermark=-1,
                        last_stable_offset=-1,
                        log_start_offset=-1,
                        aborted_transactions=[],
                        preferred_read_replica=-1,
                        records=b"",
                    )
                    for partition in topic.partitions or ()
                ],
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_deny_list_offsets(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    topic_cls = entry_class(cls, "topics")
    partition_cls = entry_class(cls, "topics", "partitions")
    return cls[version](
        throttle_time_ms=0,
        topics=[
            topic_cls(
                name=topic.name,
                partitions=[
                    partition_cls(
                        partition_index=partition.partition_index,
                        error_code=TOPIC_AUTHORIZATION_FAILED,
                        old_style_offsets=[],
                        timestamp=-1,
                        offset=-1,
                        leader_epoch=-1,
                    )
                    for partition in topic.partitions or ()
                ],
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_deny_metadata(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    broker_cls = entry_class(cls, "brokers")
    topic_cls = entry_class(cls, "topics")
    brokers = cluster.brokers if cluster is not None else ()
    return cls[version](
        throttle_time_ms=0,
        brokers=[
            broker_cls(node_id=b.node_id, host=b.host, port=b.port, rack=b.rack) for b in brokers
        ],
        cluster_id=cluster.cluster_id if cluster is not None else None,
        controller_id=cluster.controller_id if cluster is not None else -1,
        topics=[
            topic_cls(
                error_code=TOPIC_AUTHORIZATION_FAILED,
                name=topic.name if topic.name is not None or version >= 12 else "",
                topic_id=topic.topic_id,
                is_internal=False,
                partitions=[],
                authorized_operations=_NO_AUTHORIZED_OPERATIONS,
            )
            for topic in req.topics or ()  # null (all topics): nothing the client may see
        ],
        authorized_operations=_NO_AUTHORIZED_OPERATIONS,
        error_code=0,
    )


def _kafka_deny_offset_commit(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    topic_cls = entry_class(cls, "topics")
    partition_cls = entry_class(cls, "topics", "partitions")
    return cls[version](
        throttle_time_ms=0,
        topics=[
            topic_cls(
                name=topic.name,
                topic_id=topic.topic_id,
                partitions=[
                    partition_cls(
                        partition_index=partition.partition_index,
                        error_code=TOPIC_AUTHORIZATION_FAILED,
                    )
                    for partition in topic.partitions or ()
                ],
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_deny_offset_fetch(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    def partitions(partition_cls: _Any, indexes: _Any) -> list[_Any]:
        return [
            partition_cls(
                partition_index=index,
                committed_offset=-1,
                committed_leader_epoch=-1,
                metadata="",
                error_code=TOPIC_AUTHORIZATION_FAILED,
            )
            for index in indexes
        ]

    if version < 8:
        topic_cls = entry_class(cls, "topics")
        partition_cls = entry_class(cls, "topics", "partitions")
        return cls[version](
            throttle_time_ms=0,
            topics=[
                topic_cls(
                    name=t.name, partitions=partitions(partition_cls, t.partition_indexes or ())
                )
                for t in req.topics or ()
            ],
            error_code=0 if req.topics else GROUP_AUTHORIZATION_FAILED,
        )
    group_cls = entry_class(cls, "groups")
    topic_cls = entry_class(cls, "groups", "topics")
    partition_cls = entry_class(cls, "groups", "topics", "partitions")
    return cls[version](
        throttle_time_ms=0,
        groups=[
            group_cls(
                group_id=group.group_id,
                topics=[
                    topic_cls(
                        name=t.name,
                        topic_id=t.topic_id,
                        partitions=partitions(partition_cls, t.partition_indexes or ()),
                    )
                    for t in group.topics or ()
                ],
                error_code=0 if group.topics else GROUP_AUTHORIZATION_FAILED,
            )
            for group in req.groups or ()
        ],
    )


def _kafka_coordinator_error(key_type: int) -> int:
    # CoordinatorType: 0 group, 1 transaction, 2 share group.
    return TRANSACTIONAL_ID_AUTHORIZATION_FAILED if key_type == 1 else GROUP_AUTHORIZATION_FAILED


def _kafka_deny_find_coordinator(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    error = _kafka_coordinator_error(req.key_type if version >= 1 else 0)
    if version < 4:
        return cls[version](
            throttle_time_ms=0,
            error_code=error,
            error_message=_DENIED,
            node_id=-1,
            host="",
            port=-1,
        )
    coordinator_cls = entry_class(cls, "coordinators")
    return cls[version](
        throttle_time_ms=0,
        coordinators=[
            coordinator_cls(
                key=key, node_id=-1, host="", port=-1, error_code=error, error_message=_DENIED
            )
            for key in req.coordinator_keys or ()
        ],
    )


def _kafka_deny_join_group(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    return cls[version](
        throttle_time_ms=0,
        error_code=GROUP_AUTHORIZATION_FAILED,
        generation_id=-1,
        protocol_type=None,
        protocol_name=None if version >= 7 else "",
        leader="",
        skip_assignment=False,
        member_id="",
        members=[],
    )


def _kafka_deny_describe_groups(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    group_cls = entry_class(cls, "groups")
    return cls[version](
        throttle_time_ms=0,
        groups=[
            group_cls(
                error_code=GROUP_AUTHORIZATION_FAILED,
                error_message=_DENIED,
                group_id=group_id,
                group_state="",
                protocol_type="",
                protocol_data="",
                members=[],
                authorized_operations=_NO_AUTHORIZED_OPERATIONS,
            )
            for group_id in req.groups or ()
        ],
    )


def _kafka_deny_create_topics(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    topic_cls = entry_class(cls, "topics")
    return cls[version](
        throttle_time_ms=0,
        topics=[
            topic_cls(
                name=topic.name,
                topic_id=None,
                error_code=TOPIC_AUTHORIZATION_FAILED,
                error_message=_DENIED,
                num_partitions=-1,
                replication_factor=-1,
                configs=None,
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_deny_delete_topics(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    result_cls = entry_class(cls, "responses")
    if version < 6:
        named = [(name, None) for name in req.topic_names or ()]
    else:
        named = [(topic.name, topic.topic_id) for topic in req.topics or ()]
    return cls[version](
        throttle_time_ms=0,
        responses=[
            result_cls(
                name=name,
                topic_id=topic_id,
                error_code=TOPIC_AUTHORIZATION_FAILED,
                error_message=_DENIED,
            )
            for name, topic_id in named
        ],
    )


def _kafka_deny_init_producer_id(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    transactional = req.transactional_id is not None
    return cls[version](
        throttle_time_ms=0,
        error_code=(
            TRANSACTIONAL_ID_AUTHORIZATION_FAILED if transactional else CLUSTER_AUTHORIZATION_FAILED
        ),
        producer_id=-1,
        producer_epoch=-1,
        ongoing_txn_producer_id=-1,
        ongoing_txn_producer_epoch=-1,
    )


def _kafka_acl_error(resource_type: int) -> int:
    # ResourceType TOPIC (2), or ANY (1) in a filter: a topic ACL; anything else the cluster's.
    return TOPIC_AUTHORIZATION_FAILED if resource_type in (1, 2) else CLUSTER_AUTHORIZATION_FAILED


def _kafka_deny_describe_acls(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    return cls[version](
        throttle_time_ms=0,
        error_code=_kafka_acl_error(req.resource_type_filter),
        error_message=_DENIED,
        resources=[],
    )


def _kafka_deny_create_acls(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    result_cls = entry_class(cls, "results")
    return cls[version](
        throttle_time_ms=0,
        results=[
            result_cls(error_code=_kafka_acl_error(c.resource_type), error_message=_DENIED)
            for c in req.creations or ()
        ],
    )


def _kafka_deny_delete_acls(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    result_cls = entry_class(cls, "filter_results")
    return cls[version](
        throttle_time_ms=0,
        filter_results=[
            result_cls(
                error_code=_kafka_acl_error(f.resource_type_filter),
                error_message=_DENIED,
                matching_acls=[],
            )
            for f in req.filters or ()
        ],
    )


def _kafka_deny_delete_records(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    topic_cls = entry_class(cls, "topics")
    partition_cls = entry_class(cls, "topics", "partitions")
    return cls[version](
        throttle_time_ms=0,
        topics=[
            topic_cls(
                name=topic.name,
                partitions=[
                    partition_cls(
                        partition_index=partition.partition_index,
                        low_watermark=-1,
                        error_code=TOPIC_AUTHORIZATION_FAILED,
                    )
                    for partition in topic.partitions or ()
                ],
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_deny_offset_for_leader_epoch(
    cls: _Any, version: int, req: _Any, cluster: _Any
) -> _Any:
    topic_cls = entry_class(cls, "topics")
    partition_cls = entry_class(cls, "topics", "partitions")
    return cls[version](
        throttle_time_ms=0,
        topics=[
            topic_cls(
                topic=topic.topic,
                partitions=[
                    partition_cls(
                        error_code=TOPIC_AUTHORIZATION_FAILED,
                        partition=partition.partition,
                        leader_epoch=-1,
                        end_offset=-1,
                    )
                    for partition in topic.partitions or ()
                ],
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_deny_add_partitions_to_txn(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    def results(topic_cls: _Any, partition_cls: _Any, topics: _Any) -> list[_Any]:
        return [
            topic_cls(
                name=topic.name,
                results_by_partition=[
                    partition_cls(
                        partition_index=index, partition_error_code=TOPIC_AUTHORIZATION_FAILED
                    )
                    for index in topic.partitions or ()
                ],
            )
            for topic in topics or ()
        ]

    if version < 4:
        return cls[version](
            throttle_time_ms=0,
            results_by_topic_v3_and_below=results(
                entry_class(cls, "results_by_topic_v3_and_below"),
                entry_class(cls, "results_by_topic_v3_and_below", "results_by_partition"),
                req.v3_and_below_topics,
            ),
        )
    path = ("results_by_transaction", "topic_results")
    transaction_cls = entry_class(cls, path[0])
    return cls[version](
        throttle_time_ms=0,
        error_code=0,
        results_by_transaction=[
            transaction_cls(
                transactional_id=transaction.transactional_id,
                topic_results=results(
                    entry_class(cls, *path),
                    entry_class(cls, *path, "results_by_partition"),
                    transaction.topics,
                ),
            )
            for transaction in req.transactions or ()
        ],
    )


def _kafka_deny_txn_offset_commit(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    topic_cls = entry_class(cls, "topics")
    partition_cls = entry_class(cls, "topics", "partitions")
    return cls[version](
        throttle_time_ms=0,
        topics=[
            topic_cls(
                name=topic.name,
                partitions=[
                    partition_cls(
                        partition_index=partition.partition_index,
                        error_code=TOPIC_AUTHORIZATION_FAILED,
                    )
                    for partition in topic.partitions or ()
                ],
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_config_error(resource_type: int) -> int:
    # ConfigResource.Type TOPIC (2): a topic's; BROKER, BROKER_LOGGER, ...: the cluster's.
    return TOPIC_AUTHORIZATION_FAILED if resource_type == 2 else CLUSTER_AUTHORIZATION_FAILED


def _kafka_deny_describe_configs(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    result_cls = entry_class(cls, "results")
    return cls[version](
        throttle_time_ms=0,
        results=[
            result_cls(
                error_code=_kafka_config_error(resource.resource_type),
                error_message=_DENIED,
                resource_type=resource.resource_type,
                resource_name=resource.resource_name,
                configs=[],
            )
            for resource in req.resources or ()
        ],
    )


def _kafka_deny_alter_configs(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    """AlterConfigs and IncrementalAlterConfigs: the same answer."""
    result_cls = entry_class(cls, "responses")
    return cls[version](
        throttle_time_ms=0,
        responses=[
            result_cls(
                error_code=_kafka_config_error(resource.resource_type),
                error_message=_DENIED,
                resource_type=resource.resource_type,
                resource_name=resource.resource_name,
            )
            for resource in req.resources or ()
        ],
    )


def _kafka_deny_create_partitions(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    result_cls = entry_class(cls, "results")
    return cls[version](
        throttle_time_ms=0,
        results=[
            result_cls(
                name=topic.name, error_code=TOPIC_AUTHORIZATION_FAILED, error_message=_DENIED
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_deny_describe_producers(cls: _Any, version: int, req: _Any, cluster: _Any) -> _Any:
    topic_cls = entry_class(cls, "topics")
    partition_cls = entry_class(cls, "topics", "partitions")
    return cls[version](
        throttle_time_ms=0,
        topics=[
            topic_cls(
                name=topic.name,
                partitions=[
                    partition_cls(
                        partition_index=index,
                        error_code=TOPIC_AUTHORIZATION_FAILED,
                        error_message=_DENIED,
                        active_producers=[],
                    )
                    for index in topic.partition_indexes or ()
                ],
            )
            for topic in req.topics or ()
        ],
    )


def _kafka_deny_describe_topic_partitions(
    cls: _Any, version: int, req: _Any, cluster: _Any
) -> _Any:
    topic_cls = entry_class(cls, "topics")
    return cls[version](
        throttle_time_ms=0,
        topics=[
            topic_cls(
                error_code=TOPIC_AUTHORIZATION_FAILED,
                name=topic.name,
                topic_id=None,
                is_internal=False,
                partitions=[],
                topic_authorized_operations=-(2**31),  # "not requested"; not nullable here
            )
            for topic in req.topics or ()  # an empty list (every topic): nothing to see
        ],
        next_cursor=None,
    )


_KAFKA_DENY_BUILDERS: dict[int, _KafkaDenyBuilder] = {
    0: _kafka_deny_produce,
    1: _kafka_deny_fetch,
    2: _kafka_deny_list_offsets,
    3: _kafka_deny_metadata,
    8: _kafka_deny_offset_commit,
    9: _kafka_deny_offset_fetch,
    10: _kafka_deny_find_coordinator,
    11: _kafka_deny_join_group,
    15: _kafka_deny_describe_groups,
    19: _kafka_deny_create_topics,
    20: _kafka_deny_delete_topics,
    21: _kafka_deny_delete_records,
    22: _kafka_deny_init_producer_id,
    23: _kafka_deny_offset_for_leader_epoch,
    24: _kafka_deny_add_partitions_to_txn,
    28: _kafka_deny_txn_offset_commit,
    29: _kafka_deny_describe_acls,
    30: _kafka_deny_create_acls,
    31: _kafka_deny_delete_acls,
    32: _kafka_deny_describe_configs,
    33: _kafka_deny_alter_configs,
    37: _kafka_deny_create_partitions,
    44: _kafka_deny_alter_configs,
    61: _kafka_deny_describe_producers,
    75: _kafka_deny_describe_topic_partitions,
}


def _kafka_generic_deniable(cls: _Any, version: int, request: KafkaRequest) -> bool:
    """Topic-less APIs whose response has a top-level error code in this version."""
    field = cls.fields.get("error_code")
    return (
        not request.topics
        and not request.topics_unknown
        and not request.unresolved_topic_ids
        and field is not None
        and field.for_version_q(version)
    )


def _kafka_deny_generic(cls: _Any, version: int, request: KafkaRequest) -> _Any:
    """A topic-less API: its top-level error code set, every array empty, the rest defaults.

    The code is 30 when the request names a group, 53 for a transactional id, else 31."""
    if not _kafka_generic_deniable(cls, version, request):
        raise KafkaDenyUnencodableError(f"no deny answer for {cls.name} v{version}")
    req = request.decoded
    if getattr(req, "group_id", None) is not None:
        error = GROUP_AUTHORIZATION_FAILED
    elif getattr(req, "transactional_id", None) is not None:
        error = TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    else:
        error = CLUSTER_AUTHORIZATION_FAILED
    values: dict[str, _Any] = {"error_code": error}
    for name, field in cls.fields.items():
        if name == "error_code" or not field.for_version_q(version):
            continue
        if field.is_struct_array() or field.is_array():
            values[name] = []
    return cls[version](**values)


def _kafka_deny_telemetry(request: KafkaRequest) -> bytes:
    """GetTelemetrySubscriptions / PushTelemetry v0 answers (flexible, header v1), by hand
    after KIP-714's schemas: kafka-python has no class for them."""
    if request.api_version != 0:
        raise KafkaDenyUnencodableError(
            f"no deny answer for api key {request.api_key} v{request.api_version}"
        )
    error = CLUSTER_AUTHORIZATION_FAILED.to_bytes(2, "big")
    throttle = bytes(4)
    if request.api_key == PUSH_TELEMETRY:
        body = throttle + error + b"\x00"
    else:
        body = (
            throttle
            + error
            + bytes(16)  # ClientInstanceId: zero uuid
            + bytes(4)  # SubscriptionId
            + b"\x01"  # AcceptedCompressionTypes: empty compact array
            + bytes(4)  # PushIntervalMs 0: the client keeps its default
            + bytes(4)  # TelemetryMaxBytes
            + b"\x00"  # DeltaTemporality false
            + b"\x01"  # RequestedMetrics: empty compact array
            + b"\x00"  # tagged fields
        )
    # Response header v1: the correlation id and no tagged fields.
    payload = struct.pack(">i", request.correlation_id) + b"\x00" + body
    return struct.pack(">i", len(payload)) + payload


# ---- end Kafka ------------------------------------------------------------------------------
