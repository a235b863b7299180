"""The server's shared short timer (`ProxyServer.wake_at`, in process, loopback): however often
the engines ask for a wakeup, at most one timer of the server is armed on the loop. (A wakeup
that asked again from inside the timer's run used to leave a second timer armed, each of
which re-armed itself while any wakeup was pending: tens of thousands of empty timer runs a
second under load.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.unit.proxy.test_engine_http1_server import (
    EXHAUST,
    LANDING,
    OK,
    StaticPolicy,
    Upstream,
    start_proxy,
)

pytestmark = pytest.mark.timeout(30)

REQUEST = b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\n\r\n"
DENIED = b"HTTP/1.1 403 Forbidden\r\n"


class TimerCountingLoop(asyncio.SelectorEventLoop):
    """Counts the server's shared timers armed and not yet run nor cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.armed: list[asyncio.TimerHandle] = []
        self.runs = 0

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Callable[..., object], *args: Any, **kwargs: Any
    ) -> asyncio.TimerHandle:
        if getattr(callback, "__name__", "") != "_wake_soon":
            return super().call_later(delay, callback, *args, **kwargs)
        handle: asyncio.TimerHandle | None = None

        def run(*inner: Any) -> None:
            self.runs += 1
            self.armed.remove(handle)  # type: ignore[arg-type]
            callback(*inner)

        handle = super().call_later(delay, run, *args, **kwargs)
        self.armed.append(handle)
        return handle

    def live(self) -> int:
        return sum(1 for handle in self.armed if not handle.cancelled())


async def keep_asking(loop: TimerCountingLoop, requests: int, pause: float) -> tuple[int, int]:
    """A keep-alive client asking every `pause` seconds (within `release_idle_after`, so its
    wakeups come early and ask again); the most server timers armed at once, and how many
    ran."""
    upstream = Upstream()
    await upstream.start()
    server, address = await start_proxy(upstream, StaticPolicy(LANDING))
    reader, writer = await asyncio.open_connection(*address)
    most = 0
    try:
        for i in range(requests):
            if i % 2:
                writer.write(EXHAUST)
                assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
                    DENIED
                )
                await asyncio.wait_for(reader.readuntil(b"\n"), 5)  # the body's one line
            else:
                writer.write(REQUEST)
                assert await asyncio.wait_for(reader.readexactly(len(OK)), 5) == OK
            await asyncio.sleep(pause)
            most = max(most, loop.live())
    finally:
        writer.close()
        await writer.wait_closed()
        await server.close()
        assert upstream.server is not None
        upstream.server.close()
        await upstream.server.wait_closed()
    return most, loop.runs


def test_one_shared_timer_however_often_wakeups_come_early() -> None:
    with asyncio.Runner(loop_factory=TimerCountingLoop) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, TimerCountingLoop)
        most, runs = runner.run(keep_asking(loop, 40, 0.012))
    assert most == 1
    # a run per early wakeup (every other pause) or so, not one per run of every timer left
    assert runs <= 40
