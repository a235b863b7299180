"""Kafka connections keep their own idle timeout: clients hold a connection to each broker
for minutes without a request (brokers close them after 10, `connections.max.idle.ms`), and
librdkafka reports a broker that closes sooner as down (`1/1 brokers are down`). The proxy's
general idle timeout (60 s, sized for HTTP keep-alive) cut them after a minute.

A `garrison` proxy server in process, in front of a real tansu broker: one Metadata round
trip, then idle longer than the general idle timeout (made short here), then a second round
trip on the same connection. With the Kafka idle timeout short too, the proxy closes it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from garrison.flows.store import FlowStore
from garrison.policies.l7rules import L7Protocol, L7RuleSet
from garrison.policies.labels import Labels
from garrison.policies.mapstate import LookupResult, MatchType
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.proxy.commands import PeerInfo
from garrison.proxy.config import ProxyConfig, Timeouts
from garrison.proxy.policyview import Admission
from garrison.proxy.server import FlowSink, ProxyServer, ServerSettings, StaticDestination
from tests.kafka_broker import TansuBroker, running_tansu

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

REF = RuleRef(PolicyKind.CNP, "default", "kafka-all", "ingress")
ALLOW_ALL = L7RuleSet(L7Protocol.KAFKA, (), allow_all=True, allow_all_ref=REF)


class _Everyone:
    def admit(self, src_ip: str, dst_ip: str = "", dst_port: int = 0) -> Admission:
        lookup = LookupResult(True, MatchType.L3_L4)
        return Admission(300, Labels.parse("app=client"), "default", True, lookup, ALLOW_ALL)


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    with running_tansu() as running:
        yield running


def _metadata(correlation_id: int) -> bytes:
    """A Metadata v12 request naming no topic (kafka-python's protocol classes)."""
    from kafka.protocol.metadata import MetadataRequest

    request = MetadataRequest[12](
        topics=[], allow_auto_topic_creation=False, include_topic_authorized_operations=False,
    )
    request.with_header(correlation_id=correlation_id, client_id="garrison-e2e")
    return bytes(request.encode(header=True, framed=True))


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      correlation_id: int) -> int:
    """One Metadata request; the answer's correlation id, 0 if the proxy closed."""
    writer.write(_metadata(correlation_id))
    try:
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 5), "big")
        frame = await asyncio.wait_for(reader.readexactly(size), 5)
    except asyncio.IncompleteReadError:
        return 0
    return int.from_bytes(frame[:4], "big")


async def _idle_then_ask(broker: TansuBroker, timeouts: Timeouts) -> int:
    server = ProxyServer(
        ServerSettings(
            protocol=L7Protocol.KAFKA,
            config=ProxyConfig(timeouts=timeouts),
            destination=StaticDestination(PeerInfo(256, Labels.parse("app=kafka"), "127.0.0.1",
                                                   9092)),
            sweep_interval=0.1,
        ),
        _Everyone(),  # type: ignore[arg-type]
        FlowSink(store=FlowStore(), loop=asyncio.get_running_loop()),
    )
    address = await server.listen_standalone("127.0.0.1", 0, upstream=broker.address)
    try:
        reader, writer = await asyncio.open_connection(*address)
        writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert await _round_trip(reader, writer, 1) == 1
        await asyncio.sleep(1.2)  # idle: four times the general idle timeout
        answer = await _round_trip(reader, writer, 2)
        writer.close()
        return answer
    finally:
        await server.close()


def test_a_kafka_connection_outlives_the_general_idle_timeout(broker: TansuBroker) -> None:
    timeouts = Timeouts(idle=0.3, header_read=0.3)  # Kafka keeps its default, 600 s
    assert asyncio.run(_idle_then_ask(broker, timeouts)) == 2


def test_the_kafka_idle_timeout_closes_an_idle_kafka_connection(broker: TansuBroker) -> None:
    timeouts = Timeouts(idle=0.3, header_read=0.3, kafka_idle=0.3)
    assert asyncio.run(_idle_then_ask(broker, timeouts)) == 0


def test_the_defaults_give_kafka_ten_minutes_idle_and_room_for_a_rebalance() -> None:
    kafka = Timeouts().for_protocol(L7Protocol.KAFKA)
    assert (kafka.idle, kafka.upstream_reply) == (600.0, 330.0)
    for protocol in (L7Protocol.HTTP, L7Protocol.GRPC):
        assert Timeouts().for_protocol(protocol) == Timeouts()
