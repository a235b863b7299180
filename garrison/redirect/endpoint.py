"""An endpoint's network: a network namespace joined to the host by a veth pair.

    netns NAME                               host
    eth0  198.18.x.y/32  <--veth-->  garXXXXXXXXXX (gateway address /32)
    routes: gateway dev eth0 (link)          route: 198.18.x.y/32 dev garXXXXXXXXXX
            198.18.0.0/15 via gateway               src gateway
                                             forwarding on this interface only

Endpoints reach each other through the host (the datapath sits on the host-side veth) and
nothing else: the namespace has no default route. Every address is from 198.18.0.0/15; the
gateway address (shared by every host veth, the host's side of each link) defaults to
198.19.255.254 and must not be handed to an endpoint. IPv6 is disabled on both ends.

`create_endpoint` is idempotent (what exists is kept or replaced); `delete_endpoint` removes
the veth pair, its routes and qdiscs (they go with the device) and the namespace.

Adoption (`adopt_endpoint`) governs a namespace someone else made (a container runtime's, a
hand-made one): when its interface is already a veth to the host, that veth is used as it is;
otherwise garrison adds a veth of its own. Every object garrison adds is noted in an
`Ownership`; a failed adoption and `release_endpoint` remove exactly those, so the namespace,
its interfaces, addresses and routes are left as they were.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

ENDPOINT_RANGE = IPv4Network("198.18.0.0/15")
DEFAULT_GATEWAY = IPv4Address("198.19.255.254")
CONTAINER_IFNAME = "eth0"
SCOPE_LINK = 253
NETNS_DIR = Path("/var/run/netns")


class EndpointNetworkError(Exception):
    """An endpoint's network could not be created as asked."""


def host_ifname_for(name: str) -> str:
    """The host-side veth name of endpoint `name` (stable, 13 characters, whatever the length
    of `name`: interface names are at most 15 bytes)."""
    return "gar" + hashlib.sha256(name.encode()).hexdigest()[:10]


@dataclass(frozen=True, slots=True)
class Ownership:
    """What garrison created for an endpoint; a clean-up removes exactly this.

    `netns`: the named namespace; `veth`: the veth pair (the addresses and routes garrison puts
    on it, inside and on the host, and its qdiscs go with it); `clsact`: the clsact qdisc on a
    veth garrison did not make (else only garrison's two filters are removed from it). An
    adopted namespace's own veth is never owned: garrison only attaches programs to it. An
    endpoint garrison made whole owns all three.
    """

    netns: bool = False
    veth: bool = False
    clsact: bool = False

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Ownership:
        return cls(**{k: bool(data.get(k)) for k in ("netns", "veth", "clsact")})


OWNS_ALL = Ownership(netns=True, veth=True, clsact=True)


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """`name` names the network namespace (as `ip netns` shows it)."""

    name: str
    ipv4: IPv4Address
    gateway: IPv4Address = DEFAULT_GATEWAY
    routes: tuple[IPv4Network, ...] = (ENDPOINT_RANGE,)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or len(self.name) > 253:
            raise EndpointNetworkError(f"invalid endpoint name {self.name!r}")
        if self.ipv4 not in ENDPOINT_RANGE or self.ipv4 == self.gateway:
            raise EndpointNetworkError(
                f"endpoint address {self.ipv4} must be in {ENDPOINT_RANGE} and not the "
                f"gateway {self.gateway}"
            )

    @property
    def host_ifname(self) -> str:
        return host_ifname_for(self.name)


@dataclass(frozen=True, slots=True)
class EndpointLink:
    """What exists once an endpoint's network is up."""

    name: str
    ipv4: IPv4Address
    host_ifname: str
    host_ifindex: int
    container_ifname: str
    gateway: IPv4Address
    owned: Ownership = field(default=OWNS_ALL)


def _write_sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def _in_netns(name: str, paths: dict[str, str]) -> None:
    """Write sysctls inside namespace `name` (the calling thread enters it meanwhile)."""
    netns.pushns(name)
    try:
        for path, value in paths.items():
            _write_sysctl(path, value)
    finally:
        netns.popns()


def _ensure_netns(name: str) -> None:
    if name not in netns.listnetns():
        netns.create(name)


def create_endpoint(spec: EndpointSpec) -> EndpointLink:
    _ensure_netns(spec.name)
    _in_netns(
        spec.name,
        {
            "net/ipv6/conf/all/disable_ipv6": "1",
            "net/ipv6/conf/default/disable_ipv6": "1",
        },
    )
    host_if = spec.host_ifname
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=host_if):
            try:
                ipr.link(
                    "add",
                    ifname=host_if,
                    kind="veth",
                    peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": spec.name},
                )
            except NetlinkError as exc:
                raise EndpointNetworkError(
                    f"creating veth {host_if} <-> {spec.name}/{CONTAINER_IFNAME}: {exc}"
                ) from exc
        index = ipr.link_lookup(ifname=host_if)[0]
        _write_sysctl(f"net/ipv6/conf/{host_if}/disable_ipv6", "1")
        _write_sysctl(f"net/ipv4/conf/{host_if}/forwarding", "1")
        ipr.link("set", index=index, state="up")
        ipr.addr("replace", index=index, address=str(spec.gateway), prefixlen=32)
        ipr.route(
            "replace",
            dst=f"{spec.ipv4}/32",
            oif=index,
            scope=SCOPE_LINK,
            prefsrc=str(spec.gateway),
        )
    with IPRoute(netns=spec.name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")
        peer = ns.link_lookup(ifname=CONTAINER_IFNAME)
        if not peer:
            raise EndpointNetworkError(f"{spec.name}: {CONTAINER_IFNAME} missing in namespace")
        eth = peer[0]
        ns.link("set", index=eth, state="up")
        ns.addr("replace", index=eth, address=str(spec.ipv4), prefixlen=32)
        ns.route("replace", dst=f"{spec.gateway}/32", oif=eth, scope=SCOPE_LINK)
        for net in spec.routes:
            ns.route("replace", dst=str(net), gateway=str(spec.gateway), oif=eth)
    return EndpointLink(
        spec.name, spec.ipv4, host_if, index, CONTAINER_IFNAME, spec.gateway
    )


def delete_endpoint(name: str) -> None:
    """Remove everything `create_endpoint(name)` made; a no-op for what is already gone."""
    host_if = host_ifname_for(name)
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=host_if):
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
    if name in netns.listnetns():
        with contextlib.suppress(FileNotFoundError):
            netns.remove(name)


def endpoint_exists(name: str) -> bool:
    with IPRoute() as ipr:
        has_link = bool(ipr.link_lookup(ifname=host_ifname_for(name)))
    return has_link or name in netns.listnetns()


# -- adoption: namespaces garrison did not create ---------------------------------------------

_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def _netns_socket(netns_path: str) -> Iterator[IPRoute]:
    """An rtnetlink socket inside the namespace at `netns_path`, opened by entering it on the
    calling thread only (setns) and coming straight back: pyroute2's `IPRoute(netns=...)`
    forks a helper process for that, ~20 ms each (a CNI ADD made four)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(netns_path) as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise EndpointNetworkError(f"entering {netns_path}: {os.strerror(err)}")
        try:
            ipr = IPRoute()
            ipr.link_lookup(ifname="lo")  # the socket exists (bound to this namespace) now
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                # this thread would act inside the workload's namespace: never go on
                os.write(2, b"garrison: could not return to the host network namespace\n")
                os._exit(70)
    try:
        yield ipr
    finally:
        ipr.close()


def netns_path_of(netns_path: str | None = None, pid: int | None = None) -> str:
    """The namespace file to adopt: a path (or an `ip netns` name), or that of process `pid`."""
    if pid is not None:
        path = f"/proc/{pid}/ns/net"
    elif netns_path:
        path = netns_path if "/" in netns_path else str(NETNS_DIR / netns_path)
    else:
        raise EndpointNetworkError("give --netns PATH or --pid PID")
    if not os.path.exists(path):
        raise EndpointNetworkError(f"no network namespace at {path}")
    return path


def _is_root_netns(path: str) -> bool:
    here = os.stat("/proc/self/ns/net")
    there = os.stat(path)
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def probe_interface(
    netns_path: str, ifname: str
) -> tuple[tuple[int, str] | None, IPv4Address | None]:
    """What `ifname` in the namespace at `netns_path` is, in one look: the host-side (ifindex,
    name) of its veth peer, and its first IPv4 address; (None, None) when it does not exist.

    The peer is found from the link's `IFLA_LINK` (the peer's ifindex) and
    `IFLA_LINK_NETNSID`, checked from the host's side: that link must point back at `ifname`'s
    index, in the namespace with the id the host gives `netns_path`. An interface that exists
    and is not a veth to the host, or whose host side is a bridge port, is an error.
    """
    with _netns_socket(netns_path) as ns:
        links = ns.get_links(ifname=ifname) if ns.link_lookup(ifname=ifname) else []
        if not links:
            return None, None
        link = links[0]
        addrs = ns.get_addr(family=2, index=link["index"])
        ipv4 = IPv4Address(addrs[0].get_attr("IFA_ADDRESS")) if addrs else None
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    peer_index = link.get_attr("IFLA_LINK")
    if kind != "veth" or link.get_attr("IFLA_LINK_NETNSID") is None or not peer_index:
        raise EndpointNetworkError(
            f"{netns_path}: {ifname} exists and is not a veth to the host (kind "
            f"{kind or 'unknown'}); pass --interface with a name not in use and garrison adds "
            "its own veth"
        )
    fd = os.open(netns_path, os.O_RDONLY)
    try:
        with IPRoute() as ipr:
            nsid = ipr.get_netnsid(fd=fd).get("nsid")
            try:
                host = ipr.get_links(peer_index)[0]
            except NetlinkError:
                host = None
    finally:
        os.close(fd)
    if (
        host is None
        or host.get_attr("IFLA_LINK") != link["index"]
        or host.get_attr("IFLA_LINK_NETNSID") != nsid
    ):
        raise EndpointNetworkError(
            f"{netns_path}: the peer of veth {ifname} is not in the host's namespace; "
            "garrison attaches its programs to a host-side veth"
        )
    host_name = str(host.get_attr("IFLA_IFNAME"))
    if host.get_attr("IFLA_MASTER"):
        # measured: on a bridge, L3/L4 holds but an L7-denied request reaches the workload
        raise EndpointNetworkError(
            f"the host side of {ifname}, {host_name}, is a bridge port: traffic between the "
            "bridge's workloads is switched at layer 2 and never reaches garrison's L7 proxy, "
            "so L7 rules would not hold; route it instead (CNI: ptp, as `garrison cni "
            "install` writes; by hand: a veth with no master)"
        )
    return (int(host["index"]), host_name), ipv4


def adopt_endpoint(
    name: str,
    netns_path: str,
    ifname: str = CONTAINER_IFNAME,
    ipv4: IPv4Address | None = None,
    gateway: IPv4Address = DEFAULT_GATEWAY,
    routes: tuple[IPv4Network, ...] = (ENDPOINT_RANGE,),
) -> EndpointLink:
    """Govern the namespace at `netns_path`. An existing veth `ifname` to the host is used as
    it is (nothing is changed on either end; its address is the endpoint's); otherwise a veth
    of garrison's own joins it, addressed `ipv4`. On failure only what was added is removed."""
    if _is_root_netns(netns_path):
        raise EndpointNetworkError(
            f"{netns_path} is the host's own network namespace; adopt a workload's namespace"
        )
    peer, found = probe_interface(netns_path, ifname)
    if peer is not None:
        index, host_if = peer
        if found is None:
            raise EndpointNetworkError(
                f"{netns_path}: {ifname} has no IPv4 address; garrison identifies traffic by it"
            )
        if ipv4 is not None and ipv4 != found:
            raise EndpointNetworkError(
                f"{netns_path}: {ifname} has address {found}, not {ipv4}; leave out --ip"
            )
        return EndpointLink(name, found, host_if, index, ifname, gateway, Ownership())
    if ipv4 is None:
        raise EndpointNetworkError(f"{name}: an address is needed for a new veth")
    host_if = host_ifname_for(name)
    owned = Ownership()
    try:
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=host_if):
                raise EndpointNetworkError(
                    f"{host_if} already exists on the host (another endpoint named {name!r}?)"
                )
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                ipr.link("add", ifname=host_if, kind="veth",
                         peer={"ifname": ifname, "net_ns_fd": fd})
            except NetlinkError as exc:
                raise EndpointNetworkError(
                    f"creating veth {host_if} <-> {netns_path}/{ifname}: {exc}"
                ) from exc
            finally:
                os.close(fd)
            owned = Ownership(veth=True)
            index = ipr.link_lookup(ifname=host_if)[0]
            _write_sysctl(f"net/ipv6/conf/{host_if}/disable_ipv6", "1")
            _write_sysctl(f"net/ipv4/conf/{host_if}/forwarding", "1")
            ipr.link("set", index=index, state="up")
            ipr.addr("replace", index=index, address=str(gateway), prefixlen=32)
            try:
                ipr.route("add", dst=f"{ipv4}/32", oif=index, scope=SCOPE_LINK,
                          prefsrc=str(gateway))
            except NetlinkError as exc:
                raise EndpointNetworkError(
                    f"route to {ipv4}/32 on the host: {exc} (is the address in use?)"
                ) from exc
        # everything inside goes on garrison's own interface: it leaves with the veth
        with _netns_socket(netns_path) as ns:
            eth = ns.link_lookup(ifname=ifname)[0]
            ns.link("set", index=eth, state="up")
            ns.addr("add", index=eth, address=str(ipv4), prefixlen=32)
            ns.route("add", dst=f"{gateway}/32", oif=eth, scope=SCOPE_LINK)
            for net in routes:
                try:
                    ns.route("add", dst=str(net), gateway=str(gateway), oif=eth)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                    # the namespace routes this range itself: keep its route
    except BaseException:
        release_endpoint(host_if, owned)
        raise
    return EndpointLink(name, ipv4, host_if, index, ifname, gateway, owned)


def release_endpoint(host_ifname: str, owned: Ownership) -> None:
    """Remove exactly what `owned` says garrison created; a no-op for what is already gone."""
    if owned.veth:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=host_ifname):
                try:
                    ipr.link("del", index=index)
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise
