"""The loader dies (SIGKILL) and restarts while a connection moves data: the attached
programs keep enforcing, the restarted loader reuses the pinned maps (nothing flushed,
nothing rewritten), swaps the programs with tc replace, and nothing denied passes at any
moment. Then it reconciles a changed desired state through the policy-map diff."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from garrison.bpf.loader import Datapath
from garrison.bpf.sync import PolicySync
from garrison.bpf.syscall import prog_exists, prog_id
from garrison.policies.resolve import build_resolver
from garrison.redirect import attach_endpoint_programs, attached_filters

from .test_datapath_harness import (  # noqa: F401 (fixtures)
    PROXY_PORTS,
    Endpoints,
    NetnsEndpoint,
    connect,
    echo_server,
    enforce,
    fixture_bpffs,
    fixture_datapath,
    fixture_dp,
    fixture_endpoints,
    fixture_no_leftovers,
    policies,
)

pytestmark = pytest.mark.privileged

CLIENT, SERVER, OTHER = 700, 701, 702
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-ingress}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
WIDER = POLICY + """
  - fromEndpoints: [{matchLabels: {app: other}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


class Stream(threading.Thread):
    """Echo round trips over one connection; remembers the longest pause and any error."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.sock.settimeout(3)
        self.stop = threading.Event()
        self.bytes = 0
        self.longest_gap = 0.0
        self.error: str | None = None

    def run(self) -> None:
        chunk = b"d" * 16384
        last = time.monotonic()
        while not self.stop.is_set():
            try:
                self.sock.sendall(chunk)
                got = 0
                while got < len(chunk):
                    data = self.sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed")
                    got += len(data)
            except OSError as exc:
                self.error = repr(exc)
                return
            self.bytes += got
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now


class Prober(threading.Thread):
    """Keeps trying a connection that policy denies; counts any that come up."""

    def __init__(self, src: NetnsEndpoint, dst: NetnsEndpoint, port: int) -> None:
        super().__init__(daemon=True)
        self.src, self.dst, self.port = src, dst, port
        self.stop = threading.Event()
        self.attempts = 0
        self.successes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.attempts += 1
            sock = connect(self.src, self.dst.ip, self.port, timeout=0.15)
            if sock is not None:
                self.successes += 1
                sock.close()


LOADER = """
import sys, time
from pathlib import Path
from garrison.bpf.loader import Datapath, DatapathConfig
from garrison.bpf.syscall import prog_id
from garrison.redirect import attach_endpoint_programs
dp = Datapath.load(DatapathConfig(pin_root=Path(sys.argv[1]), ct_max=16384, events_pages=64))
for ifindex in map(int, sys.argv[2:]):
    attach_endpoint_programs(ifindex, dp.programs)
print(prog_id(dp.programs.from_container), prog_id(dp.programs.to_container), flush=True)
time.sleep(120)
"""


def test_loader_killed_and_restarted_under_traffic(dp: Datapath, endpoints: Endpoints) -> None:
    client = endpoints.add("rclient", "198.18.4.1", "app=client", CLIENT)
    server = endpoints.add("rserver", "198.18.4.2", "app=server", SERVER)
    other = endpoints.add("rother", "198.18.4.3", "app=other", OTHER)
    eps = [client, server, other]
    resolver, _ = enforce(dp, POLICY, eps)
    ifindexes = [str(e.ifindex) for e in eps]

    with contextlib.ExitStack() as stack:
        # a separate loader process owns the attached programs, as the agent would
        loader = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(LOADER), str(dp.config.pin_root),
             *ifindexes],
            stdout=subprocess.PIPE, text=True,
        )
        stack.callback(kill, loader)
        assert loader.stdout is not None
        old_ids = [int(x) for x in loader.stdout.readline().split()]
        assert len(old_ids) == 2, "the loader process did not come up"
        stack.enter_context(echo_server(server, 8080))
        sock = connect(client, server.ip, 8080)
        assert sock is not None
        stack.callback(sock.close)
        stream = Stream(sock)
        prober = Prober(other, server, 8080)
        stream.start()
        prober.start()
        stack.callback(stop, stream, prober)

        time.sleep(0.3)
        kill(loader)  # SIGKILL: no cleanup of any kind
        time.sleep(0.3)
        during_outage = stream.bytes
        assert during_outage > 0 and stream.error is None

        # restart: same pins, programs swapped atomically, state reconciled
        restarted = Datapath.load(dp.config)
        stack.callback(restarted.close)
        assert restarted.map_ids() == dp.map_ids(), "pinned maps were not reused"
        for ep in eps:
            attach_endpoint_programs(ep.ifindex, restarted.programs)
        diff = PolicySync(restarted.maps, PROXY_PORTS).reconcile(
            resolver, [e.local() for e in eps])
        assert not diff, f"a restart over correct pins rewrote {len(diff)} entries"
        ipcache = restarted.maps.ipcache.entries()
        assert restarted.maps.ipcache.reconcile(ipcache) == (0, 0)
        configs = restarted.maps.endpoints.entries()
        assert restarted.maps.endpoints.reconcile(configs) == (0, 0)
        time.sleep(0.3)
        new_ids = [prog_id(restarted.programs.from_container),
                   prog_id(restarted.programs.to_container)]
        for _ in range(50):  # freed once tc drops its reference (after an RCU period)
            if not any(prog_exists(i) for i in old_ids):
                break
            time.sleep(0.02)
        assert not any(prog_exists(i) for i in old_ids), "old programs still attached"
        assert all(prog_exists(i) for i in new_ids)
        assert {f.name for f in attached_filters(client.ifindex)} == {
            "from_container", "to_container"}
        stop(stream, prober)
        assert stream.error is None, stream.error
        assert stream.bytes > during_outage
        assert stream.longest_gap < 1.0
        assert prober.attempts >= 5 and prober.successes == 0

        # the desired state changed while no loader ran: the diff brings it in
        wider = build_resolver(policies(WIDER), [(e.identity, e.labels) for e in eps])
        diff = PolicySync(restarted.maps, PROXY_PORTS).reconcile(
            wider, [e.local() for e in eps])
        assert diff.upserts and not diff.deletes
        late = connect(other, server.ip, 8080)
        assert late is not None
        late.close()

        # an endpoint gone while no loader ran: reconciling drops its state, fail closed
        gone = {k: v for k, v in configs.items() if k != other.ifindex}
        assert restarted.maps.endpoints.reconcile(gone) == (0, 1)
        kept = [e for e in ipcache if e.prefix.network_address != other.ip]
        assert restarted.maps.ipcache.reconcile(kept) == (0, 1)
        assert connect(other, server.ip, 8080, timeout=0.3) is None


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def stop(stream: Stream, prober: Prober) -> None:
    stream.stop.set()
    prober.stop.set()
    stream.join()
    prober.join()
