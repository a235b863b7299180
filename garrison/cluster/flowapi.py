"""A node's flow records, read-only, for the other nodes (Hubble's port 4244), over TLS or mTLS.

`FlowAPIServer` serves one agent's flow ring (`garrison.flows.store.FlowStore`) over gRPC on
TCP, service `garrison.Flows`, two unary methods with JSON messages as the local API's:

- `Flows` `{"query", "limit"|"first"}` → `{"flows": [record JSON...], "cursor", "ring"}`: the
  newest `limit` (or the oldest `first`) matching records and the cursor after them;
- `FlowsSince` `{"query", "cursor"}` → `{"flows", "cursor", "missed", "ring"}`: the records
  added since `cursor` (a follower polls it).

`ring` names this server's ring (random, new with every agent process): a follower that sees
it change knows the cursor it holds means nothing any more (the agent restarted).

The server holds the flow store and nothing else: no method of it can change the agent's
state. Requests are bounded (64 KiB, a few at a time); a bad one is refused with
INVALID_ARGUMENT. Connections are bounded too (`MAX_CONNECTIONS` at once; one that has not
finished its handshake in 10 s, or is idle for 5 minutes, is closed): a host that can reach the
port cannot take the descriptors of the agent's process.

TLS, as Hubble's: with `ServerTLS` (`--flow-api-tls-cert/-key`, read and checked by
`load_server_tls` before the agent starts) the server speaks TLS, and with its `client_ca`
(`--flow-api-tls-client-ca`) it asks every reader for a certificate that CA issued (mTLS).
The node's record says so (`NodeRecord.flow_api_tls`). The files are watched, as Hubble's
certloader does: at a new connection, at most once a second, the server looks whether any of
them changed (a renewed certificate, a new client CA) and hands gRPC the new ones for the
handshakes from then on; files that do not load (a certificate written before its key) are
reported and the last good ones kept (`CertificateReloader`). Without TLS it is unauthenticated
plaintext, as a Hubble server without TLS: flow records carry addresses, labels and HTTP
paths, so it then belongs on the node network only (docs/cluster.md).

`FlowAPIClient` is the reader's side (`garrison observe --cluster`, `garrison.cluster.relay`):
plaintext, or TLS with `ReaderTLS` (`--flow-api-ca`, default the system's CA roots;
`--flow-api-cert/-key` for mTLS; `load_reader_tls`). The node's certificate must chain to the
CA and carry the IP it publishes as an IP SAN (gRPC checks the host dialled). A failed
handshake is a `FlowAPIError` naming the cause and the flag that fixes it; never a fallback
to plaintext. The file checks and the reading of gRPC's TLS errors are the etcd client's
(`garrison.tlsfiles`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from garrison.cluster.keys import parse_host_port
from garrison.flows.errors import FilterError
from garrison.flows.query import FlowQuery
from garrison.flows.store import FlowStore
from garrison.tlsfiles import (
    TLSFailure,
    TLSFileError,
    classify_tls_failure,
    load_ca,
    load_cert_pair,
    system_roots,
    verify_reason,
)

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
# Connections held at once (more are closed at once), and how long one that has not finished
# its handshake, or is idle after it, is kept: each holds a descriptor of the agent's process,
# which its proxy accepts with.
MAX_CONNECTIONS = 256
HANDSHAKE_TIMEOUT_MS = 10_000
IDLE_TIMEOUT_MS = 5 * 60_000
DEFAULT_LIMIT = 100

Handler = Callable[[dict[str, Any]], dict[str, Any]]

log = logging.getLogger("garrison.cluster")


class FlowAPIError(Exception):
    """The flow API could not start, or a node's flow API did not answer as one."""


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """The flow API's TLS (`--flow-api-tls-cert/-key`), files read and checked; `client_ca`
    set (`--flow-api-tls-client-ca`): readers must show a certificate it issued (mTLS)."""

    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)
    # the (cert, key, client CA) files read, which the server watches; None: bytes given
    files: tuple[Path, Path, Path | None] | None = None

    @property
    def mode(self) -> str:
        return "mtls" if self.client_ca is not None else "tls"


def load_server_tls(cert_file: Path | None, key_file: Path | None,
                    client_ca_file: Path | None) -> ServerTLS | None:
    """The agent's flags checked before anything starts (None: plaintext); `TLSFileError`
    (a `ValueError`) names the flag, the file and the fix."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise TLSFileError(
                f"--flow-api-tls-client-ca {client_ca_file}: client certificates are asked"
                " over TLS only; give --flow-api-tls-cert and --flow-api-tls-key too"
            )
        return None
    if cert_file is None or key_file is None:
        raise TLSFileError(
            "--flow-api-tls-cert and --flow-api-tls-key go together: give both (the flow"
            " API's server certificate, with this node's IP as an IP SAN, and its private"
            " key) or neither"
        )
    cert, key = load_cert_pair("--flow-api-tls-cert", cert_file, "--flow-api-tls-key",
                               key_file, "the flow API's server certificate")
    client_ca = None
    if client_ca_file is not None:
        client_ca = load_ca("--flow-api-tls-client-ca", client_ca_file,
                            "the CA bundle (PEM) that issues the readers' client certificates")
    return ServerTLS(cert, key, client_ca, (cert_file, key_file, client_ca_file))


def _signature(files: tuple[Path, Path, Path | None]) -> tuple[tuple[int, int, int], ...]:
    """What changes when one of `files` is rewritten or replaced (a renamed-in copy, the
    `..data` symlink swap of a Kubernetes secret volume): inode, size, mtime."""
    out = []
    for path in files:
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        out.append((st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else (0, 0, 0))
    return tuple(out)


class CertificateReloader:
    """gRPC's certificate fetcher for a server whose `ServerTLS` came from files: called at
    every new connection, it looks at the files at most every `interval_s` seconds and
    returns the new configuration when they changed and load, else None (keep the current
    one). Calls may overlap (handshakes on several threads): the worst is one reload done
twice. `reloads` counts the reloads that took."""

    def __init__(self, tls: ServerTLS, *, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert tls.files is not None
        self.tls = tls
        self._files = tls.files
        self._seen = _signature(tls.files)
        self._interval_s = interval_s
        self._clock = clock
        self._next = clock() + interval_s
        self.reloads = 0

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        now = self._clock()
        if now < self._next:
            return None
        self._next = now + self._interval_s
        seen = _signature(self._files)
        if seen == self._seen:
            return None
        self._seen = seen
        try:
            new = load_server_tls(*self._files)
        except (TLSFileError, OSError) as exc:
            log.error("flow API: the changed certificate files do not load, the previous"
                      " ones stay in use: %s", exc)
            return None
        assert new is not None
        self.tls = new
        self.reloads += 1
        log.info("flow API: certificate files changed: new connections get them (%s)",
                 ", ".join(str(p) for p in self._files if p is not None))
        return _certificate_configuration(new)


def _certificate_configuration(tls: ServerTLS) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(tls.key, tls.cert)],
                                                     root_certificates=tls.client_ca)


@dataclass(frozen=True, slots=True)
class ReaderTLS:
    """How a reader talks to a node whose record says TLS (`--flow-api-ca/-cert/-key`):
    `ca` None is gRPC's built-in roots; `ca_source` says what the node is verified against."""

    ca: bytes | None = field(repr=False)
    ca_source: str
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    cert_file: Path | None = None


def load_reader_tls(ca_file: Path | None, cert_file: Path | None,
                    key_file: Path | None) -> ReaderTLS:
    """The reader's flags checked before any node is asked; no CA: the system's roots."""
    if (cert_file is None) != (key_file is None):
        raise TLSFileError(
            "--flow-api-cert and --flow-api-key go together: give both (the client"
            " certificate the nodes' --flow-api-tls-client-ca issued, and its private key)"
            " or neither"
        )
    if ca_file is None:
        ca, ca_source = system_roots("--flow-api-ca")
    else:
        ca = load_ca("--flow-api-ca", ca_file,
                     "the CA bundle (PEM) that issued the nodes' flow API certificates")
        ca_source = f"--flow-api-ca {ca_file}"
    if cert_file is None or key_file is None:
        return ReaderTLS(ca, ca_source)
    cert, key = load_cert_pair("--flow-api-cert", cert_file, "--flow-api-key", key_file,
                               "the client certificate")
    return ReaderTLS(ca, ca_source, cert, key, cert_file)


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

    def __init__(self, store: FlowStore, host: str, port: int,
                 tls: ServerTLS | None = None) -> None:
        self._handlers = flow_handlers(store)
        self.host = host
        self.port = port
        self.tls = tls
        self.reloader: CertificateReloader | None = None  # with TLS from files, once started
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
                ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
                ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
                ("grpc.max_connection_idle_ms", IDLE_TIMEOUT_MS),
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
            where = f"{self.host}:{self.port}"
            if self.tls is None:
                port = server.add_insecure_port(where)
            elif self.tls.files is None:
                port = server.add_secure_port(where, grpc.ssl_server_credentials(
                    [(self.tls.key, self.tls.cert)],
                    root_certificates=self.tls.client_ca,
                    require_client_auth=self.tls.client_ca is not None,
                ))
            else:
                self.reloader = CertificateReloader(self.tls)
                port = server.add_secure_port(where, grpc.dynamic_ssl_server_credentials(
                    _certificate_configuration(self.tls), self.reloader,
                    require_client_authentication=self.tls.client_ca is not None,
                ))
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
    """One node's flow API, over TLS with `tls` (the node's certificate must chain to
    `tls.ca` and carry the address's IP as an IP SAN), else plaintext. Every call raises
    `FlowAPIError` with a one-line reason."""

    def __init__(self, address: str, timeout_s: float = 5.0,
                 tls: ReaderTLS | None = None) -> None:
        host, port = parse_host_port(address)  # ValueError for a bad published address
        self.address = f"{host}:{port}"
        self.timeout_s = timeout_s
        self.tls = tls
        options = [
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            ("grpc.enable_http_proxy", 0),  # node addresses, never through a proxy
        ]
        if tls is None:
            self._channel = grpc.insecure_channel(self.address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
            )
            self._channel = grpc.secure_channel(self.address, credentials, options=options)

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            data = stub(json.dumps(params).encode(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise FlowAPIError(_describe(exc, self.timeout_s, self.tls)) from None
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


def _describe_tls(details: str, tls: ReaderTLS | None) -> str | None:
    """A failed connection's TLS cause in words naming the fix; None when it names none."""
    kind = classify_tls_failure(details)
    if tls is None:
        if kind in (TLSFailure.CLOSED, TLSFailure.NO_HANDSHAKE):
            return ("closed the plaintext connection (Socket closed): it serves TLS, but was"
                    " asked without (its node record says plaintext: restart its agent to"
                    " publish its record again)")
        return None
    if kind is TLSFailure.UNTRUSTED:
        return (f"TLS handshake failed: certificate not trusted by {tls.ca_source}:"
                f" {verify_reason(details)} (give --flow-api-ca, the CA that issued the"
                " nodes' flow API certificates)")
    if kind is TLSFailure.NAME_MISMATCH:
        return ("TLS handshake failed: its certificate does not carry the IP it publishes as"
                " an IP SAN (issue the node's flow API certificate with subjectAltName"
                " IP:<node IP>)")
    if kind in (TLSFailure.CLIENT_CERT_REFUSED, TLSFailure.CLOSED):
        if tls.cert is None:
            return ("TLS handshake failed: the node requires a client certificate (give"
                    " --flow-api-cert/--flow-api-key)")
        return (f"TLS handshake failed: the node refused the client certificate"
                f" --flow-api-cert {tls.cert_file} (not issued by its"
                " --flow-api-tls-client-ca, or expired; give one that is)")
    if kind is TLSFailure.NO_HANDSHAKE:
        return ("TLS handshake failed: it answers in plaintext though its node record says"
                " TLS (restart its agent to publish its record again)")
    return None


def _describe(exc: grpc.RpcError, timeout_s: float, tls: ReaderTLS | None = None) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout_s:g} s"
    if code == grpc.StatusCode.UNAVAILABLE:
        return _describe_tls(details or "", tls) or f"unreachable ({details})"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"answer too large or node busy ({details}); ask for fewer records (--last N)"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "no garrison flow API there (UNIMPLEMENTED)"
    name = code.name if code is not None else "error"
    return f"{name}: {details}"
