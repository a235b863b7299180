"""The host routing that delivers proxy-steered packets locally.

from_container assigns a redirected packet to a proxy socket and marks it
`abi.MARK_TO_PROXY`; without a local route for its (foreign) destination the host would
forward it instead. So:

    ip rule add fwmark 0x200/0xf00 lookup 2004
    ip route add local 0.0.0.0/0 dev lo table 2004

Both are host-wide and may have been there before (another agent, an operator, a CNI set-up):
`install_proxy_steering()` says which of the two it added (`SteeringParts`), and
`remove_proxy_steering(added)` removes exactly those. The agent keeps that record in its state
directory (`SteeringRecord`), so a restarted agent, or its clean-up, knows what it made.
"""

from __future__ import annotations

import errno
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from garrison.bpf.abi import MARK_MASK, MARK_TO_PROXY, PROXY_ROUTE_TABLE
from garrison.statefile import StateFileError, write_atomically

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


@dataclass(frozen=True, slots=True)
class SteeringParts:
    """The two parts of the steering, each there or not: what an installer added, or what
    is present now."""

    rule: bool = False
    route: bool = False

    def __bool__(self) -> bool:
        return self.rule or self.route

    def __or__(self, other: SteeringParts) -> SteeringParts:
        return SteeringParts(self.rule or other.rule, self.route or other.route)


def install_proxy_steering() -> SteeringParts:
    """Idempotent: adds the rule and the local route only where missing, and says which it
    added — remove only what you installed: both are host-wide and others may rely on them."""
    rule = route = False
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
            rule = True
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
            route = True
    return SteeringParts(rule, route)


def remove_proxy_steering(added: SteeringParts) -> None:
    """Removes what `added` says was installed (the rule at our priority, the local route);
    a no-op for what is already gone. Never touches what someone else put there."""
    with IPRoute() as ipr:
        if added.rule and PROXY_RULE_PRIORITY in _our_rules(ipr):
            try:
                ipr.rule(
                    "del",
                    family=socket.AF_INET,
                    fwmark=MARK_TO_PROXY,
                    fwmask=MARK_MASK,
                    table=PROXY_ROUTE_TABLE,
                    priority=PROXY_RULE_PRIORITY,
                )
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:
                    raise
        if added.route and _local_route(ipr):
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


def proxy_steering_present() -> SteeringParts:
    """Which of the rule and the route are there now (whoever put them there)."""
    with IPRoute() as ipr:
        return SteeringParts(bool(_our_rules(ipr)), _local_route(ipr))


class SteeringRecord:
    """What an agent added, kept in `path` (JSON) across restarts until its clean-up."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> SteeringParts:
        try:
            data = json.loads(self.path.read_text())
            return SteeringParts(bool(data.get("rule")), bool(data.get("route")))
        except FileNotFoundError:
            return SteeringParts()
        except (ValueError, AttributeError) as exc:
            raise StateFileError(
                f"{self.path}: not a steering record ({exc}); write {{\"rule\": true, "
                "\"route\": true} for what this agent added (false: there before it), or "
                "remove it: then no clean-up removes the rule or route"
            ) from exc

    def install(self) -> SteeringParts:
        """Install what is missing; the record becomes what this and earlier runs added."""
        added = self.load() | install_proxy_steering()
        self._save(added)
        return added

    def remove(self) -> SteeringParts:
        """Remove what the record says was added, then the record; what was removed."""
        added = self.load()
        remove_proxy_steering(added)
        self.path.unlink(missing_ok=True)
        return added

    def _save(self, added: SteeringParts) -> None:
        write_atomically(self.path, json.dumps({"rule": added.rule, "route": added.route}))
