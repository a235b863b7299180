"""The Empire's Kafka clients for the topic-ACL example (kafka-python).

    python examples/kafka/empire.py --bootstrap 127.0.0.1:19092 --source 127.0.0.2 \\
        produce empire-announce "The Emperor arrives"
    python examples/kafka/empire.py --bootstrap 127.0.0.1:19092 --source 127.0.0.3 \\
        consume empire-announce --group outposts --count 1

`--source` binds the client's sockets to that address before they connect, so one proxy can
tell identities apart by source address (`--peer 127.0.0.2/32=app=empire-hq`); kafka-python has
no option for it. Prints one line per message sent or read; a denied request prints the
client's error (`TopicAuthorizationFailedError`, ...) and exits with status 1.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import Any


def bind_source(address: str) -> None:
    """Make every socket kafka-python opens in this process leave from `address`."""
    import kafka.net.inet

    factory = kafka.net.inet.KafkaNetSocket
    original = factory.socket

    def bound(self: Any, *args: Any, **kwargs: Any) -> socket.socket:
        sock: socket.socket = original(self, *args, **kwargs)
        sock.bind((address, 0))
        return sock

    factory.socket = bound


def produce(bootstrap: str, topic: str, messages: list[str]) -> int:
    from kafka import KafkaProducer

    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap, client_id="empire-hq", bootstrap_timeout_ms=5000
        )
    except Exception as exc:  # e.g. a source the proxy does not admit: no broker answers
        print(f"{type(exc).__name__}: {exc}")
        return 1
    try:
        for text in messages:
            metadata = producer.send(topic, text.encode()).get(timeout=30)
            print(f"sent to {topic}[{metadata.partition}]@{metadata.offset}: {text}")
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        producer.close(timeout=5)
    return 0


def consume(bootstrap: str, topic: str, group: str, count: int, seconds: float) -> int:
    from kafka import KafkaConsumer

    try:
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            client_id="empire-outpost",
            group_id=group,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            bootstrap_timeout_ms=5000,
        )
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 1
    read = 0
    deadline = time.monotonic() + seconds
    try:
        while read < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    print(
                        f"read {record.topic}[{record.partition}]@{record.offset}: "
                        f"{record.value.decode(errors='replace')}"
                    )
                    read += 1
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        consumer.close()
    if read < count:
        print(f"read {read} of {count} message(s) in {seconds:g}s")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The Empire's Kafka clients")
    parser.add_argument("--bootstrap", default="127.0.0.1:19092", metavar="HOST:PORT")
    parser.add_argument("--source", metavar="ADDR", help="bind client sockets to ADDR")
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("produce", help="send messages to a topic")
    send.add_argument("topic")
    send.add_argument("messages", nargs="+")
    read = commands.add_parser("consume", help="read messages in a consumer group")
    read.add_argument("topic")
    read.add_argument("--group", default="outposts")
    read.add_argument("--count", type=int, default=1, help="stop after N messages")
    read.add_argument("--seconds", type=float, default=30.0, help="give up after S seconds")
    args = parser.parse_args(argv)
    if args.source:
        bind_source(args.source)
    if args.command == "produce":
        return produce(args.bootstrap, args.topic, args.messages)
    return consume(args.bootstrap, args.topic, args.group, args.count, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
