#!/usr/bin/env python3
"""Record real Kafka client traffic as test fixtures under tests/data/kafka/.

Runs a tansu broker on 127.0.0.1 that advertises the port of a recording relay (also
127.0.0.1), so every connection the clients open after bootstrapping also passes the relay.
Then kafka-python, confluent-kafka (librdkafka) and aiokafka produce, consume in a group
(`session_timeout_ms=6000`), ask for all topics' Metadata and use a few admin APIs. Every TCP
connection's two byte streams are stored unchanged:

    tests/data/kafka/<scenario>/conn<N>.requests.bin    client -> broker
    tests/data/kafka/<scenario>/conn<N>.responses.bin   broker -> client
    tests/data/kafka/index.json                         what each file holds, frame by frame

The index is built here with a plain struct reader (size, api key, version, correlation id),
independent of garrison's parser, and names the topics each scenario uses. The global
sequence number of each frame orders frames across connections (Metadata on the bootstrap
connection before Fetch by topic id on another).

Usage: .venv/bin/python scripts/capture_kafka_fixtures.py  (about a minute)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.kafka_broker import LOOPBACK, free_port, running_tansu  # noqa: E402

DATA = REPO / "tests" / "data" / "kafka"
SESSION_TIMEOUT_MS = 6000


# ---- recording relay --------------------------------------------------------------------------


@dataclass
class RecordedConnection:
    number: int
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (sequence, chunk)
    responses: list[tuple[int, bytes]] = field(default_factory=list)


class RecordingRelay:
    """127.0.0.1:port → broker, recording every chunk with a global sequence number."""

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.port = port
        self.upstream = upstream
        self.connections: list[RecordedConnection] = []
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._listener = socket.create_server((LOOPBACK, port))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                recorded = RecordedConnection(len(self.connections))
                self.connections.append(recorded)
                self._sockets += [client, upstream]
            for src, dst, chunks in (
                (client, upstream, recorded.requests),
                (upstream, client, recorded.responses),
            ):
                thread = threading.Thread(target=self._pump, args=(src, dst, chunks), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, chunks: list[tuple[int, bytes]]
    ) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    chunks.append((next(self._sequence), data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        self._acceptor.join()
        time.sleep(0.3)  # let in-flight bytes land before cutting the remaining sockets
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        for thread in self._threads:
            thread.join(timeout=2)


# ---- an index independent of garrison's parser ------------------------------------------------


def split_frames(chunks: list[tuple[int, bytes]]) -> Iterator[tuple[int, int, bytes]]:
    """(offset in the stream, sequence of the chunk completing the frame, frame without size)."""
    stream = bytearray()
    offset = 0
    for sequence, chunk in chunks:
        stream += chunk
        while len(stream) - offset >= 4:
            (size,) = struct.unpack_from(">i", stream, offset)
            if len(stream) - offset - 4 < size:
                break
            yield offset, sequence, bytes(stream[offset + 4 : offset + 4 + size])
            offset += 4 + size


def index_connection(scenario: str, conn: RecordedConnection) -> dict[str, object]:
    requests: list[dict[str, object]] = []
    for offset, sequence, frame in split_frames(conn.requests):
        api_key, api_version, correlation_id = struct.unpack_from(">hhi", frame, 0)
        entry: dict[str, object] = {
            "offset": offset,
            "size": len(frame) + 4,
            "sequence": sequence,
            "api_key": api_key,
            "api_version": api_version,
            "correlation_id": correlation_id,
        }
        if api_key == 0:
            entry["acks"] = _produce_acks(frame, api_version)
        requests.append(entry)
    # Responses come in request order. Kafka never answers Produce with acks=0; tansu does, so
    # such a request may or may not have an answer: match by correlation id.
    pending = list(requests)
    responses = []
    for offset, sequence, frame in split_frames(conn.responses):
        (correlation_id,) = struct.unpack_from(">i", frame, 0)
        while (
            pending
            and pending[0].get("acks") == 0
            and pending[0]["correlation_id"] != correlation_id
        ):
            pending.pop(0)
        request = pending.pop(0)
        assert request["correlation_id"] == correlation_id, (scenario, conn.number)
        response: dict[str, object] = {
            "offset": offset,
            "size": len(frame) + 4,
            "sequence": sequence,
            "api_key": request["api_key"],
            "api_version": request["api_version"],
            "correlation_id": correlation_id,
        }
        if request.get("acks") == 0:
            response["answers_acks_0"] = True
        responses.append(response)
    in_flight = [r for r in pending if r.get("acks") != 0]
    stem = f"{scenario}/conn{conn.number}"
    return {
        "requests_file": f"{stem}.requests.bin",
        "responses_file": f"{stem}.responses.bin",
        "requests": requests,
        "responses": responses,
        # requests the broker had not answered when the client closed the connection
        "unanswered": len(in_flight),
    }


def _produce_acks(frame: bytes, api_version: int) -> int:
    """acks of a Produce frame: after the header and the transactional id (v3+)."""
    pos = 8
    (client_id_len,) = struct.unpack_from(">h", frame, pos)
    pos += 2 + max(client_id_len, 0)
    flexible = api_version >= 9
    if flexible:
        pos += _skip_tagged_fields(frame, pos)
        length = _uvarint(frame, pos)
        pos = length[1] + max(length[0] - 1, 0)
    else:
        (tid_len,) = struct.unpack_from(">h", frame, pos)
        pos += 2 + max(tid_len, 0)
    (acks,) = struct.unpack_from(">h", frame, pos)
    return int(acks)


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip_tagged_fields(data: bytes, pos: int) -> int:
    start = pos
    count, pos = _uvarint(data, pos)
    for _ in range(count):
        _, pos = _uvarint(data, pos)
        size, pos = _uvarint(data, pos)
        pos += size
    return pos - start


# ---- client scenarios -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    client: str
    topics: tuple[str, ...]
    run: Callable[[str], None]
    groups: tuple[str, ...] = ()


def kafka_python_producer(bootstrap: str) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    for i in range(3):
        producer.send("kp-orders", key=b"k%d" % i, value=b"order %d" % i).get(timeout=10)
    producer.close()
    fire_and_forget = KafkaProducer(bootstrap_servers=bootstrap, acks=0)
    fire_and_forget.send("kp-orders", value=b"acks=0").get(timeout=10)
    fire_and_forget.flush()
    fire_and_forget.close()


def kafka_python_consumer(bootstrap: str) -> None:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        "kp-orders",
        bootstrap_servers=bootstrap,
        group_id="kp-group",
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=1000,
        consumer_timeout_ms=10000,
    )
    for seen, _ in enumerate(consumer, start=1):
        if seen == 4:  # three acks=all messages and the acks=0 one
            break
    consumer.commit()
    consumer.topics()  # Metadata for all topics
    consumer.close()


def kafka_python_admin(bootstrap: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("kp-admin", num_partitions=1, replication_factor=1)])
    admin.list_topics()
    for call in (admin.list_groups, lambda: admin.describe_groups(["kp-group"])):
        with contextlib.suppress(Exception):
            call()
    admin.delete_topics(["kp-admin"])
    admin.close()


def librdkafka_producer(bootstrap: str) -> None:
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    for i in range(3):
        producer.produce("rk-orders", key=b"k%d" % i, value=b"order %d" % i)
    assert producer.flush(15) == 0
    producer.poll(0)


def librdkafka_consumer(bootstrap: str) -> None:
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "rk-group",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 1000,
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(["rk-orders"])
    seen = 0
    deadline = time.monotonic() + 20
    while seen < 3 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            seen += 1
    assert seen == 3, seen
    consumer.commit(asynchronous=False)
    consumer.close()
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.list_topics(timeout=10)  # Metadata for all topics


def aiokafka_clients(bootstrap: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(3):
                await producer.send_and_wait("ak-orders", b"order %d" % i, key=b"k%d" % i)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            "ak-orders",
            bootstrap_servers=bootstrap,
            group_id="ak-group",
            auto_offset_reset="earliest",
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=1000,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            for _ in range(3):
                await asyncio.wait_for(consumer.getone(), 20)
            await consumer.commit()
        finally:
            await consumer.stop()

    asyncio.run(run())


SCENARIOS = (
    Scenario("kafka-python-producer", "kafka-python", ("kp-orders",), kafka_python_producer),
    Scenario(
        "kafka-python-consumer",
        "kafka-python",
        ("kp-orders",),
        kafka_python_consumer,
        ("kp-group",),
    ),
    Scenario(
        "kafka-python-admin", "kafka-python", ("kp-admin",), kafka_python_admin, ("kp-group",)
    ),
    Scenario("librdkafka-producer", "confluent-kafka", ("rk-orders",), librdkafka_producer),
    Scenario(
        "librdkafka-consumer", "confluent-kafka", ("rk-orders",), librdkafka_consumer, ("rk-group",)
    ),
    Scenario("aiokafka", "aiokafka", ("ak-orders",), aiokafka_clients, ("ak-group",)),
)


def client_versions() -> dict[str, str]:
    import aiokafka
    import confluent_kafka
    import kafka

    return {
        "kafka-python": kafka.__version__,
        "confluent-kafka": (
            f"{confluent_kafka.version()[0]} (librdkafka {confluent_kafka.libversion()[0]})"
        ),
        "aiokafka": aiokafka.__version__,
    }


def main() -> None:
    if DATA.exists():
        shutil.rmtree(DATA)
    DATA.mkdir(parents=True)
    relay_port = free_port()
    index: dict[str, object] = {"clients": client_versions(), "scenarios": []}
    scenarios: list[object] = []
    with running_tansu(advertised_port=relay_port) as broker:
        index["broker"] = "tansu 0.6.0 (memory storage)"
        for scenario in SCENARIOS:
            relay = RecordingRelay(relay_port, broker.address)
            started = time.monotonic()
            try:
                scenario.run(f"{LOOPBACK}:{relay_port}")
            finally:
                relay.close()
            connections = []
            total_requests = 0
            for conn in relay.connections:
                if not conn.requests:
                    continue
                entry = index_connection(scenario.name, conn)
                folder = DATA / scenario.name
                folder.mkdir(exist_ok=True)
                (DATA / str(entry["requests_file"])).write_bytes(
                    b"".join(chunk for _, chunk in conn.requests)
                )
                (DATA / str(entry["responses_file"])).write_bytes(
                    b"".join(chunk for _, chunk in conn.responses)
                )
                connections.append(entry)
                total_requests += len(cast(list[object], entry["requests"]))
            scenarios.append(
                {
                    "name": scenario.name,
                    "client": scenario.client,
                    "topics": list(scenario.topics),
                    "groups": list(scenario.groups),
                    "connections": connections,
                }
            )
            print(
                f"{scenario.name}: {len(connections)} connections, "
                f"{total_requests} requests, "
                f"{time.monotonic() - started:.1f}s"
            )
    index["scenarios"] = scenarios
    (DATA / "index.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
