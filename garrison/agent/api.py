"""The agent's local API: gRPC on a unix socket (root only, mode 0600), JSON messages.

Every method is unary: a JSON object in, a JSON object out, under the service
`garrison.Agent`. Messages are JSON rather than protobuf so the API needs no generated code
and `grpcurl`-style debugging stays readable; errors are gRPC status codes with a message
that names the cause and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

# The agent's netlink plumbing forks (pyroute2 enters network namespaces in a child process)
# while API threads are inside gRPC; gRPC's fork handlers then crash the child. The child never
# uses gRPC, so the handlers are not needed. Must be set before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc

SERVICE = "garrison.Agent"

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class APIError(Exception):
    """A handler's refusal: becomes a gRPC status with this message."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(message)
        self.code = code


class AgentUnreachableError(Exception):
    """No agent answers on the socket."""


def _decode(data: bytes) -> dict[str, Any]:
    value = json.loads(data or b"{}")
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _encode(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, default=str).encode()


class AgentAPIServer:
    def __init__(self, socket_path: Path, handlers: Mapping[str, Handler]) -> None:
        self.socket_path = socket_path
        self._handlers = dict(handlers)
        self._server: grpc.Server | None = None

    def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.socket_path.exists():
            self.socket_path.unlink()  # a stale socket of a crashed agent
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        method_handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(fn), request_deserializer=_decode, response_serializer=_encode
            )
            for name, fn in self._handlers.items()
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, method_handlers),)
        )
        old_umask = os.umask(0o177)  # the socket is created 0600: root only
        try:
            server.add_insecure_port(f"unix:{self.socket_path}")
            server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        self._server = server

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    @staticmethod
    def _wrap(fn: Handler) -> Callable[[dict[str, Any], grpc.ServicerContext], dict[str, Any]]:
        def call(request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
            try:
                return fn(request)
            except APIError as exc:
                context.abort(exc.code, str(exc))
            except Exception as exc:
                context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            raise AssertionError("unreachable")

        return call


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel: grpc.Channel | None = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        if not self.socket_path.exists():
            raise AgentUnreachableError(
                f"no agent socket at {self.socket_path}: start it with `garrison agent` "
                "(as root), or pass --socket"
            )
        if not os.access(self.socket_path, os.R_OK | os.W_OK):
            raise AgentUnreachableError(
                f"{self.socket_path}: permission denied; the agent API is root only"
            )
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.socket_path}")
        stub = self._channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=_encode, response_deserializer=_decode
        )
        try:
            result: dict[str, Any] = stub(params, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise AgentUnreachableError(
                    f"the agent at {self.socket_path} does not answer: is `garrison agent` "
                    "running?"
                ) from exc
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise APIError(str(details), code or grpc.StatusCode.UNKNOWN) from exc
        return result
