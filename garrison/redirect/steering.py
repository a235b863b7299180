"""The host routing that delivers proxy-steered packets locally.

from_container assigns a redirected packet to a proxy socket and marks it
`abi.MARK_TO_PROXY`; without a local route for its (foreign) destination the host would
forward it instead. So:

    ip rule add fwmark 0x200/0xf00 lookup 2004
    ip route add local 0.0.0.0/0 dev lo table 2004
"""

from __future__ import annotations

import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from garrison.bpf.abi import MARK_MASK, MARK_TO_PROXY, PROXY_ROUTE_TABLE

PROXY_RULE_PRIORITY = 9  # before the main table (32766); after the local one (0)
RTN_LOCAL = 2
SCOPE_HOST = 254


def _our_rules(ipr: IPRoute) -> list[int]:
    out = []
    for rule in ipr.get_rules(family=socket.AF_INET):
        if (
            rule.get_attr("FRA_FWMARK") == MARK_TO_PROXY
            and rule.get_attr("FRA_FWMASK") == MARK_MASK
            and (rule.get_attr("FRA_TABLE") or rule["table"]) == PROXY_ROUTE_TABLE
        ):
            out.append(int(rule.get_attr("FRA_PRIORITY") or 0))
    return out


def _local_route(ipr: IPRoute) -> bool:
    for route in ipr.get_routes(family=socket.AF_INET, table=PROXY_ROUTE_TABLE):
        if route["type"] == RTN_LOCAL and route["dst_len"] == 0:
            return True
    return False


def install_proxy_steering() -> bool:
    """Idempotent: adds the rule and the local route only where missing. Returns whether
    this call added anything — remove only what you installed: the rule is host-wide and
    another agent may rely on it."""
    added = False
    with IPRoute() as ipr:
        if not _our_rules(ipr):
            ipr.rule(
                "add",
                family=socket.AF_INET,
                fwmark=MARK_TO_PROXY,
                fwmask=MARK_MASK,
                table=PROXY_ROUTE_TABLE,
                priority=PROXY_RULE_PRIORITY,
            )
            added = True
        if not _local_route(ipr):
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.route(
                "replace",
                dst="0.0.0.0/0",
                type="local",
                oif=lo,
                table=PROXY_ROUTE_TABLE,
                scope=SCOPE_HOST,
            )
            added = True
    return added


def remove_proxy_steering() -> None:
    """Removes the rule(s) and the route; a no-op for what is already gone."""
    with IPRoute() as ipr:
        for priority in _our_rules(ipr):
            try:
                ipr.rule(
                    "del",
                    family=socket.AF_INET,
                    fwmark=MARK_TO_PROXY,
                    fwmask=MARK_MASK,
                    table=PROXY_ROUTE_TABLE,
                    priority=priority,
                )
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:
                    raise
        if _local_route(ipr):
            lo = ipr.link_lookup(ifname="lo")[0]
            try:
                ipr.route(
                    "del",
                    dst="0.0.0.0/0",
                    type="local",
                    oif=lo,
                    table=PROXY_ROUTE_TABLE,
                    scope=SCOPE_HOST,  # must match: pyroute2 sends another scope otherwise
                )
            except NetlinkError as exc:
                if exc.code != errno.ESRCH:
                    raise


def proxy_steering_installed() -> bool:
    with IPRoute() as ipr:
        return bool(_our_rules(ipr)) and _local_route(ipr)
