"""Routes to other nodes' pod CIDRs through their node IPs (Cilium's auto-direct-node-routes).

Only routes this object added are changed or removed: a route to the same CIDR that was there
before (someone else's) is left alone, and reported. Which routes an agent added is kept in its
state directory (`ROUTES_RECORD`), so a restart takes back its own routes and `--cleanup`
removes only those: another agent's routes in the same network namespace carry the same
protocol number, and are not this agent's to take or remove.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from garrison.statefile import StateFileError, write_atomically

log = logging.getLogger("garrison.cluster")

# The protocol number our routes carry (`ip route show proto 0xa7`): recognisable, and not one
# of the well-known ones in /etc/iproute2/rt_protos.
ROUTE_PROTO = 0xA7

# In the agent's state directory: {"routes": {"CIDR": "node IP", ...}}, what it added.
ROUTES_RECORD = "node-routes.json"


class RouteError(RuntimeError):
    """A route to another node's pod CIDR could not be installed; the message says why."""


def _load_record(path: Path) -> dict[ipaddress.IPv4Network, ipaddress.IPv4Address]:
    try:
        data = json.loads(path.read_text())
        return {
            ipaddress.IPv4Network(cidr): ipaddress.IPv4Address(via)
            for cidr, via in data["routes"].items()
        }
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateFileError(
            f"{path}: not a record of node routes ({exc}); remove it: then no restart or"
            " clean-up takes or removes the routes an earlier run added (`ip route show proto"
            " 0xa7` lists them)"
        ) from exc


class NodeRoutes:
    """The routes of one agent. `record`: the file in its state directory that says which
    routes it added (None: kept in memory only)."""

    def __init__(self, record: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._routes: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
        self._record = record

    def adopt_existing(self) -> None:
        """Take over the routes an earlier run of this agent left (in its record, and in the
        kernel with our protocol number): a clean stop keeps them, so traffic between nodes
        flows while the agent restarts. Routes of other agents are left alone."""
        if self._record is None:
            return
        recorded = _load_record(self._record)
        with self._lock, IPRoute() as ipr:
            for route in ipr.get_routes(family=2, table=254):
                gateway = route.get_attr("RTA_GATEWAY")
                dst = route.get_attr("RTA_DST")
                if route.get("proto") == ROUTE_PROTO and gateway and dst:
                    cidr = ipaddress.IPv4Network(f"{dst}/{route['dst_len']}")
                    if recorded.get(cidr) == ipaddress.IPv4Address(gateway):
                        self._routes[cidr] = recorded[cidr]
            if recorded:
                self._save()  # without those the kernel lost meanwhile

    def _save(self) -> None:
        """Write the record (called with the lock held, after every change)."""
        if self._record is None:
            return
        routes = {str(cidr): str(via) for cidr, via in sorted(self._routes.items())}
        try:
            write_atomically(self._record, json.dumps({"routes": routes}))
        except OSError as exc:  # the route works; only a later clean-up would miss it
            log.error("cannot record the node routes in %s: %s", self._record, exc)

    def installed(self) -> dict[ipaddress.IPv4Network, ipaddress.IPv4Address]:
        with self._lock:
            return dict(self._routes)

    def _foreign(self, ipr: IPRoute, cidr: ipaddress.IPv4Network) -> bool:
        # A dump, filtered here: get_routes(dst=...) would be a lookup, not a filter.
        for route in ipr.get_routes(family=2, table=254):
            if (
                route.get("dst_len") == cidr.prefixlen
                and route.get_attr("RTA_DST") == str(cidr.network_address)
                and route.get("proto") != ROUTE_PROTO
            ):
                return True
        return False

    def set(self, cidr: ipaddress.IPv4Network, via: ipaddress.IPv4Address) -> None:
        with self._lock, IPRoute() as ipr:
            if self._routes.get(cidr) == via:
                return
            if cidr not in self._routes and self._foreign(ipr, cidr):
                raise RouteError(
                    f"a route to {cidr} that garrison did not add exists; remove it or give the"
                    " node another --pod-cidr"
                )
            try:
                ipr.route("replace", dst=str(cidr), gateway=str(via), proto=ROUTE_PROTO, table=254)
            except NetlinkError as exc:
                raise RouteError(
                    f"cannot route {cidr} via {via}: {exc.args[-1] if exc.args else exc};"
                    f" is {via} on a directly connected network?"
                ) from None
            self._routes[cidr] = via
            self._save()

    def restore_missing(self) -> list[tuple[ipaddress.IPv4Network, str | None]]:
        """Add again the routes this object holds that the kernel no longer has (their link
        went down — the kernel flushes its routes — or someone deleted them); each CIDR with
        None when added, or why not (then it is tried again at the next call)."""
        out: list[tuple[ipaddress.IPv4Network, str | None]] = []
        with self._lock, IPRoute() as ipr:
            present = {
                (route.get_attr("RTA_DST"), route.get("dst_len"), route.get_attr("RTA_GATEWAY"))
                for route in ipr.get_routes(family=2, table=254)
                if route.get("proto") == ROUTE_PROTO
            }
            for cidr, via in self._routes.items():
                if (str(cidr.network_address), cidr.prefixlen, str(via)) in present:
                    continue
                if self._foreign(ipr, cidr):
                    out.append((cidr, f"a route to {cidr} that garrison did not add exists;"
                                      " remove it or give the node another --pod-cidr"))
                    continue
                try:
                    ipr.route("replace", dst=str(cidr), gateway=str(via), proto=ROUTE_PROTO,
                              table=254)
                except NetlinkError as exc:
                    out.append((cidr, f"cannot route {cidr} via {via}:"
                                      f" {exc.args[-1] if exc.args else exc}; is {via} on a"
                                      " directly connected network?"))
                else:
                    out.append((cidr, None))
        return out

    def remove(self, cidr: ipaddress.IPv4Network) -> None:
        with self._lock:
            via = self._routes.pop(cidr, None)
            if via is None:
                return
            self._save()
            with IPRoute() as ipr:
                try:
                    ipr.route("del", dst=str(cidr), gateway=str(via), proto=ROUTE_PROTO, table=254)
                except NetlinkError as exc:
                    log.warning("route to %s via %s already gone: %s", cidr, via, exc)

    def close(self) -> None:
        """Remove every route this object holds (`remove_node_routes` for a stopped agent)."""
        for cidr in list(self.installed()):
            self.remove(cidr)


def remove_node_routes(state_dir: Path) -> list[str]:
    """`garrison agent --cleanup`: remove the routes to other nodes' pod CIDRs that the agent
    of `state_dir` left (in its record and in the kernel); what was removed, as `CIDR via IP`.
    Raises StateFileError for a record that cannot be read."""
    record = state_dir / ROUTES_RECORD
    routes = NodeRoutes(record)
    routes.adopt_existing()
    removed = [f"{cidr} via {via}" for cidr, via in sorted(routes.installed().items())]
    routes.close()
    record.unlink(missing_ok=True)
    return removed


def source_address_towards(host: str) -> ipaddress.IPv4Address:
    """The address this node sends from towards `host` (its node IP when none is given)."""
    try:
        target = ipaddress.IPv4Address(host.strip("[]"))
    except ValueError:
        raise RouteError(f"give --node-ip: etcd endpoint {host!r} is not an IPv4 address") from None
    if target.is_loopback:
        raise RouteError(
            f"give --node-ip: etcd is on loopback ({target}), so its route names no node address"
        )
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(target))
        except NetlinkError as exc:
            raise RouteError(f"give --node-ip: no route to etcd at {target}: {exc}") from None
    for route in routes:
        src = route.get("RTA_PREFSRC") or route.get_attr("RTA_PREFSRC")
        if src:
            return ipaddress.IPv4Address(src)
    raise RouteError(f"give --node-ip: the route to etcd at {target} names no source address")


def interface_with_address(address: ipaddress.IPv4Address) -> int | None:
    """The index of the interface that holds `address` (the node IP), None when none does."""
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            if msg.get_attr("IFA_ADDRESS") == str(address):
                return int(msg["index"])
    return None
