"""The plugin's line to the agent: one JSON request and one JSON answer per connection on a
unix socket beside the agent's API socket (`agent.sock` → `agent-cni.sock`, root only).

The agent's main API is gRPC; importing grpc alone costs the plugin ~165 ms per container
start (measured, bench/cni.py), more than the whole budget of a CNI ADD. This socket serves the
CNI methods only, with the same handlers. Standard library only: the plugin imports nothing
else.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

CNI_METHODS = ("CniAdd", "CniDel", "CniCheck", "CniGc", "CniStatus")
MAX_MESSAGE = 1 << 20


class AgentUnreachable(Exception):
    """No agent listens on the socket."""


class AgentRefused(Exception):
    """The agent answered with an error; the message says why."""


def cni_socket_for(agent_socket: str) -> str:
    """The CNI socket of the agent whose API socket is `agent_socket`."""
    head, tail = os.path.split(agent_socket)
    stem = tail[: -len(".sock")] if tail.endswith(".sock") else tail
    return os.path.join(head, f"{stem}-cni.sock")


def read_message(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError("message too large")
    try:
        value = json.loads(data or b"null")
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def write_message(sock: socket.socket, value: dict[str, Any]) -> None:
    sock.sendall(json.dumps(value, default=str).encode() + b"\n")


def call(path: str, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnreachable(f"{path}: {exc.strerror}") from None
        write_message(sock, {"method": method, "params": params})
        answer = read_message(sock)
    finally:
        sock.close()
    if not answer.get("ok"):
        raise AgentRefused(str(answer.get("error") or "no answer"))
    result = answer.get("result")
    return result if isinstance(result, dict) else {}
