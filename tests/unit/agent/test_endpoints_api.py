"""The endpoint registry (persistence, address allocation) and the local API over a real
unix socket with a real gRPC client."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from garrison.agent.api import AgentAPIServer, AgentClient, AgentUnreachableError, APIError
from garrison.agent.endpoints import EndpointError, EndpointRecord, EndpointRegistry

POOL = ipaddress.IPv4Network("198.18.0.0/15")


def record(name: str, ip: str) -> EndpointRecord:
    return EndpointRecord(0, name, "default", ("org=empire",), ip)


def test_registry_allocates_lowest_free_address_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "state" / "endpoints.json"
    reg = EndpointRegistry(path, POOL)
    a = reg.add(record("deathstar", reg.allocate_ip()))
    b = reg.add(record("tiefighter", reg.allocate_ip()))
    assert (a.id, a.ipv4) == (1, "198.18.0.2")
    assert (b.id, b.ipv4) == (2, "198.18.0.3")
    reg.remove("deathstar")
    assert reg.allocate_ip() == "198.18.0.2"  # freed addresses are reused
    again = EndpointRegistry(path, POOL)
    assert [e.name for e in again] == ["tiefighter"]
    assert again.get("2").name == "tiefighter"
    assert again.by_ip("198.18.0.3") is not None
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # ids keep increasing across restarts
    assert again.add(record("xwing", again.allocate_ip())).id == 3


@pytest.mark.parametrize(
    ("name", "ip", "message"),
    [
        ("-starts-with-a-dash", None, "use 1-253 letters, digits"),
        ("has space", None, "use 1-253 letters, digits"),
        ("x" * 254, None, "use 1-253 letters, digits"),
        ("ok", "10.0.0.1", "must come from 198.18.0.0/15"),
        ("ok", "not-an-ip", "--ip 'not-an-ip'"),
    ],
)
def test_registry_refuses_with_a_reason(
    tmp_path: Path, name: str, ip: str | None, message: str
) -> None:
    reg = EndpointRegistry(tmp_path / "endpoints.json", POOL)
    with pytest.raises(EndpointError, match=message):
        reg.add(record(name, reg.allocate_ip(ip)))


def test_registry_refuses_duplicates_and_unknown_names(tmp_path: Path) -> None:
    reg = EndpointRegistry(tmp_path / "endpoints.json", POOL)
    reg.add(record("xwing", reg.allocate_ip()))
    with pytest.raises(EndpointError, match="already exists"):
        reg.add(record("xwing", reg.allocate_ip()))
    with pytest.raises(EndpointError, match=r"already used"):
        reg.allocate_ip("198.18.0.2")
    with pytest.raises(EndpointError, match=r"no endpoint 'nope' \(known: xwing\)"):
        reg.get("nope")


def test_api_round_trip_over_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "agent.sock"

    def echo(req: dict[str, Any]) -> dict[str, Any]:
        return {"got": req}

    def refuse(req: dict[str, Any]) -> dict[str, Any]:
        raise APIError("no endpoint 'x' (known: none)", grpc.StatusCode.NOT_FOUND)

    def crash(req: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    server = AgentAPIServer(sock, {"Echo": echo, "Refuse": refuse, "Crash": crash})
    server.start()
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with AgentClient(sock, timeout=5) as client:
            assert client.call("Echo", a=1, b=["x"]) == {"got": {"a": 1, "b": ["x"]}}
            with pytest.raises(APIError, match="no endpoint 'x'") as info:
                client.call("Refuse")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(APIError, match="RuntimeError: boom"):
                client.call("Crash")
            assert client.call("Echo") == {"got": {}}  # the API survives a crashing handler
    finally:
        server.stop()
    assert not sock.exists()


def test_client_says_how_to_start_the_agent(tmp_path: Path) -> None:
    with pytest.raises(AgentUnreachableError, match="start it with `garrison agent`"):
        AgentClient(tmp_path / "none.sock").call("Status")
