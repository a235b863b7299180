#!/usr/bin/env python3
"""The Death Star: the HTTP/1.1 service of the Star Wars scenario (asyncio + httptools).

    python examples/starwars/deathstar.py --listen 127.0.0.1:8000

- `POST /v1/request-landing` → 200 `Ship landed\\n`
- `PUT /v1/exhaust-port` → 503 `Panic: deathstar exploded\\n`
- `GET /v1/` → 200 with a small JSON description
- `POST|PUT /v1/echo` → 200, the request body streamed back (chunked) as it arrives
- `GET /v1/download?bytes=N` → 200, N bytes streamed (chunked)
- `GET /v1/headers` → 200, the request's header fields as JSON (to see header edits)
- `GET /v1/stats` → 200, `{"requests": N}`: requests this process has received (tests ask it
  directly, not through the proxy, to prove that a request never reached the app)
- anything else → 404

Keep-alive and pipelining: responses go out in request order; the connection closes after a
request that asks for it. Reading pauses while the client is slow to read its answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools

_DESCRIPTION = {
    "name": "Death Star",
    "model": "DS-1 Orbital Battle Station",
    "manufacturer": "Imperial Department of Military Research, Sienar Fleet Systems",
    "cost_in_credits": "1000000000000",
    "length": "120000",
    "crew": "342953",
    "passengers": "843342",
    "cargo_capacity": "1000000000000",
    "hyperdrive_rating": "4.0",
    "starship_class": "Deep Space Mobile Battlestation",
    "api": ["GET   /v1", "POST  /v1/request-landing", "PUT   /v1/exhaust-port"],
}

_CHUNK = 64 * 1024
_MAX_QUEUED = 64


def _response(status: str, body: bytes, content_type: bytes, keep_alive: bool) -> bytes:
    close = b"" if keep_alive else b"Connection: close\r\n"
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status.encode(), content_type, len(body), close, body
    )


def _chunked_head(keep_alive: bool) -> bytes:
    close = b"" if keep_alive else b"Connection: close\r\n"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n" + close + b"\r\n"
    )


class _Download:
    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


_CLOSE = object()


class DeathStarProtocol(asyncio.Protocol):
    """One client connection. Responses are queued in order and written by one task."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.out: asyncio.Queue[object] = asyncio.Queue()
        self.writable = asyncio.Event()
        self.writable.set()
        self.writer: asyncio.Task[None] | None = None
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.echo = False
        self.reading_paused = False
        self.done = False

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.writer = asyncio.get_running_loop().create_task(self._write_loop())

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.out.put_nowait(
                _response("400 Bad Request", b"Bad Request\n", b"text/plain", False)
            )
            self.out.put_nowait(_CLOSE)
            self.done = True
        if self.out.qsize() > _MAX_QUEUED and not self.reading_paused and self.transport:
            self.transport.pause_reading()
            self.reading_paused = True

    def eof_received(self) -> bool:
        self.out.put_nowait(_CLOSE)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.writable.set()
        if self.writer is not None:
            self.writer.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.stats["requests"] += 1
        self.url = b""
        self.headers = []
        self.echo = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        method = self.parser.get_method()
        path = urlsplit(self.url.decode("latin-1")).path
        if path == "/v1/echo" and method in (b"POST", b"PUT"):
            self.echo = True
            self.out.put_nowait(_chunked_head(self.parser.should_keep_alive()))

    def on_body(self, body: bytes) -> None:
        if self.echo and body:
            self.out.put_nowait(b"%x\r\n%s\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        if self.echo:
            self.out.put_nowait(b"0\r\n\r\n")
        else:
            self.out.put_nowait(self._answer(keep_alive))
        if not keep_alive:
            self.out.put_nowait(_CLOSE)
            self.done = True

    def _answer(self, keep_alive: bool) -> object:
        method = self.parser.get_method()
        split = urlsplit(self.url.decode("latin-1"))
        path = split.path
        if path == "/v1/request-landing" and method == b"POST":
            return _response("200 OK", b"Ship landed\n", b"text/plain", keep_alive)
        if path == "/v1/exhaust-port" and method == b"PUT":
            return _response(
                "503 Service Unavailable", b"Panic: deathstar exploded\n", b"text/plain",
                keep_alive,
            )
        if path in ("/v1", "/v1/") and method in (b"GET", b"HEAD"):
            body = json.dumps(_DESCRIPTION).encode() + b"\n"
            answer = _response("200 OK", body, b"application/json", keep_alive)
            if method == b"HEAD":
                return answer[: answer.index(b"\r\n\r\n") + 4]
            return answer
        if path == "/v1/stats" and method == b"GET":
            body = json.dumps(self.stats).encode() + b"\n"
            return _response("200 OK", body, b"application/json", keep_alive)
        if path == "/v1/headers" and method == b"GET":
            body = json.dumps(self.headers).encode() + b"\n"
            return _response("200 OK", body, b"application/json", keep_alive)
        if path == "/v1/download" and method == b"GET":
            try:
                size = int(parse_qs(split.query).get("bytes", ["0"])[0])
            except ValueError:
                size = -1
            if size >= 0:
                return [_chunked_head(keep_alive), _Download(size)]
        return _response("404 Not Found", b"Not found\n", b"text/plain", keep_alive)

    # -- writing ------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        transport = self.transport
        assert transport is not None
        while True:
            item = await self.out.get()
            if self.reading_paused and self.out.qsize() < _MAX_QUEUED // 2:
                transport.resume_reading()
                self.reading_paused = False
            items = item if isinstance(item, list) else [item]
            for part in items:
                if part is _CLOSE:
                    transport.close()
                    return
                if isinstance(part, _Download):
                    await self._download(part.size)
                else:
                    assert isinstance(part, bytes)
                    transport.write(part)
                await self.writable.wait()
                if self.done and transport.is_closing():
                    return

    async def _download(self, size: int) -> None:
        assert self.transport is not None
        piece = b"D" * _CHUNK
        left = size
        while left > 0:
            n = min(left, _CHUNK)
            self.transport.write(b"%x\r\n%s\r\n" % (n, piece[:n]))
            left -= n
            await self.writable.wait()
            if self.transport.is_closing():
                return
        self.transport.write(b"0\r\n\r\n")


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stats = {"requests": 0}
    server = await loop.create_server(
        lambda: DeathStarProtocol(stats), host, port, reuse_address=True
    )
    bound = server.sockets[0].getsockname()
    print(f"deathstar listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(host or "127.0.0.1", int(port)))
    except OSError as exc:
        print(f"deathstar: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
