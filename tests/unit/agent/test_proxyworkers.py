"""The channel between the agent and its proxy workers (garrison.agent.proxyworkers), over
real unix socket pairs: what a worker sends the agent is hostile input (the worker parses the
network's bytes): a malformed request never reaches `admit` and never takes the agent down;
a worker whose channel failed denies every connection after it (fails closed)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.agent.proxyworkers import (
    MAX_RECORDS_FRAME,
    MAX_REQUEST,
    AgentPolicy,
    ProxyWorkers,
    WorkerChannelError,
    WorkersConfig,
    _decode_records,
    _FrameReader,
    _Slot,
    recv_frame,
    reuseport_assign_supported,
    send_frame,
)
from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_paths
from garrison.proxy.commands import PeerInfo
from garrison.proxy.policyview import Admission, PeerMapping, StandalonePolicy
from tests.unit.flows.samples import l3_drop_denied

REPO = Path(__file__).resolve().parents[3]
DEATHSTAR = endpoint_labels(Labels.parse(["org=empire", "class=deathstar"]), "default")


@pytest.fixture(name="policy")
def fixture_policy() -> StandalonePolicy:
    loaded = load_paths([REPO / "examples" / "starwars" / "sw_l3_l4_l7_policy.yaml"])
    return StandalonePolicy(loaded.policies, DEATHSTAR, 80, L7Protocol.HTTP,
                            [PeerMapping.parse("10.0.0.2/32=org=empire,class=tiefighter")])


class Agent:
    """The agent's end of one worker's admission channel, served by `ProxyWorkers`."""

    def __init__(self, policy: StandalonePolicy, fail: bool = False) -> None:
        self.asked: list[tuple[str, str, int]] = []
        self.fail = fail
        self.policy = policy
        self.workers = ProxyWorkers(
            WorkersConfig(2, {L7Protocol.HTTP: 15001}, "node"), admit=self.admit,
            destination=lambda ip, port: PeerInfo(256, DEATHSTAR, ip, port),
            remote=None, revision=lambda: 7, emit=lambda records: None,
            metrics_dir=Path("/nonexistent"))
        self.agent_end, self.worker_end = socket.socketpair()
        self.thread = threading.Thread(target=self.workers._serve_calls,
                                       args=(_Slot(0), self.agent_end), daemon=True)
        self.thread.start()

    def admit(self, src: str, dst: str, port: int) -> Admission:
        self.asked.append((src, dst, port))
        if self.fail:
            raise RuntimeError("the resolver broke")
        return self.policy.admit(src, dst, port)


@pytest.fixture(name="agent")
def fixture_agent(policy: StandalonePolicy) -> Iterator[Agent]:
    agent = Agent(policy)
    yield agent
    agent.worker_end.close()
    agent.thread.join(5)


def test_an_admission_crosses_the_channel_as_the_agent_made_it(agent: Agent) -> None:
    broken: list[bool] = []
    worker = AgentPolicy(agent.worker_end, lambda: broken.append(True))
    got = worker.admit("10.0.0.2", "10.0.0.9", 80)
    assert got == agent.policy.admit("10.0.0.2")
    assert got.allowed and not got.ruleset.allow_all
    assert worker.destination("10.0.0.9", 80) == PeerInfo(256, DEATHSTAR, "10.0.0.9", 80)
    assert worker.remote("10.0.0.9") is False
    assert not worker.admit("10.0.0.3", "10.0.0.9", 80).allowed  # world: not admitted
    assert agent.asked == [("10.0.0.2", "10.0.0.9", 80), ("10.0.0.3", "10.0.0.9", 80)]
    assert not broken


@pytest.mark.parametrize("request_bytes", [
    b"not json",
    b"[1, 2, 3]",
    b'{"src": "10.0.0.2", "dst": "10.0.0.9"}',
    b'{"src": "10.0.0.2", "dst": "10.0.0.9", "port": 70000}',
    b'{"src": 1, "dst": "10.0.0.9", "port": 80}',
    b'{"src": "' + b"x" * 100 + b'", "dst": "10.0.0.9", "port": 80}',
])
def test_a_malformed_request_closes_the_channel_unasked(agent: Agent,
                                                        request_bytes: bytes) -> None:
    send_frame(agent.worker_end, request_bytes)
    agent.thread.join(5)
    assert not agent.thread.is_alive()  # the agent's thread ended, nothing raised
    assert agent.asked == []
    assert agent.worker_end.recv(1) == b""  # closed


def test_an_oversized_frame_closes_the_channel_unread(agent: Agent) -> None:
    agent.worker_end.sendall(struct.pack("!I", 1 << 30))
    agent.thread.join(5)
    assert not agent.thread.is_alive() and agent.asked == []


def test_a_worker_that_lost_the_agent_denies_from_then_on(agent: Agent) -> None:
    broken: list[bool] = []
    worker = AgentPolicy(agent.worker_end, lambda: broken.append(True))
    agent.agent_end.close()  # the agent's end is gone
    agent.thread.join(5)
    for _ in range(2):
        with pytest.raises(WorkerChannelError, match="the agent is unreachable"):
            worker.admit("10.0.0.2", "10.0.0.9", 80)
    assert broken == [True]  # told once: the worker exits to be restarted


def test_an_agent_that_cannot_answer_denies_that_connection_only(
    policy: StandalonePolicy,
) -> None:
    agent = Agent(policy, fail=True)
    worker = AgentPolicy(agent.worker_end, lambda: None)
    with pytest.raises(WorkerChannelError, match="could not answer"):
        worker.admit("10.0.0.2", "10.0.0.9", 80)
    agent.fail = False
    assert worker.admit("10.0.0.2", "10.0.0.9", 80).allowed  # the channel is still good
    agent.worker_end.close()
    agent.thread.join(5)


def test_records_from_a_worker_keep_the_good_lines_only() -> None:
    good = l3_drop_denied()
    body = b"\n".join([good.to_json().encode(), b"{broken", b'{"time": 5}', b"",
                       good.to_json().encode()])
    assert _decode_records(0, body) == [good, good]


def test_frames_are_length_prefixed_and_bounded() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, b"hello")
        assert recv_frame(b, 5) == b"hello"
        send_frame(a, b"toolong")
        with pytest.raises(WorkerChannelError, match="at most 5"):
            recv_frame(b, 5)


def test_the_kernel_release_that_spreads_assigned_connections() -> None:
    assert [reuseport_assign_supported(r) for r in ("6.18.0-1-amd64", "6.5.0", "6.4.16",
                                                    "5.15.0-91-generic", "10.0", "x")] == [
        True, True, False, False, True, False]


def test_on_the_event_loop_admissions_records_and_bad_frames(policy: StandalonePolicy) -> None:
    """The agent's way (`loop=`): both sockets read on its event loop."""
    good = l3_drop_denied()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: list[object] = []
        workers = ProxyWorkers(
            WorkersConfig(1, {L7Protocol.HTTP: 15001}, "node"),
            admit=lambda src, dst, port: policy.admit(src, dst, port),
            destination=lambda ip, port: PeerInfo(256, DEATHSTAR, ip, port),
            remote=None, revision=lambda: 3, emit=got.extend,
            metrics_dir=Path("/nonexistent"), loop=loop)
        slot = _Slot(0)
        calls_agent, calls_worker = socket.socketpair()
        events_agent, events_worker = socket.socketpair()
        events_worker.settimeout(5)
        _FrameReader(slot, calls_agent, loop, MAX_REQUEST, workers._on_call).start()
        _FrameReader(slot, events_agent, loop, MAX_RECORDS_FRAME, workers._on_events).start()
        worker = AgentPolicy(calls_worker, lambda: None)
        admitted = await loop.run_in_executor(None, worker.admit, "10.0.0.2", "10.0.0.9", 80)
        assert admitted == policy.admit("10.0.0.2")
        send_frame(events_worker, b"r")
        send_frame(events_worker, b"f" + good.to_json().encode() + b"\n{not a record")
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        assert slot.ready.is_set() and got == [good]
        # a request that is not one closes the admission channel; an oversized frame the
        # records' channel: the agent's loop runs on
        send_frame(calls_worker, b"not json")
        assert await loop.run_in_executor(None, calls_worker.recv, 1) == b""
        events_worker.sendall(struct.pack("!I", MAX_RECORDS_FRAME + 1))
        assert await loop.run_in_executor(None, events_worker.recv, 1) == b""
        calls_worker.close()
        events_worker.close()

    asyncio.run(main())
