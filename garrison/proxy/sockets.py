"""Sockets the proxy server needs beyond what asyncio makes: transparent listeners and marked
upstream sockets.

- A transparent listener (`IP_TRANSPARENT`) accepts connections the datapath assigned to it
  with `bpf_sk_assign` whatever their destination address; the accepted socket's
  `getsockname()` is the original destination. Needs CAP_NET_ADMIN.
- Upstream sockets carry `SO_MARK` = the datapath's proxy-upstream mark, so the tc program at
  the destination recognises the proxy's own connection and does not redirect it again.
  Needs CAP_NET_ADMIN too; standalone mode sets no mark.
- An upstream socket toward another node's endpoint leaves from the client's address
  (`source`: `IP_TRANSPARENT` and a bind to it), so the other node judges the client's
  identity; the datapath hands its replies back to it by its mark (garrison/bpf/lib/proxy.h).
- Several worker processes share one port with `SO_REUSEPORT` (the kernel spreads new
  connections over their listeners by a hash of the 4-tuple); the parent holds a bound,
  not listening, socket on the port (`listen=False`) so port 0 resolves once for all.
- Listeners take the system's largest accept queue (`net.core.somaxconn`), not Python's 100:
  a burst of connects beyond the queue waits as SYN cookies or retransmitted SYNs.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from garrison.bpf.abi import MARK_PROXY_UPSTREAM

# Linux values; the socket module lacks IP_TRANSPARENT on some builds.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
SO_MARK = getattr(socket, "SO_MARK", 36)


# The datapath's one definition (`GAR_MARK_PROXY_UPSTREAM` in garrison/bpf/abi.h).
PROXY_UPSTREAM_MARK = MARK_PROXY_UPSTREAM


_SOMAXCONN = "/proc/sys/net/core/somaxconn"


def system_backlog(path: str = _SOMAXCONN) -> int:
    """The kernel's cap on a listener's accept queue (`net.core.somaxconn`; 4096 on Linux
    since 5.4); `socket.SOMAXCONN` where it cannot be read."""
    try:
        with open(path, encoding="ascii") as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return socket.SOMAXCONN
    return value if value > 0 else socket.SOMAXCONN


class ListenError(OSError):
    """A listener could not be opened; the message says why, for the operator."""


def family_of(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def listener(
    host: str,
    port: int,
    *,
    transparent: bool = False,
    reuse_port: bool = False,
    backlog: int | None = None,
    listen: bool = True,
) -> socket.socket:
    """A listening, non-blocking TCP socket on host:port (port 0 picks a free one), with an
    accept queue of `backlog` (default: `system_backlog()`). `listen=False`: bound only —
    with `reuse_port`, a reservation of the port for worker processes that listen on it with
    `SO_REUSEPORT` (a bound socket that does not listen is never given a connection)."""
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            except PermissionError as exc:
                raise ListenError(
                    exc.errno, "IP_TRANSPARENT needs CAP_NET_ADMIN (run as root)"
                ) from exc
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(exc.errno, f"{host}:{port} is already in use") from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ListenError(exc.errno, f"{host} is not an address of this host") from exc
            raise ListenError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        if listen:
            sock.listen(system_backlog() if backlog is None else backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class UpstreamSourceError(OSError):
    """An upstream socket could not take the client's address as its source."""


def upstream_socket(host: str, mark: int | None, source: str | None = None) -> socket.socket:
    """A non-blocking TCP socket for connecting to `host`, marked when `mark` is given.
    `source`: the address it leaves from — an address of another host (a local endpoint's, in
    its own network namespace), so the socket is transparent (`IP_TRANSPARENT`, CAP_NET_ADMIN)
    and bound to it with a port the kernel picks."""
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source is not None:
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((source, 0))
            except PermissionError as exc:
                raise UpstreamSourceError(
                    exc.errno, "IP_TRANSPARENT needs CAP_NET_ADMIN (run as root)"
                ) from exc
            except OSError as exc:
                raise UpstreamSourceError(
                    exc.errno, f"cannot leave from {source}: {exc.strerror or exc}"
                ) from exc
    except BaseException:
        sock.close()
        raise
    return sock
