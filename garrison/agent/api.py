"""The agent's local API: gRPC on a unix socket (root only, mode 0600), JSON messages.

Every method is unary: a JSON object in, a JSON object out, under the service
`garrison.Agent`. Messages are JSON rather than protobuf so the API needs no generated code
and `grpcurl`-style debugging stays readable; errors are gRPC status codes with a message
that names the cause and the fix.

Audit trail. gRPC does not tell a handler who called (on a unix socket its peer is just
`unix:`), so the agent accepts on the public socket itself, reads the caller's
`SO_PEERCRED` (uid, gid, pid), and relays the connection to the gRPC server on a private
socket beside it (`.NAME.grpc`, root only), from a client socket bound to an abstract name
that the handler's `context.peer()` then shows. Every call that changes state (all but
`READ_ONLY`) is logged on `garrison.audit` as one JSON line: method, caller, request,
outcome and the policy revision after it.

The front socket relays at most `MAX_CONNECTIONS` connections at once (more are closed, and
logged, until some end), and outlives running out of descriptors (it retries the accept): a
client that leaks connections can neither take the descriptors the proxy accepts with nor
leave the API dead.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The agent's netlink plumbing forks (pyroute2 enters network namespaces in a child process)
# while API threads are inside gRPC; gRPC's fork handlers then crash the child. The child never
# uses gRPC, so the handlers are not needed. Must be set before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc

SERVICE = "garrison.Agent"

Handler = Callable[[dict[str, Any]], dict[str, Any]]

# Methods that only read: not in the audit trail (every other method is, new ones included).
READ_ONLY = frozenset({
    "Status", "Flows", "FlowsSince", "EndpointList", "EndpointGet", "PolicyGet", "IdentityList",
    "NamespaceGet", "NamespaceList",
    "IdentityGet", "BpfPolicyGet", "BpfIpcacheList", "BpfCtList",
})

audit_log = logging.getLogger("garrison.audit")
log = logging.getLogger("garrison.agent.api")

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# API connections relayed at once (each holds two threads and three descriptors): a client
# that opens connections and never closes them cannot take the descriptors the proxy needs.
MAX_CONNECTIONS = 128


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is on the other end of an API connection (the kernel says so: SO_PEERCRED)."""

    uid: int
    gid: int
    pid: int


class APIError(Exception):
    """A handler's refusal: becomes a gRPC status with this message."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(message)
        self.code = code


# Trailing metadata on a handler's refusal: an UNAVAILABLE the agent answered (etcd away) is
# not an agent that does not answer.
_REFUSAL_KEY = "garrison-refusal"


def _agent_refused(exc: grpc.RpcError) -> bool:
    trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    return any(key == _REFUSAL_KEY for key, _ in trailing or ())


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
    def __init__(
        self,
        socket_path: Path,
        handlers: Mapping[str, Handler],
        revision: Callable[[], int] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.grpc_path = socket_path.with_name(f".{socket_path.name}.grpc")
        self._handlers = dict(handlers)
        self._revision = revision
        self._server: grpc.Server | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._callers: dict[str, Caller] = {}
        self._callers_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()

    def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (self.socket_path, self.grpc_path):
            if path.exists():
                path.unlink()  # a stale socket of a crashed agent
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        method_handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, fn), request_deserializer=_decode, response_serializer=_encode
            )
            for name, fn in self._handlers.items()
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, method_handlers),)
        )
        old_umask = os.umask(0o177)  # the sockets are created 0600: root only
        try:
            server.add_insecure_port(f"unix:{self.grpc_path}")
            server.start()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.grpc_path, 0o600)
        os.chmod(self.socket_path, 0o600)
        listener.listen(64)
        self._server = server
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept, args=(listener,), name="garrison-api-accept", daemon=True
        )
        self._accept_thread.start()

    def stop(self, grace: float = 1.0) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        self.socket_path.unlink(missing_ok=True)
        self.grpc_path.unlink(missing_ok=True)

    # -- the front socket: who called -------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        refusing = False  # warned about the current streak of refusals
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return  # closed by stop()
                # out of descriptors or memory (EMFILE, ENFILE, ENOBUFS): the API must outlive
                # it, not stop answering for good
                if not refusing:
                    log.warning("API: cannot accept a connection: %s; retrying", exc)
                refusing = True
                time.sleep(0.1)
                continue
            with self._callers_lock:
                full = len(self._callers) >= MAX_CONNECTIONS
            if full:
                if not refusing:
                    log.warning("API: %d connections open, refusing new ones until some close"
                                " (a client that opens connections and never closes them?)",
                                MAX_CONNECTIONS)
                refusing = True
                conn.close()
                continue
            refusing = False
            try:
                self._relay(conn)
            except OSError as exc:
                log.warning("API connection dropped: %s", exc)
                conn.close()

    def _relay(self, conn: socket.socket) -> None:
        pid, uid, gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        name = f"garrison-api-{os.getpid()}-{next(self._ids)}"
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind(f"\0{name}")
            upstream.connect(str(self.grpc_path))
        except OSError:
            upstream.close()
            raise
        peer = f"unix-abstract:{name}"
        with self._callers_lock:
            self._callers[peer] = Caller(uid, gid, pid)
        ends = [2]  # the two directions still open; the last one to end closes both

        def ended() -> None:
            with self._callers_lock:
                ends[0] -= 1
                if ends[0]:
                    return
                self._callers.pop(peer, None)
            conn.close()
            upstream.close()

        for src, dst in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pump, args=(src, dst, ended), daemon=True,
                             name="garrison-api-relay").start()

    def caller_of(self, peer: str) -> Caller | None:
        with self._callers_lock:
            return self._callers.get(peer)

    # -- handlers and the audit trail --------------------------------------------------------

    def _wrap(
        self, method: str, fn: Handler
    ) -> Callable[[dict[str, Any], grpc.ServicerContext], dict[str, Any]]:
        audited = method not in READ_ONLY

        def call(request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
            try:
                result = fn(request)
            except APIError as exc:
                if audited:
                    self._audit(method, request, context, f"refused: {exc}")
                # the agent's own refusal, also when its code is UNAVAILABLE (etcd away)
                context.set_trailing_metadata(((_REFUSAL_KEY, "1"),))
                context.abort(exc.code, str(exc))
            except Exception as exc:
                if audited:
                    self._audit(method, request, context, f"failed: {type(exc).__name__}")
                context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            else:
                if audited:
                    self._audit(method, request, context, "ok")
                return result
            raise AssertionError("unreachable")

        return call

    def _audit(
        self, method: str, request: dict[str, Any], context: grpc.ServicerContext, outcome: str
    ) -> None:
        caller = self.caller_of(context.peer())
        entry: dict[str, Any] = {
            "audit": method,
            "uid": caller.uid if caller else None,
            "gid": caller.gid if caller else None,
            "pid": caller.pid if caller else None,
            "request": request,
            "outcome": outcome,
        }
        if self._revision is not None:
            with contextlib.suppress(Exception):
                entry["policy_revision"] = self._revision()
        audit_log.info("%s", json.dumps(entry, default=str, sort_keys=False))


def _pump(src: socket.socket, dst: socket.socket, ended: Callable[[], None]) -> None:
    """Copy one direction; at its end pass the end on (or, after an error, end both)."""
    how = socket.SHUT_WR
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        how = socket.SHUT_RDWR
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        dst.shutdown(how)
    ended()


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
        try:
            os.stat(self.socket_path)
        except PermissionError:  # a directory on the way is root only
            raise AgentUnreachableError(self._root_only()) from None
        except OSError:
            raise AgentUnreachableError(
                f"no agent socket at {self.socket_path}: start it with `garrison agent` "
                "(as root), or pass --socket"
            ) from None
        if not os.access(self.socket_path, os.R_OK | os.W_OK):
            raise AgentUnreachableError(self._root_only())
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.socket_path}")
        stub = self._channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=_encode, response_deserializer=_decode
        )
        try:
            result: dict[str, Any] = stub(params, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAVAILABLE and not _agent_refused(exc):
                raise AgentUnreachableError(
                    f"the agent at {self.socket_path} does not answer: is `garrison agent` "
                    "running?"
                ) from exc
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise APIError(str(details), code or grpc.StatusCode.UNKNOWN) from exc
        return result

    def _root_only(self) -> str:
        return (f"permission denied on {self.socket_path}: the agent API is root only; "
                "run the command as root (sudo garrison ...)")
