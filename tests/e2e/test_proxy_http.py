"""HTTP/1.1 end to end: the deathstar app behind `garrison proxy`, real clients (curl and raw
sockets bound to the ships' addresses), the Star Wars policies, the access log field by field."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

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
    DEATHSTAR_LABELS,
    STARWARS,
    TIEFIGHTER,
    TIEFIGHTER_PEER,
    XWING,
    XWING_PEER,
    Address,
    ProxyHandle,
    ProxyRunner,
    Reader,
    connect,
    exchange,
    get_json,
    request,
)

pytestmark = pytest.mark.e2e

L7_POLICY = STARWARS / "sw_l3_l4_l7_policy.yaml"
L4_POLICY = STARWARS / "sw_l3_l4_policy.yaml"
DENIED_403 = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 15\r\nContent-Type: text/plain\r\n\r\n"
    b"Access denied\r\n"
)
TIEFIGHTER_LABELS = (
    "k8s:class=tiefighter",
    "k8s:io.kubernetes.pod.namespace=default",
    "k8s:org=empire",
)
DEATHSTAR = (
    "k8s:class=deathstar",
    "k8s:io.kubernetes.pod.namespace=default",
    "k8s:org=empire",
)


def _start(runner: ProxyRunner, upstream: Address, policy: Path = L7_POLICY,
           **kwargs: object) -> ProxyHandle:
    return runner(
        protocol="http",
        policy_files=[policy],
        dst_labels=DEATHSTAR_LABELS,
        peers=[TIEFIGHTER_PEER, XWING_PEER],
        upstream=upstream,
        dport=80,
        **kwargs,
    )


@pytest.fixture
def proxy(proxy_runner: ProxyRunner, deathstar: Address) -> ProxyHandle:
    return _start(proxy_runner, deathstar)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """curl's output as text with its line ends kept (no newline translation)."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, timeout=20
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode("latin-1"), done.stderr.decode()
    )


def _is(verdict: Verdict, kind: L7FlowType, method: str, path: str):  # type: ignore[no-untyped-def]
    def check(r: FlowRecord) -> bool:
        return (
            r.verdict is verdict
            and r.l7 is not None
            and r.l7.type is kind
            and r.l7.http is not None
            and r.l7.http.method == method
            and r.l7.http.url.endswith(path)
        )
    return check


def test_tiefighter_lands_with_curl(proxy: ProxyHandle) -> None:
    host, port = proxy.address
    done = curl("--interface", TIEFIGHTER, "-X", "POST", "-i",
                f"http://{host}:{port}/v1/request-landing", "-H", "Authorization: Bearer x")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("HTTP/1.1 200 OK")
    assert done.stdout.endswith("\r\n\r\nShip landed\n")

    req = proxy.wait_record(_is(Verdict.FORWARDED, L7FlowType.REQUEST, "POST",
                                "/v1/request-landing"))
    assert req.type is FlowType.L7
    assert req.traffic_direction is TrafficDirection.INGRESS
    assert req.is_reply is False
    assert req.source.ip == TIEFIGHTER and req.source.labels == TIEFIGHTER_LABELS
    assert req.source.identity >= 256 and req.source.namespace == "default"
    assert req.destination.labels == DEATHSTAR and req.destination.port == 80
    assert req.destination.identity == 256
    assert req.l7 is not None and req.l7.http is not None
    assert req.l7.http.url == f"http://{host}:{port}/v1/request-landing"
    assert req.l7.http.protocol == "HTTP/1.1"
    headers = {h.key: h.value for h in req.l7.http.headers}
    assert headers["Authorization"] == "[REDACTED]"
    assert [(p.name, p.namespace, p.kind) for p in req.ingress_allowed_by] == [
        ("rule1", "default", "CiliumNetworkPolicy")
    ]
    assert req.ingress_denied_by == ()

    resp = proxy.wait_record(_is(Verdict.FORWARDED, L7FlowType.RESPONSE, "POST",
                                 "/v1/request-landing"))
    assert resp.l7 is not None and resp.l7.http is not None
    assert resp.l7.http.code == 200
    assert resp.is_reply is True
    assert resp.source.labels == DEATHSTAR and resp.destination.ip == TIEFIGHTER
    assert resp.l7.latency_ns is not None and 0 < resp.l7.latency_ns < 5_000_000_000


def test_tiefighter_denied_exhaust_port(proxy: ProxyHandle, deathstar: Address) -> None:
    before = get_json(deathstar, "/v1/stats")["requests"]
    done = curl("--interface", TIEFIGHTER, "-X", "PUT", "-i",
                f"http://{proxy.address[0]}:{proxy.address[1]}/v1/exhaust-port")
    assert done.returncode == 0, done.stderr
    assert done.stdout == DENIED_403.decode()
    # Exact bytes with a raw client too, and the app never saw either request.
    [answer] = exchange(proxy.address, TIEFIGHTER, request("PUT", "/v1/exhaust-port"), ["PUT"])
    assert answer.raw == DENIED_403
    assert get_json(deathstar, "/v1/stats")["requests"] == before + 1  # the stats call itself

    req = proxy.wait_record(_is(Verdict.DROPPED, L7FlowType.REQUEST, "PUT", "/v1/exhaust-port"))
    assert req.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert req.source.labels == TIEFIGHTER_LABELS
    assert [p.name for p in req.ingress_denied_by] == ["rule1"]
    assert req.ingress_allowed_by == ()
    resp = proxy.wait_record(_is(Verdict.DROPPED, L7FlowType.RESPONSE, "PUT", "/v1/exhaust-port"))
    assert resp.l7 is not None and resp.l7.http is not None and resp.l7.http.code == 403


def test_xwing_closed_without_an_answer(proxy: ProxyHandle, deathstar: Address) -> None:
    before = get_json(deathstar, "/v1/stats")["requests"]
    with connect(proxy.address, XWING) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request("POST", "/v1/request-landing"))
        assert Reader(sock).at_eof()
    done = curl("--interface", XWING, "-X", "POST",
                f"http://{proxy.address[0]}:{proxy.address[1]}/v1/request-landing")
    assert done.returncode in (52, 56), (done.returncode, done.stdout)  # empty reply / reset
    assert get_json(deathstar, "/v1/stats")["requests"] == before + 1

    drop = proxy.wait_record(lambda r: r.type is FlowType.L3_L4)
    assert drop.verdict is Verdict.DROPPED
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert drop.source.ip == XWING
    assert drop.source.labels == (
        "k8s:class=xwing", "k8s:io.kubernetes.pod.namespace=default", "k8s:org=alliance"
    )
    assert drop.destination.labels == DEATHSTAR and drop.destination.port == 80
    assert drop.l7 is None
    assert not [r for r in proxy.records() if r.source.ip == XWING and r.type is FlowType.L7]


def test_keep_alive_and_pipelining_across_allowed_and_denied(proxy: ProxyHandle) -> None:
    pipeline = [
        ("POST", "/v1/request-landing"),
        ("PUT", "/v1/exhaust-port"),
        ("GET", "/v1/"),
        ("POST", "/v1/request-landing"),
        ("PUT", "/v1/exhaust-port"),
    ]
    raw = b"".join(request(m, p, body=b"x" * 10 if m == "PUT" else None) for m, p in pipeline)
    with connect(proxy.address, TIEFIGHTER) as sock:
        sock.sendall(raw)  # every request in one write
        reader = Reader(sock)
        answers = reader.read([m for m, _ in pipeline])
        assert [a.status for a in answers] == [200, 403, 403, 200, 403]
        assert answers[0].body == b"Ship landed\n" and answers[3].body == b"Ship landed\n"
        assert answers[1].raw == DENIED_403
        # Then one at a time on the same connection (keep-alive both ways).
        for method, path, status in [("PUT", "/v1/exhaust-port", 403),
                                     ("POST", "/v1/request-landing", 200)]:
            sock.sendall(request(method, path))
            [answer] = reader.read([method])
            assert answer.status == status
        assert not reader.at_eof(timeout=0.2)
    ports = {r.source.port for r in proxy.records()
             if r.l7 is not None and r.l7.type is L7FlowType.REQUEST}
    assert len(ports) == 1  # one client connection carried all seven


def test_python_client_keep_alive(proxy: ProxyHandle) -> None:
    import http.client

    conn = http.client.HTTPConnection(*proxy.address, timeout=5,
                                      source_address=(TIEFIGHTER, 0))
    try:
        for _ in range(3):
            conn.request("POST", "/v1/request-landing", body=b"{}")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"Ship landed\n")
            conn.request("PUT", "/v1/exhaust-port", body=b"boom")
            response = conn.getresponse()
            assert (response.status, response.read()) == (403, b"Access denied\r\n")
            assert response.getheader("Connection") is None
        first = conn.sock.getsockname()
        conn.request("POST", "/v1/request-landing")
        conn.getresponse().read()
        assert conn.sock.getsockname() == first  # still the same connection
    finally:
        conn.close()


def test_l3_l4_policy_lets_every_request_of_empire_through(
    proxy_runner: ProxyRunner, deathstar: Address
) -> None:
    proxy = _start(proxy_runner, deathstar, L4_POLICY)
    answers = exchange(proxy.address, TIEFIGHTER,
                       request("PUT", "/v1/exhaust-port") + request("GET", "/v1/"),
                       ["PUT", "GET"])
    assert [a.status for a in answers] == [503, 200]
    assert answers[0].body == b"Panic: deathstar exploded\n"
    record = proxy.wait_record(_is(Verdict.FORWARDED, L7FlowType.RESPONSE, "PUT",
                                   "/v1/exhaust-port"))
    assert record.l7 is not None and record.l7.http is not None and record.l7.http.code == 503
    with connect(proxy.address, XWING) as sock:
        assert Reader(sock).at_eof()
    proxy.wait_record(lambda r: r.type is FlowType.L3_L4 and r.source.ip == XWING)


def test_audit_mode_forwards_and_logs_audit(proxy_runner: ProxyRunner, deathstar: Address) -> None:
    proxy = _start(proxy_runner, deathstar, extra_args=["--audit"])
    [answer] = exchange(proxy.address, TIEFIGHTER, request("PUT", "/v1/exhaust-port"), ["PUT"])
    assert answer.status == 503
    record = proxy.wait_record(_is(Verdict.AUDIT, L7FlowType.REQUEST, "PUT", "/v1/exhaust-port"))
    assert [p.name for p in record.ingress_denied_by] == ["rule1"]
    with connect(proxy.address, XWING) as sock:  # audit at L3/L4 too: admitted
        sock.sendall(request("POST", "/v1/request-landing"))
        [answer] = Reader(sock).read(["POST"])
        assert answer.status == 200
    audit = proxy.wait_record(lambda r: r.type is FlowType.L3_L4 and r.source.ip == XWING)
    assert audit.verdict is Verdict.AUDIT
    assert audit.drop_reason_desc is DropReasonDesc.POLICY_DENIED


SMUGGLING = [
    pytest.param(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nContent-Length: 4\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/ HTTP/1.1\r\nHost: d\r\n\r\n",
                 400, id="CL.TE"),
    pytest.param(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nContent-Length: 5\r\n"
                 b"Content-Length: 40\r\n\r\nhello", 400, id="double-CL"),
    pytest.param(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\n"
                 b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501, id="TE-obfuscated"),
    pytest.param(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\n"
                 b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400, id="TE-obs-fold"),
    pytest.param(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nTransfer-Encoding : chunked"
                 b"\r\n\r\n0\r\n\r\n", 400, id="TE-space-before-colon"),
    pytest.param(b"POST /v1/request-landing HTTP/1.1\nHost: d\nContent-Length: 0\n\n",
                 400, id="bare-LF"),
    pytest.param(b"GET /v1/ HTTP/1.1\r\nHost: d\r\nHost: e\r\n\r\n", 400, id="two-hosts"),
    pytest.param(b"GET /v1/../v1/ HTTP/1.1\r\nHost: d\r\nUpgrade: h2c\r\n"
                 b"Connection: Upgrade\r\n\r\n", 501, id="upgrade"),
]


@pytest.mark.parametrize(("raw", "status"), SMUGGLING)
def test_smuggling_gets_an_error_and_never_reaches_the_app(
    proxy_runner: ProxyRunner, deathstar: Address, tmp_path: Path, raw: bytes, status: int
) -> None:
    # An allow-all policy: only the parser stands between these bytes and the app.
    policy = tmp_path / "allow-all.yaml"
    policy.write_text(L7_POLICY.read_text().replace(
        '        - method: "POST"\n          path: "/v1/request-landing"\n', "        - {}\n"))
    proxy = _start(proxy_runner, deathstar, policy)
    before = get_json(deathstar, "/v1/stats")["requests"]
    with connect(proxy.address, TIEFIGHTER) as sock:
        sock.sendall(raw)
        reader = Reader(sock)
        answers = reader.read(["POST"])
        assert answers and answers[0].status == status
        assert answers[0].header("Connection") == "close"
        assert reader.at_eof()
    assert get_json(deathstar, "/v1/stats")["requests"] == before + 1
    error = proxy.wait_record(lambda r: r.verdict is Verdict.ERROR)
    assert error.drop_reason_desc is DropReasonDesc.PARSE_ERROR
    assert "parse error" in error.error
    assert not [r for r in proxy.records() if r.verdict is Verdict.FORWARDED]


def test_startup_errors(tmp_path: Path, deathstar: Address) -> None:
    base = [
        "python", "-m", "garrison.cli.main", "proxy", "--upstream",
        f"{deathstar[0]}:{deathstar[1]}", "--dst-labels", DEATHSTAR_LABELS,
    ]
    import sys

    base[0] = sys.executable
    bad = tmp_path / "bad.yaml"
    bad.write_text(L7_POLICY.read_text().replace('path: "/v1/request-landing"',
                                                 'path: "/v1/(unclosed"'))
    done = subprocess.run([*base, "--listen", "127.0.0.1:0", "-f", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"{bad}:" in done.stderr and "not started" in done.stderr
    # The port is in use: the deathstar's own.
    done = subprocess.run([*base, "--listen", f"{deathstar[0]}:{deathstar[1]}",
                           "-f", str(L7_POLICY)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "already in use" in done.stderr
    done = subprocess.run([*base, "--listen", "127.0.0.1", "-f", str(L7_POLICY)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
