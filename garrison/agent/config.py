"""The agent's typed configuration, passed in (no globals)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from garrison.policies.l7rules import L7Protocol
from garrison.policies.model import EnforcementMode

DEFAULT_STATE_DIR = Path("/var/lib/garrison")
DEFAULT_SOCKET = Path("/run/garrison/agent.sock")
DEFAULT_BPFFS_ROOT = Path("/sys/fs/bpf/garrison")

# Endpoint addresses: the benchmarking range, never routed off this machine.
ENDPOINT_POOL = ipaddress.IPv4Network("198.18.0.0/15")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    policy_dir: Path | None = None
    socket_path: Path = DEFAULT_SOCKET
    bpffs_root: Path = DEFAULT_BPFFS_ROOT
    access_log: Path | None = None
    access_log_max_bytes: int = 100 * 1024 * 1024
    access_log_backups: int = 5
    metrics: tuple[str, int] | None = None
    node_name: str = "node"
    # Query parameters flow records redact (`--redact-query-param`).
    redact_query_params: tuple[str, ...] = ()
    enforcement: EnforcementMode = EnforcementMode.DEFAULT
    audit: bool = False
    # the local host (reserved identity 1) reaches every endpoint in ingress under default
    # deny (Cilium's allow-localhost); False: only what policy allows
    allow_localhost: bool = True
    # One transparent proxy listener per L7 parser, on 127.0.0.1.
    proxy_ports: dict[L7Protocol, int] = field(
        default_factory=lambda: {
            L7Protocol.HTTP: 15001,
            L7Protocol.GRPC: 15002,
            L7Protocol.KAFKA: 15003,
        }
    )
    endpoint_pool: ipaddress.IPv4Network = ENDPOINT_POOL
    flow_ring_size: int = 10_000
    policy_poll_interval: float = 1.0
    # `etcd`: this node is one of a cluster (garrison/cluster/, docs/cluster.md); `sqlite`:
    # alone, identities in the state directory.
    kvstore: str = "sqlite"
    kvstore_endpoints: tuple[str, ...] = ()
    # TLS to etcd (`https://` endpoints): CA bundle (None: the system's roots), client
    # certificate and key (None: none shown). garrison/kvstore/etcd.py `EtcdTLS`.
    kvstore_ca: Path | None = None
    kvstore_cert: Path | None = None
    kvstore_key: Path | None = None
    # An etcd user to log in as, its password read from the file (None: no login).
    kvstore_user: str | None = None
    kvstore_password_file: Path | None = None
    # The cluster's view of this node: its endpoints' addresses come from `pod_cidr`, which the
    # other nodes route through `node_ip` (None: the address this node uses towards etcd).
    pod_cidr: ipaddress.IPv4Network | None = None
    node_ip: ipaddress.IPv4Address | None = None
    # This node's records vanish from the others this long after it stops renewing its lease.
    kvstore_lease_ttl_s: int = 15
    # An identity no node references is deleted from etcd after this long (its nodes died).
    identity_gc_grace_s: int = 900
