"""Large streamed bodies through the proxy with bounded memory, slow readers, and h2c."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import httptools
import pytest

from garrison.flows.record import L7FlowType, Verdict
from tests.e2e.conftest import (
    DEATHSTAR_LABELS,
    STARWARS,
    TIEFIGHTER,
    TIEFIGHTER_PEER,
    Address,
    ProxyHandle,
    ProxyRunner,
    connect,
)

pytestmark = pytest.mark.e2e

SIZE = 50 * 1024 * 1024
PIECE = 256 * 1024
STREAMS_POLICY = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "streams"
spec:
  endpointSelector:
    matchLabels: {org: empire, class: deathstar}
  ingress:
  - fromEndpoints:
    - matchLabels: {org: empire}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: "POST", path: "/v1/echo"}
        - {method: "GET", path: "/v1/download\\\\?bytes=[0-9]+"}
        - {method: "POST", path: "/v1/request-landing"}
"""


def peak_rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


class BodyCounter:
    """Counts the decoded body bytes of one response (httptools callbacks)."""

    def __init__(self) -> None:
        self.status = 0
        self.received = 0
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


@pytest.fixture
def proxy(proxy_runner: ProxyRunner, deathstar: Address, tmp_path: Path) -> ProxyHandle:
    policy = tmp_path / "streams.yaml"
    policy.write_text(STREAMS_POLICY)
    return proxy_runner(
        protocol="http", policy_files=[policy], dst_labels=DEATHSTAR_LABELS,
        peers=[TIEFIGHTER_PEER], upstream=deathstar, dport=80, verbose=False,
    )


def test_50_mb_chunked_upload_is_echoed_with_bounded_proxy_memory(proxy: ProxyHandle) -> None:
    rss_before, _ = peak_rss_kb(proxy.pid)
    peak = [0]
    with connect(proxy.address, TIEFIGHTER, timeout=30) as sock:
        head = (b"POST /v1/echo HTTP/1.1\r\nHost: deathstar\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (PIECE, b"u" * PIECE)

        def send() -> None:
            sock.sendall(head)
            for _ in range(SIZE // PIECE):
                sock.sendall(piece)
                peak[0] = max(peak[0], peak_rss_kb(proxy.pid)[0])
            sock.sendall(b"0\r\n\r\n")

        sender = threading.Thread(target=send)
        sender.start()
        counter = BodyCounter()
        while not counter.complete:
            data = sock.recv(1 << 20)
            assert data, "connection closed before the echo completed"
            counter.parser.feed_data(data)
        sender.join(30)
    assert counter.status == 200
    assert counter.received == SIZE
    growth_mb = (max(peak[0], peak_rss_kb(proxy.pid)[0]) - rss_before) / 1024
    assert growth_mb < 30, f"proxy RSS grew by {growth_mb:.1f} MB for a 50 MB stream"
    record = proxy.wait_record(lambda r: r.verdict is Verdict.FORWARDED
                               and r.l7 is not None and r.l7.type is L7FlowType.RESPONSE)
    assert record.l7 is not None and record.l7.http is not None
    assert record.l7.http.url.endswith("/v1/echo")


def test_50_mb_download_with_curl(proxy: ProxyHandle) -> None:
    host, port = proxy.address
    done = subprocess.run(
        ["curl", "-sS", "--interface", TIEFIGHTER, "-o", "/dev/null", "-w", "%{http_code} "
         "%{size_download}", f"http://{host}:{port}/v1/download?bytes={SIZE}"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"200 {SIZE}"


def test_a_reader_that_stops_reading_does_not_grow_proxy_memory(proxy: ProxyHandle) -> None:
    rss_before, _ = peak_rss_kb(proxy.pid)
    with connect(proxy.address, TIEFIGHTER, timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET /v1/download?bytes={SIZE} HTTP/1.1\r\nHost: d\r\n\r\n".encode())
        counter = BodyCounter()
        counter.parser.feed_data(sock.recv(65536))
        time.sleep(1.5)  # the client stalls; upstream keeps offering 50 MB
        stalled_rss, _ = peak_rss_kb(proxy.pid)
        while not counter.complete:
            data = sock.recv(1 << 20)
            assert data
            counter.parser.feed_data(data)
    assert counter.received == SIZE
    growth_mb = (stalled_rss - rss_before) / 1024
    assert growth_mb < 10, f"a stalled reader made the proxy hold {growth_mb:.1f} MB"


def test_h2c_prior_knowledge_is_enforced_with_http_rules(
    proxy_runner: ProxyRunner, deathstar: Address
) -> None:
    proxy = proxy_runner(
        protocol="http", policy_files=[STARWARS / "sw_l3_l4_l7_policy.yaml"],
        dst_labels=DEATHSTAR_LABELS, peers=[TIEFIGHTER_PEER], upstream=deathstar, dport=80,
    )
    host, port = proxy.address
    done = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--interface", TIEFIGHTER, "-X", "PUT",
         "-w", " %{http_code} %{http_version}", f"http://{host}:{port}/v1/exhaust-port"],
        capture_output=True, timeout=20,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"Access denied\r\n 403 2"
    record = proxy.wait_record(lambda r: r.verdict is Verdict.DROPPED and r.l7 is not None
                               and r.l7.type is L7FlowType.REQUEST)
    assert record.l7 is not None and record.l7.http is not None
    assert record.l7.http.method == "PUT" and record.l7.http.protocol == "HTTP/2"
