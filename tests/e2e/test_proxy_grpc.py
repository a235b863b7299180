"""gRPC end to end: the door manager (examples/grpc) behind `garrison proxy --protocol grpc`,
real grpcio clients, the example policy, the access log field by field.

grpcio cannot choose its source address, and every loopback connection comes from 127.0.0.1,
so each client identity gets its own proxy mapping 127.0.0.1 to its labels (`--peer`); the
world proxy maps nobody, so its clients are `reserved:world`, which the policy does not admit.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from garrison.flows.record import (
    DropReasonDesc,
    FlowRecord,
    FlowType,
    L7FlowType,
    TrafficDirection,
    Verdict,
)
from tests.e2e.conftest import (
    PYTHON,
    REPO,
    Address,
    ProxyHandle,
    accepts,
    free_port,
    start_process,
    start_proxy,
    wait_until,
)
from tests.unit.proxy.test_engine_h2_harness import load_doors

pytestmark = pytest.mark.e2e

EXAMPLE = REPO / "examples" / "grpc"
POLICY = EXAMPLE / "doors-policy.yaml"
DOOR_MANAGER = "app=door-manager"
DOOR_MANAGER_LABELS = ("k8s:app=door-manager", "k8s:io.kubernetes.pod.namespace=default")
SERVICE = "doors.DoorManager"
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

doors = load_doors()

HTTP_RULES_POLICY = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "door-manager-http"
spec:
  endpointSelector:
    matchLabels:
      app: door-manager
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: guard
    toPorts:
    - ports:
      - port: "50051"
        protocol: TCP
      rules:
        http:
        - method: POST
          path: /doors[.]DoorManager/Get(Name|Location)
"""


# ---- processes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def door_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Address]:
    log_dir = tmp_path_factory.mktemp("doors")
    port = free_port()
    process = start_process(
        [PYTHON, str(EXAMPLE / "doors_server.py"), "--listen", f"127.0.0.1:{port}"],
        log_dir,
        "doors",
    )
    try:
        wait_until(lambda: accepts(("127.0.0.1", port)), "doors_server listening", 10, process)
        yield ("127.0.0.1", port)
    finally:
        process.stop()


Proxies = dict[str, ProxyHandle]


@pytest.fixture(scope="module")
def proxies(door_manager: Address, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxies]:
    """One proxy per client identity (see the module docstring), started in parallel."""
    log_dir = tmp_path_factory.mktemp("grpc-proxies")
    http_policy = log_dir / "door-manager-http.yaml"
    http_policy.write_text(HTTP_RULES_POLICY)
    specs: dict[str, dict[str, Any]] = {
        "guard": {"peers": ["127.0.0.1/32=app=guard"]},
        "technician": {"peers": ["127.0.0.1/32=app=technician"]},
        "world": {"peers": []},
        "http": {
            "peers": ["127.0.0.1/32=app=guard"],
            "protocol": "http",
            "policy_files": [http_policy],
        },
    }

    def start(name: str) -> ProxyHandle:
        spec = specs[name]
        return start_proxy(
            log_dir,
            protocol=spec.get("protocol", "grpc"),
            policy_files=spec.get("policy_files", [POLICY]),
            dst_labels=DOOR_MANAGER,
            upstream=door_manager,
            peers=spec["peers"],
            dport=50051,
            name=name,
        )

    started: Proxies = {}
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(start, name) for name in specs}
        try:
            for name, future in futures.items():
                started[name] = future.result()
            yield started
        finally:
            for future in futures.values():
                if future.exception() is None:
                    future.result().stop()


def channel(proxy: ProxyHandle) -> grpc.Channel:
    host, port = proxy.address
    return grpc.insecure_channel(f"{host}:{port}", options=CHANNEL_OPTIONS)


def unary(ch: grpc.Channel, method: str, request: bytes, request_id: str = "") -> bytes:
    metadata = [("x-request-id", request_id)] if request_id else None
    reply: bytes = ch.unary_unary(doors.path(method))(request, timeout=10, metadata=metadata)
    return reply


def tagged(request_id: str) -> Callable[[FlowRecord], bool]:
    """Request records carrying this x-request-id (gRPC metadata is in l7.http.headers)."""

    def match(r: FlowRecord) -> bool:
        if r.l7 is None or r.l7.http is None or r.l7.type is not L7FlowType.REQUEST:
            return False
        return any(h.key == "x-request-id" and h.value == request_id for h in r.l7.http.headers)

    return match


def response_to(request: FlowRecord) -> Callable[[FlowRecord], bool]:
    """The response record of the same call: same connection, same method, a reply."""
    assert request.l7 is not None and request.l7.grpc is not None
    method = (request.l7.grpc.service, request.l7.grpc.method)

    def match(r: FlowRecord) -> bool:
        return (
            r.l7 is not None
            and r.l7.type is L7FlowType.RESPONSE
            and r.l7.grpc is not None
            and (r.l7.grpc.service, r.l7.grpc.method) == method
            and r.destination.port == request.source.port
        )

    return match


def new_id() -> str:
    return uuid.uuid4().hex


# ---- allowed and denied calls -------------------------------------------------------------------


def test_guard_allowed_unary_calls_and_their_records(proxies: Proxies) -> None:
    proxy = proxies["guard"]
    rid = new_id()
    with channel(proxy) as ch:
        assert doors.decode(unary(ch, "GetName", doors.message((1, "front")), rid)) == {
            1: b"door front"
        }
        assert doors.decode(unary(ch, "GetLocation", doors.message((1, "front")))) == {
            1: b"HQ",
            2: 3,
        }
    request = proxy.wait_record(tagged(rid))
    assert request.verdict is Verdict.FORWARDED
    assert request.type is FlowType.L7
    assert request.traffic_direction is TrafficDirection.INGRESS
    assert request.is_reply is False
    assert request.drop_reason_desc is None
    assert (request.source.identity, request.source.labels) == (
        257,
        ("k8s:app=guard", "k8s:io.kubernetes.pod.namespace=default"),
    )
    assert request.source.ip == "127.0.0.1" and request.source.namespace == "default"
    assert (request.destination.identity, request.destination.labels) == (256, DOOR_MANAGER_LABELS)
    assert request.destination.port == 50051
    assert request.l7 is not None and request.l7.grpc is not None and request.l7.http is not None
    assert (request.l7.grpc.service, request.l7.grpc.method) == (SERVICE, "GetName")
    assert request.l7.http.method == "POST" and request.l7.http.protocol == "HTTP/2"
    assert request.l7.http.url.endswith("/doors.DoorManager/GetName")
    assert [(p.name, p.namespace, p.kind) for p in request.ingress_allowed_by] == [
        ("door-manager", "default", "CiliumNetworkPolicy")
    ]
    assert request.ingress_denied_by == ()

    response = proxy.wait_record(response_to(request))
    assert response.verdict is Verdict.FORWARDED
    assert response.is_reply is True
    assert response.source.labels == DOOR_MANAGER_LABELS
    assert response.destination.identity == 257
    assert response.l7 is not None and response.l7.grpc is not None
    assert response.l7.grpc.status == 0
    assert response.l7.http is not None and response.l7.http.code == 200
    assert response.l7.latency_ns is not None and 0 < response.l7.latency_ns < 5_000_000_000
    assert [p.name for p in response.ingress_allowed_by] == ["door-manager"]


def test_guard_denied_call_is_permission_denied(proxies: Proxies) -> None:
    proxy = proxies["guard"]
    rid = new_id()
    with channel(proxy) as ch:
        with pytest.raises(grpc.RpcError) as caught:
            unary(ch, "SetAccessCode", doors.message((1, "front"), (2, "0000")), rid)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details() == "Access denied"
        # The connection goes on serving allowed calls.
        assert unary(ch, "GetName", doors.message((1, "back")))
    request = proxy.wait_record(tagged(rid))
    assert request.verdict is Verdict.DROPPED
    assert request.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert request.l7 is not None and request.l7.grpc is not None
    assert (request.l7.grpc.service, request.l7.grpc.method) == (SERVICE, "SetAccessCode")
    assert request.ingress_allowed_by == ()
    assert [(p.name, p.kind) for p in request.ingress_denied_by] == [
        ("door-manager", "CiliumNetworkPolicy")
    ]
    response = proxy.wait_record(response_to(request))
    assert response.verdict is Verdict.DROPPED
    assert response.l7 is not None and response.l7.grpc is not None
    assert response.l7.grpc.status == 7
    assert response.summary.startswith("gRPC 7 PERMISSION_DENIED")


def test_server_streaming_call(proxies: Proxies) -> None:
    proxy = proxies["guard"]
    rid = new_id()
    with channel(proxy) as ch:
        replies = list(
            ch.unary_stream(doors.path("GetStatus"))(
                doors.message((1, "front")), timeout=10, metadata=[("x-request-id", rid)]
            )
        )
    assert [doors.decode(r) for r in replies] == [
        {1: b"front", 2: 1, 3: 0},
        {1: b"front", 2: 0, 3: 1},
        {1: b"front", 2: 1, 3: 2},
    ]
    request = proxy.wait_record(tagged(rid))
    response = proxy.wait_record(response_to(request))
    assert response.l7 is not None and response.l7.grpc is not None
    assert response.l7.grpc.status == 0


def test_client_streaming_call_allowed_for_the_technician_denied_for_the_guard(
    proxies: Proxies,
) -> None:
    def maintenance(proxy: ProxyHandle) -> bytes:
        with channel(proxy) as ch:
            requests = iter([doors.message((1, "front"), (2, f"hinge {i}")) for i in range(5)])
            reply: bytes = ch.stream_unary(doors.path("RequestMaintenance"))(requests, timeout=10)
            return reply

    assert doors.decode(maintenance(proxies["technician"])) == {1: b"T-1", 2: 5}
    with pytest.raises(grpc.RpcError) as caught:
        maintenance(proxies["guard"])
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "Access denied"


def test_200_concurrent_calls_on_one_channel(proxies: Proxies) -> None:
    """Allowed and denied calls interleaved on one HTTP/2 connection, all in flight at once:
    each gets its own answer, denies leave their siblings alone."""
    proxy = proxies["guard"]
    batch = new_id()
    with channel(proxy) as ch:
        get_name = ch.unary_unary(doors.path("GetName"))
        set_code = ch.unary_unary(doors.path("SetAccessCode"))
        get_name(doors.message((1, "warm-up")), timeout=10)  # connection up before the burst
        futures = []
        for i in range(200):
            metadata = [("x-request-id", f"{batch}-{i}")]
            call = set_code if i % 2 else get_name
            futures.append(call.future(doors.message((1, f"d{i}")), timeout=20, metadata=metadata))
        for i, future in enumerate(futures):
            if i % 2:
                with pytest.raises(grpc.RpcError) as caught:
                    future.result()
                assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
            else:
                assert doors.decode(future.result()) == {1: f"door d{i}".encode()}

    def in_batch(r: FlowRecord) -> bool:
        return any(
            h.key == "x-request-id" and h.value.startswith(batch)
            for h in (r.l7.http.headers if r.l7 and r.l7.http else ())
        )

    records = proxy.wait_records(in_batch, 200, timeout=10)
    verdicts = sorted((r.verdict.value, r.l7.grpc.method) for r in records if r.l7 and r.l7.grpc)
    assert verdicts == [("DROPPED", "SetAccessCode")] * 100 + [("FORWARDED", "GetName")] * 100


def test_world_client_is_closed_without_an_answer(proxies: Proxies) -> None:
    proxy = proxies["world"]
    with channel(proxy) as ch, pytest.raises(grpc.RpcError) as caught:
        unary(ch, "GetName", doors.message((1, "front")))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    drop = proxy.wait_record(lambda r: r.type is FlowType.L3_L4)
    assert drop.verdict is Verdict.DROPPED
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert drop.source.identity == 2
    assert [label.rstrip("=") for label in drop.source.labels] == ["reserved:world"]
    assert drop.destination.labels == DOOR_MANAGER_LABELS
    assert not [r for r in proxy.records() if r.type is FlowType.L7]


def test_access_log_lines_use_hubble_field_names(proxies: Proxies) -> None:
    proxy = proxies["guard"]
    rid = new_id()
    with channel(proxy) as ch, pytest.raises(grpc.RpcError):
        unary(ch, "SetAccessCode", doors.message((1, "x"), (2, "1")), rid)
    proxy.wait_record(tagged(rid))
    line = next(
        json.loads(text) for text in proxy.access_log.read_text().splitlines() if rid in text
    )
    assert line["verdict"] == "DROPPED"
    assert line["Type"] == "L7"
    assert line["traffic_direction"] == "INGRESS"
    assert line["is_reply"] is False
    assert line["drop_reason_desc"] == "POLICY_DENIED"
    assert line["source"]["identity"] == 257
    assert line["destination"]["labels"] == list(DOOR_MANAGER_LABELS)
    assert line["l7"]["type"] == "REQUEST"
    assert line["l7"]["grpc"] == {"service": SERVICE, "method": "SetAccessCode"}
    assert line["l7"]["http"]["protocol"] == "HTTP/2"
    assert line["ingress_denied_by"][0]["name"] == "door-manager"
    assert "ingress_allowed_by" not in line or line["ingress_allowed_by"] == []


# ---- HTTP rules over h2c on an HTTP port ---------------------------------------------------------


def test_http_rules_over_h2c(proxies: Proxies) -> None:
    """The HTTP/1.1 engine hands a prior-knowledge HTTP/2 client to the HTTP/2 engine, which
    matches HTTP rules (gRPC calls are POST /pkg.Service/Method); a denied gRPC call gets the
    gRPC answer a gRPC client understands."""
    proxy = proxies["http"]
    rid = new_id()
    with channel(proxy) as ch:
        assert doors.decode(unary(ch, "GetName", doors.message((1, "front")), rid)) == {
            1: b"door front"
        }
        with pytest.raises(grpc.RpcError) as caught:
            unary(ch, "SetAccessCode", doors.message((1, "front"), (2, "1")))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "Access denied"
    request = proxy.wait_record(tagged(rid))
    assert request.verdict is Verdict.FORWARDED
    assert [p.name for p in request.ingress_allowed_by] == ["door-manager-http"]
    denied = proxy.wait_record(
        lambda r: (
            r.verdict is Verdict.DROPPED and r.l7 is not None and r.l7.type is L7FlowType.REQUEST
        )
    )
    assert denied.l7 is not None and denied.l7.http is not None
    assert denied.l7.http.url.endswith("/doors.DoorManager/SetAccessCode")


# ---- the example's own client --------------------------------------------------------------------


def test_example_client_script(proxies: Proxies) -> None:
    host, port = proxies["guard"].address

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, str(EXAMPLE / "doors_client.py"), "--target", f"{host}:{port}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=Path(REPO),
        )

    ok = run("GetName", "--door", "front")
    assert (ok.returncode, ok.stdout) == (0, "{1: 'door front'}\n"), ok.stderr
    denied = run("SetAccessCode", "--code", "1234")
    assert (denied.returncode, denied.stdout) == (1, "PERMISSION_DENIED: Access denied\n")
