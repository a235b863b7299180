"""Shared fixtures of the datapath tests, and the checks that they leave nothing behind.

Test modules import the fixtures they use from here. Everything a test creates is named
(namespaces `gdp-*` and their host veths, pin dirs `garrison-test-<pid>-*`); `no_leftovers`
compares those before and after each test — namespaces, veths, clsact qdiscs, bpffs pins —
and this process's children. The proxy steering rule and route are host-wide and another
agent on the machine may hold them: the `steering` fixture removes of the two only what it
added, and then checks that is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from garrison.bpf import abi
from garrison.bpf.loader import Datapath, DatapathConfig
from garrison.bpf.maps import DatapathEvent, EndpointConfig
from garrison.bpf.sync import LocalEndpoint, PolicySync
from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.model import Policy
from garrison.policies.resolve import PolicyResolver, ResolverConfig, build_resolver
from garrison.redirect import (
    DEFAULT_GATEWAY,
    EndpointLink,
    EndpointSpec,
    attach_endpoint_programs,
    create_endpoint,
    delete_endpoint,
    ensure_bpffs,
    host_ifname_for,
    install_proxy_steering,
    prepare_pin_dir,
    proxy_steering_installed,
    proxy_steering_present,
    remove_pin_dir,
    remove_proxy_steering,
    unmount_bpffs,
)
from garrison.redirect.bpffs import BPFFS_MOUNT

PROXY_PORT = 15080
PROXY_PORTS = {L7Protocol.HTTP: PROXY_PORT, L7Protocol.KAFKA: PROXY_PORT,
               L7Protocol.GRPC: PROXY_PORT}

# ---- the machine's state, before and after ----------------------------------------------


def _children() -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out |= {int(p) for p in (task / "children").read_text().split()}
    return out


# Every endpoint name the tests of this session created (other work on the machine may
# create namespaces and veths of its own meanwhile: only ours are checked).
CREATED: set[str] = set()


def machine_state() -> dict[str, object]:
    ours = {host_ifname_for(name) for name in CREATED}
    with IPRoute() as ipr:
        links = {str(link.get_attr("IFLA_IFNAME")): link["index"] for link in ipr.get_links()}
        mine = {name: index for name, index in links.items() if name in ours}
        clsact = sorted(
            q["index"] for q in ipr.get_qdiscs()
            if q.get_attr("TCA_KIND") == "clsact" and q["index"] in mine.values()
        )
    prefix = f"garrison-test-{os.getpid()}-"  # other test runs may pin meanwhile
    pins = sorted(
        p.name for p in BPFFS_MOUNT.iterdir() if p.name.startswith(prefix)
    ) if BPFFS_MOUNT.is_dir() else []
    return {
        "netns": sorted(n for n in netns.listnetns() if n in CREATED or n.startswith("gdp-")),
        "links": sorted(mine),
        "clsact": clsact,
        "pins": pins,
        "children": sorted(_children()),
    }


@pytest.fixture(name="no_leftovers")
def fixture_no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Requested first by every datapath test: the machine after equals the machine before
    (module-scoped fixtures are set up before, torn down after the module: their pin dir is
    not counted)."""
    before = machine_state()
    yield
    after = machine_state()
    assert after == before, "the test left something behind"


# ---- bpffs and the datapath ---------------------------------------------------------------


@pytest.fixture(scope="session", name="bpffs")
def fixture_bpffs() -> Iterator[Path]:
    mounted = ensure_bpffs()
    yield BPFFS_MOUNT
    if mounted:
        unmount_bpffs()


def pin_root_for(bpffs: Path, name: str) -> Path:
    return bpffs / f"garrison-test-{os.getpid()}-{name}"


@pytest.fixture(scope="module", name="datapath")
def fixture_datapath(bpffs: Path, request: pytest.FixtureRequest) -> Iterator[Datapath]:
    """One loaded datapath per test module, over its own pin dir (removed afterwards)."""
    root = pin_root_for(bpffs, request.module.__name__.rsplit(".", 1)[-1])
    prepare_pin_dir(root)
    dp = None
    try:
        dp = Datapath.load(DatapathConfig(pin_root=root, ct_max=16384, events_pages=64))
        yield dp
    finally:
        if dp is not None:
            dp.close()
        remove_pin_dir(root)


def reset_maps(dp: Datapath) -> None:
    for key in list(dp.maps.policy.entries()):
        dp.maps.policy.delete(key)
    for entry in dp.maps.ipcache.entries():
        dp.maps.ipcache.delete(entry.prefix)
    for ifindex in dp.maps.endpoints.entries():
        dp.maps.endpoints.delete(ifindex)
    dp.maps.conntrack.flush()
    dp.maps.events.drain()


@pytest.fixture(name="dp")
def fixture_dp(no_leftovers: None, datapath: Datapath) -> Iterator[Datapath]:
    """The module's datapath with empty maps."""
    reset_maps(datapath)
    yield datapath
    reset_maps(datapath)


@pytest.fixture(name="steering")
def fixture_steering(dp: Datapath) -> Iterator[None]:
    installed = install_proxy_steering()
    assert not install_proxy_steering()  # idempotent: nothing more to add
    try:
        assert proxy_steering_installed()
        yield
    finally:
        # only the parts this fixture added: a rule or route that was there stays
        remove_proxy_steering(installed)
        now = proxy_steering_present()
        assert not (installed.rule and now.rule), "the proxy rule was left behind"
        assert not (installed.route and now.route), "the proxy route was left behind"


# ---- endpoints ----------------------------------------------------------------------------


@dataclass
class NetnsEndpoint:
    name: str
    link: EndpointLink
    labels: Labels
    identity: int

    @property
    def ip(self) -> IPv4Address:
        return self.link.ipv4

    @property
    def ifindex(self) -> int:
        return self.link.host_ifindex

    def local(self) -> LocalEndpoint:
        return LocalEndpoint(self.ifindex, self.identity, self.ip)

    def socket(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket living in this endpoint's namespace."""
        return ns_socket(self.name, kind)


def ns_socket(name: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    netns.pushns(name)
    try:
        return socket.socket(socket.AF_INET, kind)
    finally:
        netns.popns()


def labels_of(text: str, namespace: str = "default") -> Labels:
    return endpoint_labels(Labels.parse([p for p in text.split(",") if p]), namespace)


@dataclass
class Endpoints:
    datapath: Datapath
    made: list[NetnsEndpoint] = field(default_factory=list)

    def add(self, short: str, ip: str, labels: str, identity: int) -> NetnsEndpoint:
        name = f"gdp-{short}"
        # never adopt (and later delete) a namespace someone else made under our name
        assert name not in netns.listnetns(), f"namespace {name} exists: not ours, left alone"
        CREATED.add(name)
        link = create_endpoint(EndpointSpec(name, IPv4Address(ip)))
        ep = NetnsEndpoint(name, link, labels_of(labels), identity)
        self.made.append(ep)
        maps = self.datapath.maps
        maps.write_endpoint(link.host_ifindex, EndpointConfig(identity, link.ipv4))
        maps.ipcache.upsert(f"{DEFAULT_GATEWAY}/32", abi.IDENTITY_HOST)
        attach_endpoint_programs(link.host_ifindex, self.datapath.programs)
        return ep

    def remove_all(self) -> None:
        for ep in self.made:
            delete_endpoint(ep.name)
        self.made.clear()


@pytest.fixture(name="endpoints")
def fixture_endpoints(dp: Datapath) -> Iterator[Endpoints]:
    eps = Endpoints(dp)
    try:
        yield eps
    finally:
        eps.remove_all()


# ---- policy -------------------------------------------------------------------------------


def policies(yaml_text: str) -> tuple[Policy, ...]:
    return load_text(textwrap.dedent(yaml_text), "test.yaml").policies


def enforce(
    dp: Datapath,
    yaml_text: str,
    eps: list[NetnsEndpoint],
    config: ResolverConfig | None = None,
) -> tuple[PolicyResolver, PolicySync]:
    """Resolve `yaml_text` for the endpoints and write the result to the kernel, the way
    the agent does."""
    resolver = build_resolver(policies(yaml_text), [(e.identity, e.labels) for e in eps],
                              config)
    sync = PolicySync(dp.maps, PROXY_PORTS)
    sync.reconcile(resolver, [e.local() for e in eps if e.identity in
                              resolver.endpoint_identities()])
    return resolver, sync


# ---- traffic ------------------------------------------------------------------------------


class EchoServer:
    """A TCP server in a namespace: echoes every byte back (prefixed by nothing)."""

    def __init__(self, ep: NetnsEndpoint, port: int) -> None:
        self.sock = ep.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(ep.ip), port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self._main = threading.Thread(target=self._serve, daemon=True)
        self._main.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._main.join()
        for t in self._threads:
            t.join()
        self.sock.close()


@contextlib.contextmanager
def echo_server(ep: NetnsEndpoint, port: int) -> Iterator[EchoServer]:
    server = EchoServer(ep, port)
    try:
        yield server
    finally:
        server.close()


def connect(src: NetnsEndpoint, dst: IPv4Address | str, port: int,
            timeout: float = 0.6, sport: int = 0) -> socket.socket | None:
    """A connected socket from `src`, or None when the connection does not come up."""
    sock = src.socket()
    if sport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(src.ip), sport))
    sock.settimeout(timeout)
    try:
        sock.connect((str(dst), port))
    except (TimeoutError, OSError):
        sock.close()
        return None
    return sock


def roundtrip(sock: socket.socket, payload: bytes = b"ping") -> bool:
    try:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                return False
            got += chunk
    except (TimeoutError, OSError):
        return False
    return got == payload


def wait_events(dp: Datapath, predicate: Callable[[DatapathEvent], bool],
                timeout: float = 2.0) -> list[DatapathEvent]:
    """Events read until one satisfies `predicate` (all of them), or what came in time."""
    seen: list[DatapathEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.extend(dp.maps.events.poll(50))
        if any(predicate(e) for e in seen):
            break
    return seen


# ---- the harness checks itself ------------------------------------------------------------


@pytest.mark.privileged
def test_endpoints_are_created_and_removed_without_trace(
    endpoints: Endpoints, dp: Datapath
) -> None:
    a = endpoints.add("h1", "198.18.0.201", "app=a", 300)
    again = create_endpoint(EndpointSpec(a.name, a.ip))  # idempotent
    assert again.host_ifindex == a.ifindex
    assert dp.maps.endpoints.get(a.ifindex) == EndpointConfig(300, a.ip)
