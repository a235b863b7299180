"""The cluster key-value store: etcd v3 over its gRPC API, with leases, sessions and watches.

Client: grpcio (already a dependency) with message classes generated from etcd's own
`rpc.proto` (`garrison/kvstore/etcdpb/`). The Python etcd clients were checked and not taken:
`etcd3` 0.12 (2020) pins protobuf 3 and cannot load beside this project's protobuf; `etcd3gw`
speaks the JSON gateway (no streaming watch over gRPC, base64 everywhere); `aetcd` is asyncio
only while the `KVStore` interface and the identity allocator are synchronous. The API surface
garrison needs is small (Range, Put, DeleteRange, Txn, Compact, Watch, the lease calls and
Status), and owning the retry, resume and re-list logic is the point of this module.

Every key is stored under `root` (`garrison/` by default), so one etcd can serve other users.

- **Sessions** (`EtcdSession`): one lease kept alive by a background thread. Keys written
  through the session are bound to the lease and vanish when the agent stops renewing it
  (dies, or is partitioned for longer than the TTL). When etcd comes back and the lease is gone
  the session grants a new one and writes its keys again; hooks run after each new lease.
- **Watches** (`EtcdWatch`): a prefix watch in a background thread that hands `Relisted`,
  `KeyPut` and `KeyDeleted` events to a callback. It starts with the prefix's content at one
  revision, then follows from the next revision; after a disconnect it resumes at the revision
  after the last one delivered (none missed, none repeated); when etcd compacted that history
  away it re-lists and says so.
- **TLS** (`https://` endpoints, `EtcdTLS`): gRPC's TLS with a CA bundle (default: the
  system's, OpenSSL's default CA file, rather than the roots grpcio ships) and optionally a
  client certificate, for etcd's `--client-cert-auth`.
  The files are checked before any connection (readable, PEM, the key matches the
  certificate); the server's certificate must chain to the CA and name the endpoint's host
  (an IP SAN for an IP address). One channel serves all endpoints and gRPC checks one name
  per channel: with several endpoints that is the first URL's host, which every member's
  certificate must then carry. Never a fallback to plaintext.
- **Users** (`EtcdAuth`, etcd's `auth enable`): Auth.Authenticate with a name and password
  gives a token, sent as `token` metadata on every call and stream; when etcd says the token
  is invalid (it expired: `--auth-token-ttl`, or etcd restarted) the store logs in again and
  retries the call once, and streams log in again when they reconnect.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import grpc

from garrison.kvstore.base import (
    Absent,
    Condition,
    Delete,
    KeyDeleted,
    KeyPut,
    KVStoreError,
    KVStoreUnavailableError,
    NoneWithPrefix,
    Op,
    Put,
    Relisted,
    ValueIs,
    WatchEvent,
    check_key,
)
from garrison.kvstore.etcdpb import kv_pb2, rpc_pb2
from garrison.tlsfiles import (
    TLSFailure,
    TLSFileError,
    TLSMaterial,
    classify_tls_failure,
    load_ca,
    load_cert_pair,
    read_file,
    system_roots,
    verify_reason,
)

log = logging.getLogger(__name__)

DEFAULT_ROOT = "garrison/"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_SESSION_TTL_S = 15
_MAX_MESSAGE = 64 * 1024 * 1024
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 1.0
# Ask the server for a pong every 10 s and give it 5 s: a partition without a reset is noticed
# within 15 s. etcd accepts pings every 5 s or slower (--grpc-keepalive-min-time).
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)


@dataclass(frozen=True, slots=True)
class EtcdEndpoints:
    """The parsed `--kvstore-endpoints`: gRPC addresses (`HOST:PORT`), their hosts as written
    (what a server certificate must name) and whether they are `https://` (TLS)."""

    addresses: tuple[str, ...]
    hosts: tuple[str, ...]
    tls: bool


def parse_endpoint_urls(text: str | Sequence[str]) -> EtcdEndpoints:
    """`https://10.0.0.1:2379,https://10.0.0.2:2379` (or a list) → `EtcdEndpoints`. Raises
    `KVStoreError` naming the bad URL and the expected form; all http:// or all https://."""
    items = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text)
    out: list[str] = []
    hosts: list[str] = []
    schemes: set[str] = set()
    for item in items:
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        hint = "expected http://HOST:PORT or https://HOST:PORT, e.g. http://127.0.0.1:2379"
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise KVStoreError(f"bad etcd endpoint {item!r}: {hint}")
        try:
            port = url.port
        except ValueError:
            port = None
        if port is None:
            raise KVStoreError(f"bad etcd endpoint {item!r}: no port; {hint}")
        schemes.add(url.scheme)
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        out.append(f"{host}:{port}")
        hosts.append(url.hostname)
    if not out:
        raise KVStoreError("no etcd endpoint given: pass --kvstore-endpoints http://HOST:PORT")
    if len(schemes) > 1:
        raise KVStoreError(
            f"etcd endpoints {','.join(i for i in items if i)!r} mix http:// and https://: give"
            " them all https:// when etcd serves TLS (else all http://)"
        )
    return EtcdEndpoints(tuple(out), tuple(hosts), schemes == {"https"})


def parse_endpoints(text: str | Sequence[str]) -> tuple[str, ...]:
    """`http://127.0.0.1:2379,http://127.0.0.1:22379` (or a list) → the gRPC addresses
    (`127.0.0.1:2379`, ...). Raises `KVStoreError` naming the bad URL and the expected form."""
    return parse_endpoint_urls(text).addresses


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """Client TLS towards etcd (`--kvstore-ca`, `--kvstore-cert`, `--kvstore-key`).

    `ca_file` None: the system's CA bundle (OpenSSL's default CA file, `SSL_CERT_FILE` if set;
    gRPC's built-in roots where there is none). `cert_file` and `key_file`
    together or neither: the client certificate etcd's `--client-cert-auth` asks for.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def given(self) -> bool:
        return any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))


@dataclass(frozen=True, slots=True)
class EtcdAuth:
    """An etcd user (`--kvstore-user`) and its password (`--kvstore-password-file`)."""

    user: str
    password: str = field(repr=False)


def load_auth(user: str | None, password_file: Path | None) -> EtcdAuth | None:
    """The user and the password file's first line; both or neither (`KVStoreError` naming
    the flag or the file and the fix)."""
    if user is None and password_file is None:
        return None
    if not user or password_file is None:
        raise KVStoreError(
            "--kvstore-user and --kvstore-password-file go together: give both (the etcd user"
            " and a file holding its password) or neither"
        )
    raw = _read("--kvstore-password-file", password_file, "a file holding the user's password")
    password = raw.decode("utf-8", errors="replace").splitlines()[0] if raw.strip() else ""
    if not password:
        raise KVStoreError(
            f"--kvstore-password-file {password_file}: empty; give a file holding the etcd"
            f" password of {user!r} on its first line"
        )
    return EtcdAuth(user, password)


def _read(flag: str, path: Path, what: str) -> bytes:
    try:
        return read_file(flag, path, what)
    except TLSFileError as exc:
        raise KVStoreError(str(exc)) from None


def load_tls(tls: EtcdTLS) -> TLSMaterial:
    """Read and check the TLS files before any connection: each `KVStoreError` names the file,
    what is wrong with it and what to give instead."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise KVStoreError(
            "--kvstore-cert and --kvstore-key go together: give both (the client certificate"
            " and its private key) or neither"
        )
    try:
        if tls.ca_file is None:
            ca, ca_source = system_roots("--kvstore-ca")
        else:
            ca_what = "the CA bundle (PEM) that issued etcd's server certificate"
            ca = load_ca("--kvstore-ca", tls.ca_file, ca_what)
            ca_source = f"--kvstore-ca {tls.ca_file}"
        if tls.cert_file is None or tls.key_file is None:
            return TLSMaterial(ca, None, None, ca_source)
        cert, key = load_cert_pair("--kvstore-cert", tls.cert_file, "--kvstore-key",
                                   tls.key_file, "the client certificate")
    except TLSFileError as exc:
        raise KVStoreError(str(exc)) from None
    return TLSMaterial(ca, key, cert, ca_source)


def _grpc_target(addresses: Sequence[str]) -> str:
    """One channel over every endpoint: gRPC's pick_first fails over between the addresses of
    an `ipv4:`/`ipv6:` target list. Host names cannot be listed that way: one only."""
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        host = address.rpartition(":")[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise KVStoreError(
                f"several etcd endpoints must be IP addresses of one family, got {address!r}"
            ) from None
    if len(families) != 1:
        raise KVStoreError("several etcd endpoints must all be IPv4 or all IPv6")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with `prefix`": the prefix with its last
    byte below 0xff incremented (b"\\0" means "to the end of the key space")."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


@dataclass(frozen=True, slots=True)
class EtcdStatus:
    """What `garrison status` shows about the store."""

    endpoints: tuple[str, ...]
    version: str
    revision: int
    leader: int
    db_size: int


class EtcdKVStore:
    """`TransactionalKVStore` over etcd v3. Thread-safe; one gRPC channel per object."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        root: str = DEFAULT_ROOT,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls: EtcdTLS | None = None,
        auth: EtcdAuth | None = None,
    ) -> None:
        """`auth`: log in as this etcd user (None: no token; etcd then takes a client
        certificate's CN as the user, or has authentication off). `tls`: the files for
        `https://` endpoints (None there: the system's CA bundle, no
        client certificate); files given with `http://` endpoints are refused, not ignored."""
        parsed = parse_endpoint_urls(endpoints)
        self.endpoints = parsed.addresses
        if not root or "\x00" in root:
            raise KVStoreError(f"bad etcd key root {root!r}: non-empty, no NUL")
        self.root = root
        self._root_bytes = root.encode()
        self.timeout_s = timeout_s
        target = _grpc_target(self.endpoints)
        self.tls: EtcdTLS | None = None
        self.server_name: str | None = None
        self._ca_source = ""
        if parsed.tls:
            self.tls = tls or EtcdTLS()
            material = load_tls(self.tls)
            self._ca_source = material.ca_source
            credentials = grpc.ssl_channel_credentials(
                root_certificates=material.ca,
                private_key=material.key,
                certificate_chain=material.cert,
            )
            # gRPC checks one name per channel, by default the target's host; an ipv4:/ipv6:
            # list has none, so the first URL's host is the name every member must carry.
            self.server_name = parsed.hosts[0]
            options: tuple[tuple[str, int | str], ...] = _CHANNEL_OPTIONS
            if len(self.endpoints) > 1:
                options += (("grpc.ssl_target_name_override", self.server_name),)
            self._channel: grpc.Channel | None = grpc.secure_channel(
                target, credentials, options=options
            )
        else:
            if tls is not None and tls.given:
                raise KVStoreError(
                    "--kvstore-ca/--kvstore-cert/--kvstore-key are for TLS but the etcd"
                    f" endpoints {','.join(self.endpoints)} are http://: use https:// URLs"
                )
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.auth = auth
        # The token of the last login; "" while etcd has authentication off.
        self._token: str | None = None
        self._token_lock = threading.RLock()
        self.logins = 0
        self._closed = threading.Event()
        self._children: list[EtcdSession | EtcdWatch] = []
        self._children_lock = threading.Lock()
        ch = self._channel
        self._range = _unary(ch, "KV/Range", rpc_pb2.RangeRequest, rpc_pb2.RangeResponse)
        self._put = _unary(ch, "KV/Put", rpc_pb2.PutRequest, rpc_pb2.PutResponse)
        self._delete_range = _unary(
            ch, "KV/DeleteRange", rpc_pb2.DeleteRangeRequest, rpc_pb2.DeleteRangeResponse
        )
        self._txn = _unary(ch, "KV/Txn", rpc_pb2.TxnRequest, rpc_pb2.TxnResponse)
        self._compact = _unary(
            ch, "KV/Compact", rpc_pb2.CompactionRequest, rpc_pb2.CompactionResponse
        )
        self._lease_grant = _unary(
            ch, "Lease/LeaseGrant", rpc_pb2.LeaseGrantRequest, rpc_pb2.LeaseGrantResponse
        )
        self._lease_revoke = _unary(
            ch, "Lease/LeaseRevoke", rpc_pb2.LeaseRevokeRequest, rpc_pb2.LeaseRevokeResponse
        )
        self._lease_ttl = _unary(
            ch,
            "Lease/LeaseTimeToLive",
            rpc_pb2.LeaseTimeToLiveRequest,
            rpc_pb2.LeaseTimeToLiveResponse,
        )
        self._status = _unary(
            ch, "Maintenance/Status", rpc_pb2.StatusRequest, rpc_pb2.StatusResponse
        )
        self._authenticate = _unary(
            ch, "Auth/Authenticate", rpc_pb2.AuthenticateRequest, rpc_pb2.AuthenticateResponse
        )
        self.lease_keepalive = ch.stream_stream(
            "/etcdserverpb.Lease/LeaseKeepAlive",
            request_serializer=rpc_pb2.LeaseKeepAliveRequest.SerializeToString,
            response_deserializer=rpc_pb2.LeaseKeepAliveResponse.FromString,
        )
        self.watch_stream = ch.stream_stream(
            "/etcdserverpb.Watch/Watch",
            request_serializer=rpc_pb2.WatchRequest.SerializeToString,
            response_deserializer=rpc_pb2.WatchResponse.FromString,
        )

    @property
    def tls_description(self) -> str | None:
        """For `garrison status`: what etcd's certificate is verified against, and the client
        certificate shown to it; None without TLS."""
        if self.tls is None:
            return None
        cert = f", client certificate {self.tls.cert_file}" if self.tls.cert_file else ""
        return f"TLS, server verified against {self._ca_source}{cert}"

    def __repr__(self) -> str:
        return f"EtcdKVStore({','.join(self.endpoints)!r}, root={self.root!r})"

    # Plumbing -----------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return self._root_bytes + check_key(key).encode()

    def _prefix(self, prefix: str) -> bytes:
        if "\x00" in prefix:
            check_key(prefix)
        return self._root_bytes + prefix.encode()

    def strip_root(self, raw_key: bytes) -> str:
        return raw_key[len(self._root_bytes) :].decode()

    def call(self, method: Callable[..., Any], request: Any, what: str) -> Any:
        """Run one unary call, turning gRPC failures into `KVStoreError`s that say what to do.
        A token etcd no longer knows is renewed and the call made once more."""
        if self._closed.is_set():
            raise KVStoreError(f"kvstore {self!r} is closed")
        for attempt in (1, 2):
            metadata = self.metadata()
            try:
                return method(request, timeout=self.timeout_s, metadata=metadata)
            except grpc.RpcError as exc:
                if attempt == 1 and metadata and _token_rejected(exc):
                    self._forget_token(metadata)
                    continue
                raise self.describe_rpc_error(exc, what) from None
        raise AssertionError("unreachable")

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """What every call and stream sends: the login token (logging in first when there is
        none), or nothing without `auth`."""
        if self.auth is None:
            return None
        with self._token_lock:
            if self._token is None:
                self._token = self._login(self.auth)
            token = self._token
        return (("token", token),) if token else None

    def _forget_token(self, metadata: tuple[tuple[str, str], ...] | None) -> None:
        with self._token_lock:
            if metadata and self._token == dict(metadata).get("token"):
                self._token = None

    def _login(self, auth: EtcdAuth) -> str:
        where = ",".join(self.endpoints)
        request = rpc_pb2.AuthenticateRequest(name=auth.user, password=auth.password)
        try:
            resp = self._authenticate(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            details = str(exc.details()) if isinstance(exc, grpc.Call) else str(exc)
            if "authentication is not enabled" in details:
                log.warning(
                    "etcd at %s has authentication off: --kvstore-user %s is not used", where,
                    auth.user,
                )
                return ""
            if "authentication failed" in details:
                raise KVStoreError(
                    f"etcd at {where} refused user {auth.user!r}: wrong user name or password"
                    " (--kvstore-user, --kvstore-password-file)"
                ) from None
            raise self.describe_rpc_error(exc, "login") from None
        self.logins += 1
        return str(resp.token)

    def describe_rpc_error(self, exc: grpc.RpcError, what: str) -> KVStoreError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        where = ",".join(self.endpoints)
        if code == grpc.StatusCode.UNAVAILABLE:
            tls_problem = self._describe_tls_failure(str(details or ""))
            if tls_problem is not None:
                return KVStoreUnavailableError(f"etcd {what}: {tls_problem}")
            return KVStoreUnavailableError(
                f"etcd {what}: no etcd answers at {where} ({details}); start etcd or fix"
                " --kvstore-endpoints"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return KVStoreUnavailableError(
                f"etcd {what}: etcd at {where} did not answer within {self.timeout_s:g} s;"
                " check its health (etcdctl endpoint health)"
            )
        if code == grpc.StatusCode.CANCELLED and self._closed.is_set():
            return KVStoreError(f"kvstore {self!r} is closed")
        auth_problem = self._describe_auth_failure(code, str(details or ""))
        if auth_problem is not None:
            return KVStoreError(f"etcd {what}: {auth_problem}")
        return KVStoreError(f"etcd {what} at {where} failed: {details}")

    def _describe_auth_failure(self, code: grpc.StatusCode | None, details: str) -> str | None:
        where = ",".join(self.endpoints)
        if "invalid auth token" in details:
            # Streams meet this when they reconnect: the next attempt logs in again.
            with self._token_lock:
                self._token = None
            return f"etcd at {where} no longer knows this client's token; logging in again"
        if "user name is empty" in details or "user name not found" in details:
            return (
                f"etcd at {where} has authentication on: give --kvstore-user and"
                " --kvstore-password-file (or a client certificate whose CN is an etcd user)"
            )
        if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
            user = repr(self.auth.user) if self.auth else "this client"
            return (
                f"etcd at {where} denied {user} (permission denied): grant its role readwrite"
                f" on the prefix {self.root!r} (etcdctl role grant-permission ROLE --prefix"
                f" readwrite {self.root})"
            )
        return None

    def _describe_tls_failure(self, details: str) -> str | None:
        """What a connection failure says about TLS, in words naming the fix; None when it
        says nothing about TLS (gRPC reports all of these as UNAVAILABLE)."""
        where = ",".join(self.endpoints)
        kind = classify_tls_failure(details)
        if self.tls is None:
            if kind is TLSFailure.CLOSED:
                return (
                    f"etcd at {where} closed the connection ({_last_error(details)}); if it"
                    " serves TLS, use https:// endpoints (and --kvstore-ca)"
                )
            return None
        if kind is TLSFailure.NAME_MISMATCH:
            if len(self.endpoints) > 1:
                return (
                    f"the certificate of an etcd member at {where} is not issued for"
                    f" {self.server_name}: with several endpoints every member's certificate"
                    " must name the first endpoint's host (one TLS name per gRPC channel);"
                    " issue them so, or give one endpoint"
                )
            return (
                f"the certificate of etcd at {where} is not issued for {self.server_name}"
                f" (not in its subject alternative names); issue it for the host in"
                " --kvstore-endpoints, or give the endpoint by a name the certificate carries"
            )
        if kind is TLSFailure.UNTRUSTED:
            return (
                f"the certificate of etcd at {where} does not verify against {self._ca_source}"
                f" ({verify_reason(details)}); give the CA that issued it with --kvstore-ca"
            )
        if kind is TLSFailure.CLIENT_CERT_REFUSED:
            if self.tls.cert_file is None:
                return (
                    f"etcd at {where} refused this client: it wants a client certificate"
                    " (--client-cert-auth); give --kvstore-cert and --kvstore-key"
                )
            return (
                f"etcd at {where} refused the client certificate --kvstore-cert"
                f" {self.tls.cert_file}: not issued by a CA etcd trusts (its"
                " --trusted-ca-file), or expired; give one that is"
            )
        if kind is TLSFailure.NO_HANDSHAKE:
            return (
                f"etcd at {where} did not complete a TLS handshake ({_last_error(details)});"
                " if it serves plaintext, use http:// endpoints"
            )
        return None

    # KVStore ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        resp = self.call(self._range, rpc_pb2.RangeRequest(key=self._key(key)), "get")
        return bytes(resp.kvs[0].value) if resp.kvs else None

    def snapshot(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under `prefix` → value, and the store revision of that snapshot."""
        start = self._prefix(prefix)
        request = rpc_pb2.RangeRequest(key=start, range_end=prefix_range_end(start))
        resp = self.call(self._range, request, "list")
        items = {self.strip_root(kv.key): bytes(kv.value) for kv in resp.kvs}
        return items, int(resp.header.revision)

    def list_prefix(self, prefix: str) -> dict[str, bytes]:
        return self.snapshot(prefix)[0]

    def revision(self) -> int:
        """The store's current revision."""
        resp = self.call(self._range, rpc_pb2.RangeRequest(key=self._root_bytes), "revision")
        return int(resp.header.revision)

    def create(self, key: str, value: bytes) -> bool:
        return self.transaction([Absent(key)], [Put(key, value)])

    def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        request = rpc_pb2.PutRequest(key=self._key(key), value=value, lease=lease or 0)
        self.call(self._put, request, "put")

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes) -> bool:
        if expected is None:
            return self.create(key, new)
        return self.transaction([ValueIs(key, expected)], [Put(key, new)])

    def delete(self, key: str) -> bool:
        request = rpc_pb2.DeleteRangeRequest(key=self._key(key))
        return int(self.call(self._delete_range, request, "delete").deleted) > 0

    def compare_and_delete(self, key: str, expected: bytes) -> bool:
        return self.transaction([ValueIs(key, expected)], [Delete(key)])

    def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> bool:
        compares = [self._compare(cond) for cond in conditions]
        success = [self._request_op(op) for op in ops]
        request = rpc_pb2.TxnRequest(compare=compares, success=success)
        return bool(self.call(self._txn, request, "transaction").succeeded)

    def _compare(self, cond: Condition) -> rpc_pb2.Compare:
        if isinstance(cond, ValueIs):
            return rpc_pb2.Compare(
                key=self._key(cond.key),
                target=rpc_pb2.Compare.VALUE,
                result=rpc_pb2.Compare.EQUAL,
                value=cond.value,
            )
        if isinstance(cond, Absent):
            return rpc_pb2.Compare(
                key=self._key(cond.key),
                target=rpc_pb2.Compare.CREATE,
                result=rpc_pb2.Compare.EQUAL,
                create_revision=0,
            )
        if isinstance(cond, NoneWithPrefix):
            if not cond.prefix:
                raise KVStoreError("NoneWithPrefix needs a non-empty prefix")
            start = self._prefix(cond.prefix)
            # A compare over a range with no key compares against a zero KeyValue (etcd's
            # applyCompare), so "create revision = 0 over the range" holds exactly when empty.
            return rpc_pb2.Compare(
                key=start,
                range_end=prefix_range_end(start),
                target=rpc_pb2.Compare.CREATE,
                result=rpc_pb2.Compare.EQUAL,
                create_revision=0,
            )
        raise TypeError(f"unknown condition {cond!r}")

    def _request_op(self, op: Op) -> rpc_pb2.RequestOp:
        if isinstance(op, Put):
            put = rpc_pb2.PutRequest(key=self._key(op.key), value=op.value, lease=op.lease or 0)
            return rpc_pb2.RequestOp(request_put=put)
        return rpc_pb2.RequestOp(
            request_delete_range=rpc_pb2.DeleteRangeRequest(key=self._key(op.key))
        )

    def compact(self, revision: int) -> None:
        """Drop the history before `revision` (what etcd's auto-compaction does)."""
        request = rpc_pb2.CompactionRequest(revision=revision, physical=True)
        self.call(self._compact, request, "compact")

    def status(self) -> EtcdStatus:
        resp = self.call(self._status, rpc_pb2.StatusRequest(), "status")
        return EtcdStatus(
            endpoints=self.endpoints,
            version=str(resp.version),
            revision=int(resp.header.revision),
            leader=int(resp.leader),
            db_size=int(resp.dbSize),
        )

    # Leases -------------------------------------------------------------------------------

    def grant_lease(self, ttl_s: int) -> int:
        resp = self.call(self._lease_grant, rpc_pb2.LeaseGrantRequest(TTL=ttl_s), "lease grant")
        if resp.error:
            raise KVStoreError(f"etcd refused a lease of {ttl_s} s: {resp.error}")
        return int(resp.ID)

    def revoke_lease(self, lease: int) -> None:
        """Revoke `lease` (its keys go at once); an unknown lease is not an error."""
        try:
            self.call(self._lease_revoke, rpc_pb2.LeaseRevokeRequest(ID=lease), "lease revoke")
        except KVStoreError as exc:
            if "lease not found" not in str(exc):
                raise

    def lease_ttl(self, lease: int) -> int:
        """Seconds `lease` has left, -1 when it does not exist (expired or revoked)."""
        request = rpc_pb2.LeaseTimeToLiveRequest(ID=lease)
        return int(self.call(self._lease_ttl, request, "lease ttl").TTL)

    def session(self, ttl_s: int = DEFAULT_SESSION_TTL_S, *, name: str = "session") -> EtcdSession:
        """A started `EtcdSession` (closed with the store)."""
        session = EtcdSession(self, ttl_s, name=name)
        self._adopt(session)
        session.start()
        return session

    def watch(
        self,
        prefix: str,
        callback: Callable[[WatchEvent], None],
        *,
        name: str = "watch",
    ) -> EtcdWatch:
        """A started `EtcdWatch` of `prefix` (closed with the store)."""
        watch = EtcdWatch(self, prefix, callback, name=name)
        self._adopt(watch)
        watch.start()
        return watch

    def _adopt(self, child: EtcdSession | EtcdWatch) -> None:
        with self._children_lock:
            if self._closed.is_set():
                raise KVStoreError(f"kvstore {self!r} is closed")
            self._children.append(child)

    def close(self) -> None:
        with self._children_lock:
            children, self._children = self._children, []
        for child in children:
            child.close()
        self._closed.set()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _token_rejected(exc: grpc.RpcError) -> bool:
    details = exc.details() if isinstance(exc, grpc.Call) else ""
    return "invalid auth token" in str(details or "")


def _last_error(details: str) -> str:
    """The cause at the end of gRPC's "failed to connect to all addresses; last error: ..."."""
    return details.rpartition("last error: ")[2] or details


def _unary(channel: grpc.Channel, method: str, request: Any, response: Any) -> Any:
    return channel.unary_unary(
        f"/etcdserverpb.{method}",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


class _Backoff:
    def __init__(self) -> None:
        self.delay = _RETRY_MIN_S

    def reset(self) -> None:
        self.delay = _RETRY_MIN_S

    def wait(self, stop: threading.Event) -> None:
        stop.wait(self.delay)
        self.delay = min(self.delay * 2, _RETRY_MAX_S)


def _requests_until(
    stop: threading.Event, first: Any, every_s: float | None, again: Any | None = None
) -> Iterator[Any]:
    """The request side of a bidi stream: `first`, then `again` every `every_s` seconds (or
    nothing more), until `stop` is set."""
    yield first
    while not stop.wait(every_s if every_s is not None else 3600.0):
        if again is not None:
            yield again


class EtcdSession:
    """A lease kept alive in the background, and the keys bound to it.

    `put`/`delete` change this agent's lease-bound keys; the session remembers them, so when
    a write fails while etcd is away, or etcd lost the lease (down for longer than the TTL),
    the session writes them again as soon as it can. `on_new_lease` hooks run (in the session
    thread) after every lease granted after the first, for keys that need more than a blind
    re-write (the identity allocator's references).
    """

    def __init__(self, store: EtcdKVStore, ttl_s: int, *, name: str = "session") -> None:
        if ttl_s < 2:
            raise ValueError("a session TTL must be at least 2 s")
        self._store = store
        self.ttl_s = ttl_s
        self.name = name
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        # Keys to write, oldest change first (a dict as an ordered set).
        self._dirty: dict[str, None] = {}
        self._hooks: list[Callable[[int], object]] = []
        self._stop = threading.Event()
        self._call: Any = None
        self._lease: int | None = None
        self._ready = threading.Event()
        self.last_renewed: float | None = None
        self.leases_granted = 0
        self.last_error: str | None = None
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"etcd-{name}", daemon=True)
        self._writer = threading.Thread(
            target=self._write_loop, name=f"etcd-{name}-writer", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._writer.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the session holds a lease (False after `timeout_s` without one)."""
        return self._ready.wait(timeout_s)

    @property
    def lease(self) -> int | None:
        """The current lease id, None while the session has none (etcd unreachable)."""
        return self._lease

    @property
    def connected(self) -> bool:
        return self._lease is not None and self._ready.is_set() and self.silent_for() is None

    def silent_for(self) -> float | None:
        """Seconds since etcd last renewed the lease when that is longer than two renewals
        should take (an etcd that stopped answering on an open connection, a partition that
        resets nothing: the stream neither ends nor errs), else None."""
        renewed = self.last_renewed
        if renewed is None or self._lease is None:
            return None
        silent = time.monotonic() - renewed
        return silent if silent > 2 * max(self.ttl_s / 3, 0.5) + 1.0 else None

    def require_lease(self) -> int:
        lease = self._lease
        if lease is None:
            raise KVStoreUnavailableError(
                f"etcd session {self.name!r} holds no lease: etcd at"
                f" {','.join(self._store.endpoints)} has not answered; it retries on its own"
            )
        return lease

    def on_new_lease(self, hook: Callable[[int], object]) -> None:
        with self._lock:
            self._hooks.append(hook)

    def put(self, key: str, value: bytes) -> None:
        """Bind `key` = `value` to the session's lease. Returns at once, never blocks on etcd
        (a caller may hold the agent's lock): the writer thread writes it, and again until
        etcd takes it."""
        with self._lock:
            self._keys[key] = value
            self._dirty.pop(key, None)
            self._dirty[key] = None
        self._kick.set()

    def delete(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)
            self._dirty.pop(key, None)
            self._dirty[key] = None
        self._kick.set()

    def wait_flushed(self, timeout_s: float) -> bool:
        """True once every put and delete so far is in etcd (False after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._dirty:
                    return True
            self._kick.set()
            time.sleep(0.01)
        with self._lock:
            return not self._dirty

    def keys(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._keys)

    def _write_loop(self) -> None:
        """The writer thread: flushes dirty keys when kicked, retrying with backoff."""
        backoff = _Backoff()
        while not self._stop.is_set():
            self._kick.wait(1.0)
            self._kick.clear()
            lease = self._lease
            if lease is None:
                continue
            try:
                self._flush(lease)
                backoff.reset()
            except KVStoreError as exc:
                self.last_error = str(exc)
                backoff.wait(self._stop)
                self._kick.set()

    def _flush(self, lease: int) -> None:
        while True:
            with self._lock:
                if not self._dirty:
                    return
                key = next(iter(self._dirty))
                value = self._keys.get(key)
            if value is None:
                self._store.delete(key)
            else:
                self._store.put(key, value, lease=lease)
            with self._lock:
                # Written as it is now? Else (changed meanwhile) it stays dirty.
                if self._keys.get(key) == value:
                    self._dirty.pop(key, None)

    def _run(self) -> None:
        backoff = _Backoff()
        interval = max(self.ttl_s / 3, 0.5)
        while not self._stop.is_set():
            try:
                if self._lease is None:
                    lease = self._store.grant_lease(self.ttl_s)
                    self.leases_granted += 1
                    with self._lock:
                        self._dirty.update(dict.fromkeys(self._keys))
                        hooks = list(self._hooks)
                    self._lease = lease
                    if self.leases_granted > 1:
                        log.warning("etcd %s: lease lost, new lease %x", self.name, lease)
                        for hook in hooks:
                            try:
                                hook(lease)
                            except Exception:
                                log.exception("etcd %s: new-lease hook %r failed", self.name, hook)
                lease = self._lease
                self._kick.set()
                self._ready.set()
                self._keepalive(lease, interval, backoff)
            except KVStoreError as exc:
                self.last_error = str(exc)
            except grpc.RpcError as exc:
                self.last_error = str(self._store.describe_rpc_error(exc, "lease keepalive"))
            if not self._stop.is_set():
                backoff.wait(self._stop)

    def _keepalive(self, lease: int, interval: float, backoff: _Backoff) -> None:
        """Renew `lease` every `interval` until stopped, the stream breaks, the lease is gone
        (then `_lease` becomes None), or a write needs retrying."""
        stop = threading.Event()
        request = rpc_pb2.LeaseKeepAliveRequest(ID=lease)
        call = self._store.lease_keepalive(
            _requests_until(stop, request, interval, request), metadata=self._store.metadata()
        )
        self._call = call
        if self._stop.is_set():
            call.cancel()
        try:
            for resp in call:
                if resp.TTL <= 0:
                    log.warning("etcd %s: lease %x expired", self.name, lease)
                    self._lease = None
                    return
                self.last_renewed = time.monotonic()
                self.last_error = None
                backoff.reset()
                with self._lock:
                    if self._dirty:
                        self._kick.set()
        finally:
            stop.set()
            call.cancel()
            self._call = None

    def close(self, *, revoke: bool = True, flush_s: float = 2.0) -> None:
        """Stop renewing; with `revoke`, drop the lease (and its keys) now rather than at TTL.
        Without, writes still pending get `flush_s` to reach etcd first."""
        if not revoke and self._lease is not None and self._writer.is_alive():
            self.wait_flushed(flush_s)
        self._stop.set()
        self._kick.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._writer.is_alive():
            self._writer.join(timeout=5)
        lease, self._lease = self._lease, None
        if revoke and lease is not None and not self._store.closed:
            try:
                self._store.revoke_lease(lease)
            except KVStoreError as exc:
                log.info("etcd %s: lease %x not revoked: %s", self.name, lease, exc)


class EtcdWatch:
    """Follows a prefix from a background thread; see the module docstring for the guarantees.

    The callback runs in the watch thread, one event at a time, in revision order; it must not
    block for long. An exception it raises is logged and the event counts as delivered.
    """

    def __init__(
        self,
        store: EtcdKVStore,
        prefix: str,
        callback: Callable[[WatchEvent], None],
        *,
        name: str = "watch",
    ) -> None:
        self._store = store
        self.prefix = prefix
        self._callback = callback
        self.name = name
        self._stop = threading.Event()
        # The next revision to ask for; None: list first.
        self.next_revision: int | None = None
        self.relists = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.connected = False
        self._thread = threading.Thread(target=self._run, name=f"etcd-{name}", daemon=True)
        self._call: Any = None

    def start(self) -> None:
        self._thread.start()

    def _deliver(self, event: WatchEvent) -> None:
        try:
            self._callback(event)
        except Exception:
            log.exception("etcd %s: callback failed on %r", self.name, event)

    def _relist(self, reason: str, *, restored: bool = False) -> None:
        items, revision = self._store.snapshot(self.prefix)
        self.relists += 1
        self._deliver(Relisted(items=items, revision=revision, reason=reason, restored=restored))
        self.next_revision = revision + 1

    def _run(self) -> None:
        backoff = _Backoff()
        reason = "initial list"
        restored = False
        while not self._stop.is_set():
            try:
                if self.next_revision is not None and self.reconnects:
                    current = self._store.revision()
                    if current < self.next_revision - 1:
                        # etcd came back behind what we saw (restored from a backup, or a new
                        # one): resuming would wait for revisions that mean other changes.
                        reason = (
                            f"etcd's revision went back from {self.next_revision - 1} to"
                            f" {current} (restored or replaced): re-listed the prefix"
                        )
                        log.warning("etcd %s: %s", self.name, reason)
                        self.next_revision = None
                        restored = True
                if self.next_revision is None:
                    self._relist(reason, restored=restored)
                    restored = False
                compacted = self._follow(backoff)
                if compacted is not None:
                    reason = (
                        f"etcd compacted its history up to revision {compacted}: re-listed"
                        f" the prefix (events after revision {self.next_revision} were gone)"
                    )
                    log.warning("etcd %s: %s", self.name, reason)
                    self.next_revision = None
                    continue
            except KVStoreError as exc:
                self.last_error = str(exc)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    break
                self.last_error = str(self._store.describe_rpc_error(exc, "watch"))
            self.connected = False
            if not self._stop.is_set():
                self.reconnects += 1
                backoff.wait(self._stop)

    def _follow(self, backoff: _Backoff) -> int | None:
        """Stream events from `next_revision` on; the compaction revision when etcd no longer
        has that history, None when the stream ended otherwise."""
        assert self.next_revision is not None
        start = self._store._prefix(self.prefix)
        create = rpc_pb2.WatchRequest(
            create_request=rpc_pb2.WatchCreateRequest(
                key=start,
                range_end=prefix_range_end(start),
                start_revision=self.next_revision,
            )
        )
        stop = threading.Event()
        call = self._store.watch_stream(
            _requests_until(stop, create, None), metadata=self._store.metadata()
        )
        self._call = call
        if self._stop.is_set():
            call.cancel()
        try:
            for resp in call:
                if resp.compact_revision:
                    return int(resp.compact_revision)
                if resp.canceled:
                    raise KVStoreError(f"etcd cancelled the watch: {resp.cancel_reason}")
                if resp.created:
                    self.connected = True
                    self.last_error = None
                    backoff.reset()
                for event in resp.events:
                    self._deliver(self._event(event))
                if resp.events:
                    # etcd sends all the events of one revision in one response (no fragment
                    # was asked for), so resuming after the last one misses and repeats nothing.
                    self.next_revision = int(resp.events[-1].kv.mod_revision) + 1
            return None
        finally:
            stop.set()
            call.cancel()
            self._call = None

    def _event(self, event: kv_pb2.Event) -> WatchEvent:
        key = self._store.strip_root(event.kv.key)
        revision = int(event.kv.mod_revision)
        if event.type == kv_pb2.Event.DELETE:
            return KeyDeleted(key=key, revision=revision)
        return KeyPut(key=key, value=bytes(event.kv.value), revision=revision)

    def close(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


class EventQueue:
    """A callback that queues watch events, for consumers that poll (tests, the CLI)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[WatchEvent] = queue.Queue()

    def __call__(self, event: WatchEvent) -> None:
        self._queue.put(event)

    def get(self, timeout_s: float) -> WatchEvent:
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no watch event within {timeout_s:g} s") from None

    def drain(self) -> list[WatchEvent]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out


def apply_event(view: dict[str, bytes], event: WatchEvent) -> Mapping[str, bytes]:
    """Fold `event` into `view` (a consumer's copy of a prefix) and return it."""
    if isinstance(event, Relisted):
        view.clear()
        view.update(event.items)
    elif isinstance(event, KeyPut):
        view[event.key] = event.value
    else:
        view.pop(event.key, None)
    return view
