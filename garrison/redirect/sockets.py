"""Socket options the proxy needs to work with the datapath."""

from __future__ import annotations

import socket

from garrison.bpf.abi import MARK_PROXY_UPSTREAM

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)


def set_transparent(sock: socket.socket) -> None:
    """For the proxy's listener: accept connections steered to it whose destination is not
    a local address; `getsockname()` of an accepted socket is the original destination.
    Needs CAP_NET_ADMIN."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def set_upstream_mark(sock: socket.socket) -> None:
    """For the proxy's upstream sockets: the datapath admits their connections as the
    proxy's (see garrison/bpf/abi.h, GAR_MARK_PROXY_UPSTREAM). Needs CAP_NET_ADMIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK_PROXY_UPSTREAM)
