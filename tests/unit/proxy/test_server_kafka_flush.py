"""The server tells the Kafka engine when a connection ends without a FIN and when the proxy
stops, so its aggregated denial counts reach the records (in process, loopback; a broker that
replays librdkafka's recorded answers, so the proxy learns the brokers as it would)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from garrison.flows.record import Aggregate, FlowRecord, Verdict
from garrison.flows.store import FlowStore
from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels
from garrison.proxy.commands import PeerInfo
from garrison.proxy.config import ProxyConfig
from garrison.proxy.server import FlowSink, ProxyServer, ServerSettings, StaticDestination
from tests.unit.proxy.test_engine_http1_server import StaticPolicy
from tests.unit.proxy.test_engine_kafka import ALLOW_ALL, conn, response_frames
from tests.unit.proxy.test_engine_kafka_noise import PRODUCE_ORDERS, flood

pytestmark = pytest.mark.timeout(30)

FIRST = conn("librdkafka-consumer/conn0")


async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers the recorded first connection with its recorded answers; others, never."""
    data = b""
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
            if data == FIRST.requests_bytes:
                writer.write(b"".join(response_frames(FIRST)))
    finally:
        writer.close()


def aggregates(server: ProxyServer) -> list[Aggregate]:
    records: list[FlowRecord] = list(server.sink.store)
    return [r.aggregate for r in records if r.aggregate is not None]


async def scenario() -> None:
    upstream = await asyncio.start_server(broker, "127.0.0.1", 0)
    policy = StaticPolicy(ALLOW_ALL)
    server = ProxyServer(
        ServerSettings(
            protocol=L7Protocol.KAFKA, config=ProxyConfig(),
            destination=StaticDestination(PeerInfo(256, Labels.parse("app=kafka"),
                                                   "127.0.0.1", 9092)),
        ),
        policy,
        FlowSink(store=FlowStore(), loop=asyncio.get_running_loop()),
    )
    address = await server.listen_standalone(
        "127.0.0.1", 0, upstream=upstream.sockets[0].getsockname()[:2]
    )
    # A first client learns the brokers (the broker's Metadata answers).
    reader, writer = await asyncio.open_connection(*address)
    writer.write(FIRST.requests_bytes)
    await asyncio.wait_for(reader.readexactly(len(b"".join(response_frames(FIRST)))), 5)
    writer.close()
    # Now topics are denied but produce to kp-orders: a client floods a denied Metadata.
    policy.ruleset = PRODUCE_ORDERS
    server.update_policy(policy)

    async def flooding(count: int) -> socket.socket:
        sock = socket.create_connection(address)
        sock.sendall(b"".join(flood(count)))
        for _ in range(count):  # every request is answered (here, by the proxy)
            (size,) = struct.unpack(">i", await read_exactly(sock, 4))
            await read_exactly(sock, size)
        return sock

    # Reset without FIN (SO_LINGER 0): the 9 repeats are recorded with their count.
    sock = await flooding(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    for _ in range(50):
        await asyncio.sleep(0.02)
        if aggregates(server):
            break
    assert aggregates(server) == [Aggregate(ingress_flow_count=9)] * 2
    # The proxy stops with a client's 6 repeats still counting: recorded too.
    other = await flooding(7)
    await server.close()
    assert aggregates(server)[2:] == [Aggregate(ingress_flow_count=6)] * 2
    assert all(r.verdict is Verdict.DROPPED for r in server.sink.store if r.aggregate)
    other.close()
    upstream.close()


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.run_in_executor(None, sock.recv, n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def test_aggregated_kafka_denials_are_recorded_on_reset_and_on_stop() -> None:
    asyncio.run(scenario())
