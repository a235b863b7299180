"""`garrison agent`: the node agent in the foreground (a systemd unit is in packaging/).

It owns the datapath (BPF programs and pinned maps, endpoint plumbing) and the transparent
proxy (one listener per L7 parser on 127.0.0.1), and serves the local API on a unix socket
(root only, mode 0600). SIGTERM / SIGINT stop it — enforcement stays in the kernel (pinned
maps, attached programs); redirected ports fail closed until it is back. SIGHUP re-reads the
policy directory.

`garrison agent --cleanup` (with the same --state-dir, --socket and --bpffs-root) removes
what an agent leaves in the kernel on purpose, once it is stopped: its endpoints (the
namespaces and veths it made; of an adopted namespace only garrison's programs and what it
added), its pinned maps, and the proxy steering ip rule / local route — only those of the two
that this agent added (recorded in the state directory); a rule or route that was there
before the agent stays. With `--kvstore etcd` also the routes to other nodes' pod CIDRs
(protocol 0xa7, docs/cluster.md) and from_netdev on the underlay device, with its clsact
when garrison added it (recorded too, so a killed agent's is found).

One agent per state directory, socket and pin root: an agent (or `--cleanup`) whose
--state-dir, --socket or --bpffs-root a running agent holds refuses before it touches
anything, naming the path and that agent's pid (garrison/agent/claim.py).

Exit status: 0 after a clean stop; 1 when it cannot start (missing privilege or package —
the message says which — or another agent holds one of its paths), or `--cleanup` while the
agent runs; 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from garrison.agent.api import AgentAPIServer, AgentClient, AgentUnreachableError, APIError
from garrison.agent.claim import AgentRunningError, check_stopped, claim
from garrison.agent.cnisocket import CNISocketServer
from garrison.agent.config import DEFAULT_BPFFS_ROOT, DEFAULT_SOCKET, DEFAULT_STATE_DIR, AgentConfig
from garrison.agent.daemon import Agent, PolicyDirError
from garrison.agent.endpoints import EndpointError, EndpointRegistry
from garrison.agent.handlers import make_handlers
from garrison.agent.kernel import STEERING_RECORD, UNDERLAY_RECORD, KernelDatapath
from garrison.agent.metrics import AgentMetrics
from garrison.agent.proxyworkers import ProxyWorkers, WorkersConfig, new_metrics_dir
from garrison.agent.proxyworkers import serve_metrics as serve_workers_metrics
from garrison.bpf.loader import BPFFSError, DatapathError
from garrison.cli.flow_api_args import (
    add_flow_api_server_flags,
    flow_api_server_flags_given,
    flow_api_server_tls,
)
from garrison.cli.kvstore_args import (
    add_etcd_client_flags,
    etcd_client_flags_given,
    etcd_client_options,
)
from garrison.cluster.agent import ClusterConfigError
from garrison.cluster.flowapi import DEFAULT_PORT as FLOW_API_PORT
from garrison.cluster.flowapi import FlowAPIError, FlowAPIServer, ServerTLS
from garrison.cluster.keys import parse_host_port
from garrison.cluster.routes import RouteError, remove_node_routes
from garrison.cni.wire import cni_socket_for
from garrison.flows.record import FlowRecord
from garrison.flows.writer import AccessLogConfig, AccessLogError, AccessLogWriter
from garrison.kvstore.base import KVStoreError
from garrison.policies.errors import PolicyValidationError
from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels
from garrison.policies.model import EnforcementMode
from garrison.proxy.commands import PeerInfo
from garrison.proxy.config import ProxyConfig
from garrison.proxy.metrics import MetricsServer, ProxyMetrics
from garrison.proxy.server import FlowSink, ProxyServer, ServerSettings
from garrison.proxy.sockets import ListenError
from garrison.redirect.bpffs import ensure_bpffs, prepare_pin_dir, remove_pin_dir
from garrison.redirect.steering import SteeringRecord
from garrison.redirect.underlay import UnderlayRecord
from garrison.statefile import StateFileError

log = logging.getLogger("garrison.agent")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("agent", help="run the node agent (datapath, proxy, API) as root")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="where the agent keeps its endpoints, identities, imported policies "
                   "and policy revision (docs/operating.md)")
    p.add_argument("--policy-dir", type=Path,
                   help="policy files to enforce, watched: every change is applied (a "
                   "change that does not validate is refused, the previous policy stays)")
    p.add_argument("--access-log", type=Path, metavar="PATH",
                   help="write every flow record (kernel drops, L7 decisions) as JSON lines")
    p.add_argument("--access-log-max-bytes", type=int, default=100 * 1024 * 1024, metavar="N",
                   help="rotate the access log at this size in bytes (0: never)")
    p.add_argument("--access-log-backups", type=int, default=5, metavar="N",
                   help="rotated access logs to keep")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics of the datapath, agent and proxy here "
                   "(docs/operating.md#metrics)")
    p.add_argument("--ui", metavar="HOST:PORT",
                   help="also serve the review page of this agent's flows (`garrison ui`; "
                   "loopback only, port 0 picks one and logs it)")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                   help="the local API's unix socket (root only)")
    p.add_argument("--bpffs-root", type=Path, default=DEFAULT_BPFFS_ROOT,
                   help="bpffs directory of the pinned maps (one per agent)")
    p.add_argument("--node-name", default=os.uname().nodename,
                   help="this node's name in flow records and in a cluster")
    p.add_argument("--redact-query-param", action="append", default=[], metavar="NAME",
                   help="flow records show this query parameter's value as [REDACTED] "
                   "(exact case, percent-decoded name; repeatable); policy still sees it")
    p.add_argument("--kvstore", choices=["sqlite", "etcd"], default="sqlite",
                   help="etcd: join a cluster (docs/cluster.md); sqlite: this node alone")
    p.add_argument("--kvstore-endpoints", default="", metavar="URL[,URL]",
                   help="etcd client URLs, e.g. http://198.19.0.250:2379; https:// for TLS "
                   "(all one scheme)")
    add_etcd_client_flags(p)
    p.add_argument("--pod-cidr", metavar="CIDR",
                   help="with --kvstore etcd: this node's endpoint addresses")
    p.add_argument("--node-ip", metavar="IP",
                   help="with --kvstore etcd: where other nodes route --pod-cidr (default: the "
                   "address towards etcd)")
    p.add_argument("--kvstore-lease-ttl", type=int, default=15, metavar="SECONDS",
                   help="with --kvstore etcd: how long after this agent stops the other nodes "
                   "forget its endpoints (default 15)")
    p.add_argument("--identity-gc-grace", type=int, default=900, metavar="SECONDS",
                   help="with --kvstore etcd: how long an identity no node references (its "
                   "nodes died) stays in etcd before this agent deletes it and frees its number "
                   "(default 900, Cilium's identity GC interval)")
    p.add_argument("--flow-api", default="auto", metavar="IP:PORT|none",
                   help="with --kvstore etcd: serve this node's flow records read-only to the "
                   "other nodes (`garrison observe --cluster`), over TLS with "
                   "--flow-api-tls-cert, else unauthenticated plaintext like Hubble's port "
                   "without TLS; auto: the node IP, port 4244; none: do not (docs/cluster.md)")
    add_flow_api_server_flags(p)
    p.add_argument("--enforcement", choices=[m.value for m in EnforcementMode],
                   default="default",
                   help="Cilium's policy enforcement mode: default: a direction is enforced, "
                   "denying what no rule allows, once a rule selects the endpoint for it; always: "
                   "everything is denied that no rule allows; never: nothing is enforced")
    p.add_argument("--audit", action="store_true", help="log verdicts, drop and deny nothing")
    p.add_argument("--allow-localhost", choices=["always", "policy"], default="always",
                   help="always (default): the local host reaches every endpoint (ingress) "
                   "even under default deny, so health checks keep working, as Cilium's "
                   "allow-localhost; policy: the host only reaches what policy allows")
    p.add_argument("--proxy-ports", default="http=15001,grpc=15002,kafka=15003",
                   metavar="http=N,grpc=N,kafka=N",
                   help="the transparent proxy's listeners on 127.0.0.1, one per L7 parser")
    p.add_argument("--proxy-workers", type=int, default=1, metavar="N",
                   help="serve the transparent proxy from N worker processes sharing its "
                   "ports (SO_REUSEPORT; needs Linux 6.5 or later); 1 (default): in the "
                   "agent's own process")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every flow record as a compact line on stderr")
    p.add_argument("--cleanup", action="store_true",
                   help="do not start: remove what a stopped agent with this --state-dir left "
                   "(its endpoints, pinned maps, the proxy steering rule/route it added), "
                   "then exit")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> AgentConfig:
    ports: dict[L7Protocol, int] = {}
    for part in args.proxy_ports.split(","):
        name, _, number = part.partition("=")
        try:
            proto = L7Protocol(name.strip())
        except ValueError:
            raise ValueError(
                f"--proxy-ports {args.proxy_ports}: {name.strip()!r} is no L7 parser; give "
                "http=N,grpc=N,kafka=N") from None
        ports[proto] = _port(number, f"--proxy-ports {args.proxy_ports}")
    metrics = None
    if args.metrics:
        host, _, port = args.metrics.rpartition(":")
        metrics = (host or "127.0.0.1", _port(port, f"--metrics {args.metrics}", HOST_PORT))
    for option, value, zero in (
            ("--access-log-max-bytes", args.access_log_max_bytes, "never rotate"),
            ("--access-log-backups", args.access_log_backups, "keep none")):
        if value < 0:
            raise ValueError(f"{option} {value}: give 0 ({zero}) or more")
    cluster = _cluster_config(args)
    name = args.node_name
    if (not name or len(name) > 253 or "/" in name
            or any(c.isspace() or not c.isprintable() for c in name)):
        # it names etcd keys and the flow records
        raise ValueError(f"--node-name {name!r}: give 1-253 characters without '/', spaces or"
                         " control characters (e.g. the host name)")
    return AgentConfig(
        **cluster,
        state_dir=args.state_dir,
        policy_dir=args.policy_dir,
        socket_path=args.socket,
        bpffs_root=args.bpffs_root,
        access_log=args.access_log,
        access_log_max_bytes=args.access_log_max_bytes,
        access_log_backups=args.access_log_backups,
        metrics=metrics,
        node_name=args.node_name,
        redact_query_params=tuple(args.redact_query_param),
        enforcement=EnforcementMode(args.enforcement),
        audit=args.audit,
        allow_localhost=args.allow_localhost == "always",
        proxy_ports=ports,
    )


HOST_PORT = "give HOST:PORT, e.g. 127.0.0.1:9962"


def _port(text: str, flag: str, example: str = "give http=N,grpc=N,kafka=N") -> int:
    """A TCP port number of an option, or a ValueError naming the option."""
    try:
        port = int(text.strip())
    except ValueError:
        raise ValueError(f"{flag}: {text.strip()!r} is not a port number; {example}") from None
    if not 0 < port <= 65535:
        raise ValueError(f"{flag}: port {port} is not 1-65535; {example}")
    return port


def _check_flow_api(args: argparse.Namespace) -> ServerTLS | None:
    """--flow-api and its TLS flags checked, the TLS files read, before anything starts."""
    tls_flags = flow_api_server_flags_given(args)
    if tls_flags and (args.kvstore != "etcd" or args.flow_api == "none"):
        raise ValueError(f"{tls_flags[0]} is for the flow API, which serves the cluster's flow"
                         " view: it needs --kvstore etcd and --flow-api other than none")
    if args.flow_api not in ("auto", "none"):
        if args.kvstore != "etcd":
            raise ValueError("--flow-api serves the cluster's flow view: it needs --kvstore "
                             "etcd")
        try:
            parse_host_port(args.flow_api)
        except ValueError as exc:
            raise ValueError(f"--flow-api: {exc}, auto or none") from None
    return flow_api_server_tls(args)


def _start_flow_api(agent: Agent, flag: str, tls: ServerTLS | None) -> FlowAPIServer | None:
    """The read-only flow listener, its address published in the node's record. The default
    address that cannot be bound is logged and shown by `garrison status` (the agent runs
    on); an address given that cannot be is an error."""
    cluster = agent.cluster
    if cluster is None or flag == "none":
        return None
    explicit = flag != "auto"
    host, port = parse_host_port(flag) if explicit else (cluster.node.me.ip, FLOW_API_PORT)
    server = FlowAPIServer(agent.flows, str(host), port, tls)
    try:
        server.start()
    except FlowAPIError as exc:
        if explicit:
            raise
        cluster.flow_api_error = f"no flow API for `observe --cluster`: {exc}"
        log.error("%s", cluster.flow_api_error)
        return None
    published = cluster.node.me.ip if host.is_unspecified else host
    cluster.serve_flow_api(f"{published}:{server.port}", tls.mode if tls else "plaintext")
    if tls is None and not host.is_loopback:
        log.warning("flow API on %s is plaintext and unauthenticated: whoever reaches it reads"
                    " this node's flow records; give --flow-api-tls-cert/--flow-api-tls-key"
                    " (and --flow-api-tls-client-ca) to serve TLS (docs/cluster.md)",
                    server.address)
    log.info("flow API (read-only, %s) on %s", tls.mode if tls else "plaintext", server.address)
    return server


def _cluster_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.kvstore != "etcd":
        if (args.kvstore_endpoints or args.pod_cidr or args.node_ip
                or etcd_client_flags_given(args)):
            raise ValueError("--kvstore-endpoints, --kvstore-ca/-cert/-key, --kvstore-user, "
                             "--pod-cidr and --node-ip need --kvstore etcd")
        return {}
    if not args.kvstore_endpoints or not args.pod_cidr:
        raise ValueError("--kvstore etcd needs --kvstore-endpoints URL and --pod-cidr CIDR")
    if args.kvstore_lease_ttl < 2:
        raise ValueError("--kvstore-lease-ttl must be at least 2 seconds")
    if args.kvstore_lease_ttl > 3600:
        # etcd refuses more than ~285 years, and every node keeps a dead node's endpoints
        # this long
        raise ValueError(f"--kvstore-lease-ttl {args.kvstore_lease_ttl}: at most 3600 seconds"
                         " (the other nodes keep a dead node's endpoints that long)")
    if not 1 <= args.identity_gc_grace <= 86400:
        raise ValueError(f"--identity-gc-grace {args.identity_gc_grace}: give 1 to 86400 seconds"
                         " (a node away longer than its lease TTL gets its identities back"
                         " within it)")
    etcd_client_options(args, args.kvstore_endpoints)  # files checked before anything starts
    try:
        pod_cidr = ipaddress.IPv4Network(args.pod_cidr)
    except ValueError as exc:
        raise ValueError(f"--pod-cidr {args.pod_cidr}: {exc}; give this node's IPv4 block, e.g."
                         " 198.18.1.0/24") from None
    try:
        node_ip = ipaddress.IPv4Address(args.node_ip) if args.node_ip else None
    except ValueError as exc:
        raise ValueError(f"--node-ip {args.node_ip}: {exc}; give this node's IPv4 address on"
                         " the network between the nodes") from None
    return {
        "kvstore": "etcd",
        "kvstore_endpoints": tuple(u.strip() for u in args.kvstore_endpoints.split(",") if u),
        "kvstore_ca": args.kvstore_ca,
        "kvstore_cert": args.kvstore_cert,
        "kvstore_key": args.kvstore_key,
        "kvstore_user": args.kvstore_user,
        "kvstore_password_file": args.kvstore_password_file,
        "pod_cidr": pod_cidr,
        "endpoint_pool": pod_cidr,
        "node_ip": node_ip,
        "kvstore_lease_ttl_s": args.kvstore_lease_ttl,
        "identity_gc_grace_s": args.identity_gc_grace,
    }


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = _config(args)
        flow_api_tls = _check_flow_api(args)
        if args.proxy_workers < 1:
            raise ValueError(f"--proxy-workers {args.proxy_workers}: give 1 (the proxy in the "
                             "agent's own process) or more")
    except ValueError as exc:
        print(f"garrison agent: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("garrison agent: needs root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN): it loads "
              "BPF programs, creates network namespaces and a transparent proxy", file=sys.stderr)
        return 1
    if args.cleanup:
        try:
            held = check_stopped(config.state_dir, config.socket_path, config.bpffs_root)
        except AgentRunningError as exc:
            print(f"garrison agent --cleanup: the agent with {exc.flag} ({exc.who}) is running; "
                  "stop it first (SIGTERM)", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"garrison agent --cleanup: {exc}", file=sys.stderr)
            return 1
        try:
            return _cleanup(config)
        finally:
            held.release()
    if args.ui:
        from garrison.ui.app import UIError, parse_listen

        try:
            parse_listen(args.ui, allow_remote=False)
        except UIError as exc:
            print(f"garrison agent: --ui: {exc}", file=sys.stderr)
            return 2
    problem = _prepare_paths(config)
    if problem is not None:
        print(f"garrison agent: {problem}", file=sys.stderr)
        return 2
    made_pins = not config.bpffs_root.exists()
    try:
        # before anything is touched: no two agents on one state dir, socket or pin root
        held = claim(config.state_dir, config.socket_path, None)
        try:
            ensure_bpffs()
            held.take(prepare_pin_dir(config.bpffs_root), f"--bpffs-root {config.bpffs_root}",
                      directory=True)
        except BaseException:
            held.release()
            raise
    except AgentRunningError as exc:
        print(f"garrison agent: {exc}; stop it first, or give this agent its own "
              "--state-dir, --socket and --bpffs-root", file=sys.stderr)
        return 1
    except (BPFFSError, OSError) as exc:
        print(f"garrison agent: {exc}", file=sys.stderr)
        return 1
    try:
        # uvloop for the agent's own loop only: pyroute2 runs its own asyncio loops in worker
        # threads, and those must stay standard loops (uvloop cannot open netlink sockets).
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve(config, args.verbose, args.ui, args.flow_api,
                                     args.proxy_workers, flow_api_tls))
    except (DatapathError, PolicyValidationError, ListenError, AccessLogError, OSError,
            KVStoreError, ClusterConfigError, RouteError, FlowAPIError, StateFileError,
            PolicyDirError) as exc:
        print(f"garrison agent: {exc}", file=sys.stderr)
        return 1
    finally:
        held.release()
        if made_pins:  # a start refused before the maps were pinned leaves no pin root
            with contextlib.suppress(OSError):
                config.bpffs_root.rmdir()  # only when empty


def _prepare_paths(config: AgentConfig) -> str | None:
    """A --policy-dir or --access-log directory that does not exist is created (and said);
    a path that cannot be one is refused with the reason. Never silently ignored."""
    if config.policy_dir is not None:
        if config.policy_dir.exists() and not config.policy_dir.is_dir():
            return f"--policy-dir {config.policy_dir}: not a directory; give a directory"
        if not config.policy_dir.exists():
            try:
                config.policy_dir.mkdir(parents=True, mode=0o755)
            except OSError as exc:
                return f"--policy-dir {config.policy_dir}: cannot create it: {exc.strerror}"
            log.warning("created the policy directory %s: it is empty, no policy from it yet",
                        config.policy_dir)
    if config.access_log is not None:
        if config.access_log.is_dir():
            return f"--access-log {config.access_log}: a directory; give a file path in it"
        parent = config.access_log.parent
        if not parent.exists():
            try:
                parent.mkdir(parents=True, mode=0o750)
            except OSError as exc:
                return f"--access-log {config.access_log}: cannot create {parent}: {exc.strerror}"
            log.warning("created the access log's directory %s", parent)
    return None


def _cleanup(config: AgentConfig) -> int:
    try:
        with AgentClient(config.socket_path, timeout=5) as client:
            client.call("Status")
    except AgentUnreachableError:
        pass
    except APIError:
        pass
    else:
        print(f"garrison agent --cleanup: the agent on {config.socket_path} is running; stop it "
              "first (SIGTERM)", file=sys.stderr)
        return 1
    # endpoints first: their programs go, then what garrison made of their network (an
    # adopted namespace stays, only garrison's veth/qdisc of it go — the record says which)
    had_pins = config.bpffs_root.exists()
    if not config.state_dir.is_dir():  # a typo must not read as a clean-up done
        print(f"no state directory at {config.state_dir}: no endpoints or steering of an "
              "agent recorded there (give the --state-dir the agent ran with)")
    try:
        registry = EndpointRegistry(config.state_dir / "endpoints.json", config.endpoint_pool)
        kernel = KernelDatapath(config.bpffs_root, config.proxy_ports, config.state_dir)
        for ep in list(registry):
            kernel.delete_endpoint(ep.name, ep.ipv4, ep.host_ifname or None, ep.owned)
            registry.remove(ep.name)
            print(f"removed endpoint {ep.name}: "
                  + ("its namespace and veth" if "netns" in ep.owned
                     else f"garrison's part of it ({', '.join(ep.owned) or 'programs only'}); "
                     "its namespace stays"))
        remove_pin_dir(config.bpffs_root)
    except (BPFFSError, EndpointError, OSError, StateFileError) as exc:
        print(f"garrison agent --cleanup: {exc}", file=sys.stderr)
        return 1
    print(f"removed the pinned maps under {config.bpffs_root}" if had_pins
          else f"no pinned maps under {config.bpffs_root}")
    try:
        released = UnderlayRecord(config.state_dir / UNDERLAY_RECORD).release()
    except (ValueError, OSError, NetlinkError) as exc:
        print(f"garrison agent --cleanup: {exc}", file=sys.stderr)
        return 1
    if released.underlay is not None:
        where = f"{released.underlay.ifname} (ifindex {released.underlay.ifindex})"
        what = "from_netdev and the clsact garrison added" if released.underlay.clsact \
            else "from_netdev (the clsact was there before garrison)"
        print(f"removed {what} from the underlay device {where}" if released.removed
              else f"left the underlay device {where} alone: it is gone or renamed")
    try:
        removed = SteeringRecord(config.state_dir / STEERING_RECORD).remove()
    except StateFileError as exc:
        print(f"garrison agent --cleanup: {exc}", file=sys.stderr)
        return 1
    for what, added in (("ip rule fwmark 0x200/0xf00 lookup 2004", removed.rule),
                        ("local route in table 2004", removed.route)):
        print(f"removed the {what}" if added
              else f"kept the {what}: this agent did not add it")
    try:
        routes = remove_node_routes(config.state_dir)
    except StateFileError as exc:
        print(f"garrison agent --cleanup: {exc}", file=sys.stderr)
        return 1
    for route in routes:
        print(f"removed the route to another node's pod CIDR {route}")
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _emit_all(sink: FlowSink, records: list[FlowRecord]) -> None:
    """A proxy worker's records, into the agent's sink (ring, access log, metrics)."""
    for record in records:
        sink.emit(record)


def _start_ui(listen: str, socket_path: Path) -> Any:
    """The review page over this agent's API, as `garrison ui --socket` serves it; a page that
    cannot start is logged, the agent runs on."""
    from garrison.ui.app import ReviewApp, UIError, agent_source, parse_listen

    review = ReviewApp(agent_source(socket_path), parse_listen(listen, allow_remote=False))
    try:
        log.info("review page on %s", review.start())
    except UIError as exc:
        log.error("no review page: %s", exc)
        return None
    return review


async def _serve(config: AgentConfig, verbose: bool, ui: str | None = None,
                 flow_api_flag: str = "none", proxy_workers: int = 1,
                 flow_api_tls: ServerTLS | None = None) -> int:
    loop = asyncio.get_running_loop()
    # off the loop's thread: pyroute2 (the cluster's default --node-ip, looked up through
    # netlink) runs an asyncio loop of its own, which cannot start in a thread running one
    agent = await loop.run_in_executor(None, lambda: Agent(
        config, KernelDatapath(config.bpffs_root, config.proxy_ports, config.state_dir)))
    writer = None
    if config.access_log is not None:
        writer = AccessLogWriter(
            AccessLogConfig(config.access_log, config.access_log_max_bytes,
                            config.access_log_backups)
        )
    metrics = ProxyMetrics()
    agent_metrics = AgentMetrics(agent)  # the datapath's and the agent's, beside the proxy's
    metrics.registry.register(agent_metrics)
    # --proxy-workers N: the per-process proxy metrics are the workers', summed
    workers_dir = new_metrics_dir() if proxy_workers > 1 else None
    metrics_server: MetricsServer | None = None
    if config.metrics and workers_dir is not None:
        metrics_server = serve_workers_metrics(*config.metrics, metrics.registry, workers_dir)
    else:
        metrics_server = metrics.serve(*config.metrics) if config.metrics else None
    sink = FlowSink(store=agent.flows, writer=writer, metrics=metrics,
                    verbose=sys.stderr if verbose else None, loop=loop)
    agent.event_listeners.append(agent_metrics.event_seen)
    agent.flow_sinks = [lambda record: loop.call_soon_threadsafe(sink.emit, record)]
    # before start() publishes the node
    flow_api = _start_flow_api(agent, flow_api_flag, flow_api_tls)
    try:
        await loop.run_in_executor(None, agent.start)
    except BaseException:
        if flow_api is not None:
            flow_api.stop(0)
        raise

    def destination(ip: str, port: int) -> PeerInfo:
        with agent.lock:
            ep = agent.endpoints.by_ip(ip)
            ident = ep.identity if ep else agent.identity_of_ip(ip)
            labels = agent.resolver.cache.labels_of(ident) or Labels()
        return PeerInfo(ident, labels, ip, port, ep.namespace if ep else None,
                        ep.name if ep else None)

    servers: list[ProxyServer] = []
    workers: ProxyWorkers | None = None
    proxy_status: dict[str, object] = {}
    try:
        if workers_dir is not None:
            workers = ProxyWorkers(
                WorkersConfig(proxy_workers, dict(config.proxy_ports), config.node_name,
                              tuple(config.redact_query_params), agent.cluster is not None),
                admit=agent.admit, destination=destination,
                remote=agent.cluster.is_remote_endpoint if agent.cluster else None,
                revision=lambda: agent.revision,
                emit=lambda records: _emit_all(sink, records),
                metrics_dir=workers_dir, loop=loop,
            )
            await loop.run_in_executor(None, workers.start)
            proxy_status = {proto.value: f"127.0.0.1:{port}"
                            for proto, port in config.proxy_ports.items()}
            agent.policy_listeners.append(workers.policy_changed)
        else:
            for proto, port in config.proxy_ports.items():
                settings = ServerSettings(
                    protocol=proto,
                    config=ProxyConfig(
                        node_name=config.node_name,
                        redact_query_params=config.redact_query_params,
                    ),
                    destination=destination,
                    transparent_to=agent.cluster.is_remote_endpoint if agent.cluster else None,
                )
                server = ProxyServer(settings, agent, sink, metrics=metrics)
                address = await server.listen_transparent("127.0.0.1", port)
                servers.append(server)
                proxy_status[proto.value] = f"{address[0]}:{address[1]}"
        agent.proxy_status = proxy_status

        def policy_changed() -> None:
            for server in servers:
                loop.call_soon_threadsafe(server.update_policy, agent)

        agent.policy_listeners.append(policy_changed)
        handlers = make_handlers(agent)
        api = AgentAPIServer(config.socket_path, handlers, revision=lambda: agent.revision)
        api.start()
        # the CNI plugin's socket: the CNI methods without gRPC (garrison.cni.wire)
        cni = CNISocketServer(Path(cni_socket_for(str(config.socket_path))), handlers)
        cni.start()
        log.info("agent ready: API on %s, proxy %s, policy revision %d", config.socket_path,
                 proxy_status, agent.revision)
        review = await loop.run_in_executor(None, _start_ui, ui, config.socket_path) if ui else None
        stop = asyncio.Event()
        main_pid = os.getpid()

        # Plain handlers that check the pid, not loop.add_signal_handler: pyroute2 forks to
        # enter network namespaces, and a signal a forked child receives must not stop (or
        # reload) the agent through a shared wakeup fd.
        def on_stop(signum: int, frame: object) -> None:
            if os.getpid() == main_pid:
                loop.call_soon_threadsafe(stop.set)

        def on_hup(signum: int, frame: object) -> None:
            if os.getpid() == main_pid:
                loop.call_soon_threadsafe(loop.run_in_executor, None, agent.reload_policy_dir)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        await stop.wait()
        log.info("stopping: enforcement stays in the kernel")
        if review is not None:
            review.stop()
        cni.stop()
        api.stop()
    finally:
        if flow_api is not None:
            flow_api.stop()
        for server in servers:
            with contextlib.suppress(Exception):
                await server.close(grace=0.5)
        if workers is not None:
            await loop.run_in_executor(None, workers.stop)
        elif workers_dir is not None:
            shutil.rmtree(workers_dir, ignore_errors=True)
        await loop.run_in_executor(None, agent.stop)
        sink.flush()
        if writer is not None:
            writer.close()
        if metrics_server is not None:
            metrics_server.close()
    return 0
