"""A node's flow records, read-only, for the other nodes (Hubble's port 4244, without TLS).

`FlowAPIServer` serves one agent's flow ring (`garrison.flows.store.FlowStore`) over gRPC on
TCP, service `garrison.Flows`, two unary methods with JSON messages as the local API's:

- `Flows` `{"query", "limit"|"first"}` → `{"flows": [record JSON...], "cursor", "ring"}`: the
  newest `limit` (or the oldest `first`) matching records and the cursor after them;
- `FlowsSince` `{"query", "cursor"}` → `{"flows", "cursor", "missed", "ring"}`: the records
  added since `cursor` (a follower polls it).

`ring` names this server's ring (random, new with every agent process): a follower that sees
it change knows the cursor it holds means nothing any more (the agent restarted).

The server holds the flow store and nothing else: no method of it can change the agent's
state. It is unauthenticated plaintext, as a Hubble server without TLS: flow records carry
addresses, labels and HTTP paths, so it belongs on the node network only (docs/cluster.md).
Requests are bounded (64 KiB, a few at a time); a bad one is refused with INVALID_ARGUMENT.

`FlowAPIClient` is the reader's side (`garrison observe --cluster`, `garrison.cluster.relay`).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

from garrison.cluster.keys import parse_host_port
from garrison.flows.errors import FilterError
from garrison.flows.query import FlowQuery
from garrison.flows.store import FlowStore

# The agent forks (pyroute2) while gRPC threads run; set before grpc is first imported, as
# garrison.agent.api does.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc

SERVICE = "garrison.Flows"
METHODS = ("Flows", "FlowsSince")
DEFAULT_PORT = 4244  # Hubble's
MAX_REQUEST_BYTES = 64 * 1024
# The ring's records as JSON: 10,000 records of a few KiB each stay under this; a reader
# never takes more from one node.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
WORKERS = 2
MAX_CONCURRENT = 8
DEFAULT_LIMIT = 100

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class FlowAPIError(Exception):
    """The flow API could not start, or a node's flow API did not answer as one."""


class BadRequestError(ValueError):
    """A request the server refuses (INVALID_ARGUMENT), with why."""


def _count(req: Mapping[str, Any], name: str, default: int | None, cap: int) -> int | None:
    value = req.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequestError(f"{name}: expected a non-negative integer, got {value!r}")
    return min(value, cap)


def _query(req: Mapping[str, Any]) -> Any:
    raw = req.get("query")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequestError("query: expected a JSON object")
    try:
        return FlowQuery.from_dict(raw).compile()
    except FilterError as exc:
        raise BadRequestError(f"query: {exc}") from exc


def flow_handlers(store: FlowStore) -> dict[str, Handler]:
    """The two read-only methods over `store`: nothing else is reachable from them."""
    ring = secrets.token_hex(8)

    def flows(req: dict[str, Any]) -> dict[str, Any]:
        query = _query(req)
        first = _count(req, "first", None, store.capacity)
        if first is not None:
            cursor = store.total
            records = store.query(query, limit=first)
            return {"flows": [r.to_json() for r in records], "cursor": cursor, "ring": ring}
        limit = _count(req, "limit", DEFAULT_LIMIT, store.capacity)
        assert limit is not None
        batch = store.tail(limit, query)
        return {"flows": [r.to_json() for r in batch.records], "cursor": batch.cursor,
                "ring": ring}

    def flows_since(req: dict[str, Any]) -> dict[str, Any]:
        query = _query(req)
        cursor = _count(req, "cursor", 0, 2**62)
        assert cursor is not None
        batch = store.since(cursor, query)
        return {
            "flows": [r.to_json() for r in batch.records],
            "cursor": batch.cursor,
            "missed": batch.missed,
            "ring": ring,
        }

    return {"Flows": flows, "FlowsSince": flows_since}


def _unary(fn: Handler) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    def call(data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            try:
                req = json.loads((data or b"{}").decode("utf-8"))
            except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
                raise BadRequestError(f"the request is not UTF-8 JSON: {exc}") from None
            if not isinstance(req, dict):
                raise BadRequestError("the request is not a JSON object")
            result = fn(req)
        except BadRequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # never the agent's problem: the caller learns what failed
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return json.dumps(result).encode()

    return call


class FlowAPIServer:
    """`host:port` → the read-only flow methods over `store`. Port 0 picks one: `address`
    says which after `start()`."""

    def __init__(self, store: FlowStore, host: str, port: int) -> None:
        self._handlers = flow_handlers(store)
        self.host = host
        self.port = port
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> str:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="flow-api"),
            maximum_concurrent_rpcs=MAX_CONCURRENT,
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
                # one listener per address: a second agent on it fails instead of sharing
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(
                SERVICE,
                {name: grpc.unary_unary_rpc_method_handler(_unary(fn))
                 for name, fn in self._handlers.items()},
            ),
        ))
        try:
            port = server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError as exc:  # grpcio >= 1.5x raises where older ones returned 0
            port = 0
            reason = str(exc)
        else:
            reason = "address in use or not on this node"
        if not port:
            server.stop(None)
            raise FlowAPIError(
                f"--flow-api {self.host}:{self.port}: cannot listen ({reason}); give an address"
                " of this node and a free port, or --flow-api none"
            )
        server.start()
        self.port = port
        self._server = server
        return self.address

    def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None


class FlowAPIClient:
    """One node's flow API. Every call raises `FlowAPIError` with a one-line reason."""

    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        host, port = parse_host_port(address)  # ValueError for a bad published address
        self.address = f"{host}:{port}"
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                ("grpc.enable_http_proxy", 0),  # node addresses, never through a proxy
            ],
        )

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            data = stub(json.dumps(params).encode(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise FlowAPIError(_describe(exc, self.timeout_s)) from None
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise FlowAPIError(f"answered with no JSON ({exc})") from None
        flows = doc.get("flows") if isinstance(doc, dict) else None
        cursor = doc.get("cursor") if isinstance(doc, dict) else None
        if (
            not isinstance(flows, list)
            or not all(isinstance(f, str) for f in flows)
            or isinstance(cursor, bool)
            or not isinstance(cursor, int)
            or not isinstance(doc.get("ring", ""), str)
        ):
            raise FlowAPIError("answered something that is not a flow API answer")
        out: dict[str, Any] = doc
        return out


def _describe(exc: grpc.RpcError, timeout_s: float) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout_s:g} s"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"unreachable ({details})"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"answer too large or node busy ({details}); ask for fewer records (--last N)"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "no garrison flow API there (UNIMPLEMENTED)"
    name = code.name if code is not None else "error"
    return f"{name}: {details}"
