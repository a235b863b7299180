"""The node's own IPv4 addresses, and a watch that wakes when one is added or removed.

The agent gives every address of its network namespace the host identity in the ipcache
(Cilium does the same): a connection from an endpoint to the node's address on any
interface reaches the host, and must be judged as the host, not as `world`.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
from ipaddress import IPv4Address

from pyroute2 import IPRoute

_NETLINK_ROUTE = 0
_RTMGRP_IPV4_IFADDR = 0x10


def host_addresses() -> set[IPv4Address]:
    """Every IPv4 address of this network namespace but loopback's 127.0.0.0/8."""
    with IPRoute() as ipr:
        messages = ipr.get_addr(family=socket.AF_INET)
    found = set()
    for msg in messages:
        text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if text:
            address = IPv4Address(text)
            if not address.is_loopback:
                found.add(address)
    return found


class AddressWatch:
    """Readable when an IPv4 address of this network namespace was added or removed (an
    rtnetlink socket subscribed to RTMGRP_IPV4_IFADDR); the caller lists them again."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
        self._sock.bind((0, _RTMGRP_IPV4_IFADDR))
        self._sock.setblocking(False)

    def wait(self, timeout: float) -> bool:
        """True when addresses may have changed within `timeout` seconds."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return False
        while True:  # drain: one listing answers every message read so far
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # messages lost: list again, as for a change
                    continue
                raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
