"""Real HTTP clients through `garrison proxy` (standalone) to a real upstream that speaks
HTTP/1.1 and h2c (hypercorn): what each client sees for allowed and denied requests, a denied
HEAD followed by another request on the same connection, large denied uploads (Content-Length
and chunked), `Expect: 100-continue`, HTTP/2 denied uploads among concurrent streams, and
HTTP/1.1 and HTTP/2 clients sharing one proxy.

Clients: curl (HTTP/1.1 and --http2-prior-knowledge), nghttp, wget, http.client, urllib,
requests, httpx (HTTP/1.1 and HTTP/2), aiohttp, and Node's `http` module and `fetch`. One
proxy and one upstream serve the whole module.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from garrison.flows.record import L7FlowType, Verdict
from tests.e2e.conftest import (
    DEATHSTAR_LABELS,
    PYTHON,
    ProxyHandle,
    accepts,
    free_port,
    start_process,
    start_proxy,
    wait_until,
)

httpx = pytest.importorskip("httpx")
pytest.importorskip("h2")
requests = pytest.importorskip("requests")
pytest.importorskip("hypercorn")

pytestmark = pytest.mark.e2e

DENIED_BODY = b"Access denied\r\n"
BIG = 4 * 1024 * 1024  # far past the engine's DISCARD_LIMIT (64 KiB)

POLICY = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: real-clients
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
        - {method: GET, path: "/allowed.*"}
        - {method: HEAD, path: "/allowed.*"}
        - {method: POST, path: "/upload-ok"}
"""

# The upstream: every request is answered 200 with what it saw, and logged as one JSON line
# (method, path, HTTP version, body size, and the proxy's source port, which names the
# upstream connection it came on).
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
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    seen = {"method": scope["method"], "path": scope["path"],
            "http_version": scope["http_version"], "received": size,
            "port": scope["client"][1]}
    print(json.dumps(seen), flush=True)
    body = json.dumps(seen).encode() + b"\\n"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body",
                "body": b"" if scope["method"] == "HEAD" else body})
'''


@dataclass
class Setup:
    proxy: ProxyHandle
    upstream_log: Path

    @property
    def url(self) -> str:
        host, port = self.proxy.address
        return f"http://{host}:{port}"

    def seen(self) -> list[dict[str, Any]]:
        """What the upstream received, in order."""
        lines = self.upstream_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("gh-real-clients")
    (work / "ghapp.py").write_text(APP)
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    upstream = start_process(
        [PYTHON, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--keep-alive", "60",
         "ghapp:app"],
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
            yield Setup(proxy, upstream.stdout)
        finally:
            proxy.stop()
    finally:
        upstream.stop()


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          timeout=timeout)


def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "upload.bin"
    path.write_bytes(b"u" * BIG)
    return path


# ---- allowed and denied GET -----------------------------------------------------------------


@pytest.mark.parametrize("version", ["--http1.1", "--http2-prior-knowledge"])
def test_curl_allowed_and_denied_get(setup: Setup, version: str) -> None:
    allowed = curl(version, "-w", "|%{http_code} %{http_version}", f"{setup.url}/allowed/a")
    assert allowed.returncode == 0, allowed.stderr
    body, status = allowed.stdout.rsplit(b"|", 1)
    assert json.loads(body)["path"] == "/allowed/a"
    assert status == (b"200 2" if "http2" in version else b"200 1.1")
    denied = curl(version, "-w", "|%{http_code}", f"{setup.url}/denied")
    assert denied.returncode == 0, denied.stderr
    assert denied.stdout == DENIED_BODY + b"|403"


def test_python_clients_allowed_and_denied_get(setup: Setup) -> None:
    with urllib.request.urlopen(f"{setup.url}/allowed/urllib", timeout=10) as answer:
        assert answer.status == 200 and json.loads(answer.read())["path"] == "/allowed/urllib"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{setup.url}/denied", timeout=10)
    assert denied.value.code == 403 and denied.value.read() == DENIED_BODY
    with requests.Session() as session:
        assert session.get(f"{setup.url}/allowed/requests", timeout=10).status_code == 200
        answer = session.get(f"{setup.url}/denied", timeout=10)
        assert (answer.status_code, answer.content) == (403, DENIED_BODY)
    for http2 in (False, True):
        with httpx.Client(http1=not http2, http2=http2, timeout=10) as client:
            answer = client.get(f"{setup.url}/allowed/httpx")
            assert answer.status_code == 200
            assert answer.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            answer = client.get(f"{setup.url}/denied")
            assert (answer.status_code, answer.content) == (403, DENIED_BODY)


# ---- a denied HEAD, then another request on the same connection ------------------------------


def test_curl_denied_head_then_get_on_the_same_connection(setup: Setup) -> None:
    done = curl("-v", "--http1.1", "-I", "-w", "|%{http_code} %{num_connects}\n",
                f"{setup.url}/denied", "--next", "--http1.1", "-w",
                "|%{http_code} %{num_connects}", f"{setup.url}/allowed/after-head")
    assert done.returncode == 0, done.stderr
    assert b"Excess found" not in done.stderr  # curl -I saw 15 bytes too many
    head, rest = done.stdout.split(b"|403 1\n", 1)
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert head.endswith(b"Content-Length: 15\r\nContent-Type: text/plain\r\n\r\n")
    assert rest.endswith(b"|200 0")  # the same connection (no new connect)


def test_curl_http2_denied_head(setup: Setup) -> None:
    """A DATA frame after the HEAD's 403 was a protocol error for curl. (curl 7.88 does not
    reuse an h2c prior-knowledge connection for a second URL: httpx and nghttp do, below.)"""
    done = curl("--http2-prior-knowledge", "-I", "-w", "|%{http_code}", f"{setup.url}/denied")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (b"HTTP/2 403 \r\ncontent-type: text/plain\r\ncontent-length: 15\r\n"
                           b"\r\n|403")


def test_nghttp_denied_head_then_get_on_one_connection(setup: Setup) -> None:
    done = subprocess.run(
        ["nghttp", "-n", "--stat", "-H", ":method: HEAD", f"{setup.url}/denied",
         f"{setup.url}/allowed/nghttp"],
        capture_output=True, timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = re.findall(rb" (\d{3}) +(\d+) (/\S+)", done.stdout)  # code, body size, path
    assert sorted(rows) == [(b"200", b"0", b"/allowed/nghttp"), (b"403", b"0", b"/denied")]


def test_python_clients_denied_head_then_get_on_the_same_connection(setup: Setup) -> None:
    host, port = setup.proxy.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("HEAD", "/denied")
    answer = conn.getresponse()
    assert (answer.status, answer.getheader("Content-Length"), answer.read()) == (403, "15", b"")
    conn.request("GET", "/allowed/after-head")
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read())["path"] == "/allowed/after-head"
    conn.close()
    with requests.Session() as session:
        assert session.head(f"{setup.url}/denied", timeout=10).status_code == 403
        assert session.get(f"{setup.url}/allowed/r", timeout=10).status_code == 200
    for http2 in (False, True):
        with httpx.Client(http1=not http2, http2=http2, timeout=10) as client:
            answer = client.head(f"{setup.url}/denied")
            assert (answer.status_code, answer.content) == (403, b"")
            answer = client.get(f"{setup.url}/allowed/after-head")
            assert answer.status_code == 200, answer.content


def test_aiohttp_denied_head_then_get(setup: Setup) -> None:
    aiohttp = pytest.importorskip("aiohttp")

    async def run() -> list[int]:
        connector = aiohttp.TCPConnector(limit=1)  # one connection: the GET reuses it
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.head(f"{setup.url}/denied") as head:
                first = head.status
            async with session.get(f"{setup.url}/allowed/aiohttp") as get:
                await get.read()
                return [first, get.status]

    assert asyncio.run(asyncio.wait_for(run(), 20)) == [403, 200]


# ---- denied HTTP/1.1 uploads: the client reads the 403, never a reset ------------------------


def test_urllib_denied_upload_with_content_length_gets_the_403(setup: Setup) -> None:
    upload = urllib.request.Request(f"{setup.url}/upload", data=b"u" * BIG, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(upload, timeout=20)
    assert denied.value.code == 403
    assert denied.value.headers["Connection"] == "close"
    assert denied.value.read() == DENIED_BODY


def test_http_client_denied_chunked_upload_gets_the_403(setup: Setup) -> None:
    host, port = setup.proxy.address
    conn = http.client.HTTPConnection(host, port, timeout=20)
    chunks = (b"c" * 65536 for _ in range(32))  # 2 MiB, sent before reading
    conn.request("PUT", "/upload", body=chunks, encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 403 and answer.getheader("Connection") == "close"
    assert answer.read() == DENIED_BODY
    conn.close()
    # A small chunked body keeps the connection.
    conn = http.client.HTTPConnection(host, port, timeout=20)
    conn.request("PUT", "/upload", body=iter([b"small"]), encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 403 and answer.getheader("Connection") is None
    assert answer.read() == DENIED_BODY
    conn.request("GET", "/allowed/after-upload")
    assert conn.getresponse().status == 200
    conn.close()


def test_requests_and_httpx_denied_uploads_get_the_403(setup: Setup) -> None:
    answer = requests.put(f"{setup.url}/upload", data=b"u" * BIG, timeout=20)
    assert (answer.status_code, answer.content) == (403, DENIED_BODY)
    chunked = requests.put(f"{setup.url}/upload", data=(b"c" * 65536 for _ in range(32)),
                           timeout=20)
    assert (chunked.status_code, chunked.content) == (403, DENIED_BODY)
    with httpx.Client(timeout=20) as client:
        answer = client.put(f"{setup.url}/upload", content=b"u" * BIG)
        assert (answer.status_code, answer.content) == (403, DENIED_BODY)
        assert client.get(f"{setup.url}/allowed/next").status_code == 200


@pytest.mark.parametrize("expect", ["Expect: 100-continue", "Expect:"])
def test_curl_denied_upload_http1(setup: Setup, tmp_path: Path, expect: str) -> None:
    """curl asks `Expect: 100-continue` for large bodies: the 403 comes instead of the 100,
    at once (curl would wait a second for the 100); without Expect curl sends it all."""
    done = curl("--http1.1", "-v", "-X", "PUT", "-H", expect, "--data-binary",
                f"@{big_file(tmp_path)}", "-w", "|%{http_code}", f"{setup.url}/upload")
    assert done.returncode == 0, done.stderr
    assert done.stdout == DENIED_BODY + b"|403"
    assert b"< HTTP/1.1 100" not in done.stderr
    # The 403 came before curl's one-second wait for `100 Continue` ran out.
    assert b"Done waiting for 100-continue" not in done.stderr


def test_expect_100_continue_raw(setup: Setup) -> None:
    """The 403 without `100 Continue`, announcing the close; a client that sends its body
    anyway is read (not reset) until it closes."""
    with socket.create_connection(setup.proxy.address, timeout=10) as sock:
        sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: d\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % BIG)
        answer = b""
        while not answer.endswith(DENIED_BODY):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b"Connection: close\r\n" in answer and b"100 Continue" not in answer
        sock.sendall(b"u" * BIG)  # ignored the answer: still no reset
        assert sock.recv(10) == b""  # the proxy's FIN, after the answer


def test_wget_denied_upload_gets_the_403_once(setup: Setup, tmp_path: Path) -> None:
    """wget retried 20 times on the reset."""
    if shutil.which("wget") is None:
        pytest.skip("wget is not installed")
    done = subprocess.run(
        ["wget", "-S", "-O-", "--tries=3", "--method=PUT", f"--body-file={big_file(tmp_path)}",
         f"{setup.url}/upload"], capture_output=True, timeout=60,
    )
    assert done.returncode == 8, done.stderr  # 8: the server answered with an error
    assert b"ERROR 403: Forbidden." in done.stderr and b"Retrying" not in done.stderr


NODE_CLIENTS = """\
const http = require("node:http");
const base = process.argv[2];
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
function ask(method, path, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(base + path, { method, agent }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({
        status: res.statusCode, body: Buffer.concat(chunks).toString(),
        socket: req.socket.localPort,
      }));
    });
    req.on("error", (e) => resolve({ error: e.code || String(e) }));
    if (body) req.end(body); else req.end();
  });
}
(async () => {
  const out = {};
  const head = await ask("HEAD", "/denied");
  const get = await ask("GET", "/allowed/node");
  out.http_head_then_get = [head.status, get.status, head.socket === get.socket];
  out.http_upload = (await ask("PUT", "/upload", Buffer.alloc(4 << 20, 117))).status ?? "reset";
  const fhead = await fetch(base + "/denied", { method: "HEAD" });
  const fget = await fetch(base + "/allowed/fetch");
  await fget.text();
  out.fetch_head_then_get = [fhead.status, fget.status];
  try {
    const body = Buffer.alloc(4 << 20, 117);
    const up = await fetch(base + "/upload", { method: "PUT", body });
    out.fetch_upload = [up.status, await up.text()];
  } catch (e) { out.fetch_upload = String(e.cause ? e.cause.code : e); }
  console.log(JSON.stringify(out));
  agent.destroy();
})();
"""


def test_node_http_and_fetch(setup: Setup, tmp_path: Path) -> None:
    """Node's http: a denied HEAD, then a GET on the same socket (it read 'Access denied' as
    the next status line); a 4 MiB denied upload (ECONNRESET). Node's fetch: the same."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    script = tmp_path / "clients.js"
    script.write_text(NODE_CLIENTS)
    done = subprocess.run(["node", str(script), setup.url], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "http_head_then_get": [403, 200, True],
        "http_upload": 403,
        "fetch_head_then_get": [403, 200],
        "fetch_upload": [403, "Access denied\r\n"],
    }


# ---- HTTP/2 denied uploads ---------------------------------------------------------------------


def test_curl_http2_denied_upload(setup: Setup, tmp_path: Path) -> None:
    done = curl("--http2-prior-knowledge", "-X", "PUT", "--data-binary",
                f"@{big_file(tmp_path)}", "-w", "|%{http_code}", f"{setup.url}/upload")
    assert done.returncode == 0, done.stderr
    assert done.stdout == DENIED_BODY + b"|403"


def test_httpx_http2_denied_uploads_among_concurrent_streams(setup: Setup) -> None:
    """30 concurrent streams on one connection, 10 of them denied PUTs with bodies: every
    one gets its answer (with RST_STREAM after the 403, 1-10 of the 10 failed in httpx).

    The bodies fit the windows: httpx has a deadlock of its own when several uploads wait for
    flow control at once (pydantic/httpx2#1133), which fails uploads to any server. The proxy
    opens a denied body's windows at once (up to 1 MiB) so that httpx rarely waits."""

    async def run() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as client:

            async def put(i: int) -> tuple[str, int]:
                answer = await client.put(f"{setup.url}/upload/{i}", content=b"p" * 90_000)
                return ("put", answer.status_code)

            async def get(i: int) -> tuple[str, int]:
                answer = await client.get(f"{setup.url}/allowed/{i}")
                return ("get", answer.status_code)

            calls = [put(i) if i % 3 == 0 else get(i) for i in range(30)]
            return list(await asyncio.gather(*calls))

    results = asyncio.run(asyncio.wait_for(run(), 60))
    assert sorted(results) == [("get", 200)] * 20 + [("put", 403)] * 10


# ---- HTTP/1.1 and HTTP/2 clients on one proxy -------------------------------------------------


def test_http1_and_http2_clients_share_the_proxy(setup: Setup) -> None:
    """`curl --http1.1 URL; curl --http2-prior-knowledge URL`: the HTTP/2 client's preface
    went down the pooled HTTP/1.1 upstream connection. Each protocol gets its own."""
    first = curl("--http1.1", f"{setup.url}/allowed/mixed-h1")
    second = curl("--http2-prior-knowledge", f"{setup.url}/allowed/mixed-h2")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    h1, h2 = json.loads(first.stdout), json.loads(second.stdout)
    assert (h1["http_version"], h2["http_version"]) == ("1.1", "2")
    assert h1["port"] != h2["port"]  # two upstream connections, one per protocol
    # Both kinds at once, for a while: nobody fails.
    failures: list[str] = []

    def h1_client() -> None:
        with requests.Session() as session:
            for i in range(20):
                answer = session.get(f"{setup.url}/allowed/h1-{i}", timeout=10)
                if answer.status_code != 200 or answer.json()["http_version"] != "1.1":
                    failures.append(f"h1 {i}: {answer.status_code}")

    def h2_client() -> None:
        for i in range(5):
            with httpx.Client(http1=False, http2=True, timeout=10) as client:
                for j in range(4):
                    answer = client.get(f"{setup.url}/allowed/h2-{i}-{j}")
                    if answer.status_code != 200 or answer.json()["http_version"] != "2":
                        failures.append(f"h2 {i}/{j}: {answer.status_code}")

    threads = [threading.Thread(target=target) for target in (h1_client, h2_client) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    by_port: dict[int, set[str]] = {}
    for seen in setup.seen():
        by_port.setdefault(seen["port"], set()).add(seen["http_version"])
    assert all(len(versions) == 1 for versions in by_port.values()), by_port


def test_the_access_log_has_the_denials(setup: Setup) -> None:
    records = setup.proxy.wait_records(
        lambda r: r.verdict is Verdict.DROPPED and r.l7 is not None
        and r.l7.type is L7FlowType.RESPONSE and r.l7.http is not None
        and r.l7.http.method == "HEAD", count=1, timeout=10)
    assert records[0].l7 is not None and records[0].l7.http is not None
    assert records[0].l7.http.code == 403
