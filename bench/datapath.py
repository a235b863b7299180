"""Datapath benchmark: the cost of enforcing policy in the kernel, against no enforcement and
against nftables IP-list rules, all measured in one run.

Run (root): .venv/bin/python bench/datapath.py [--seconds 3] [--identities 10000]
            [--endpoints 1000]

Two endpoint namespaces (198.18.10.1 client, 198.18.10.2 server) joined through the host:
1. traffic, for each configuration: iperf3 TCP throughput client -> server; TCP
   request/response latency (1-byte ping-pong on one connection); connection rate (connect
   and reset, one at a time):
     none       no program attached (the reference: ratios are to it)
     garrison   programs on both host veths, 10,000 identities in the ipcache, the server's
                ingress allowing all of them by identity (10,001 policy entries), conntrack
     nft N      no programs; an nftables forward chain to the server: established accept,
                `ip saddr @allowed accept`, drop — with N = 1 / 1,000 / 10,000 addresses
2. admitting one endpoint: garrison's endpoint config + ipcache write (with and without
   allocating its identity in the SQLite kvstore), at 2 and at 10,000 entries, against
   `nft add element` into the set of 1 / 1,000 / 10,000 addresses;
3. a policy change at 1,000 endpoints: resolver update -> policy-map diff -> map writes,
   for a rule that touches one endpoint and one that touches all 1,000, then a connection
   the change allows.
Everything it creates (namespaces, veths, the nft table, the pin dir, processes) is removed
at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from garrison.bpf import abi
from garrison.bpf.loader import Datapath, DatapathConfig
from garrison.bpf.maps import EndpointConfig
from garrison.bpf.sync import LocalEndpoint, PolicySync
from garrison.bpf.syscall import ProgStats, prog_stats
from garrison.identity.allocator import IdentityAllocator
from garrison.kvstore.sqlite import SQLiteKVStore
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.resolve import PolicyResolver
from garrison.redirect import (
    DEFAULT_GATEWAY,
    EndpointSpec,
    attach_endpoint_programs,
    create_endpoint,
    delete_endpoint,
    detach_endpoint_programs,
    ensure_bpffs,
    prepare_pin_dir,
    remove_pin_dir,
)

CLIENT_IP, SERVER_IP = "198.18.10.1", "198.18.10.2"
CLIENT_NS, SERVER_NS = "gdb-client", "gdb-server"
IPERF_PORT, RR_PORT, CONN_PORT, CHANGE_PORT = 5201, 7000, 7001, 7002
NFT_TABLE = "garrison_bench"
CLIENT_ID, SERVER_ID = 300, 301


def fake_ip(i: int) -> str:
    """Addresses of identities with no namespace: 198.19.0.0 + i (never the gateway)."""
    return str(IPv4Address("198.19.0.0") + i)


def labels(text: str) -> Labels:
    return endpoint_labels(Labels.parse(text.split(",")), "default")


# ---- traffic ------------------------------------------------------------------------------

SERVER_SCRIPT = f"""
import socket, threading
def listener(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{SERVER_IP}", port)); s.listen(4096); return s
def rr(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d: return
        c.sendall(d)
def conns(s):
    while True:
        c, _ = s.accept(); c.close()
a, b, c = listener({RR_PORT}), listener({CONN_PORT}), listener({CHANGE_PORT})
threading.Thread(target=conns, args=(b,), daemon=True).start()
threading.Thread(target=conns, args=(c,), daemon=True).start()
print("ready", flush=True)
rr(a)
"""

CLIENT_SCRIPT = f"""
import json, socket, struct, sys, time
mode, seconds = sys.argv[1], float(sys.argv[2])
end = time.perf_counter() + seconds
if mode == "rr":
    s = socket.create_connection(("{SERVER_IP}", {RR_PORT}))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    while time.perf_counter() < end:
        t = time.perf_counter(); s.send(b"x"); s.recv(1); lat.append(time.perf_counter() - t)
    lat.sort()
    print(json.dumps({{"n": len(lat), "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * .99)]}}))
else:
    n = 0
    linger = struct.pack("ii", 1, 0)
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.connect(("{SERVER_IP}", {CONN_PORT})); s.close(); n += 1
    print(json.dumps({{"n": n, "rate": n / (time.perf_counter() - t0)}}))
"""


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@dataclass
class Traffic:
    gbps: float
    rr_p50_us: float
    rr_p99_us: float
    conn_rate: float


def listening(ns: str, port: int) -> bool:
    out = subprocess.run(in_ns(ns, "ss", "-Hltn", f"sport = :{port}"), capture_output=True,
                         text=True)
    return bool(out.stdout.strip())


def iperf(seconds: float) -> float:
    server = subprocess.Popen(
        in_ns(SERVER_NS, "iperf3", "-s", "-1", "-B", SERVER_IP, "-p", str(IPERF_PORT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if listening(SERVER_NS, IPERF_PORT):
                break
            time.sleep(0.02)
        out = subprocess.run(
            in_ns(CLIENT_NS, "iperf3", "-c", SERVER_IP, "-p", str(IPERF_PORT), "-t",
                  str(seconds), "-J"),
            capture_output=True, text=True,
        )
        report = json.loads(out.stdout)
        if "error" in report or out.returncode:
            raise RuntimeError(f"iperf3: {report.get('error', out.stderr)}")
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def client(mode: str, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        in_ns(CLIENT_NS, sys.executable, "-c", CLIENT_SCRIPT, mode, str(seconds)),
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


Fds = dict[str, int]
PhaseCost = dict[str, dict[str, ProgStats]]  # phase -> program -> runs and time


def _stats(fds: Fds) -> dict[str, ProgStats]:
    return {name: prog_stats(fd) for name, fd in fds.items()}


def _delta(a: dict[str, ProgStats], b: dict[str, ProgStats]) -> dict[str, ProgStats]:
    return {n: ProgStats(b[n].run_time_ns - a[n].run_time_ns, b[n].run_cnt - a[n].run_cnt)
            for n in a}


def traffic(seconds: float, fds: Fds | None = None) -> tuple[Traffic, PhaseCost]:
    """The three measurements; with program fds, what the programs cost in each phase."""
    cost: PhaseCost = {}
    results: list[object] = []
    for phase, run in (("throughput", lambda: iperf(seconds)),
                       ("request/response", lambda: client("rr", seconds)),
                       ("connections", lambda: client("conn", seconds))):
        before = _stats(fds) if fds else {}
        results.append(run())
        if fds:
            cost[phase] = _delta(before, _stats(fds))
    gbps, rr, conn = results
    assert isinstance(gbps, float) and isinstance(rr, dict) and isinstance(conn, dict)
    return Traffic(gbps, rr["p50"] * 1e6, rr["p99"] * 1e6, conn["rate"]), cost


# ---- nftables -----------------------------------------------------------------------------


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def nft_install(host_if: str, entries: int) -> None:
    elements = [CLIENT_IP] + [fake_ip(i) for i in range(entries - 1)]
    nft(f"""
table ip {NFT_TABLE} {{
  set allowed {{
    type ipv4_addr
    size 65536
  }}
  chain gate {{
    type filter hook forward priority 0
    policy accept
    oifname "{host_if}" ct state established,related accept
    oifname "{host_if}" ip saddr @allowed accept
    oifname "{host_if}" drop
  }}
}}
""")
    for start in range(0, len(elements), 2000):
        chunk = ", ".join(elements[start:start + 2000])
        nft(f"add element ip {NFT_TABLE} allowed {{ {chunk} }}\n")


def nft_remove() -> None:
    subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], capture_output=True)


class LibNftables:
    """libnftables in-process: what an agent linking the library pays per element."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libnftables.so.1")
        self.lib.nft_ctx_new.restype = ctypes.c_void_p
        self.lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self.ctx = self.lib.nft_ctx_new(0)

    def add_element_us(self, ip: str) -> float:
        t = time.perf_counter()
        rc = self.lib.nft_run_cmd_from_buffer(
            self.ctx, f"add element ip {NFT_TABLE} allowed {{ {ip} }}".encode())
        elapsed = (time.perf_counter() - t) * 1e6
        if rc != 0:
            raise RuntimeError(f"libnftables: add element {ip} failed")
        return elapsed

    def close(self) -> None:
        self.lib.nft_ctx_free(self.ctx)


def nft_add_element_ms(ip: str) -> float:
    t = time.perf_counter()
    subprocess.run(["nft", "add", "element", "ip", NFT_TABLE, "allowed", f"{{ {ip} }}"],
                   check=True)
    return (time.perf_counter() - t) * 1e3


# ---- garrison state -----------------------------------------------------------------------

SERVER_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-server}
spec:
  endpointSelector: {matchLabels: {app: bench-server}}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: client}}]
"""


def populate(dp: Datapath, identities: int, client_ifindex: int, server_ifindex: int) -> int:
    """`identities` client identities in the ipcache and in the server's ingress policy."""
    resolver = PolicyResolver()
    resolver.add_identity(CLIENT_ID, labels("app=bench-client,tier=client"))
    resolver.add_identity(SERVER_ID, labels("app=bench-server"))
    base = 1000
    for i in range(identities):
        resolver.add_identity(base + i, labels(f"app=c{i},tier=client"))
        dp.maps.ipcache.upsert(f"{fake_ip(i)}/32", base + i)
    resolver.add_policies(load_text(SERVER_POLICY, "bench.yaml").policies)
    sync = PolicySync(dp.maps, {})
    sync.reconcile(resolver, [
        LocalEndpoint(client_ifindex, CLIENT_ID, IPv4Address(CLIENT_IP)),
        LocalEndpoint(server_ifindex, SERVER_ID, IPv4Address(SERVER_IP)),
    ])
    return len(dp.maps.policy.entries([SERVER_ID]))


def admit_us(dp: Datapath, count: int, first: int,
             allocator: IdentityAllocator | None) -> list[float]:
    out = []
    for i in range(first, first + count):
        t = time.perf_counter()
        if allocator is not None:
            identity = allocator.allocate(labels(f"app=new{i}"), f"ep{i}").id
        else:
            identity = 20000 + i
        dp.maps.write_endpoint(900000 + i, EndpointConfig(identity, IPv4Address(fake_ip(i))))
        out.append((time.perf_counter() - t) * 1e6)
    for i in range(first, first + count):
        dp.maps.remove_endpoint(900000 + i, IPv4Address(fake_ip(i)))
    return out


def policy_change(dp: Datapath, endpoints: int, client_ifindex: int,
                  server_ifindex: int) -> list[tuple[str, float, int, float | None]]:
    """(change, ms to maps written, entries written, ms until a new connection passes)."""
    resolver = PolicyResolver()
    resolver.add_identity(CLIENT_ID, labels("app=bench-client,tier=client"))
    resolver.add_identity(SERVER_ID, labels("app=bench-server,tier=backend"))
    resolver.add_identity(2000, labels("app=monitor,tier=monitor"))
    locals_ = [
        LocalEndpoint(client_ifindex, CLIENT_ID, IPv4Address(CLIENT_IP)),
        LocalEndpoint(server_ifindex, SERVER_ID, IPv4Address(SERVER_IP)),
    ]
    for i in range(endpoints - 2):
        ident = 3000 + i
        resolver.add_identity(ident, labels(f"app=svc{i},tier=backend"))
        locals_.append(LocalEndpoint(800000 + i, ident, IPv4Address(fake_ip(20000 + i))))
    base = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backends}
spec:
  endpointSelector: {matchLabels: {tier: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: client}}]
    toPorts: [{ports: [{port: "7000", protocol: TCP}, {port: "7001", protocol: TCP}]}]
"""
    resolver.add_policies(load_text(base, "base.yaml").policies)
    sync = PolicySync(dp.maps, {})
    sync.reconcile(resolver, locals_)
    changes = {
        "one endpoint (allow client -> server:7002)": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: open-7002}
spec:
  endpointSelector: {matchLabels: {app: bench-server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: bench-client}}]
    toPorts: [{ports: [{port: "7002", protocol: TCP}]}]
""",
        f"all {endpoints} endpoints (allow monitor on 9100)": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: monitoring}
spec:
  endpointSelector: {matchLabels: {tier: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: monitor}}]
    toPorts: [{ports: [{port: "9100", protocol: TCP}]}]
""",
    }
    out: list[tuple[str, float, int, float | None]] = []
    for name, text in changes.items():
        pols = load_text(text, "change.yaml").policies
        blocked = name.startswith("one") and connects(CHANGE_PORT, 0.3)
        assert not blocked, "the connection passed before the change"
        t0 = time.perf_counter()
        changed = resolver.add_policies(pols)
        diff = sync.apply_updates(resolver, changed, locals_)
        t1 = time.perf_counter()
        until = None
        if name.startswith("one"):
            assert connects(CHANGE_PORT, 2.0), "the change did not take effect"
            until = (time.perf_counter() - t0) * 1e3
        out.append((name, (t1 - t0) * 1e3, len(diff), until))
    return out


def connects(port: int, timeout: float) -> bool:
    from pyroute2 import netns

    netns.pushns(CLIENT_NS)
    try:
        sock = socket.socket()
    finally:
        netns.popns()
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect((SERVER_IP, port))
        except OSError:
            return False
    return True


# ---- run ----------------------------------------------------------------------------------


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """Kernel accounting of program run time, on for the run and restored after."""
    before = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1")
    try:
        yield
    finally:
        BPF_STATS.write_text(before)


@contextlib.contextmanager
def environment() -> Iterator[tuple[Datapath, int, int]]:
    with contextlib.ExitStack() as stack:
        ensure_bpffs()
        root = Path(f"/sys/fs/bpf/garrison-bench-{os.getpid()}")
        prepare_pin_dir(root)
        stack.callback(remove_pin_dir, root)
        stack.enter_context(bpf_stats())
        stack.callback(nft_remove)
        for ns in (CLIENT_NS, SERVER_NS):
            stack.callback(delete_endpoint, ns)
        client_link = create_endpoint(EndpointSpec(CLIENT_NS, IPv4Address(CLIENT_IP)))
        server_link = create_endpoint(EndpointSpec(SERVER_NS, IPv4Address(SERVER_IP)))
        server = subprocess.Popen(in_ns(SERVER_NS, sys.executable, "-c", SERVER_SCRIPT),
                                  stdout=subprocess.PIPE, text=True)
        stack.callback(lambda: (server.kill(), server.wait()))
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        dp = Datapath.load(DatapathConfig(pin_root=root))
        stack.callback(dp.close)
        dp.maps.ipcache.upsert(f"{DEFAULT_GATEWAY}/32", abi.IDENTITY_HOST)
        dp.maps.write_endpoint(client_link.host_ifindex,
                               EndpointConfig(CLIENT_ID, IPv4Address(CLIENT_IP)))
        dp.maps.write_endpoint(server_link.host_ifindex,
                               EndpointConfig(SERVER_ID, IPv4Address(SERVER_IP)))
        yield dp, client_link.host_ifindex, server_link.host_ifindex


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="length of each throughput / latency / rate measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="configurations are measured round-robin this many times")
    parser.add_argument("--identities", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=1000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/datapath.py needs root (namespaces, BPF, nftables)")
    nft_sizes = (1, 1000, 10000)
    with environment() as (dp, client_if, server_if):
        host_server_if = EndpointSpec(SERVER_NS, IPv4Address(SERVER_IP)).host_ifname
        small = admit_us(dp, 300, 0, None)
        entries = populate(dp, args.identities, client_if, server_if)
        large = admit_us(dp, 300, 0, None)
        with tempfile.TemporaryDirectory() as tmp:
            allocator = IdentityAllocator(SQLiteKVStore.in_state_dir(tmp))
            with_identity = admit_us(dp, 300, 0, allocator)

        def garrison_on() -> None:
            for ifindex in (client_if, server_if):
                attach_endpoint_programs(ifindex, dp.programs)

        def garrison_off() -> None:
            for ifindex in (client_if, server_if):
                detach_endpoint_programs(ifindex)

        configs: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
            ("none (no program)", lambda: None, lambda: None),
            (f"garrison ({args.identities:,} identities, {entries:,} entries)",
             garrison_on, garrison_off),
        ]
        for n in nft_sizes:
            configs.append((f"nftables set of {n:,}",
                            lambda n=n: nft_install(host_server_if, n), nft_remove))
        samples: dict[str, list[Traffic]] = {name: [] for name, _, _ in configs}
        fds = {"from_container": dp.programs.from_container,
               "to_container": dp.programs.to_container}
        costs: PhaseCost = {}
        for round_ in range(args.rounds):
            for name, on, off in configs:
                print(f"round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
                on()
                try:
                    measured = name.startswith("garrison")
                    result, cost = traffic(args.seconds, fds if measured else None)
                    samples[name].append(result)
                    for phase, progs in cost.items():
                        acc = costs.setdefault(phase, {p: ProgStats(0, 0) for p in fds})
                        for p, st in progs.items():
                            acc[p] = ProgStats(acc[p].run_time_ns + st.run_time_ns,
                                               acc[p].run_cnt + st.run_cnt)
                finally:
                    off()

        nft_cli: dict[int, float] = {}
        nft_lib: dict[int, float] = {}
        for n in nft_sizes:
            nft_install(host_server_if, n)
            try:
                nft_cli[n] = median([nft_add_element_ms(fake_ip(50000 + i)) * 1e3
                                     for i in range(20)])
                lib = LibNftables()
                try:
                    nft_lib[n] = median([lib.add_element_us(fake_ip(60000 + i))
                                         for i in range(300)])
                finally:
                    lib.close()
            finally:
                nft_remove()

        garrison_on()
        try:
            changes = policy_change(dp, args.endpoints, client_if, server_if)
        finally:
            garrison_off()

    rows = [(name, Traffic(*(median([getattr(t, f) for t in ts])
                             for f in ("gbps", "rr_p50_us", "rr_p99_us", "conn_rate"))))
            for name, ts in samples.items()]
    ref = rows[0][1]
    print(f"\nmedians of {args.rounds} rounds, {args.seconds:g} s each")
    print("| configuration | throughput Gbit/s | ratio | RR p50 µs | ratio | RR p99 µs "
          "| connections/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t.gbps:.1f} | {t.gbps / ref.gbps:.2f} | {t.rr_p50_us:.1f} | "
              f"{t.rr_p50_us / ref.rr_p50_us:.2f} | {t.rr_p99_us:.1f} | {t.conn_rate:,.0f} | "
              f"{t.conn_rate / ref.conn_rate:.2f} |")
    print("\n| garrison programs, kernel accounting (bpf_stats) | program | runs | ns per run "
          "| CPU time per second of traffic |")
    print("|---|---|---|---|---|")
    for phase, progs in costs.items():
        for p, st in progs.items():
            per = st.run_time_ns / st.run_cnt if st.run_cnt else 0.0
            share = st.run_time_ns / (args.seconds * args.rounds * 1e9)
            print(f"| {phase} | {p} | {st.run_cnt:,} | {per:.0f} | {share * 1e3:.1f} ms |")
    print("\n| admit one endpoint | median | p99 |")
    print("|---|---|---|")
    for name, xs in (("garrison map writes, 2 ipcache entries", small),
                     (f"garrison map writes, {args.identities:,} ipcache entries", large),
                     ("garrison identity allocation (SQLite kvstore) + map writes",
                      with_identity)):
        xs = sorted(xs)
        print(f"| {name} | {median(xs):.1f} µs | {xs[int(len(xs) * .99)]:.1f} µs |")
    for n in nft_sizes:
        print(f"| libnftables `add element` into a set of {n:,} | {nft_lib[n]:.1f} µs | |")
    for n in nft_sizes:
        print(f"| `nft add element` (command) into a set of {n:,} | {nft_cli[n]:.0f} µs | |")
    print("\n| policy change | maps written after | entries written | new connection "
          "passes after |")
    print("|---|---|---|---|")
    for name, ms, count, until in changes:
        after = f"{until:.1f} ms" if until is not None else "n/a"
        print(f"| {name} | {ms:.1f} ms | {count:,} | {after} |")


if __name__ == "__main__":
    main()
