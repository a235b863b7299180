"""Hostile HTTP/2 through `garrison proxy --protocol http` (h2c with prior knowledge), in front
of a real h2c server (hypercorn): requests that name two authorities or an authority servers
split differently, malformed header blocks, and an HTTP/1.1-only upstream behind an h2c client.
What the client gets, what reaches the upstream, and the record an operator reads.

The hostile client is the `h2` library (what httpx speaks HTTP/2 with) with its own checks
off, so it sends exactly the header block written here.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from garrison.flows.record import DropReasonDesc, FlowRecord, Verdict
from tests.e2e.conftest import (
    DEATHSTAR_LABELS,
    PYTHON,
    Address,
    ProxyHandle,
    ProxyRunner,
    accepts,
    free_port,
    start_process,
    start_proxy,
    wait_until,
)

h2_connection = pytest.importorskip("h2.connection")
h2_config = pytest.importorskip("h2.config")
h2_events = pytest.importorskip("h2.events")
pytest.importorskip("hypercorn")

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: hunt
spec:
  endpointSelector:
    matchLabels: {org: empire, class: deathstar}
  ingress:
  - fromEndpoints:
    - matchLabels: {org: empire}
    toPorts:
    - ports:
      - {port: "80", protocol: TCP}
      rules:
        http:
        - {method: GET, path: "/hosted", host: "good\\\\.example"}
        - {method: GET, path: "/wild", host: "evil\\\\.example.*"}
        - {method: GET, path: "/open/.*"}
"""

# The h2c upstream logs each request it receives as one JSON line and answers 200.
APP = '''
import json


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    while (await receive()).get("more_body"):
        pass
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
    print(json.dumps({"path": scope["path"], "host": host}), flush=True)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"ok\\n"})
'''


@dataclass
class Setup:
    proxy: ProxyHandle
    upstream_log: Path
    upstream: Address
    policy: Path

    def seen(self) -> list[dict[str, Any]]:
        lines = self.upstream_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("hh-hunt")
    (work / "hhapp.py").write_text(APP)
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    upstream = start_process(
        [PYTHON, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--keep-alive", "60",
         "hhapp:app"],
        work, "hypercorn", env={"PYTHONPATH": str(work)},
    )
    try:
        wait_until(lambda: accepts(("127.0.0.1", port)), "hypercorn listening", 30, upstream)
        proxy = start_proxy(
            work, protocol="http", policy_files=[policy], dst_labels=DEATHSTAR_LABELS,
            peers=["127.0.0.1/32=org=empire,class=tiefighter"], upstream=("127.0.0.1", port),
            dport=80, verbose=False,
        )
        try:
            yield Setup(proxy, upstream.stdout, ("127.0.0.1", port), policy)
        finally:
            proxy.stop()
    finally:
        upstream.stop()


@dataclass
class Answer:
    status: int | None = None
    body: bytes = b""
    reset: int | None = None


def h2_get(address: Address, fields: list[tuple[bytes, bytes]]) -> Answer:
    """One GET over h2c with exactly these fields after :method and :scheme."""
    config = h2_config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False, header_encoding=None,
    )
    conn = h2_connection.H2Connection(config)
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), *fields],
                      end_stream=True)
    answer = Answer()
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while answer.reset is None:
            data = sock.recv(65536)
            if not data:
                break
            done = False
            for ev in conn.receive_data(data):
                if isinstance(ev, h2_events.ResponseReceived):
                    answer.status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2_events.DataReceived):
                    answer.body += ev.data
                    conn.acknowledge_received_data(len(ev.data), sid)
                elif isinstance(ev, h2_events.StreamReset):
                    answer.reset = int(ev.error_code)
                elif isinstance(ev, h2_events.StreamEnded):
                    done = True
            sock.sendall(conn.data_to_send())
            if done:
                break
    return answer


def _code(status: int) -> Any:
    def check(r: FlowRecord) -> bool:
        return r.l7 is not None and r.l7.http is not None and r.l7.http.code == status
    return check


def _url(r: FlowRecord) -> str:
    return r.l7.http.url if r.l7 is not None and r.l7.http is not None else ""


def test_a_host_field_naming_another_authority_is_refused(setup: Setup) -> None:
    before = len(setup.seen())
    answer = h2_get(setup.proxy.address, [
        (b":authority", b"good.example"), (b":path", b"/hosted"), (b"host", b"evil.example"),
    ])
    assert (answer.status, answer.body) == (400, b"Bad Request\r\n")
    record = setup.proxy.wait_record(lambda r: _code(400)(r) and _url(r).endswith("/hosted"))
    assert record.verdict is Verdict.DROPPED
    assert record.drop_reason_desc is DropReasonDesc.PARSE_ERROR
    # The same request with one authority is served.
    ok = h2_get(setup.proxy.address, [(b":authority", b"good.example"), (b":path", b"/hosted")])
    assert (ok.status, ok.body) == (200, b"ok\n")
    assert setup.seen()[before:] == [{"path": "/hosted", "host": "good.example"}]


def test_an_authority_with_userinfo_never_matches_a_host_pattern(setup: Setup) -> None:
    before = len(setup.seen())
    answer = h2_get(setup.proxy.address, [
        (b":authority", b"evil.example@good.example"), (b":path", b"/wild"),
    ])
    assert answer.status == 400
    setup.proxy.wait_record(lambda r: _code(400)(r) and _url(r).endswith("/wild"))
    assert setup.seen()[before:] == []


def test_a_malformed_header_block_is_reset_and_logged(setup: Setup) -> None:
    before = len(setup.seen())
    answer = h2_get(setup.proxy.address, [
        (b":authority", b"x"), (b":path", b"/open/a"), (b":path", b"/open/b"),
    ])
    assert answer.reset == 1  # PROTOCOL_ERROR
    record = setup.proxy.wait_record(
        lambda r: r.verdict is Verdict.ERROR and "Invalid HTTP header field" in r.error
    )
    assert record.drop_reason_desc is DropReasonDesc.PARSE_ERROR
    assert "client stream 1 reset with PROTOCOL_ERROR" in record.error
    assert setup.seen()[before:] == []


def test_h2c_to_an_http1_only_upstream_says_why(
    proxy_runner: ProxyRunner, deathstar: Address, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    proxy = proxy_runner(
        protocol="http", policy_files=[policy], dst_labels=DEATHSTAR_LABELS,
        peers=["127.0.0.1/32=org=empire,class=tiefighter"], upstream=deathstar, dport=80,
    )
    host, port = proxy.address
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge",
         f"http://{host}:{port}/open/x"],
        capture_output=True, timeout=20,
    )
    assert done.returncode != 0  # no answer: the upstream cannot speak HTTP/2
    record = proxy.wait_record(lambda r: r.verdict is Verdict.ERROR)
    assert record.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
    assert "answered in HTTP/1.x, not HTTP/2" in record.error
    assert "h2c" in record.error


def test_an_idle_h2c_client_is_closed_by_the_idle_timeout_quietly(
    setup: Setup, proxy_runner: ProxyRunner
) -> None:
    """An h2c connection whose calls are answered is idle: --idle-timeout closes it with
    GOAWAY NO_ERROR and no record (it was cut after --upstream-timeout with INTERNAL_ERROR
    and an ERROR record 'timeout waiting for upstream')."""
    import time

    proxy = proxy_runner(
        protocol="http", policy_files=[setup.policy], dst_labels=DEATHSTAR_LABELS,
        peers=["127.0.0.1/32=org=empire,class=tiefighter"], upstream=setup.upstream, dport=80,
        extra_args=["--idle-timeout", "1", "--upstream-timeout", "30", "--workers", "1"],
    )
    conn = h2_connection.H2Connection(h2_config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "x"),
                          (":path", "/open/idle")], end_stream=True)
    started = time.monotonic()
    goaway: int | None = None
    status: int | None = None
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2_events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2_events.ConnectionTerminated):
                    goaway = int(ev.error_code)
            sock.sendall(conn.data_to_send())
    assert status == 200
    assert goaway == 0  # NO_ERROR
    assert time.monotonic() - started < 10  # the idle timeout, far before --upstream-timeout
    proxy.wait_records(lambda r: r.verdict is Verdict.FORWARDED, count=2)  # request, response
    time.sleep(0.2)
    assert [r.error for r in proxy.records() if r.verdict is Verdict.ERROR] == []


def test_out_of_file_descriptors_is_a_503_and_a_record(
    deathstar: Address, tmp_path: Path
) -> None:
    """The proxy runs out of file descriptors (a small `ulimit -n`, many clients): a client
    whose request needs a new upstream connection gets `503 Service Unavailable` and the
    record says why. It got its connection closed without an answer, and stderr a traceback
    ('internal error: OSError(24, ...)'): the upstream socket's creation was not guarded."""
    import shutil

    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    access_log = tmp_path / "access.log"
    proxy = start_process(
        ["prlimit", "--nofile=48:48", PYTHON, "-m", "garrison.cli.main", "proxy",
         "--listen", "127.0.0.1:0", "--upstream", f"{deathstar[0]}:{deathstar[1]}",
         "--dport", "80", "-f", str(policy), "--dst-labels", DEATHSTAR_LABELS,
         "--peer", "127.0.0.1/32=org=empire,class=tiefighter", "--workers", "1",
         "--access-log", str(access_log)],
        tmp_path, "proxy",
    )
    try:
        import re
        import time

        found: list[Address] = []

        def listening() -> bool:
            m = re.search(r"listening on ([0-9.]+):(\d+)", proxy.stderr.read_text())
            if m:
                found.append((m.group(1), int(m.group(2))))
            return bool(m)

        wait_until(listening, "garrison proxy listening", 30, proxy)
        first = socket.create_connection(found[0], timeout=10)
        # Hold idle connections until the proxy has no descriptor left for an upstream one.
        held = [socket.create_connection(found[0], timeout=10) for _ in range(60)]
        time.sleep(0.5)
        first.sendall(b"GET /open/x HTTP/1.1\r\nHost: deathstar\r\n\r\n")
        answer = first.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        for sock in [first, *held]:
            sock.close()

        def recorded() -> bool:
            text = access_log.read_text() if access_log.exists() else ""
            return "Too many open files" in text

        wait_until(recorded, "an ERROR record naming the cause", 10, proxy)
        records = [FlowRecord.from_json(line) for line in access_log.read_text().splitlines()]
        (error,) = [r for r in records if r.verdict is Verdict.ERROR]
        assert error.drop_reason_desc is DropReasonDesc.UPSTREAM_ERROR
        assert "Traceback" not in proxy.stderr.read_text()
    finally:
        proxy.stop()
