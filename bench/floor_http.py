"""The floor of the design: the least a Python HTTP/1.1 proxy on uvloop + httptools can do.

Run: .venv/bin/python bench/floor_http.py LISTEN_PORT UPSTREAM_PORT

Used by `bench/proxy_http.py` as a reference measured in the same run as garrison and haproxy.
Per client connection one upstream connection; httptools (llhttp) finds where each request and
each response ends; the bytes are relayed as they came. No policy, no normalization, no flow
records, no metrics, no limits or timeouts. garrison's CPU per request cannot go below this
with the same event loop and parser, so it bounds what the aims in BENCHMARKS.md can ask of a
CPython proxy.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import httptools  # type: ignore[import-untyped]
import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)  # finds the end of each response, as a proxy must
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.held: list[bytes] = []
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(self._connect(loop))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        _t, upstream = await loop.create_connection(
            lambda: _Upstream(self), "127.0.0.1", self.upstream_port)
        self.upstream = upstream
        for data in self.held:
            self._send(data)
        self.held.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)  # finds the end of each request, as a proxy must
        if self.upstream is None:
            self.held.append(data)
        else:
            self._send(data)

    def _send(self, data: bytes) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        self.upstream.transport.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def _serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_port), "127.0.0.1", listen_port,
                                      backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


def main() -> int:
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    uvloop.run(_serve(listen_port, upstream_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
