"""Attaching the endpoint programs to a host-side veth: clsact + direct-action bpf filters.

Both filters use a fixed priority and handle, so attaching again (an upgrade, a restarted
agent) is a `replace` that swaps the program atomically: packets see the old or the new
program, never none.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from garrison.bpf.loader import EndpointPrograms

PARENT_INGRESS = 0xFFFFFFF2  # ffff:fff2, clsact ingress: from_container
PARENT_EGRESS = 0xFFFFFFF3  # ffff:fff3, clsact egress: to_container
FILTER_PRIO = 1
FILTER_HANDLE = 1
ETH_P_ALL = 0x0003


@dataclass(frozen=True, slots=True)
class AttachedFilter:
    parent: int
    name: str


def _replace_filter(ipr: IPRoute, ifindex: int, parent: int, fd: int, name: str) -> None:
    ipr.tc(
        "replace-filter",
        "bpf",
        ifindex,
        FILTER_HANDLE,
        fd=fd,
        name=name,
        parent=parent,
        classid=1,
        direct_action=True,
        prio=FILTER_PRIO,
        protocol=ETH_P_ALL,
    )


OUR_FILTERS = frozenset({"from_container", "to_container", "from_netdev"})


class ForeignFilterError(Exception):
    """The device already has a filter of someone else's where garrison's would go."""


def attach_endpoint_programs(ifindex: int, programs: EndpointPrograms) -> bool:
    """clsact on the host veth (kept if present), from_container at ingress and
    to_container at egress (replaced if present). True when this call created the clsact.

    A filter of someone else's at garrison's priority is never replaced: that is an error."""
    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
            created = True
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            created = False
        if not created:
            foreign = [
                f for f in _filters(ipr, ifindex)
                if f[1] == FILTER_PRIO and f[2] not in OUR_FILTERS
            ]
            if foreign:
                raise ForeignFilterError(
                    f"interface {ifindex} already has a tc filter at priority {FILTER_PRIO} "
                    f"({foreign[0][2]}); garrison leaves it alone: remove it first"
                )
        _replace_filter(ipr, ifindex, PARENT_INGRESS, programs.from_container, "from_container")
        _replace_filter(ipr, ifindex, PARENT_EGRESS, programs.to_container, "to_container")
        return created


def attach_netdev_program(ifindex: int, program: int) -> bool:
    """from_netdev at tc ingress of a cluster node's underlay device (a clsact added when
    missing; True when this call created it). A filter of someone else's at garrison's
    priority is never replaced: that is an error."""
    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
            created = True
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            created = False
        foreign = [
            f for f in _filters(ipr, ifindex)
            if f[0] == PARENT_INGRESS and f[1] == FILTER_PRIO and f[2] != "from_netdev"
        ]
        if foreign:
            raise ForeignFilterError(
                f"interface {ifindex} already has a tc ingress filter at priority {FILTER_PRIO}"
                f" ({foreign[0][2]}); garrison leaves it alone: remove it first"
            )
        _replace_filter(ipr, ifindex, PARENT_INGRESS, program, "from_netdev")
        return created


def detach_netdev_program(ifindex: int, remove_qdisc: bool) -> None:
    """Remove from_netdev (and the clsact when garrison created it); a no-op when absent."""
    _detach(ifindex, remove_qdisc, frozenset({(PARENT_INGRESS, "from_netdev")}))


def detach_endpoint_programs(ifindex: int, remove_qdisc: bool = True) -> None:
    """Remove the clsact qdisc (and with it both filters), or with `remove_qdisc=False` (a
    clsact garrison did not create) only garrison's two filters; a no-op when absent."""
    _detach(ifindex, remove_qdisc, None)


def _detach(ifindex: int, remove_qdisc: bool,
            only: frozenset[tuple[int, str]] | None) -> None:
    """The clsact qdisc, or garrison's filters at FILTER_PRIO: those named in OUR_FILTERS, or
    only the (parent, name) pairs of `only`. Already gone is not an error."""
    gone = (errno.ENOENT, errno.EINVAL, errno.ENODEV)
    with IPRoute() as ipr:
        if remove_qdisc:
            try:
                ipr.tc("del", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code not in gone:
                    raise
            return
        for parent, prio, name in _filters(ipr, ifindex):
            if prio != FILTER_PRIO or name not in OUR_FILTERS:
                continue
            if only is not None and (parent, name) not in only:
                continue
            try:
                ipr.tc("del-filter", "bpf", ifindex, FILTER_HANDLE, parent=parent, prio=prio,
                       protocol=ETH_P_ALL)
            except NetlinkError as exc:
                if exc.code not in gone:
                    raise


def _filters(ipr: IPRoute, ifindex: int) -> list[tuple[int, int, str]]:
    """(parent, priority, name) of every filter on the clsact hooks (a bpf filter's program
    name; `<kind> filter` for others)."""
    out = []
    for parent in (PARENT_INGRESS, PARENT_EGRESS):
        try:
            msgs = ipr.get_filters(index=ifindex, parent=parent)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                continue
            raise
        for msg in msgs:
            kind = msg.get_attr("TCA_KIND")
            opts = msg.get_attr("TCA_OPTIONS")
            if kind == "bpf":
                name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
                if name is None:
                    continue  # the priority's head message, not a filter instance
            else:
                name = f"{kind} filter"
            out.append((parent, int(msg["info"] >> 16), str(name)))
    return out


def attached_filters(ifindex: int) -> list[AttachedFilter]:
    """The bpf filters on the device's clsact hooks."""
    out = []
    with IPRoute() as ipr:
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            try:
                msgs = ipr.get_filters(index=ifindex, parent=parent)
            except NetlinkError as exc:
                if exc.code in (errno.EINVAL, errno.ENOENT):
                    continue
                raise
            for msg in msgs:
                if msg.get_attr("TCA_KIND") != "bpf":
                    continue
                opts = msg.get_attr("TCA_OPTIONS")
                name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
                if name is not None:
                    out.append(AttachedFilter(parent, str(name)))
    return out


def has_clsact(ifindex: int) -> bool:
    with IPRoute() as ipr:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))
