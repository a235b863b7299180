"""The flags of the flow API's TLS, one definition for the agent that serves it and for the
commands that read every node's (`observe`, `accesslog summary`, `export` with `--cluster`).

Server (`garrison agent`): `--flow-api-tls-cert`, `--flow-api-tls-key` (together: serve TLS),
`--flow-api-tls-client-ca` (with them: readers must show a certificate it issued, mTLS).
Reader: `--flow-api-ca` (what the nodes' certificates chain to; default the system's CA roots),
`--flow-api-cert`, `--flow-api-key` (a client certificate for nodes that ask for one). Each
check reads the files before anything starts and raises `ValueError` with one line naming the
flag, the file and the fix (a usage error).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from garrison.cluster.flowapi import ReaderTLS, ServerTLS

SERVER_FLAGS = ("flow_api_tls_cert", "flow_api_tls_key", "flow_api_tls_client_ca")
READER_FLAGS = ("flow_api_ca", "flow_api_cert", "flow_api_key")


def add_flow_api_server_flags(p: argparse._ActionsContainer) -> None:
    p.add_argument("--flow-api-tls-cert", type=Path, metavar="FILE",
                   help="serve the flow API over TLS with this server certificate (PEM; it "
                   "must carry the node IP the API publishes as an IP SAN); with "
                   "--flow-api-tls-key")
    p.add_argument("--flow-api-tls-key", type=Path, metavar="FILE",
                   help="the private key (PEM, unencrypted) of --flow-api-tls-cert")
    p.add_argument("--flow-api-tls-client-ca", type=Path, metavar="FILE",
                   help="with --flow-api-tls-cert: readers must show a client certificate "
                   "this CA bundle (PEM) issued (mTLS)")


def add_flow_api_reader_flags(p: argparse._ActionsContainer) -> None:
    p.add_argument("--flow-api-ca", type=Path, metavar="FILE",
                   help="with --cluster: the CA bundle (PEM) the nodes' flow API certificates "
                   "chain to, for nodes that serve TLS (default: the system's CA roots)")
    p.add_argument("--flow-api-cert", type=Path, metavar="FILE",
                   help="with --cluster: a client certificate (PEM) for nodes that ask for "
                   "one (their --flow-api-tls-client-ca); with --flow-api-key")
    p.add_argument("--flow-api-key", type=Path, metavar="FILE",
                   help="the private key (PEM, unencrypted) of --flow-api-cert")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def flow_api_server_flags_given(args: argparse.Namespace) -> list[str]:
    return _given(args, SERVER_FLAGS)


def flow_api_reader_flags_given(args: argparse.Namespace) -> list[str]:
    return _given(args, READER_FLAGS)


def flow_api_server_tls(args: argparse.Namespace) -> ServerTLS | None:
    """The agent's flags checked, files read (None: plaintext)."""
    from garrison.cluster.flowapi import load_server_tls

    return load_server_tls(args.flow_api_tls_cert, args.flow_api_tls_key,
                           args.flow_api_tls_client_ca)


def flow_api_reader_tls(args: argparse.Namespace) -> ReaderTLS:
    """The reader's flags checked, files read (the CA defaults to the system's roots)."""
    from garrison.cluster.flowapi import load_reader_tls

    return load_reader_tls(args.flow_api_ca, args.flow_api_cert, args.flow_api_key)
