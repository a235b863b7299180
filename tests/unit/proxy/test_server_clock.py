"""The server's timers under a step of the wall clock (in process, loopback): `time.time()` jumping
an hour forwards neither fires a timeout early, nor does a jump backwards stall one. (The
server used to poll engines' timers against `time.time()`: both happened.)"""

from __future__ import annotations

import asyncio
import time

import pytest

from garrison.flows.record import Verdict
from garrison.proxy.config import ProxyConfig, Timeouts
from tests.unit.proxy.test_engine_http1_server import (
    LANDING,
    StaticPolicy,
    Upstream,
    in_loop,
    records,
    start_proxy,
)

pytestmark = pytest.mark.timeout(30)

PARTIAL = b"POST /v1/request-landing HTTP/1.1\r\nHost:"
HEADER_READ = 1.0


def step_wall_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


@in_loop
async def test_a_wall_clock_step_forwards_fires_no_timeout(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ProxyConfig(timeouts=Timeouts(header_read=HEADER_READ))
    server, address = await start_proxy(upstream, StaticPolicy(LANDING), config)
    reader, writer = await asyncio.open_connection(*address)
    writer.write(PARTIAL)
    await asyncio.sleep(0.2)
    step_wall_clock(monkeypatch, 3600.0)
    started = time.monotonic()
    await asyncio.sleep(0.4)  # four sweeps after the step: a wall-clock timer fired here
    assert not reader.at_eof() and not records(server, lambda r: r.verdict is Verdict.ERROR)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert time.monotonic() - started >= HEADER_READ - 0.2 - 0.4 - 0.05
    writer.close()
    await server.close()


@in_loop
async def test_a_wall_clock_step_backwards_stalls_no_timeout(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ProxyConfig(timeouts=Timeouts(header_read=HEADER_READ))
    server, address = await start_proxy(upstream, StaticPolicy(LANDING), config)
    reader, writer = await asyncio.open_connection(*address)
    writer.write(PARTIAL)
    await asyncio.sleep(0.2)
    step_wall_clock(monkeypatch, -3600.0)
    # A wall-clock timer would wait an hour more; the monotonic one runs out on time.
    answer = await asyncio.wait_for(reader.read(), HEADER_READ + 1.0)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    writer.close()
    await server.close()
