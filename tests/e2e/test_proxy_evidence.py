"""Evidence through the real standalone proxy (issue 17): a normalized request-target is logged
beside the target as curl sent it (HTTP/1.1 and HTTP/2), and `--redact-query-param` hides a
query value in the access log while the policy matches on it and the upstream receives it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from garrison.flows.record import FlowRecord, L7FlowType, Verdict
from tests.e2e.conftest import (
    DEATHSTAR_LABELS,
    PYTHON,
    STARWARS,
    TIEFIGHTER,
    TIEFIGHTER_PEER,
    ProxyHandle,
    accepts,
    free_port,
    start_process,
    start_proxy,
    wait_until,
)

pytest.importorskip("hypercorn")

pytestmark = pytest.mark.e2e

SECRET = "s3cret-gv"
# The Star Wars L7 rule, narrowed to one token: policy matches the query as sent.
POLICY = (STARWARS / "sw_l3_l4_l7_policy.yaml").read_text().replace(
    'path: "/v1/request-landing"', f'path: "/v1/request-landing\\\\?token={SECRET}"'
)

# The upstream (hypercorn: HTTP/1.1 and h2c): answers 200 and prints the target it received.
APP = """
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
    print(scope["http_version"], scope["raw_path"].decode() + "?" + scope["query_string"].decode(),
          flush=True)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"12")]})
    await send({"type": "http.response.body", "body": b"Ship landed\\n"})
"""


@dataclass
class Setup:
    proxy: ProxyHandle
    upstream_log: Path

    @property
    def host(self) -> str:
        return f"{self.proxy.address[0]}:{self.proxy.address[1]}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("gv-evidence")
    (work / "gvapp.py").write_text(APP)
    policy = work / "gv-token-policy.yaml"
    policy.write_text(POLICY)
    assert f"request-landing\\\\?token={SECRET}" in POLICY
    port = free_port()
    upstream = start_process(
        [PYTHON, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "gvapp:app"],
        work, "gv-hypercorn", env={"PYTHONPATH": str(work)},
    )
    try:
        wait_until(lambda: accepts(("127.0.0.1", port)), "hypercorn listening", 30, upstream)
        proxy = start_proxy(
            work, protocol="http", policy_files=[policy], dst_labels=DEATHSTAR_LABELS,
            peers=[TIEFIGHTER_PEER], upstream=("127.0.0.1", port), dport=80, name="gv-proxy",
            extra_args=["--redact-query-param", "token", "--workers", "1"],
        )
        try:
            yield Setup(proxy, upstream.stdout)
        finally:
            proxy.stop()
    finally:
        upstream.stop()


def _curl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--path-as-is", "--interface", TIEFIGHTER,
         "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}", *args, url],
        capture_output=True, text=True, timeout=20,
    )


def _request_line(proxy: ProxyHandle, verdict: Verdict,
                  protocol: str = "HTTP/1.1") -> tuple[str, FlowRecord]:
    def wanted(r: FlowRecord) -> bool:
        return (
            r.verdict is verdict and r.l7 is not None and r.l7.type is L7FlowType.REQUEST
            and r.l7.http is not None and r.l7.http.protocol == protocol
        )

    proxy.wait_record(wanted)
    for line in proxy.access_log.read_text().splitlines():
        record = FlowRecord.from_json(line)
        if wanted(record):
            return line, record
    raise AssertionError("no request record")


def _expected(record: FlowRecord, host: str, verdict: str,
              raw: str, refs: str) -> str:
    """The whole access-log line; only the time, the client's port and the identities come
    from the record (they change from run to run)."""
    src, dst = record.source, record.destination
    url = f"http://{host}/v1/request-landing?token=[REDACTED]"
    time = json.dumps(record.to_dict()["time"])
    labels = json.dumps(list(src.labels), separators=(",", ":"))
    dst_labels = json.dumps(list(dst.labels), separators=(",", ":"))
    reason = ',"drop_reason_desc":"POLICY_DENIED"' if verdict == "DROPPED" else ""
    return (
        f'{{"time":{time},"verdict":"{verdict}",'
        f'"IP":{{"source":"{TIEFIGHTER}","destination":"{dst.ip}","ipVersion":"IPv4"}},'
        f'"l4":{{"TCP":{{"source_port":{src.port},"destination_port":80}}}},'
        f'"source":{{"identity":{src.identity},"namespace":"default","labels":{labels},'
        f'"ip":"{TIEFIGHTER}","port":{src.port}}},'
        f'"destination":{{"identity":{dst.identity},"namespace":"default",'
        f'"labels":{dst_labels},"ip":"{dst.ip}","port":80}},'
        f'"Type":"L7","l7":{{"type":"REQUEST","http":{{"method":"POST","url":"{url}",'
        f'"raw_target":"{raw}","protocol":"HTTP/1.1","headers":['
        f'{{"key":"Host","value":"{host}"}},{{"key":"User-Agent","value":"curl/'
        f'{_curl_version()}"}},{{"key":"Accept","value":"*/*"}}]}}}},'
        f'"event_type":{{"type":129}},"traffic_direction":"INGRESS"{reason},'
        f'"is_reply":false,"Summary":"HTTP/1.1 POST {url}",'
        f'"{refs}":[{{"name":"rule1","namespace":"default","kind":"CiliumNetworkPolicy",'
        f'"rule":"ingress[0]"}}]}}'
    )


def _curl_version() -> str:
    out = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    return out.split()[1]


def test_normalized_target_and_redacted_token_in_the_access_log(setup: Setup) -> None:
    proxy, host = setup.proxy, setup.host
    sent = f"/v1/./x/../request-landing?token={SECRET}"
    done = _curl(f"http://{host}{sent}")
    assert (done.returncode, done.stdout) == (0, "200"), done.stderr  # the policy saw the token
    # the upstream got the normalized target with the real value
    wait_until(lambda: f"1.1 /v1/request-landing?token={SECRET}\n"
               in setup.upstream_log.read_text(), "upstream saw the request", 5)

    line, record = _request_line(proxy, Verdict.FORWARDED)
    raw = "/v1/./x/../request-landing?token=[REDACTED]"
    assert line == _expected(record, host, "FORWARDED", raw, "ingress_allowed_by")

    # a wrong token is denied (the policy matched the value, not [REDACTED]) and hidden too
    done = _curl(f"http://{host}/v1//request-landing?token=wrong")
    assert (done.returncode, done.stdout) == (0, "403"), done.stderr
    line, record = _request_line(proxy, Verdict.DROPPED)
    assert line == _expected(record, host, "DROPPED", "/v1//request-landing?token=[REDACTED]",
                             "ingress_denied_by")

    log = proxy.access_log.read_text()
    assert SECRET not in log and "wrong" not in log
    assert SECRET not in proxy.stderr()  # the -v compact lines
    assert "(normalized from /v1/./x/../request-landing?token=[REDACTED])" in proxy.stderr()


def test_http2_keeps_the_path_as_sent(setup: Setup) -> None:
    proxy, host = setup.proxy, setup.host
    done = _curl(f"http://{host}/v1/./x/../request-landing?token={SECRET}",
                 "--http2-prior-knowledge")
    assert (done.returncode, done.stdout) == (0, "200"), done.stderr
    wait_until(lambda: f"2 /v1/request-landing?token={SECRET}\n"
               in setup.upstream_log.read_text(), "upstream saw the h2 request", 5)
    _, record = _request_line(proxy, Verdict.FORWARDED, "HTTP/2")
    assert record.l7 is not None and record.l7.http is not None
    http = record.l7.http
    assert (http.protocol, http.url, http.raw_target) == (
        "HTTP/2",
        f"http://{host}/v1/request-landing?token=[REDACTED]",
        "/v1/./x/../request-landing?token=[REDACTED]",
    )
    assert SECRET not in proxy.access_log.read_text()
