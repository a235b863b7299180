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
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
from dataclasses import dataclass
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
    """The host-side veth name of endpoint `name` (stable, 13 characters)."""
    return "gar" + hashlib.sha256(name.encode()).hexdigest()[:10]


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """`name` names the network namespace (as `ip netns` shows it)."""

    name: str
    ipv4: IPv4Address
    gateway: IPv4Address = DEFAULT_GATEWAY
    routes: tuple[IPv4Network, ...] = (ENDPOINT_RANGE,)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or len(self.name) > 64:
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
