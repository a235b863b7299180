"""Transparent mode in a network namespace: an nftables TPROXY rule stands in for the
datapath's `bpf_sk_assign`, the proxy listens with IP_TRANSPARENT, learns the original
destination from `getsockname()`, and its upstream connection carries the proxy mark (the rule
skips marked packets, as the datapath does), so it reaches the real service."""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.flows.record import FlowType, L7FlowType, Verdict
from garrison.proxy.sockets import PROXY_UPSTREAM_MARK
from tests.e2e.conftest import (
    PYTHON,
    REPO,
    STARWARS,
    ProxyHandle,
    ServerProcess,
    start_process,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

SERVICE = "198.18.7.10"
TIEFIGHTER = "198.18.7.2"
XWING = "198.18.7.3"
PROXY_PORT = 15001

PROXY_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from garrison.flows.writer import AccessLogConfig, AccessLogWriter
    from garrison.policies.l7rules import L7Protocol
    from garrison.policies.labels import Labels, endpoint_labels
    from garrison.policies.loader import load_paths
    from garrison.proxy.commands import PeerInfo
    from garrison.proxy.policyview import PeerMapping, StandalonePolicy
    from garrison.proxy.server import FlowSink, ProxyServer, ServerSettings, install_uvloop

    policy_file, access_log, service, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    deathstar = endpoint_labels(Labels.parse("org=empire,class=deathstar"))
    policy = StandalonePolicy(
        load_paths([policy_file]).policies, deathstar, 80, L7Protocol.HTTP,
        [PeerMapping.parse("198.18.7.2/32=org=empire,class=tiefighter"),
         PeerMapping.parse("198.18.7.3/32=org=alliance,class=xwing")],
    )

    def destination(ip, dport):  # the agent would ask its ipcache
        if ip == service:
            return PeerInfo(256, deathstar, ip, dport, "default")
        return PeerInfo(2, Labels.parse("reserved:world"), ip, dport)

    async def main():
        sink = FlowSink(writer=AccessLogWriter(AccessLogConfig(access_log)),
                        loop=asyncio.get_running_loop())
        server = ProxyServer(ServerSettings(protocol=L7Protocol.HTTP, destination=destination),
                             policy, sink)
        host, bound = await server.listen_transparent("0.0.0.0", port)
        print(f"garrison proxy: listening on {host}:{bound} (transparent)", file=sys.stderr,
              flush=True)
        await asyncio.Event().wait()

    install_uvloop()
    asyncio.run(main())
""")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"garrison-tp-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        ns = ["ip", "netns", "exec", name]
        subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        for address in (SERVICE, TIEFIGHTER, XWING):
            subprocess.run([*ns, "ip", "addr", "add", f"{address}/32", "dev", "lo"],
                           check=True, timeout=10)
        rules = f"""
            table ip garrison_tproxy {{
              chain prerouting {{
                type filter hook prerouting priority mangle; policy accept;
                ip daddr {SERVICE} tcp dport 80 meta mark != {PROXY_UPSTREAM_MARK:#x} \\
                  tproxy to :{PROXY_PORT}
              }}
            }}
        """
        subprocess.run([*ns, "nft", "-f", "-"], input=rules.encode(), check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def _in_ns(ns: str, argv: list[str], log_dir: Path, name: str) -> ServerProcess:
    return start_process(["ip", "netns", "exec", ns, *argv], log_dir, name,
                         env={"PYTHONPATH": str(REPO)})


def _curl(ns: str, source: str, method: str, path: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "5", "--interface", source,
         "-X", method, "-w", " %{http_code}", f"http://{SERVICE}{path}"],
        capture_output=True, timeout=20,
    )


def test_transparent_proxy_enforces_by_original_destination(netns: str, tmp_path: Path) -> None:
    app = _in_ns(netns, [PYTHON, str(STARWARS / "deathstar.py"), "--listen", f"{SERVICE}:80"],
                 tmp_path, "deathstar")
    access_log = tmp_path / "access.log"
    proxy_proc = _in_ns(netns, [PYTHON, "-c", PROXY_SCRIPT,
                                str(STARWARS / "sw_l3_l4_l7_policy.yaml"), str(access_log),
                                SERVICE, str(PROXY_PORT)], tmp_path, "proxy")
    try:
        wait_until(lambda: "deathstar listening" in app.output(), "deathstar", 10, app)
        wait_until(lambda: "listening on" in proxy_proc.output(), "proxy", 10, proxy_proc)
        proxy = ProxyHandle(proxy_proc, ("0.0.0.0", PROXY_PORT), access_log)

        landed = _curl(netns, TIEFIGHTER, "POST", "/v1/request-landing")
        assert landed.stdout == b"Ship landed\n 200", landed.stderr
        denied = _curl(netns, TIEFIGHTER, "PUT", "/v1/exhaust-port")
        assert denied.stdout == b"Access denied\r\n 403"
        dropped = _curl(netns, XWING, "POST", "/v1/request-landing")
        assert dropped.returncode in (52, 56)

        request = proxy.wait_record(lambda r: r.verdict is Verdict.FORWARDED
                                    and r.l7 is not None and r.l7.type is L7FlowType.REQUEST)
        # The original destination, from getsockname() of the accepted socket.
        assert (request.destination.ip, request.destination.port) == (SERVICE, 80)
        assert request.destination.identity == 256
        assert "k8s:class=deathstar" in request.destination.labels
        assert request.source.ip == TIEFIGHTER
        assert [p.name for p in request.ingress_allowed_by] == ["rule1"]
        response = proxy.wait_record(lambda r: r.verdict is Verdict.FORWARDED
                                     and r.l7 is not None
                                     and r.l7.type is L7FlowType.RESPONSE)
        assert response.l7 is not None and response.l7.http is not None
        assert response.l7.http.code == 200  # the app answered: the marked upstream got there
        drop = proxy.wait_record(lambda r: r.type is FlowType.L3_L4)
        assert drop.source.ip == XWING and drop.destination.ip == SERVICE
    finally:
        proxy_proc.stop()
        app.stop()
