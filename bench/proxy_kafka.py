"""Kafka produce through garrison vs. direct to the broker, measured in one run.

Run: .venv/bin/python bench/proxy_kafka.py [--messages N] [--rounds R] [--requests N]
         [--blocks B]

A tansu broker (tests/kafka_broker.py) and `garrison proxy --protocol kafka` in front of it,
enforcing examples/kafka/kafka_policy.yaml for the producer identity (empire-hq may produce to
empire-announce), writing every flow record to a JSON-lines access log, as deployed. The same
kafka-python producer code runs against the broker directly and through the proxy; direct
and proxied runs alternate and medians are reported, so load that comes and goes on the
machine hits both sides alike:

- `batched`: N messages of 100 bytes sent without waiting, then `flush()`: kafka-python packs
  them into record batches (16 KiB, up to 5 requests in flight). Messages per second; the
  ratio garrison / direct is the throughput a producer keeps behind the proxy.
- `one request per message`: each `send()` waited for (`.get()`), so every message is one
  Produce request and one answer, nothing else in flight: the proxy's added time per request
  is (time through garrison - time direct) / requests, from blocks of B requests on two warm
  producers (one direct, one through garrison).

The proxy's CPU time (from /proc/PID/stat) is divided by the Produce requests it handled in
the timed rounds (counted in its access log), as µs of proxy CPU per request. References
measured in the same run: a bare uvloop relay (no parsing, no records; in front of a second
broker that advertises it), the floor of any Python proxy hop on the machine, and the Kafka
engine alone in this process (no I/O). A last line compares the best (least disturbed)
blocks and rounds of each side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kafka import KafkaProducer  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402

from tests.kafka_broker import LOOPBACK, free_port, running_tansu  # noqa: E402

TOPIC = "empire-announce"
POLICY = ROOT / "examples" / "kafka" / "kafka_policy.yaml"
PAYLOAD = b"x" * 100
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_proxy(upstream: str, access_log: Path) -> Iterator[tuple[str, int]]:
    """`garrison proxy` in front of `upstream`, every client mapped to empire-hq: yields
    (the proxy's address as HOST:PORT, its PID)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "garrison.cli.main",  # this checkout's garrison (as bench/proxy_http.py runs it)
        "proxy",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--upstream",
        upstream,
        "--protocol",
        "kafka",
        "-f",
        str(POLICY),
        "--dst-labels",
        "app=kafka",
        "--dport",
        "9092",
        "--peer",
        "0.0.0.0/0=app=empire-hq",
        "--access-log",
        str(access_log),
        # One worker: the CPU per request is one process's (the default, one worker per
        # CPU, would make PID the supervisor, whose own CPU time is nearly nothing).
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"garrison proxy exited with {proc.returncode}")
            try:
                socket.create_connection((LOOPBACK, port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"{LOOPBACK}:{port}", proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def serve_relay(listen_port: int, upstream_port: int) -> None:
    """A bare uvloop TCP relay (no parsing, no records): the floor of any Python proxy hop
    on this machine. Run in a child process by `running_relay`."""
    import asyncio

    import uvloop

    class Upstream(asyncio.Protocol):
        def __init__(self, client: asyncio.Transport) -> None:
            self.client = client

        def data_received(self, data: bytes) -> None:
            self.client.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.client.close()

    class Client(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
            self.upstream: asyncio.Transport | None = None
            self.queued: list[bytes] = []
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            upstream, _ = await loop.create_connection(
                lambda: Upstream(self.transport), LOOPBACK, upstream_port
            )
            self.upstream = upstream
            for data in self.queued:
                upstream.write(data)

        def data_received(self, data: bytes) -> None:
            if self.upstream is None:
                self.queued.append(data)
            else:
                self.upstream.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.upstream is not None:
                self.upstream.close()

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Client, LOOPBACK, listen_port)
        await server.serve_forever()

    uvloop.install()
    asyncio.run(serve())


@contextlib.contextmanager
def running_relay() -> Iterator[tuple[str, int]]:
    """A second broker that advertises a bare relay in front of it (so clients stay on the
    relay, as they stay on garrison): yields the relay's HOST:PORT and its PID."""
    port = free_port()
    with running_tansu(advertised_port=port) as broker:
        command = [sys.executable, __file__, "--serve-relay", f"{port}:{broker.port}"]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection((LOOPBACK, port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.05)
            yield f"{LOOPBACK}:{port}", proc.pid
        finally:
            proc.kill()  # our own child, by its handle
            proc.wait(5)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def producer(bootstrap: str) -> KafkaProducer:
    producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="bench", acks=1)
    producer.send(TOPIC, PAYLOAD).get(timeout=30)  # metadata, connection, warm codecs
    return producer


def batched(bootstrap: str, messages: int) -> float:
    """Seconds to send `messages` and have every one acknowledged."""
    p = producer(bootstrap)
    try:
        start = time.perf_counter()
        for _ in range(messages):
            p.send(TOPIC, PAYLOAD)
        p.flush(timeout=120)
        return time.perf_counter() - start
    finally:
        p.close(timeout=5)


def one_by_one(p: KafkaProducer, requests: int) -> float:
    """Seconds for `requests` Produce round trips, one message each, one at a time."""
    start = time.perf_counter()
    for _ in range(requests):
        p.send(TOPIC, PAYLOAD).get(timeout=30)
    return time.perf_counter() - start


def produce_requests(access_log: Path) -> int:
    count = 0
    with access_log.open() as lines:
        for line in lines:
            record = json.loads(line)
            kafka = record.get("l7", {}).get("kafka", {})
            if record["l7"]["type"] == "REQUEST" and kafka.get("api_key") == "produce":
                count += 1
    return count


@dataclass
class Measured:
    direct: list[float] = field(default_factory=list)  # seconds per round or block
    proxied: list[float] = field(default_factory=list)
    relayed: list[float] = field(default_factory=list)  # through the bare relay
    proxy_cpu: float = 0.0  # seconds of proxy CPU during the proxied runs
    proxy_requests: int = 0  # Produce requests the proxy logged during them
    relay_cpu: float = 0.0  # seconds of the bare relay's CPU during the relayed runs
    relay_requests: int = 0  # Produce requests sent through the relay in them


class ProxyMeter:
    """Proxy CPU and Produce requests over a stretch of proxied traffic."""

    def __init__(self, pid: int, access_log: Path, into: Measured) -> None:
        self.pid, self.access_log, self.into = pid, access_log, into

    def __enter__(self) -> None:
        self.cpu, self.requests = cpu_seconds(self.pid), produce_requests(self.access_log)

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)  # the access log is written at the end of the proxy's loop turn
        self.into.proxy_cpu += cpu_seconds(self.pid) - self.cpu
        self.into.proxy_requests += produce_requests(self.access_log) - self.requests


def engine_alone(requests: int = 20_000) -> tuple[float, float]:
    """Seconds per request in `KafkaEngine` alone, in this process, no I/O: a captured
    kafka-python Produce v9 request and its answer, allowed by a topic rule. Returns (the
    engine with its two flow records left unmade, the time making them adds: the engine
    defers them with `Log.later`, the server makes them at the end of the loop turn)."""
    import garrison.proxy.engine_kafka as engine_kafka
    from garrison.policies.l7rules import KafkaRole, KafkaRule, L7Protocol, L7RuleSet
    from garrison.policies.labels import Labels
    from garrison.policies.refs import PolicyKind, RuleRef
    from garrison.proxy.commands import ConnectionContext, Log, PeerInfo, TrafficDirection
    from garrison.proxy.config import ProxyConfig
    from tests.unit.parsers.kafka_fixtures import scenario_connections

    conn = scenario_connections("kafka-python-producer")[1]
    request = next(f for f in conn.requests if f.api_key == 0)
    answer = next(f for f in conn.responses if f.correlation_id == request.correlation_id)
    frame, reply = conn.request_frame(request), conn.response_frame(answer)
    ref = RuleRef(PolicyKind.CNP, "default", "bench", "ingress")
    rules = L7RuleSet(
        L7Protocol.KAFKA, ((KafkaRule(role=KafkaRole.PRODUCE, topic="kp-orders"), ref),)
    )
    context = ConnectionContext(
        PeerInfo(300, Labels.parse("app=empire-hq"), "127.0.0.2", 40000),
        PeerInfo(256, Labels.parse("app=kafka"), "127.0.0.1", 9092),
        TrafficDirection.INGRESS,
        L7Protocol.KAFKA,
        rules,
    )

    def per_request(make_records: bool) -> float:
        engine = engine_kafka.KafkaEngine(context, ProxyConfig())
        best = float("inf")
        for _ in range(4):  # the first round warms up
            start = time.perf_counter()
            for _ in range(requests):
                for batch in (engine.client_data(frame, 1.0), engine.upstream_data(reply, 1.0)):
                    if make_records:
                        for command in batch:
                            if type(command) is Log:
                                command.record  # noqa: B018 - reading it makes it
            best = min(best, (time.perf_counter() - start) / requests)
        return best

    without_records = per_request(False)
    return without_records, per_request(True) - without_records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000, help="batched, per round")
    parser.add_argument("--rounds", type=int, default=5, help="batched rounds per side")
    parser.add_argument("--requests", type=int, default=200, help="single requests per block")
    parser.add_argument("--blocks", type=int, default=15, help="blocks per side")
    parser.add_argument("--serve-relay", metavar="PORT:UPSTREAM_PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_relay:
        listen_port, upstream_port = map(int, args.serve_relay.split(":"))
        serve_relay(listen_port, upstream_port)
        return 0
    batch, single = Measured(), Measured()
    with running_tansu() as broker, tempfile.TemporaryDirectory() as tmp:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic(TOPIC, 1, 1)])
        admin.close()
        access_log = Path(tmp) / "access.log"
        with running_proxy(broker.bootstrap, access_log) as (through, pid):
            # Batched: whole rounds, alternating direct / through garrison.
            batched(broker.bootstrap, args.messages // 10)  # warm-up, not timed
            batched(through, args.messages // 10)
            for _ in range(args.rounds):
                batch.direct.append(batched(broker.bootstrap, args.messages))
                with ProxyMeter(pid, access_log, batch):
                    batch.proxied.append(batched(through, args.messages))
            # One request per message: warm producers, alternating blocks; the bare relay
            # (in front of a second broker) is the floor of a Python proxy hop.
            with running_relay() as (relay_address, relay_pid):
                admin = KafkaAdminClient(bootstrap_servers=relay_address)
                admin.create_topics([NewTopic(TOPIC, 1, 1)])
                admin.close()
                direct, proxied = producer(broker.bootstrap), producer(through)
                relayed = producer(relay_address)
                for p in (direct, proxied, relayed):
                    one_by_one(p, args.requests)
                for _ in range(args.blocks):
                    single.direct.append(one_by_one(direct, args.requests))
                    relay_cpu = cpu_seconds(relay_pid)
                    single.relayed.append(one_by_one(relayed, args.requests))
                    single.relay_cpu += cpu_seconds(relay_pid) - relay_cpu
                    single.relay_requests += args.requests
                    with ProxyMeter(pid, access_log, single):
                        single.proxied.append(one_by_one(proxied, args.requests))
                for p in (direct, proxied, relayed):
                    p.close(timeout=5)
    engine, records = engine_alone()
    report(args, batch, single)
    print(
        f"KafkaEngine alone (in process, captured Produce v9 + answer): {engine * 1e6:.1f} µs "
        f"per request, + {records * 1e6:.1f} µs to make its two flow records"
    )
    return 0


def report(args: argparse.Namespace, batch: Measured, single: Measured) -> None:
    """Medians over rounds / blocks; each ratio pairs a proxied run with the direct run
    just before it, so load that comes and goes on the machine hits both alike."""
    batch_ratio = statistics.median(d / p for d, p in zip(batch.direct, batch.proxied, strict=True))
    batch_requests = batch.proxy_requests / len(batch.proxied)
    batch_added = statistics.median(
        (p - d) / batch_requests for d, p in zip(batch.direct, batch.proxied, strict=True)
    )
    single_direct = statistics.median(single.direct) / args.requests
    single_proxied = statistics.median(single.proxied) / args.requests
    single_added = statistics.median(
        (p - d) / args.requests for d, p in zip(single.direct, single.proxied, strict=True)
    )
    print(
        f"kafka-python producer, 100-byte messages. Batched: {args.rounds} rounds of "
        f"{args.messages} messages ({batch_requests:.0f} Produce requests each); single: "
        f"{args.blocks} blocks of {args.requests} requests. Medians; direct and proxied "
        "runs alternate."
    )
    rows = [
        (
            "batched",
            f"{args.messages / statistics.median(batch.direct):,.0f} msg/s",
            f"{args.messages / statistics.median(batch.proxied):,.0f} msg/s",
            batch_ratio,
            batch_added,
            batch.proxy_cpu / max(1, batch.proxy_requests),
        ),
        (
            "one request per message",
            f"{single_direct * 1e6:,.0f} µs/req",
            f"{single_proxied * 1e6:,.0f} µs/req",
            single_direct / single_proxied,
            single_added,
            single.proxy_cpu / max(1, single.proxy_requests),
        ),
    ]
    print(
        f"{'case':<26}{'direct':>15}{'garrison':>15}{'ratio':>7}{'added/req':>11}"
        f"{'proxy CPU/req':>15}"
    )
    for name, direct, proxied, ratio, added, cpu in rows:
        print(
            f"{name:<26}{direct:>15}{proxied:>15}{ratio:>7.2f}{added * 1e6:>8.0f} µs"
            f"{cpu * 1e6:>12.0f} µs"
        )
    relay_added = statistics.median(
        (r - d) / args.requests for d, r in zip(single.direct, single.relayed, strict=True)
    )
    print(
        f"{'  bare uvloop relay':<26}{'':>15}"
        f"{statistics.median(single.relayed) / args.requests * 1e6:>11,.0f} µs/req"
        f"{single_direct / (statistics.median(single.relayed) / args.requests):>7.2f}"
        f"{relay_added * 1e6:>8.0f} µs"
        f"{single.relay_cpu / max(1, single.relay_requests) * 1e6:>12.0f} µs"
    )
    # The least disturbed blocks: what each hop adds when the machine is quiet.
    per = 1e6 / args.requests
    best_direct, best_proxied, best_relayed = (
        min(single.direct) * per,
        min(single.proxied) * per,
        min(single.relayed) * per,
    )
    print(
        f"one request per message, best blocks: direct {best_direct:,.0f} µs/req, garrison "
        f"{best_proxied:,.0f} (+{best_proxied - best_direct:,.0f}), bare relay "
        f"{best_relayed:,.0f} (+{best_relayed - best_direct:,.0f}); batched best rounds: "
        f"ratio {min(batch.direct) / min(batch.proxied):.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
