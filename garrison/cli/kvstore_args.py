"""The flags of an etcd client's TLS and login, one definition for every command that talks
to etcd (`garrison agent --kvstore etcd`; `observe --cluster` can take the same).

`add_etcd_client_flags(parser)` adds `--kvstore-ca`, `--kvstore-cert`, `--kvstore-key`,
`--kvstore-user`, `--kvstore-password-file`; `etcd_client_options(args, endpoints)` checks
them against the endpoints before anything connects and returns what `EtcdKVStore` takes,
raising `ValueError` with one line naming the file or flag and the fix (a usage error).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from garrison.kvstore.base import KVStoreError
from garrison.kvstore.etcd import EtcdAuth, EtcdTLS, load_auth, load_tls, parse_endpoint_urls


@dataclass(frozen=True, slots=True)
class EtcdClientOptions:
    """What `EtcdKVStore(endpoints, tls=..., auth=...)` takes (None: not used)."""

    tls: EtcdTLS | None
    auth: EtcdAuth | None


def add_etcd_client_flags(p: argparse._ActionsContainer) -> None:
    p.add_argument("--kvstore-ca", type=Path, metavar="FILE",
                   help="with https:// endpoints: the CA bundle (PEM) etcd's certificate must "
                   "chain to (default: the system's CA roots)")
    p.add_argument("--kvstore-cert", type=Path, metavar="FILE",
                   help="with https:// endpoints: this node's client certificate (PEM), for "
                   "etcd's --client-cert-auth; with --kvstore-key")
    p.add_argument("--kvstore-key", type=Path, metavar="FILE",
                   help="the private key (PEM, unencrypted) of --kvstore-cert")
    p.add_argument("--kvstore-user", metavar="NAME",
                   help="log in to etcd as this user (etcd's auth enable); with "
                   "--kvstore-password-file")
    p.add_argument("--kvstore-password-file", type=Path, metavar="FILE",
                   help="the file whose first line is --kvstore-user's etcd password")


def etcd_client_flags_given(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, name) is not None
        for name in ("kvstore_ca", "kvstore_cert", "kvstore_key", "kvstore_user",
                     "kvstore_password_file")
    )


def etcd_client_options(args: argparse.Namespace, endpoints: str) -> EtcdClientOptions:
    """The flags checked (files read, the scheme of `endpoints` matched): `ValueError` with
    one line naming the file or flag and the fix."""
    tls = EtcdTLS(args.kvstore_ca, args.kvstore_cert, args.kvstore_key)
    try:
        parsed = parse_endpoint_urls(endpoints)
        if parsed.tls:
            load_tls(tls)
        elif tls.given:
            raise KVStoreError("--kvstore-ca/--kvstore-cert/--kvstore-key are for TLS but the "
                               "etcd endpoints are http://: use https:// URLs")
        auth = load_auth(args.kvstore_user, args.kvstore_password_file)
    except KVStoreError as exc:
        raise ValueError(str(exc)) from None
    return EtcdClientOptions(tls if tls.given else None, auth)
