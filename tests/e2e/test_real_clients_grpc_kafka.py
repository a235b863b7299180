"""Real gRPC and Kafka clients of other ecosystems through `garrison proxy` (issue 17 §5):
grpc-js (Node, from npm, installed by `make setup` into tests/e2e/node) against the door
manager, kcat (librdkafka's command-line client, Debian) against a tansu broker. Each is asked
for what is allowed and what is denied on one connection, and the test asserts what the client
reports and the record the proxy wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from garrison.flows.record import FlowRecord, L7FlowType, Verdict
from tests.e2e.conftest import REPO, Address, ProxyHandle, start_proxy
from tests.e2e.test_proxy_grpc import DOOR_MANAGER, door_manager
from tests.e2e.test_proxy_grpc import POLICY as GRPC_POLICY
from tests.e2e.test_proxy_kafka import (
    ANNOUNCE,
    HQ_LABELS,
    OUTPOST_LABELS,
    PLANS,
    _proxy,
    broker,
    unique,
)
from tests.kafka_broker import TansuBroker

pytestmark = pytest.mark.e2e

__all__ = ["broker", "door_manager"]  # module-scoped fixtures this module uses

NODE_DIR = REPO / "tests" / "e2e" / "node"
DOORS_PROTO = REPO / "examples" / "grpc" / "doors.proto"
PERMISSION_DENIED = 7


def _need(tool: str, install: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"needs {tool}: {install} (make setup does)")
    return path


# ---- grpc-js ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guard_proxy(door_manager: Address, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    ProxyHandle
]:
    handle = start_proxy(
        tmp_path_factory.mktemp("grpc-js"), protocol="grpc", policy_files=[GRPC_POLICY],
        dst_labels=DOOR_MANAGER, upstream=door_manager, peers=["127.0.0.1/32=app=guard"],
        dport=50051, name="guard",
    )
    yield handle
    handle.stop()


def grpc_js(proxy: ProxyHandle, *calls: str) -> list[dict[str, Any]]:
    node = _need("node", "apt-get install nodejs")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"needs @grpc/grpc-js: npm ci --prefix {NODE_DIR} (make setup does)")
    host, port = proxy.address
    done = subprocess.run(
        [node, str(NODE_DIR / "doors_client.js"), f"{host}:{port}", str(DOORS_PROTO), *calls],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _grpc_request(method: str, verdict: Verdict) -> Callable[[FlowRecord], bool]:
    def match(r: FlowRecord) -> bool:
        return (
            r.verdict is verdict and r.l7 is not None and r.l7.type is L7FlowType.REQUEST
            and r.l7.grpc is not None and r.l7.grpc.method == method
        )

    return match


def test_grpc_js_allowed_denied_then_allowed_on_one_channel(guard_proxy: ProxyHandle) -> None:
    results = grpc_js(guard_proxy, "GetName", "SetAccessCode", "GetName")
    assert results[0] == {"method": "GetName", "ok": True, "reply": {"name": "door front"}}
    assert results[1]["ok"] is False and results[1]["code"] == PERMISSION_DENIED, results[1]
    assert results[1]["details"] == "Access denied"
    assert results[2] == results[0]  # the denial did not break the channel
    denied = guard_proxy.wait_record(_grpc_request("SetAccessCode", Verdict.DROPPED))
    assert denied.l7 is not None and denied.l7.grpc is not None
    assert denied.l7.grpc.service == "doors.DoorManager"
    assert len(guard_proxy.wait_records(_grpc_request("GetName", Verdict.FORWARDED), 2)) >= 2


# ---- kcat ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka_proxies(
    broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ProxyHandle]]:
    log_dir = tmp_path_factory.mktemp("kcat")
    started: dict[str, ProxyHandle] = {}
    try:
        started["hq"] = _proxy(broker, log_dir, "kcat-hq", f"0.0.0.0/0={HQ_LABELS}")
        started["outpost"] = _proxy(broker, log_dir, "kcat-outpost",
                                    f"0.0.0.0/0={OUTPOST_LABELS}")
        yield started
    finally:
        for handle in started.values():
            handle.stop()


def kcat(proxy: ProxyHandle, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    binary = _need("kcat", "apt-get install kcat")
    host, port = proxy.address
    return subprocess.run(
        [binary, "-b", f"{host}:{port}", "-X", "message.timeout.ms=10000",
         "-X", "socket.timeout.ms=10000", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


def _kafka_request(topic: str, verdict: Verdict) -> Callable[[FlowRecord], bool]:
    def match(r: FlowRecord) -> bool:
        return (
            r.verdict is verdict and r.l7 is not None and r.l7.type is L7FlowType.REQUEST
            and r.l7.kafka is not None and r.l7.kafka.topic == topic
        )

    return match


def test_kcat_produces_and_consumes_the_allowed_topic(
    kafka_proxies: dict[str, ProxyHandle],
) -> None:
    value = unique("kcat").decode()
    produced = kcat(kafka_proxies["hq"], "-P", "-t", ANNOUNCE, stdin=value + "\n")
    assert produced.returncode == 0, produced.stderr
    consumed = kcat(kafka_proxies["outpost"], "-C", "-t", ANNOUNCE, "-o", "beginning", "-e",
                    "-q")
    assert consumed.returncode == 0, consumed.stderr
    assert value in consumed.stdout.splitlines()
    kafka_proxies["hq"].wait_record(_kafka_request(ANNOUNCE, Verdict.FORWARDED))


def test_kcat_denied_produce_reports_topic_authorization_failed(
    kafka_proxies: dict[str, ProxyHandle],
) -> None:
    produced = kcat(kafka_proxies["hq"], "-P", "-t", PLANS, stdin="stolen plans\n")
    assert "Topic authorization failed" in produced.stderr, produced.stderr
    record = kafka_proxies["hq"].wait_record(_kafka_request(PLANS, Verdict.DROPPED))
    assert record.l7 is not None and record.l7.kafka is not None
    # librdkafka asks for the topic's metadata first: that is where the denial comes
    assert record.l7.kafka.api_key in ("metadata", "produce")


def test_kcat_denied_consume_reads_nothing(kafka_proxies: dict[str, ProxyHandle]) -> None:
    consumed = kcat(kafka_proxies["outpost"], "-C", "-t", PLANS, "-o", "beginning", "-e")
    assert "plan" not in consumed.stdout  # the broker holds "plan 0".."plan 2"
    assert "Topic authorization failed" in consumed.stderr, consumed.stderr
    kafka_proxies["outpost"].wait_record(_kafka_request(PLANS, Verdict.DROPPED))
