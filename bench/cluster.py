"""Cluster propagation: from `endpoint add` on node A to node B's ipcache entry, and what one
more remote endpoint costs node B with N already known — against regenerating an nftables
rule set of N allowed addresses, in the same run.

Run as root: .venv/bin/python bench/cluster.py [--endpoints 100] [--known 10,100,1000]

Builds what tests/privileged/test_cluster.py builds: an underlay bridge in a namespace of its
own with etcd 3.4 on 198.19.0.250, two node namespaces (198.19.0.201/.202) each running
`garrison agent --kvstore etcd`; removes all of it at the end, also on failure.

1. Propagation: `--endpoints` endpoints of one identity are added on node A one after the
   other (the real API call: namespace, veth, BPF attach, identity, etcd). For each, the time
   from the call to node B having written the address's ipcache entry (node B stamps that
   moment; both agents share this machine's clock), and from the call's return to then.
2. Scale: a third "node" (this process, its own lease, like any agent) publishes N endpoints
   of one identity that node B's policy allows; then one more. Node B's policy-map writes for
   that one (its `map_writes`) and the time to its ipcache entry. The reference: `nft -f` of a
   table whose rule allows the N+1 addresses (a set), in a scratch namespace — what an
   IP-list firewall redoes on every endpoint start.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from garrison.agent.api import AgentClient, AgentUnreachableError  # noqa: E402
from garrison.cluster.keys import IPEntry  # noqa: E402
from garrison.identity.allocator import (  # noqa: E402
    AllocatorConfig,
    ClusterIdentityAllocator,
    canonical_labels,
)
from garrison.kvstore.etcd import EtcdKVStore  # noqa: E402
from garrison.policies.labels import Labels  # noqa: E402
from garrison.redirect import remove_pin_dir  # noqa: E402
from garrison.redirect.bpffs import BPFFS_MOUNT  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402

GARRISON = str(Path(sys.executable).with_name("garrison"))
PID = os.getpid()
UNDERLAY = f"ge-bul-{PID}"
ETCD_IP = "198.19.0.250"
POLICY = """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: ge-bench
    spec:
      endpointSelector:
        matchLabels:
          app: ge-bench-server
      ingress:
      - fromEndpoints:
        - matchLabels:
            app: ge-bench-client
        toPorts:
        - ports:
          - port: "7000"
            protocol: TCP
"""


def ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


class Agent:
    def __init__(self, n: int, netns: str, etcd_url: str, workdir: Path) -> None:
        self.netns = netns
        self.workdir = workdir
        self.pin = BPFFS_MOUNT / f"ge-bench-{n}-{PID}"
        self.socket = workdir / "agent.sock"
        self.args = [
            "--state-dir",
            str(workdir / "state"),
            "--socket",
            str(self.socket),
            "--bpffs-root",
            str(self.pin),
        ]
        self.log = (workdir / "agent.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{netns}",
                GARRISON,
                "agent",
                *self.args,
                "--kvstore",
                "etcd",
                "--kvstore-endpoints",
                etcd_url,
                "--node-name",
                f"ge-b{n}",
                "--pod-cidr",
                f"198.18.{210 + n}.0/24",
                "--node-ip",
                f"198.19.0.{210 + n}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError((workdir / "agent.log").read_text()[-3000:])
            try:
                self.call("Status")
                return
            except AgentUnreachableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        with AgentClient(self.socket, timeout=60) as client:
            return client.call(method, **params)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for ep in self.call("EndpointList")["endpoints"]:
                self.call("EndpointDelete", name=ep["name"])
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(
            [
                "nsenter",
                f"--net=/run/netns/{self.netns}",
                GARRISON,
                "agent",
                "--cleanup",
                *self.args,
            ],
            capture_output=True,
            check=False,
        )
        if self.pin.exists():
            remove_pin_dir(self.pin)
        self.log.close()


@contextlib.contextmanager
def cluster(workdir: Path) -> Iterator[tuple[EtcdServer, Agent, Agent]]:
    made: list[str] = []
    agents: list[Agent] = []
    etcd = None
    try:
        for name in (UNDERLAY, f"ge-bn1-{PID}", f"ge-bn2-{PID}"):
            if Path(f"/run/netns/{name}").exists():
                raise RuntimeError(f"namespace {name} exists and is not ours")
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            ip(name, "link", "set", "lo", "up")
        ip(UNDERLAY, "link", "add", "ge-br", "type", "bridge")
        ip(UNDERLAY, "addr", "add", f"{ETCD_IP}/24", "dev", "ge-br")
        ip(UNDERLAY, "link", "set", "ge-br", "up")
        etcd = EtcdServer(name="ge-bench", netns=UNDERLAY, host=ETCD_IP)
        etcd.start()
        for n in (1, 2):
            netns = f"ge-bn{n}-{PID}"
            ip(
                netns,
                "link",
                "add",
                f"ge-u{n}",
                "type",
                "veth",
                "peer",
                "name",
                f"ge-p{n}",
                "netns",
                UNDERLAY,
            )
            ip(netns, "addr", "add", f"198.19.0.{210 + n}/24", "dev", f"ge-u{n}")
            ip(netns, "link", "set", f"ge-u{n}", "up")
            ip(UNDERLAY, "link", "set", f"ge-p{n}", "master", "ge-br", "up")
            subprocess.run(
                ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True
            )
            sub = workdir / f"n{n}"
            sub.mkdir()
            agents.append(Agent(n, netns, etcd.url, sub))
        yield etcd, agents[0], agents[1]
    finally:
        for agent in agents:
            agent.close()
        if etcd is not None:
            etcd.close()
        for name in reversed(made):
            subprocess.run(["ip", "netns", "delete", name], check=False)


def written_at(agent: Agent, address: str, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stamps = agent.call("Status")["cluster"]["ipcache_written_at"]
        if address in stamps:
            return float(stamps[address])
        time.sleep(0.002)
    raise RuntimeError(f"{address} never reached node B's ipcache")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def propagation(a: Agent, b: Agent, count: int) -> dict[str, float]:
    from_call, from_return = [], []
    for i in range(count):
        address = str(ipaddress.IPv4Address("198.18.211.10") + i)
        t0 = time.time()
        a.call("EndpointAdd", name=f"ge-bep{i}", labels=["app=ge-bench-client"], ip=address)
        t1 = time.time()
        at = written_at(b, address)
        from_call.append((at - t0) * 1000)
        from_return.append((at - t1) * 1000)
    return {
        "median_ms": statistics.median(from_call),
        "p99_ms": percentile(from_call, 0.99),
        "after_return_median_ms": statistics.median(from_return),
        "after_return_p99_ms": percentile(from_return, 0.99),
    }


def nft_regenerate_ms(
    netns: str, addresses: list[str], rounds: int = 5, *, as_set: bool = True
) -> float:
    """Median time of `nft -f` of a rule set allowing `addresses` (one set, or one rule each)
    in the scratch namespace `netns`."""
    if as_set:
        elements = ", ".join(addresses)
        body = (
            f"set allowed {{ type ipv4_addr; elements = {{ {elements} }} }}\n"
            "chain input { type filter hook input priority 0; policy drop;\n"
            "ip saddr @allowed tcp dport 7000 accept\n}"
        )
    else:
        rules = "\n".join(f"ip saddr {a} tcp dport 7000 accept" for a in addresses)
        body = f"chain input {{ type filter hook input priority 0; policy drop;\n{rules}\n}}"
    ruleset = f"flush ruleset\ntable inet ge_bench {{\n{body}\n}}\n"
    with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as fh:
        fh.write(ruleset)
    took = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", fh.name], check=True)
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        os.unlink(fh.name)
    return statistics.median(took)


def publisher(etcd_url: str) -> int:
    """The third node, run inside the underlay namespace (etcd is reachable only there): one
    command a line on stdin — `up N` publishes endpoints 0..N-1, `one I` publishes endpoint I
    and prints the time it called etcd."""
    store = EtcdKVStore(etcd_url)
    session = store.session(30, name="ge-bench-node")
    if not session.wait_ready(10):
        raise RuntimeError(session.last_error or "etcd does not answer")
    allocator = ClusterIdentityAllocator(
        store, AllocatorConfig(node_name="ge-bench-c"), lease=session.require_lease
    )
    labels = Labels.parse("k8s:app=ge-bench-client,k8s:io.kubernetes.pod.namespace=default")
    identity = allocator.allocate(labels, "bench")
    canonical = canonical_labels(identity.labels)
    base = ipaddress.IPv4Address("198.18.230.0")
    published = 0
    print("ready", flush=True)
    for line in sys.stdin:
        verb, _, arg = line.strip().partition(" ")
        if verb == "up":
            while published < int(arg):
                entry = IPEntry(base + published, identity.id, canonical, "ge-bench-c")
                session.put(entry.key, entry.encode())
                published += 1
            if not session.wait_flushed(120):
                raise RuntimeError("etcd did not take the entries in 120 s")
            print("done", flush=True)
        elif verb == "size":
            items = store.list_prefix("")
            nbytes = sum(len(store.root) + len(k.encode()) + len(v) for k, v in items.items())
            print(f"{len(items)} {nbytes}", flush=True)
        elif verb == "one":
            entry = IPEntry(base + int(arg), identity.id, canonical, "ge-bench-c")
            t0 = time.time()
            session.put(entry.key, entry.encode())
            published = max(published, int(arg) + 1)
            print(f"{t0}", flush=True)
    session.close()
    store.close()
    return 0


class Publisher:
    """The third node (`publisher()` in the underlay namespace), asked one line at a time."""

    def __init__(self, etcd: EtcdServer) -> None:
        self.proc = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{UNDERLAY}",
                sys.executable,
                __file__,
                "--publisher",
                etcd.url,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the publisher did not start")

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def size(self) -> tuple[int, int]:
        keys, nbytes = self.ask("size").split()
        return int(keys), int(nbytes)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(20)


def scale(worker: Publisher, b: Agent, known: list[int]) -> list[dict[str, float]]:
    """The third node publishes remote endpoints that node B's policy allows."""
    ask = worker.ask
    scratch = f"ge-bnft-{PID}"
    subprocess.run(["ip", "netns", "add", scratch], check=True)
    rows = []
    base = ipaddress.IPv4Address("198.18.230.0")
    try:
        for n in known:
            assert ask(f"up {n}") == "done"
            written_at(b, str(base + (n - 1)), timeout_s=60)
            before = b.call("Status")["map_writes"]
            t0 = float(ask(f"one {n}"))
            at = written_at(b, str(base + n))
            writes = b.call("Status")["map_writes"] - before
            addresses = [str(base + i) for i in range(n + 1)]
            rows.append(
                {
                    "known": n,
                    "policy_map_writes": writes,
                    "ipcache_ms": (at - t0) * 1000,
                    "nft_set_ms": nft_regenerate_ms(scratch, addresses),
                    "nft_rules_ms": nft_regenerate_ms(scratch, addresses, as_set=False),
                }
            )
    finally:
        subprocess.run(["ip", "netns", "delete", scratch], check=False)
    return rows


def _allocate_worker(url: str, node: str, names: list[str], start: Any, out: Any) -> None:
    store = EtcdKVStore(url)
    session = store.session(30, name=node)
    session.wait_ready(10)
    allocator = ClusterIdentityAllocator(
        store, AllocatorConfig(node_name=node), lease=session.require_lease
    )
    got = {}
    start.wait()
    t0 = time.perf_counter()
    for name in names:
        labels = Labels.parse(f"k8s:app={name},k8s:io.kubernetes.pod.namespace=default")
        got[name] = allocator.allocate(labels, "bench").id
    out.put((node, time.perf_counter() - t0, got))
    session.close(revoke=False)
    store.close()


def allocation(agents: int, labels: int) -> dict[str, dict[str, float]]:
    """`agents` processes, each with its own etcd client, session and allocator, allocate at
    once: `distinct` — each its own new labels; `shared` — all the same new labels (each must
    get the one number); `alone` — one agent, the reference. A loopback etcd of its own."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    result = {}
    with EtcdServer(name="ge-bench-alloc") as etcd:
        for phase, count in (("alone", 1), ("distinct", agents), ("shared", agents)):
            start, out = ctx.Event(), ctx.Queue()
            procs = []
            for i in range(count):
                prefix = phase if phase == "shared" else f"{phase}-{i}"
                names = [f"{prefix}-{j}" for j in range(labels)]
                proc = ctx.Process(
                    target=_allocate_worker, args=(etcd.url, f"agent{i}", names, start, out)
                )
                proc.start()
                procs.append(proc)
            time.sleep(2.0)  # every worker connected and waiting
            start.set()
            results = [out.get(timeout=300) for _ in procs]
            for proc in procs:
                proc.join(30)
            wall = max(seconds for _, seconds, _ in results)
            by_name: dict[str, set[int]] = {}
            for _, _, got in results:
                for name, number in got.items():
                    by_name.setdefault(name, set()).add(number)
            if any(len(numbers) != 1 for numbers in by_name.values()):
                raise RuntimeError(f"{phase}: agents disagree on a number")
            numbers = [next(iter(n)) for n in by_name.values()]
            if len(set(numbers)) != len(numbers):
                raise RuntimeError(f"{phase}: two label sets got one number")
            total = count * labels
            result[phase] = {
                "allocations": total,
                "seconds": wall,
                "per_s": total / wall,
                "distinct_ids": len(set(numbers)),
            }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--known", default="10,100,1000")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--labels", type=int, default=200)
    parser.add_argument("--publisher", metavar="ETCD_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publisher:
        return publisher(args.publisher)
    if os.geteuid() != 0:
        print("bench/cluster.py: needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    known = [int(n) for n in args.known.split(",")]
    with tempfile.TemporaryDirectory(prefix="ge-bench-") as tmp, cluster(Path(tmp)) as (etcd, a, b):
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(textwrap.dedent(POLICY))
        b.call("EndpointAdd", name="ge-bsrv", labels=["app=ge-bench-server"], ip="198.18.212.10")
        subprocess.run(
            [GARRISON, "policy", "import", str(policy), "--socket", str(a.socket)],
            check=True,
            capture_output=True,
        )
        worker = Publisher(etcd)
        try:
            keys0, bytes0 = worker.size()
            p = propagation(a, b, args.endpoints)
            keys1, bytes1 = worker.size()
            rows = scale(worker, b, known)
        finally:
            worker.close()
    alloc = allocation(args.agents, args.labels)
    footprint = {
        "keys_per_endpoint": (keys1 - keys0) / args.endpoints,
        "bytes_per_endpoint": (bytes1 - bytes0) / args.endpoints,
    }
    print(
        json.dumps(
            {"propagation": p, "etcd": footprint, "scale": rows, "allocation": alloc}, indent=1
        )
    )
    print(
        f"\nendpoint add on A -> ipcache entry on B, {args.endpoints} endpoints: "
        f"median {p['median_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms "
        f"(after the add returned: median {p['after_return_median_ms']:.1f} ms, "
        f"p99 {p['after_return_p99_ms']:.1f} ms)"
    )
    print(
        f"{'known':>6} {'policy writes':>14} {'ipcache ms':>11} {'nft set ms':>11}"
        f" {'nft rules ms':>13}"
    )
    for row in rows:
        print(
            f"{row['known']:>6} {row['policy_map_writes']:>14} {row['ipcache_ms']:>11.1f} "
            f"{row['nft_set_ms']:>11.1f} {row['nft_rules_ms']:>13.1f}"
        )
    print(
        f"etcd per endpoint: {footprint['keys_per_endpoint']:.2f} keys,"
        f" {footprint['bytes_per_endpoint']:.0f} bytes (keys + values)"
    )
    for phase, row in alloc.items():
        print(
            f"allocation, {phase}: {row['per_s']:.0f} identities/s"
            f" ({row['allocations']} allocations in {row['seconds']:.2f} s,"
            f" {row['distinct_ids']} numbers)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
