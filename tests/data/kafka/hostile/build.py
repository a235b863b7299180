"""Builds lengths.json: Kafka frames whose lengths or counts no protocol version can carry.

Each case is a real frame captured from a client or tansu (tests/data/kafka, located by the
topic name inside it) or one encoded by kafka-python, with one length or count replaced. The
expected error is written here by hand, never read from garrison. Run from the repository
root: `.venv/bin/python tests/data/kafka/hostile/build.py`.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

from kafka.protocol.admin import (  # noqa: E402
    DeleteTopicsRequest,
    DescribeTopicPartitionsRequest,
)
from kafka.protocol.metadata import MetadataRequest  # noqa: E402

from tests.unit.parsers.kafka_fixtures import scenario_connections  # noqa: E402

OUT = Path(__file__).with_name("lengths.json")


def captured(name: str, api_key: int, correlation_id: int, response: bool = False) -> bytes:
    scenario, _, number = name.partition("/conn")
    conn = scenario_connections(scenario)[int(number)]
    frames = conn.responses if response else conn.requests
    (frame,) = [f for f in frames if f.api_key == api_key and f.correlation_id == correlation_id]
    return conn.response_frame(frame) if response else conn.request_frame(frame)


def replace(frame: bytes, at: int, old: int, new: bytes) -> bytes:
    """`old` bytes at `at` replaced by `new`; the size prefix follows the new length."""
    body = frame[4:at] + new + frame[at + old :]
    return struct.pack(">i", len(body)) + body


def find(frame: bytes, needle: bytes) -> int:
    at = frame.find(needle)
    assert at > 0 and frame.find(needle, at + 1) < 0, needle
    return at


def i32(value: int) -> bytes:
    return struct.pack(">i", value)


def i16(value: int) -> bytes:
    return struct.pack(">h", value)


CASES: list[dict[str, Any]] = []


def case(name: str, why: str, frame: bytes, error: str, request: bytes | None = None) -> None:
    entry: dict[str, Any] = {"name": name, "why": why, "side": "broker" if request else "client"}
    if request is not None:
        entry["request"] = request.hex()
    entry["frame"] = frame.hex()
    entry["error"] = error
    CASES.append(entry)


# ---- aiokafka Produce v7 (classic encodings) ---------------------------------------------------

P7 = captured("aiokafka/conn1", 0, 3)
N = find(P7, b"\x00\x09ak-orders")  # topic name; the topic count is the 4 bytes before it
P7_TXN, P7_PARTS, P7_RECORDS, P7_BATCH = N - 12, N + 11, N + 19, N + 23
E7 = "ProduceRequest v7: "

for value, label, message in [
    (-(2**31), "min-int", "topic_data: length -2147483648 is negative (only -1 means null)"),
    (-2, "minus-2", "topic_data: length -2 is negative (only -1 means null)"),
    (-1, "null", "topic_data: null where the schema allows none"),
    (2**31 - 1, "max-int", "topic_data: 2147483647 elements cannot fit in the 100 bytes left"),
]:
    case(
        f"produce-v7-topic-count-{label}",
        "the fail-open: a topic count no Kafka reader accepts once read as 'no topics'",
        replace(P7, N - 4, 4, i32(value)),
        E7 + message,
    )
case(
    "produce-v7-partition-count-negative",
    "partition array count below -1",
    replace(P7, P7_PARTS, 4, i32(-2)),
    E7 + "partition_data: length -2 is negative (only -1 means null)",
)
case(
    "produce-v7-transactional-id-minus-2",
    "a nullable string may be -1 (null), never another negative length",
    replace(P7, P7_TXN, 2, i16(-2)),
    E7 + "transactional_id: length -2 is negative (only -1 means null)",
)
case(
    "produce-v7-topic-name-null",
    "a topic name is not nullable: null once read as 'no name', so no topic",
    replace(P7, N, 2, i16(-1)),
    E7 + "name: null where the schema allows none",
)
case(
    "produce-v7-topic-name-past-the-end",
    "a string length larger than the frame",
    replace(P7, N, 2, i16(0x7FFF)),
    E7 + "name: string of 32767 bytes runs past the end",
)
case(
    "produce-v7-records-minus-2",
    "records may be -1 (null), never another negative length",
    replace(P7, P7_RECORDS, 4, i32(-2)),
    E7 + "records: length -2 is negative (only -1 means null)",
)
case(
    "produce-v7-records-past-the-end",
    "a bytes length larger than the frame",
    replace(P7, P7_RECORDS, 4, i32(2**31 - 1)),
    E7 + "records: 2147483647 bytes run past the end of the frame",
)
case(
    "produce-v7-batch-length-past-the-records",
    "a record batch longer than the records field that holds it",
    replace(P7, P7_BATCH + 8, 4, i32(2**31 - 1)),
    E7 + "records: record batch length 2147483647 outside [49, 65]",
)
case(
    "produce-v7-batch-length-negative",
    "a negative record batch length",
    replace(P7, P7_BATCH + 8, 4, i32(-(2**31))),
    E7 + "records: record batch length -2147483648 outside [49, 65]",
)
case(
    "produce-v7-batch-magic-3",
    "a record batch format Kafka does not have",
    replace(P7, P7_BATCH + 16, 1, b"\x03"),
    E7 + "records: record batch magic 3 (Kafka knows 0, 1 and 2)",
)
case(
    "produce-v7-batch-record-count-negative",
    "an uncompressed batch claiming -1 records",
    replace(P7, P7_BATCH + 57, 4, i32(-1)),
    E7 + "records: record batch of 65 bytes claims -1 records",
)
case(
    "produce-v7-batch-record-count-huge",
    "an uncompressed batch claiming more records than its bytes hold",
    replace(P7, P7_BATCH + 57, 4, i32(2**31 - 1)),
    E7 + "records: record batch of 65 bytes claims 2147483647 records",
)
case(
    "produce-v7-client-id-minus-2",
    "the request header's client id may be -1 (null), never another negative length",
    replace(P7, 12, 2, i16(-2)),
    "client id length -2",
)

# ---- librdkafka Produce v10 (compact encodings, tagged fields) ---------------------------------

P10 = captured("librdkafka-producer/conn1", 0, 4)
M = find(P10, b"\x0ark-orders")  # compact name; the compact topic count is the byte before it
E10 = "ProduceRequest v10: "
case(
    "produce-v10-topic-count-null",
    "compact count 0 is null, and the topic array is not nullable",
    replace(P10, M - 1, 1, b"\x00"),
    E10 + "topic_data: null where the schema allows none",
)
case(
    "produce-v10-topic-count-overflows-32-bits",
    "a 5-byte unsigned varint above 2**32 - 1",
    replace(P10, M - 1, 1, b"\xff\xff\xff\xff\x7f"),
    E10 + "topic_data: unsigned varint 34359738367 overflows 32 bits",
)
case(
    "produce-v10-topic-count-6-byte-varint",
    "an unsigned varint longer than 5 bytes",
    replace(P10, M - 1, 1, b"\x81\x80\x80\x80\x80\x00"),
    E10 + "topic_data: varint longer than 5 bytes",
)
case(
    "produce-v10-topic-count-huge",
    "a compact count larger than the frame could hold",
    replace(P10, M - 1, 1, b"\x80\x80\x80\x80\x08"),
    E10 + "topic_data: 2147483647 elements cannot fit in the 96 bytes left",
)
case(
    "produce-v10-topic-name-null",
    "compact string length 0 is null, and a topic name is not nullable",
    replace(P10, M, 1, b"\x00"),
    E10 + "name: null where the schema allows none",
)
case(
    "produce-v10-topic-name-longer-than-kafka-allows",
    "a compact string longer than 32767 bytes",
    replace(P10, M, 1, b"\x81\x80\x02"),
    E10 + "name: string of 32768 bytes (Kafka allows 32767)",
)
TAGS = len(P10) - 1  # the request's own tagged-field count, the last byte
case(
    "produce-v10-tagged-count-huge",
    "more tagged fields than the bytes left could hold",
    replace(P10, TAGS, 1, b"\x7f"),
    E10 + "message tagged fields: 127 fields cannot fit in the 0 bytes left",
)
case(
    "produce-v10-tagged-field-past-the-end",
    "a tagged field larger than the frame",
    replace(P10, TAGS, 1, b"\x01\x05\x7f"),
    E10 + "message tagged fields: tag 5 of 127 bytes runs past the end",
)
case(
    "produce-v10-tagged-fields-out-of-order",
    "tags must ascend: a repeated tag could be read first or last",
    replace(P10, TAGS, 1, b"\x02\x05\x00\x05\x00"),
    E10 + "message tagged fields: tag 5 after tag 5 (must ascend)",
)
HEADER_TAGS = 14 + len(b"rdkafka")
case(
    "produce-v10-header-tagged-field-past-the-end",
    "a tagged field of the request header larger than the frame",
    replace(P10, HEADER_TAGS, 1, b"\x01\x00\x7f\x7f"),
    "header tagged fields: tag 0 of 127 bytes runs past the end",
)

# ---- Fetch --------------------------------------------------------------------------------------

F11 = captured("aiokafka/conn3", 1, 5)
FN = find(F11, b"\x00\x09ak-orders")
case(
    "fetch-v11-topic-count-min-int",
    "a Fetch whose topic count is negative",
    replace(F11, FN - 4, 4, i32(-(2**31))),
    "FetchRequest v11: topics: length -2147483648 is negative (only -1 means null)",
)
case(
    "fetch-v11-partition-count-minus-2",
    "a Fetch whose partition count is negative",
    replace(F11, FN + 11, 4, i32(-2)),
    "FetchRequest v11: partitions: length -2 is negative (only -1 means null)",
)
F16 = captured("librdkafka-consumer/conn1", 1, 10)
case(
    "fetch-v16-cluster-id-shorter-than-its-tag",
    "a known tagged field (cluster_id) that does not fill its declared size: garrison and the"
    " broker would resume reading at different places",
    replace(F16, len(F16) - 1, 1, b"\x01\x00\x05\x02a\x00\x00\x00"),
    "FetchRequest v16: message tagged fields: tag 0 (cluster_id) declares 5 bytes, holds 2",
)

# ---- Metadata ----------------------------------------------------------------------------------

M5 = captured("aiokafka/conn1", 3, 2)
MN = find(M5, b"\x00\x09ak-orders")
case(
    "metadata-v5-topic-count-minus-2",
    "a nullable array may be -1 (every topic), never another negative count",
    replace(M5, MN - 4, 4, i32(-2)),
    "MetadataRequest v5: topics: length -2 is negative (only -1 means null)",
)
m0 = MetadataRequest[0](topics=[MetadataRequest[0].fields["topics"].data_class(name="t1")])
m0.with_header(correlation_id=1, client_id="hostile")
M0 = bytes(m0.encode(header=True, framed=True))
case(
    "metadata-v0-topics-null",
    "v0 has no null topic list (an empty one asks for every topic): null once read as 'all'",
    replace(M0, find(M0, b"\x00\x02t1") - 4, 4, i32(-1)),
    "MetadataRequest v0: topics: null where the schema allows none",
)
d3 = DeleteTopicsRequest[3](topic_names=["t1"], timeout_ms=1000)
d3.with_header(correlation_id=1, client_id="hostile")
D3 = bytes(d3.encode(header=True, framed=True))
case(
    "deletetopics-v3-topic-name-null",
    "an element of an array of names is never null",
    replace(D3, find(D3, b"\x00\x02t1"), 4, i16(-1)),
    "DeleteTopicsRequest v3: topic_names: null where the schema allows none",
)

case(
    "produce-v10-records-past-the-end",
    "a compact bytes length larger than the frame",
    replace(P10, M + 10 + 4 + 1, 1, b"\xff\xff\xff\x07"),
    E10 + "records: 16777214 bytes run past the end of the frame",
)
dtp = DescribeTopicPartitionsRequest[0](
    topics=[DescribeTopicPartitionsRequest[0].fields["topics"].data_class(name="t1")],
    response_partition_limit=10,
    cursor=None,
)
dtp.with_header(correlation_id=1, client_id="hostile")
DTP = bytes(dtp.encode(header=True, framed=True))
case(
    "describetopicpartitions-v0-cursor-marker-5",
    "a nullable struct's marker is -1 (null) or 1, nothing else",
    replace(DTP, len(DTP) - 2, 1, b"\x05"),
    "DescribeTopicPartitionsRequest v0: cursor: null marker 5 (only -1 or 1)",
)

# ---- answers from the broker --------------------------------------------------------------------

R5 = captured("aiokafka/conn1", 3, 2, response=True)
case(
    "metadata-v5-answer-topic-count-minus-2",
    "a broker answer with a negative topic count",
    replace(R5, find(R5, b"\x00\x09ak-orders") - 6, 4, i32(-2)),
    "MetadataResponse v5: topics: length -2 is negative (only -1 means null)",
    request=M5,
)
R12 = captured("kafka-python-producer/conn1", 3, 3, response=True)
case(
    "metadata-v12-answer-broker-count-overflows",
    "a broker answer with a compact count above 2**32 - 1",
    replace(R12, 13, 1, b"\xff\xff\xff\xff\x7f"),
    "MetadataResponse v12: brokers: unsigned varint 34359738367 overflows 32 bits",
    request=captured("kafka-python-producer/conn1", 3, 3),
)
RP = captured("aiokafka/conn1", 0, 3, response=True)
case(
    "produce-v7-answer-partition-count-min-int",
    "a broker answer with a negative partition count",
    replace(RP, find(RP, b"\x00\x09ak-orders") + 11, 4, i32(-(2**31))),
    "ProduceResponse v7: partition_responses: length -2147483648 is negative (only -1 means null)",
    request=P7,
)


if __name__ == "__main__":
    OUT.write_text(json.dumps({"cases": CASES}, indent=1) + "\n")
    print(f"{len(CASES)} cases written to {OUT.relative_to(ROOT)}")
