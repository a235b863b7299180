"""Kafka end to end: real clients, a real broker (tansu), `garrison proxy --protocol kafka`.

The scenario is examples/kafka: empire-hq may produce to empire-announce, empire-outpost may
consume it (in a consumer group); nothing else is allowed. Every client sees what it would
see from a Kafka broker with ACLs: allowed messages round-trip, denied requests fail at once
with TopicAuthorizationFailed, with no retry storm, and every decision is an access-log line.

Identities are by source address. kafka-python, librdkafka and aiokafka have no option to bind
a client's source address, so:
- kafka-python runs in a child process whose socket factory binds the identity's address
  (127.0.0.2 empire-hq, 127.0.0.3 empire-outpost) before connecting; one proxy maps both
  addresses (`--peer 127.0.0.2/32=app=empire-hq --peer 127.0.0.3/32=app=empire-outpost`),
  which exercises the source-address mapping with a real client;
- librdkafka (C) and aiokafka run in this process against one proxy per identity
  (`--peer 0.0.0.0/0=app=empire-hq`, `--peer 0.0.0.0/0=app=empire-outpost`).

One broker per module; the proxies are per module too, and each test reads only the access-log
records written while it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ProxyHandle, start_proxy, wait_until
from tests.kafka_broker import TansuBroker, running_tansu

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kafka"
POLICY = EXAMPLE / "kafka_policy.yaml"
POLICY_NAME = "secure-empire-kafka"
ANNOUNCE = "empire-announce"
PLANS = "deathstar-plans"
HQ, OUTPOST, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
HQ_LABELS, OUTPOST_LABELS = "app=empire-hq", "app=empire-outpost"
SESSION_TIMEOUT_MS = 6000  # tansu takes about half of it to complete a group join
DENIED_WITHIN = 5.0  # seconds a client may take to report a denied request


# ---- broker and proxies -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    with running_tansu() as running:
        admin = KafkaAdminClient(bootstrap_servers=running.bootstrap)
        admin.create_topics([NewTopic(ANNOUNCE, 1, 1), NewTopic(PLANS, 1, 1)])
        admin.close()
        # Plans to steal: a denied consumer must not read them.
        producer = KafkaProducer(bootstrap_servers=running.bootstrap)
        for n in range(3):
            producer.send(PLANS, f"plan {n}".encode())
        producer.flush()
        producer.close()
        yield running


def _proxy(
    broker: TansuBroker, log_dir: Path, name: str, *peers: str, metrics: bool = False
) -> ProxyHandle:
    return start_proxy(
        log_dir,
        protocol="kafka",
        policy_files=[POLICY],
        dst_labels="app=kafka",
        upstream=broker.address,
        peers=peers,
        dport=9092,
        verbose=False,
        name=name,
        metrics=metrics,
    )


@pytest.fixture(scope="module")
def proxies(
    broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ProxyHandle]]:
    log_dir = tmp_path_factory.mktemp("kafka-proxies")
    started: dict[str, ProxyHandle] = {}
    try:
        started["mapped"] = _proxy(
            broker, log_dir, "mapped", f"{HQ}/32={HQ_LABELS}", f"{OUTPOST}/32={OUTPOST_LABELS}"
        )
        started["hq"] = _proxy(broker, log_dir, "hq", f"0.0.0.0/0={HQ_LABELS}")
        started["outpost"] = _proxy(
            broker, log_dir, "outpost", f"0.0.0.0/0={OUTPOST_LABELS}", metrics=True
        )
        yield started
    finally:
        for handle in started.values():
            handle.stop()


def bootstrap(proxy: ProxyHandle) -> str:
    return f"{proxy.address[0]}:{proxy.address[1]}"


# ---- access log -------------------------------------------------------------------------------


class AccessLog:
    """The JSON lines one proxy writes from the moment this object is made."""

    def __init__(self, proxy: ProxyHandle) -> None:
        self.proxy = proxy
        self.start = self._size()

    def _size(self) -> int:
        path = self.proxy.access_log
        return path.stat().st_size if path.exists() else 0

    def lines(self) -> list[dict[str, Any]]:
        with self.proxy.access_log.open("rb") as log:
            log.seek(self.start)
            text = log.read().decode()
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            nonlocal found
            found = [line for line in self.lines() if predicate(line)]
            return len(found) >= count

        wait_until(check, f"{count} matching access-log line(s)", timeout, self.proxy.process)
        return found


def kafka(line: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = line.get("l7", {}).get("kafka", {})
    return found


def is_kafka(
    kind: str, api_key: str, verdict: str | None = None, topic: str | None = None
) -> Callable[[dict[str, Any]], bool]:
    def match(line: dict[str, Any]) -> bool:
        return (
            line.get("l7", {}).get("type") == kind
            and kafka(line).get("api_key") == api_key
            and (verdict is None or line["verdict"] == verdict)
            and (topic is None or kafka(line).get("topic") == topic)
        )

    return match


def check_request_line(
    line: dict[str, Any], *, verdict: str, api_key: str, topic: str, source: str, labels: str
) -> None:
    """An L7 request line, field by field (Hubble's names)."""
    assert line["verdict"] == verdict
    assert line["Type"] == "L7"
    assert line["traffic_direction"] == "INGRESS"
    assert line["is_reply"] is False
    assert line["event_type"] == {"type": 129}
    assert line["source"]["ip"] == source
    assert f"k8s:{labels}" in line["source"]["labels"]
    assert line["source"]["identity"] >= 256
    assert line["destination"]["port"] == 9092
    assert "k8s:app=kafka" in line["destination"]["labels"]
    assert line["destination"]["identity"] == 256
    assert line["IP"]["source"] == source
    assert line["l4"]["TCP"]["destination_port"] == 9092
    assert line["l7"]["type"] == "REQUEST"
    record = kafka(line)
    assert record["api_key"] == api_key and record["topic"] == topic
    assert topic in record["topics"]
    assert isinstance(record["api_version"], int) and isinstance(record["correlation_id"], int)
    assert "error_code" not in record
    assert line["Summary"].startswith(f"Kafka request {api_key} correlation id ")
    if verdict == "FORWARDED":
        assert [p["name"] for p in line["ingress_allowed_by"]] == [POLICY_NAME]
        assert "drop_reason_desc" not in line
    else:
        assert "ingress_allowed_by" not in line
        assert line["drop_reason_desc"] == "POLICY_DENIED"


def check_response_line(
    line: dict[str, Any], *, verdict: str, api_key: str, error_code: int, client: str
) -> None:
    assert line["verdict"] == verdict
    assert line["is_reply"] is True
    assert line["destination"]["ip"] == client and line["source"]["port"] == 9092
    assert line["l7"]["type"] == "RESPONSE"
    assert isinstance(line["l7"]["latency_ns"], int)
    record = kafka(line)
    assert record["api_key"] == api_key and record["error_code"] == error_code
    assert line["Summary"].endswith(f"return code {error_code}")


# ---- kafka-python in a child process bound to an identity's address ---------------------------


def _bind_source(address: str) -> None:
    """Make every socket kafka-python opens in this process leave from `address` (the
    example client's patch: examples/kafka/empire.py)."""
    sys.path.insert(0, str(EXAMPLE))
    from empire import bind_source  # type: ignore[import-not-found]

    bind_source(address)


def _kp_produce(
    source: str, servers: str, topic: str, values: list[bytes], then: list[bytes]
) -> dict[str, Any]:
    """Send `values` to `topic` (each waited for), then `then` to empire-announce with the
    same producer: a denied topic must not break the producer for its allowed topic."""
    _bind_source(source)
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=servers, client_id="kp-" + source, acks=1)
    result: dict[str, Any] = {"sent": 0, "error": None, "then_sent": 0}
    start = time.monotonic()
    try:
        for value in values:
            producer.send(topic, value).get(timeout=30)
            result["sent"] += 1
    except Exception as exc:  # the denied case: what the client reports
        result["error"] = type(exc).__name__
    result["elapsed"] = time.monotonic() - start
    try:
        for value in then:
            producer.send(ANNOUNCE, value).get(timeout=10)
            result["then_sent"] += 1
    except Exception as exc:
        result["then_error"] = type(exc).__name__
    producer.close(timeout=5)
    return result


def _kp_consume(
    source: str,
    servers: str,
    topic: str,
    prefix: bytes,
    wanted: int,
    group: str,
    seconds: float = 30.0,
) -> dict[str, Any]:
    """Consume `topic` in consumer group `group` until `wanted` values starting with
    `prefix` arrived (or an error, or `seconds`)."""
    _bind_source(source)
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=servers,
        client_id="kp-" + source,
        group_id=group,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=1000,
    )
    values: list[bytes] = []
    result: dict[str, Any] = {"error": None}
    start = time.monotonic()
    try:
        while len(values) < wanted and time.monotonic() - start < seconds:
            for records in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in records if r.value.startswith(prefix)]
    except Exception as exc:
        result["error"] = type(exc).__name__
    result["elapsed"] = time.monotonic() - start
    result["values"] = values
    consumer.close()
    return result


def _child(conn: Any, function: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    try:
        conn.send(function(*args))
    except BaseException as exc:
        conn.send({"crashed": repr(exc)})
    finally:
        conn.close()


def in_child(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run `function(*args)` in a fresh interpreter (the socket patch stays there)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, function, args))
    child.start()
    sender.close()
    try:
        if not receiver.poll(60):
            raise AssertionError(f"{function.__name__} did not finish within 60 s")
        result: dict[str, Any] = receiver.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()  # our own child, by its handle
            child.join(5)
    assert "crashed" not in result, result
    return result


def unique(tag: str) -> bytes:
    return f"{tag}-{uuid.uuid4().hex[:8]}-".encode()


# ---- kafka-python: identities by source address -----------------------------------------------


def test_kafka_python_round_trip_by_source_address(proxies: dict[str, ProxyHandle]) -> None:
    proxy = proxies["mapped"]
    log = AccessLog(proxy)
    prefix = unique("kp")
    values = [prefix + str(n).encode() for n in range(20)]
    sent = in_child(_kp_produce, HQ, bootstrap(proxy), ANNOUNCE, values, [])
    assert sent == {"sent": 20, "error": None, "then_sent": 0, "elapsed": sent["elapsed"]}
    got = in_child(_kp_consume, OUTPOST, bootstrap(proxy), ANNOUNCE, prefix, 20, "kp-outposts")
    assert got["error"] is None and sorted(got["values"]) == sorted(values)

    produce = log.wait(is_kafka("REQUEST", "produce", "FORWARDED"), 20)
    for line in produce:
        check_request_line(
            line,
            verdict="FORWARDED",
            api_key="produce",
            topic=ANNOUNCE,
            source=HQ,
            labels=HQ_LABELS,
        )
    for line in log.wait(is_kafka("RESPONSE", "produce"), 20):
        check_response_line(line, verdict="FORWARDED", api_key="produce", error_code=0, client=HQ)
    fetch = log.wait(is_kafka("REQUEST", "fetch", "FORWARDED", ANNOUNCE))
    check_request_line(
        fetch[0],
        verdict="FORWARDED",
        api_key="fetch",
        topic=ANNOUNCE,
        source=OUTPOST,
        labels=OUTPOST_LABELS,
    )
    # The consumer group joined through the proxy.
    for api in ("findcoordinator", "joingroup", "syncgroup", "offsetfetch", "offsetcommit"):
        lines = log.wait(is_kafka("REQUEST", api))
        assert {line["verdict"] for line in lines} == {"FORWARDED"}, api
        assert {line["source"]["ip"] for line in lines} == {OUTPOST}
    assert not [line for line in log.lines() if line["verdict"] in ("DROPPED", "ERROR")]


def test_kafka_python_denied_produce_fails_fast_and_leaves_the_allowed_topic_working(
    proxies: dict[str, ProxyHandle],
) -> None:
    proxy = proxies["mapped"]
    log = AccessLog(proxy)
    result = in_child(
        _kp_produce, HQ, bootstrap(proxy), PLANS, [b"stolen"], [unique("after") + b"0"]
    )
    assert result["error"] == "TopicAuthorizationFailedError" and result["sent"] == 0
    assert result["elapsed"] < DENIED_WITHIN
    assert result["then_sent"] == 1, result
    denied = log.wait(is_kafka("REQUEST", "metadata", "DROPPED"))
    check_request_line(
        denied[0],
        verdict="DROPPED",
        api_key="metadata",
        topic=denied[0]["l7"]["kafka"]["topic"],
        source=HQ,
        labels=HQ_LABELS,
    )
    assert PLANS in kafka(denied[0])["topics"]
    answer = log.wait(is_kafka("RESPONSE", "metadata", "DROPPED"))[0]
    check_response_line(answer, verdict="DROPPED", api_key="metadata", error_code=29, client=HQ)
    # No retry storm: a handful of denied requests, and nothing for deathstar-plans forwarded.
    assert len([line for line in log.lines() if line["verdict"] == "DROPPED"]) <= 10
    assert not [
        line
        for line in log.lines()
        if line["verdict"] == "FORWARDED" and PLANS in kafka(line).get("topics", [])
    ]


def test_kafka_python_denied_consume_reads_nothing(proxies: dict[str, ProxyHandle]) -> None:
    """kafka-python's consumer does not raise on a topic it may not describe (as with a Kafka
    broker with ACLs): it gets no partition and reads nothing. The proxy answers its Metadata
    requests at once and it does not retry them in a loop."""
    proxy = proxies["mapped"]
    log = AccessLog(proxy)
    result = in_child(_kp_consume, OUTPOST, bootstrap(proxy), PLANS, b"plan", 1, "kp-thieves", 6.0)
    assert result["error"] is None and result["values"] == []
    denied = log.wait(is_kafka("REQUEST", "metadata", "DROPPED", PLANS))
    check_request_line(
        denied[0],
        verdict="DROPPED",
        api_key="metadata",
        topic=PLANS,
        source=OUTPOST,
        labels=OUTPOST_LABELS,
    )
    answers = log.wait(is_kafka("RESPONSE", "metadata", "DROPPED", PLANS))
    check_response_line(
        answers[0], verdict="DROPPED", api_key="metadata", error_code=29, client=OUTPOST
    )
    assert answers[0]["l7"]["latency_ns"] < DENIED_WITHIN * 1e9
    assert len([line for line in log.lines() if line["verdict"] == "DROPPED"]) <= 10
    assert not [
        line
        for line in log.lines()
        if line["verdict"] == "FORWARDED" and PLANS in kafka(line).get("topics", [])
    ]


def test_an_outpost_may_not_produce(proxies: dict[str, ProxyHandle]) -> None:
    proxy = proxies["mapped"]
    log = AccessLog(proxy)
    result = in_child(_kp_produce, OUTPOST, bootstrap(proxy), ANNOUNCE, [b"forged"], [])
    assert result["error"] == "TopicAuthorizationFailedError"
    assert result["elapsed"] < DENIED_WITHIN
    (line,) = log.wait(is_kafka("REQUEST", "produce", "DROPPED", ANNOUNCE))
    check_request_line(
        line,
        verdict="DROPPED",
        api_key="produce",
        topic=ANNOUNCE,
        source=OUTPOST,
        labels=OUTPOST_LABELS,
    )
    # The consume rule lets it describe the topic, not write to it.
    assert log.wait(is_kafka("REQUEST", "metadata", "FORWARDED", ANNOUNCE))


def test_an_unknown_source_is_refused_at_l3_l4(proxies: dict[str, ProxyHandle]) -> None:
    proxy = proxies["mapped"]
    log = AccessLog(proxy)
    with socket.socket() as sock:
        sock.settimeout(5)
        sock.bind((STRANGER, 0))
        sock.connect(proxy.address)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""  # closed without an answer, as a dropped SYN
    (line,) = log.wait(lambda line: line["Type"] == "L3_L4")
    assert line["verdict"] == "DROPPED" and line["drop_reason_desc"] == "POLICY_DENIED"
    assert line["source"]["ip"] == STRANGER and any(
        label.startswith("reserved:world") for label in line["source"]["labels"]
    )


# ---- librdkafka (confluent-kafka): one proxy per identity -------------------------------------


def rdkafka_config(proxy: ProxyHandle, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap(proxy), "client.id": "rdkafka-e2e", **extra}


@dataclass
class Delivery:
    errors: list[str]
    delivered: int = 0

    def __call__(self, error: Any, message: Any) -> None:
        if error is None:
            self.delivered += 1
        else:
            self.errors.append(error.name())


def rdkafka_produce(proxy: ProxyHandle, topic: str, values: list[bytes]) -> tuple[Delivery, float]:
    from confluent_kafka import Producer

    producer = Producer(rdkafka_config(proxy, **{"message.timeout.ms": 10000}))
    delivery = Delivery([])
    start = time.monotonic()
    for value in values:
        producer.produce(topic, value, on_delivery=delivery)
    producer.flush(15)
    return delivery, time.monotonic() - start


def rdkafka_consume(
    proxy: ProxyHandle, topic: str, prefix: bytes, wanted: int, group: str
) -> tuple[list[bytes], list[str], float]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        rdkafka_config(
            proxy,
            **{
                "group.id": group,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": 1000,
            },
        )
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    errors: list[str] = []
    start = time.monotonic()
    try:
        while len(values) < wanted and not errors and time.monotonic() - start < 30:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error, value = message.error(), message.value() or b""
            if error is not None:
                errors.append(error.name())
            elif value.startswith(prefix):
                values.append(value)
    finally:
        consumer.close()
    return values, errors, time.monotonic() - start


def test_librdkafka_round_trip_in_a_consumer_group(proxies: dict[str, ProxyHandle]) -> None:
    hq, outpost = AccessLog(proxies["hq"]), AccessLog(proxies["outpost"])
    prefix = unique("rk")
    values = [prefix + str(n).encode() for n in range(20)]
    delivery, _ = rdkafka_produce(proxies["hq"], ANNOUNCE, values)
    assert delivery.errors == [] and delivery.delivered == 20
    got, errors, _ = rdkafka_consume(proxies["outpost"], ANNOUNCE, prefix, 20, "rk-outposts")
    assert errors == [] and sorted(got) == sorted(values)

    for line in hq.wait(is_kafka("REQUEST", "produce", "FORWARDED")):
        check_request_line(
            line,
            verdict="FORWARDED",
            api_key="produce",
            topic=ANNOUNCE,
            source="127.0.0.1",
            labels=HQ_LABELS,
        )
    # librdkafka fetches by topic id (Fetch v13+): the proxy resolved it to the name.
    fetch = outpost.wait(is_kafka("REQUEST", "fetch", "FORWARDED", ANNOUNCE))
    assert fetch[0]["l7"]["kafka"]["api_version"] >= 13
    for api in ("joingroup", "syncgroup", "offsetcommit"):
        assert outpost.wait(is_kafka("REQUEST", api, "FORWARDED")), api
    # tansu advertises client telemetry (KIP-714) and librdkafka would ask for it on every
    # connection; the rules do not allow it, so the proxy's ApiVersions answers leave it out,
    # as a broker without a telemetry receiver does: librdkafka never asks, nothing is denied.
    lines = [line for log in (hq, outpost) for line in log.lines()]
    assert not [line for line in lines if line["verdict"] != "FORWARDED"]
    assert not [line for line in lines if "telemetry" in kafka(line).get("api_key", "")]


def test_librdkafka_denied_produce_fails_fast(proxies: dict[str, ProxyHandle]) -> None:
    log = AccessLog(proxies["hq"])
    delivery, elapsed = rdkafka_produce(proxies["hq"], PLANS, [b"stolen"] * 3)
    assert delivery.errors == ["TOPIC_AUTHORIZATION_FAILED"] * 3 and delivery.delivered == 0
    assert elapsed < DENIED_WITHIN
    denied = log.wait(is_kafka("REQUEST", "metadata", "DROPPED", PLANS))
    check_request_line(
        denied[0],
        verdict="DROPPED",
        api_key="metadata",
        topic=PLANS,
        source="127.0.0.1",
        labels=HQ_LABELS,
    )
    assert len([line for line in log.lines() if line["verdict"] == "DROPPED"]) <= 10


def test_librdkafka_denied_consume_fails_fast(proxies: dict[str, ProxyHandle]) -> None:
    log = AccessLog(proxies["outpost"])
    got, errors, elapsed = rdkafka_consume(proxies["outpost"], PLANS, b"plan", 1, "rk-thieves")
    assert got == [] and errors == ["TOPIC_AUTHORIZATION_FAILED"]
    assert elapsed < DENIED_WITHIN
    log.wait(is_kafka("REQUEST", "metadata", "DROPPED", PLANS))
    assert len([line for line in log.lines() if line["verdict"] == "DROPPED"]) <= 10
    assert not [line for line in log.lines() if is_kafka("REQUEST", "fetch", "FORWARDED")(line)]


# ---- aiokafka: one proxy per identity ---------------------------------------------------------


async def aiokafka_round_trip(
    hq: ProxyHandle, outpost: ProxyHandle, values: list[bytes], prefix: bytes
) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(hq))
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(ANNOUNCE, value)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        ANNOUNCE,
        bootstrap_servers=bootstrap(outpost),
        group_id="ak-outposts",
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(60):
            async for message in consumer:
                if message.value is not None and message.value.startswith(prefix):
                    got.append(message.value)
                    if len(got) == len(values):
                        break
    finally:
        await consumer.stop()
    return got


def test_aiokafka_round_trip_in_a_consumer_group(proxies: dict[str, ProxyHandle]) -> None:
    hq, outpost = AccessLog(proxies["hq"]), AccessLog(proxies["outpost"])
    prefix = unique("ak")
    values = [prefix + str(n).encode() for n in range(20)]
    got = asyncio.run(aiokafka_round_trip(proxies["hq"], proxies["outpost"], values, prefix))
    assert sorted(got) == sorted(values)
    assert len(hq.wait(is_kafka("REQUEST", "produce", "FORWARDED", ANNOUNCE), 20)) == 20
    outpost.wait(is_kafka("REQUEST", "fetch", "FORWARDED", ANNOUNCE))
    outpost.wait(is_kafka("REQUEST", "joingroup", "FORWARDED"))
    assert not [
        line for log in (hq, outpost) for line in log.lines() if line["verdict"] != "FORWARDED"
    ]


async def aiokafka_denied_produce(hq: ProxyHandle) -> tuple[str, float]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(hq))
    await producer.start()
    start = time.monotonic()
    try:
        await producer.send_and_wait(PLANS, b"stolen")
    except Exception as exc:
        return type(exc).__name__, time.monotonic() - start
    finally:
        await producer.stop()
    return "", time.monotonic() - start


def test_aiokafka_denied_produce_fails_fast(proxies: dict[str, ProxyHandle]) -> None:
    log = AccessLog(proxies["hq"])
    error, elapsed = asyncio.run(aiokafka_denied_produce(proxies["hq"]))
    assert error == "TopicAuthorizationFailedError" and elapsed < DENIED_WITHIN
    log.wait(is_kafka("REQUEST", "metadata", "DROPPED", PLANS))
    assert len([line for line in log.lines() if line["verdict"] == "DROPPED"]) <= 10


# ---- the example's own client, as its README runs it ------------------------------------------


def empire(proxy: ProxyHandle, source: str, *command: str) -> tuple[int, str]:
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "empire.py"),
            *("--bootstrap", bootstrap(proxy), "--source", source),
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout


def test_the_example_clients_behave_as_the_readme_says(proxies: dict[str, ProxyHandle]) -> None:
    proxy = proxies["mapped"]
    news = unique("readme").decode() + "The Emperor arrives"
    code, out = empire(proxy, HQ, "produce", ANNOUNCE, news)
    assert code == 0 and out.startswith(f"sent to {ANNOUNCE}[0]@")
    code, out = empire(proxy, HQ, "produce", PLANS, "exhaust port")
    assert code == 1 and out.startswith("TopicAuthorizationFailedError")
    code, out = empire(
        proxy,
        OUTPOST,
        "consume",
        ANNOUNCE,
        "--group",
        "readme",
        "--count",
        "1000",
        "--seconds",
        "8",
    )
    assert news in out  # every announcement so far, in one group
    code, out = empire(proxy, OUTPOST, "produce", ANNOUNCE, "forged")
    assert code == 1 and "ClusterAuthorizationFailedError" in out


async def aiokafka_denied_consume(outpost: ProxyHandle) -> tuple[str, float]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        PLANS,
        bootstrap_servers=bootstrap(outpost),
        group_id="ak-thieves",
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=1000,
    )
    start = time.monotonic()
    try:  # aiokafka raises from start() (its first Metadata answer) or from getone()
        await consumer.start()
        async with asyncio.timeout(10):
            await consumer.getone()
    except Exception as exc:
        return type(exc).__name__, time.monotonic() - start
    finally:
        await consumer.stop()
    return "", time.monotonic() - start


def test_aiokafka_denied_consume_fails_fast(proxies: dict[str, ProxyHandle]) -> None:
    log = AccessLog(proxies["outpost"])
    error, elapsed = asyncio.run(aiokafka_denied_consume(proxies["outpost"]))
    assert error == "TopicAuthorizationFailedError" and elapsed < DENIED_WITHIN
    log.wait(is_kafka("REQUEST", "metadata", "DROPPED", PLANS))
    assert len([line for line in log.lines() if line["verdict"] == "DROPPED"]) <= 10
    assert not [line for line in log.lines() if is_kafka("REQUEST", "fetch", "FORWARDED")(line)]


def denied_kafka_requests(proxy: ProxyHandle) -> float:
    """The proxy's own count of denied Kafka requests (Prometheus, Cilium's name)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    assert proxy.metrics is not None
    host, port = proxy.metrics
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "garrison_policy_l7_total"
                and labels.get("rule") == "denied"
                and labels.get("proxy_type") == "kafka"
            ):
                return float(sample.value)
    raise AssertionError("no garrison_policy_l7_total{rule=denied,proxy_type=kafka}")


async def aiokafka_assigned_denied(outpost: ProxyHandle, seconds: float) -> list[Any]:
    """aiokafka with a denied partition assigned (no group): it re-sends Metadata for the
    topic without backoff and never reports the error; `getone` just waits."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(outpost), auto_offset_reset="earliest")
    await consumer.start()
    got: list[Any] = []
    try:
        consumer.assign([TopicPartition(PLANS, 0)])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                got.append(await consumer.getone())
    finally:
        await consumer.stop()
    return got


def test_a_denied_metadata_flood_is_recorded_once_with_a_count(
    proxies: dict[str, ProxyHandle],
) -> None:
    """Issue 17: 65,000 DROPPED records in 11 s. Now the first denial is one request and one
    response record, at once; the repeats are one more pair with Hubble's aggregate count,
    written when the connection ends (or every 10 s); the metrics still count each one."""
    outpost = proxies["outpost"]
    log = AccessLog(outpost)
    denied_before = denied_kafka_requests(outpost)
    got = asyncio.run(aiokafka_assigned_denied(outpost, 3.0))
    assert got == []  # nothing of the plans reached the client
    # The connection closed: the counted repeats are written.
    log.wait(
        lambda line: is_kafka("REQUEST", "metadata", "DROPPED", PLANS)(line) and "aggregate" in line
    )
    lines = log.lines()
    denied = [line for line in lines if line["verdict"] == "DROPPED"]
    requests = [line for line in denied if line["l7"]["type"] == "REQUEST"]
    responses = [line for line in denied if line["l7"]["type"] == "RESPONSE"]
    first, *repeats = requests
    assert "aggregate" not in first and all("aggregate" in line for line in repeats)
    check_request_line(
        first,
        verdict="DROPPED",
        api_key="metadata",
        topic=PLANS,
        source="127.0.0.1",
        labels=OUTPOST_LABELS,
    )
    counted = [line["aggregate"]["ingress_flow_count"] for line in repeats]
    assert all(set(line["aggregate"]) == {"ingress_flow_count"} for line in repeats)
    total = 1 + sum(counted)
    assert total > 100  # the client really flooded: about 900 requests a second here
    assert len(requests) <= 3  # 3 s: the first, then at most one group per 10 s and the close
    assert [kafka(line)["error_code"] for line in responses] == [29] * len(responses)
    assert [line.get("aggregate") for line in responses] == [
        line.get("aggregate") for line in requests
    ]
    for line in responses:
        check_response_line(
            line, verdict="DROPPED", api_key="metadata", error_code=29, client="127.0.0.1"
        )
    assert not [line for line in lines if is_kafka("REQUEST", "fetch", "FORWARDED")(line)]
    wait_until(
        lambda: denied_kafka_requests(outpost) - denied_before == total,
        f"{total} denied requests in the proxy's metrics",
        5.0,
        outpost.process,
    )


def metadata_over_a_socket(address: tuple[str, int], topic: str) -> Any:
    """One Metadata v12 request for `topic` as the first request of a new connection,
    encoded and decoded with kafka-python's protocol classes: the answer as the wire has it."""
    from kafka.protocol.metadata import MetadataRequest, MetadataResponse

    entry = MetadataRequest[12].fields["topics"].data_class
    request = MetadataRequest[12](
        topics=[entry(name=topic, topic_id=None)],
        allow_auto_topic_creation=False,
        include_topic_authorized_operations=False,
    )
    request.with_header(correlation_id=1, client_id="garrison-e2e")
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(bytes(request.encode(header=True, framed=True)))
        size = int.from_bytes(_read_exactly(sock, 4), "big")
        frame = size.to_bytes(4, "big") + _read_exactly(sock, size)
    return MetadataResponse.decode(frame, version=12, header=True, framed=True)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the proxy closed the connection"
        data += chunk
    return data


def test_after_a_proxy_restart_a_denied_metadata_still_lists_the_brokers(
    broker: TansuBroker, tmp_path: Path
) -> None:
    """A client that already knows its topics talks to a proxy that has seen no Metadata
    answer yet (restarted, or another worker): its first Metadata request may name only a
    denied topic. The answer lists the brokers (here the proxy itself), the controller and the
    cluster id the client needs to go on, not 0 brokers and controller -1; the denied topic
    never reaches the broker; kafka-python reports the denial at once."""
    from kafka import KafkaProducer
    from kafka.errors import TopicAuthorizationFailedError

    first = _proxy(broker, tmp_path, "before-restart", f"0.0.0.0/0={HQ_LABELS}")
    host, port = first.address
    producer = KafkaProducer(bootstrap_servers=f"{host}:{port}", max_block_ms=15000)
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            producer.send(PLANS, b"stolen").get(timeout=DENIED_WITHIN)
        first.stop()
        second = start_proxy(
            tmp_path,
            protocol="kafka",
            policy_files=[POLICY],
            dst_labels="app=kafka",
            upstream=broker.address,
            peers=[f"0.0.0.0/0={HQ_LABELS}"],
            dport=9092,
            verbose=False,
            name="after-restart",
            extra_args=["--listen", f"{host}:{port}"],
        )
        try:
            log = AccessLog(second)
            answer = metadata_over_a_socket((host, port), PLANS)
            assert [(b.host, b.port) for b in answer.brokers] == [(host, port)]
            assert answer.controller_id == answer.brokers[0].node_id
            assert answer.cluster_id == "tansu_cluster"
            assert [(t.name, t.error_code) for t in answer.topics] == [(PLANS, 29)]
            start = time.monotonic()
            with pytest.raises(TopicAuthorizationFailedError):
                producer.send(PLANS, b"stolen again").get(timeout=DENIED_WITHIN)
            assert time.monotonic() - start < DENIED_WITHIN
            dropped = log.wait(is_kafka("RESPONSE", "metadata", "DROPPED", PLANS), 2)
            for line in dropped:
                check_response_line(
                    line, verdict="DROPPED", api_key="metadata", error_code=29, client="127.0.0.1"
                )
            requests = [line for line in log.lines() if is_kafka("REQUEST", "metadata")(line)]
            assert {(line["verdict"], kafka(line)["topic"]) for line in requests} == {
                ("DROPPED", PLANS)
            }
        finally:
            second.stop()
    finally:
        producer.close(timeout=5)
        first.stop()


# ---- acks=0: nobody answers ------------------------------------------------------------------


def test_acks_0_produce_passes_when_allowed_and_is_dropped_silently_when_denied(
    broker: TansuBroker, proxies: dict[str, ProxyHandle]
) -> None:
    """tansu answers acks=0 Produce requests (Kafka does not); the proxy never forwards such
    an answer, and a denied acks=0 Produce is dropped without an answer, as the client
    expects none. Neither producer hangs."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    log = AccessLog(proxies["hq"])
    prefix = unique("acks0")
    producer = KafkaProducer(bootstrap_servers=bootstrap(proxies["hq"]), acks=0)
    start = time.monotonic()
    for n in range(10):
        producer.send(ANNOUNCE, prefix + str(n).encode())
    producer.flush(timeout=10)
    producer.close(timeout=5)
    assert time.monotonic() - start < DENIED_WITHIN
    # Read back from the broker itself: every message arrived.
    reader = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition(ANNOUNCE, 0)])
    reader.seek_to_beginning()
    seen: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(seen) < 10 and time.monotonic() < deadline:
        for records in reader.poll(timeout_ms=500).values():
            seen += [r.value for r in records if r.value.startswith(prefix)]
    reader.close()
    assert len(seen) == 10
    produce = log.wait(is_kafka("REQUEST", "produce", "FORWARDED", ANNOUNCE))
    assert not [line for line in log.lines() if is_kafka("RESPONSE", "produce")(line)]
    assert produce

    # Denied: an outpost may describe empire-announce but not write to it. Its acks=0
    # Produce is dropped without an answer (the client expects none) and reaches nobody.
    log = AccessLog(proxies["outpost"])
    producer = KafkaProducer(bootstrap_servers=bootstrap(proxies["outpost"]), acks=0)
    start = time.monotonic()
    producer.send(ANNOUNCE, prefix + b"forged").get(timeout=DENIED_WITHIN)
    producer.flush(timeout=DENIED_WITHIN)
    producer.close(timeout=5)
    assert time.monotonic() - start < DENIED_WITHIN
    (dropped,) = log.wait(is_kafka("REQUEST", "produce", "DROPPED", ANNOUNCE))
    check_request_line(
        dropped,
        verdict="DROPPED",
        api_key="produce",
        topic=ANNOUNCE,
        source="127.0.0.1",
        labels=OUTPOST_LABELS,
    )
    assert not [line for line in log.lines() if is_kafka("RESPONSE", "produce")(line)]
