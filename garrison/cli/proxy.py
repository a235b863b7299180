"""`garrison proxy`: the L7 proxy in standalone mode, in front of one service.

    garrison proxy --listen 127.0.0.1:8080 --upstream 127.0.0.1:80 --protocol http \\
        -f examples/starwars/sw_l3_l4_l7_policy.yaml --dst-labels org=empire,class=deathstar \\
        --peer 127.0.0.2/32=org=empire,class=tiefighter \\
        --peer 127.0.0.3/32=org=alliance,class=xwing \\
        --access-log /tmp/access.log -v

Clients are mapped to labels by source address (`--peer`); others are `reserved:world`. The
policy enforced is the ingress policy of the destination (`--dst-labels`, `--dst-namespace`)
on port `--dport` (default: the upstream's port). SIGHUP or a changed policy file reloads the
policy; an invalid one is refused and the old one stays. SIGTERM / SIGINT stop the proxy.

`--workers N` (default: the number of CPUs) runs N worker processes on the one port
(`SO_REUSEPORT`, `garrison.proxy.workers`): the kernel spreads connections over them; the
parent watches the policy files and takes SIGHUP, and has every worker load a valid policy
("policy revision N applied (N workers)" once all did); a worker that dies is restarted with
the policy in force; the access log gets whole lines from all of them; and `--metrics` serves
their sum (prometheus_client's multiprocess mode, in a per-run directory removed at exit).
`--workers 1` is one process.

When no loaded policy selects the destination for ingress (often a typo in `--dst-labels`),
nothing in the files applies and every request would be forwarded: the proxy refuses to
start, and refuses such a reload, unless `--allow-unselected` is given; then it warns at
start and on every reload. The metric `garrison_proxy_destination_selected` is 1 or 0.

Exit status: 0 after a clean stop; 2 for bad usage, an invalid policy (every problem printed
as `file:line: ...`), a policy that does not select the destination (without
`--allow-unselected`) or an access log that cannot be opened; 1 when the proxy cannot listen
(the address is in use, not local) or fails at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from garrison.flows.writer import AccessLogConfig, AccessLogError, AccessLogWriter
from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import DEFAULT_NAMESPACE, LabelError, Labels, endpoint_labels
from garrison.policies.model import EnforcementMode, Policy
from garrison.policies.resolve import ResolverConfig
from garrison.proxy.commands import PeerInfo
from garrison.proxy.config import ProxyConfig, Timeouts
from garrison.proxy.metrics import (
    MetricsConfig,
    MetricsServer,
    ProxyMetrics,
    serve_multiprocess,
    use_multiprocess,
    worker_exited,
)
from garrison.proxy.policyview import (
    DESTINATION_IDENTITY,
    PeerMapping,
    PolicyConfigError,
    PolicySource,
    StandalonePolicy,
)
from garrison.proxy.reload import PolicyLoadError, PolicyReloader, load_policy
from garrison.proxy.server import (
    FlowSink,
    ProxyServer,
    ServerSettings,
    StaticDestination,
    install_uvloop,
)
from garrison.proxy.sockets import ListenError, listener
from garrison.proxy.workers import Supervisor, default_workers, message

EXIT_RUNTIME = 1
EXIT_USAGE = 2

log = logging.getLogger("garrison.proxy")


class UsageError(Exception):
    pass


class UnselectedDestinationError(PolicyConfigError):
    """No loaded policy selects the destination: the proxy would enforce nothing."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "proxy",
        help="run the L7 proxy in front of one service (standalone mode)",
        description=(
            "Enforce the destination's ingress policy on HTTP/1.1, HTTP/2+gRPC or Kafka "
            "traffic between clients and one upstream, and log every decision as a flow "
            "record. SIGHUP or a changed policy file reloads the policy."
        ),
    )
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to accept clients on (port 0: any free port)")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT",
                   help="the service the proxy forwards allowed traffic to")
    p.add_argument("--protocol", default="http", choices=[p.value for p in L7Protocol],
                   help="L7 protocol of the service (default: %(default)s)")
    p.add_argument("-f", "--file", dest="files", action="append", required=True,
                   metavar="POLICY", help="policy file or directory (repeatable)")
    p.add_argument("--dst-labels", required=True, metavar="k=v,...",
                   help="labels of the upstream service (the policy's endpointSelector)")
    p.add_argument("--dst-namespace", default=DEFAULT_NAMESPACE, metavar="NS",
                   help="namespace of the upstream service (namespaced policies select in it)")
    p.add_argument("--dport", type=int, metavar="N",
                   help="port the policy's toPorts are matched against (default: upstream's)")
    p.add_argument("--peer", action="append", default=[], metavar="CIDR=k=v,...",
                   help="labels of clients from CIDR (repeatable; `ns=NAME` sets the "
                   "namespace); other clients are reserved:world")
    p.add_argument("--access-log", metavar="PATH", help="write flow records as JSON lines")
    p.add_argument("--access-log-max-bytes", type=int, default=100 * 1024 * 1024, metavar="N",
                   help="rotate the access log at this size (0: never; default 100 MiB)")
    p.add_argument("--access-log-backups", type=int, default=5, metavar="N",
                   help="rotated access logs to keep (default: %(default)s)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument("--allow-unselected", action="store_true",
                   help="start (and reload) even when no policy selects the destination for "
                   "ingress, i.e. forward every request; without it the proxy refuses")
    p.add_argument("--audit", action="store_true",
                   help="audit mode: log what policy would deny, deny nothing")
    p.add_argument("--enforcement", default="default", choices=[m.value for m in EnforcementMode],
                   help="Cilium's policy enforcement mode: default: enforced once a rule "
                   "selects the destination; always: deny what no rule allows; never: allow all")
    p.add_argument("--max-connections", type=int, default=ProxyConfig().max_connections,
                   metavar="N",
                   help="client connections each worker process holds at once; more are "
                   "closed (an ERROR record)")
    p.add_argument("--connect-timeout", type=float, default=Timeouts().connect, metavar="S",
                   help="seconds to connect to the upstream")
    p.add_argument("--header-timeout", type=float, default=Timeouts().header_read, metavar="S",
                   help="seconds a client may take to send a request's headers")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="seconds an idle client connection is kept (default "
                   f"{Timeouts().idle:g}, Kafka {Timeouts().kafka_idle:g})")
    p.add_argument("--upstream-timeout", type=float, default=None, metavar="S",
                   help="seconds the upstream may take to answer (default "
                   f"{Timeouts().upstream_reply:g}, Kafka {Timeouts().kafka_upstream_reply:g}:"
                   " a broker holds JoinGroup until a rebalance ends)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes sharing the listen port (SO_REUSEPORT); "
                   "default: the number of CPUs")
    p.add_argument("--node-name", default="", metavar="NAME",
                   help="node name written into flow records (default: none)")
    p.add_argument("--redact-query-param", action="append", default=[], metavar="NAME",
                   help="flow records show this query parameter's value as [REDACTED] "
                   "(exact case, percent-decoded name; repeatable); policy still sees it")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every flow record as one compact line on stderr")
    p.set_defaults(func=run)


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT`."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"{flag} {text!r}: port out of range")
    return host, port


def resolve_host(host: str, flag: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"{flag}: cannot resolve {host!r}: {exc.strerror}") from exc
    return str(infos[0][4][0])


def _host_port(host: str, port: int) -> str:
    """`host:port` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _timeouts(args: argparse.Namespace) -> Timeouts:
    """The timeout flags (checked in `_Options`): an idle or upstream timeout given applies
    to every protocol; left out, Kafka connections keep their own longer defaults."""
    base = Timeouts(connect=args.connect_timeout, header_read=args.header_timeout)
    if args.idle_timeout is not None:
        base = replace(base, idle=args.idle_timeout, kafka_idle=args.idle_timeout)
    if args.upstream_timeout is not None:
        base = replace(base, upstream_reply=args.upstream_timeout,
                       kafka_upstream_reply=args.upstream_timeout)
    return base


class _Options:
    """The command line, checked."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.listen = parse_address(args.listen, "--listen")
        up_host, up_port = parse_address(args.upstream, "--upstream")
        if up_port == 0:
            raise UsageError("--upstream: the port cannot be 0")
        self.upstream = (resolve_host(up_host, "--upstream"), up_port)
        self.protocol = L7Protocol(args.protocol)
        self.dport = args.dport if args.dport is not None else up_port
        if not 0 < self.dport <= 65535:
            raise UsageError("--dport: a port 1-65535")
        try:
            labels = Labels.parse(args.dst_labels)
        except LabelError as exc:
            raise UsageError(f"--dst-labels: {exc}") from exc
        if not labels.items:
            raise UsageError("--dst-labels: give at least one label, e.g. app=web")
        self.dst_namespace = args.dst_namespace
        self.dst_labels_text = args.dst_labels
        self.dst_labels = endpoint_labels(labels, args.dst_namespace)
        self.files = list(args.files)
        self.allow_unselected = bool(args.allow_unselected)
        self.peers: list[PeerMapping] = []
        for text in args.peer:
            try:
                self.peers.append(PeerMapping.parse(text))
            except (ValueError, LabelError) as exc:
                raise UsageError(str(exc)) from exc
        self.metrics = parse_address(args.metrics, "--metrics") if args.metrics else None
        self.workers = default_workers() if args.workers is None else int(args.workers)
        if not 0 < self.workers <= 1024:
            raise UsageError("--workers: a number of processes, 1-1024")
        for flag in ("connect", "header", "idle", "upstream"):
            seconds = getattr(args, f"{flag}_timeout")
            # nan, inf, 0 and less: a timer that never waits (None: the protocol's default)
            if seconds is not None and not 0 < seconds < 10**7:
                raise UsageError(f"--{flag}-timeout {seconds:g}: a number of seconds above 0 "
                                 "and below 10000000 (e.g. 30)")
        for option, value, zero in (
                ("--access-log-max-bytes", args.access_log_max_bytes, "never rotate"),
                ("--access-log-backups", args.access_log_backups, "keep none")):
            if value < 0:
                raise UsageError(f"{option} {value}: give 0 ({zero}) or more")
        if args.max_connections < 1:
            raise UsageError(f"--max-connections {args.max_connections}: at least 1")
        self.resolver = ResolverConfig(EnforcementMode(args.enforcement), args.audit)
        self.config = ProxyConfig(
            timeouts=_timeouts(args),
            max_connections=args.max_connections,
            node_name=args.node_name,
            redact_query_params=tuple(args.redact_query_param),
        )

    def build_policy(self, policies: Sequence[Policy]) -> PolicySource:
        policy = StandalonePolicy(
            policies,
            self.dst_labels,
            self.dport,
            self.protocol,
            self.peers,
            self.resolver,
        )
        if not policy.destination_selected:
            what = (
                f"no policy in {', '.join(self.files)} selects the destination "
                f"--dst-labels {self.dst_labels_text} (namespace {self.dst_namespace}) for "
                f"ingress, so every "
                + ("client would be refused" if policy.ingress_enforced
                   else "request would be forwarded")
            )
            if not self.allow_unselected:
                raise UnselectedDestinationError(
                    f"{what}: check --dst-labels and --dst-namespace against the policy's "
                    "endpointSelector, or pass --allow-unselected to run without policy"
                )
            log.warning("WARNING: %s (--allow-unselected)", what)
        return policy


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="garrison proxy: %(message)s", stream=sys.stderr
    )
    try:
        options = _Options(args)
    except UsageError as exc:
        print(f"garrison proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        policy = load_policy(args.files, options.build_policy)
    except PolicyLoadError as exc:
        if isinstance(exc.__cause__, UnselectedDestinationError):
            print(f"garrison proxy: not started: {exc.__cause__}", file=sys.stderr)
            return EXIT_USAGE
        for line in exc.lines:
            print(line, file=sys.stderr)
        print("garrison proxy: invalid policy; not started", file=sys.stderr)
        return EXIT_USAGE
    writer: AccessLogWriter | None = None
    log_config: AccessLogConfig | None = None
    if args.access_log:
        parent = Path(args.access_log).parent
        if not parent.exists():  # created, as the agent does, and said
            try:
                parent.mkdir(parents=True, mode=0o750)
            except OSError as exc:
                print(f"garrison proxy: --access-log {args.access_log}: cannot create {parent}: "
                      f"{exc.strerror}", file=sys.stderr)
                return EXIT_USAGE
            log.warning("created the access log's directory %s", parent)
        try:
            log_config = AccessLogConfig(
                Path(args.access_log),
                max_bytes=args.access_log_max_bytes,
                backups=args.access_log_backups,
            )
            writer = AccessLogWriter(log_config)
        except (AccessLogError, ValueError) as exc:
            print(f"garrison proxy: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if options.workers > 1:
        if writer is not None:
            writer.close()  # opened to check it can be; each worker opens its own
        return _run_workers(args, options, policy, log_config)
    install_uvloop()
    try:
        return asyncio.run(_serve(args, options, policy, writer))
    finally:
        if writer is not None:
            writer.close()


@dataclass(frozen=True, slots=True)
class _Worker:
    """This process is worker `index` of several, on `address` (SO_REUSEPORT)."""

    index: int
    address: tuple[str, int]
    message_fd: int  # lines to the parent (`garrison.proxy.workers.message`)
    revision: int  # of the policy it starts with


def _run_workers(
    args: argparse.Namespace,
    options: _Options,
    policy: PolicySource,
    log_config: AccessLogConfig | None,
) -> int:
    """The parent of `--workers N`: reserve the port, fork the workers, serve the summed
    metrics, supervise (garrison.proxy.workers)."""
    try:
        reserved = listener(*options.listen, reuse_port=True, listen=False)
    except ListenError as exc:
        print(f"garrison proxy: cannot listen: {exc.strerror}", file=sys.stderr)
        return EXIT_RUNTIME
    name = reserved.getsockname()
    address = (str(name[0]), int(name[1]))
    metrics_dir = Path(tempfile.mkdtemp(prefix="garrison-proxy-metrics-"))
    use_multiprocess(metrics_dir)
    metrics_server: MetricsServer | None = None
    # The parent owns the policy: it watches the files (and takes SIGHUP), validates, and
    # when valid has every worker reload (SIGHUP); a worker started later is forked with the
    # policy in force. "policy revision N applied" is said once every worker applied it.
    current = {"policy": policy}
    pending: set[int] = set()
    reloader = PolicyReloader(args.files, options.build_policy,
                              lambda new: _apply_in_workers(new), announce=False)

    def _apply_in_workers(new: PolicySource) -> None:
        current["policy"] = new
        pending.clear()
        pending.update(range(options.workers))
        supervisor.signal_workers(signal.SIGHUP)

    def settle(index: int) -> None:
        if index in pending:
            pending.discard(index)
            if not pending:
                log.info("policy revision %d applied (%d workers)", reloader.revision,
                         options.workers)

    def on_message(index: int, text: str) -> None:
        what, _, revision_text = text.partition(" ")
        if not revision_text.isdigit() or int(revision_text) != reloader.revision:
            return
        if what == "refused":
            log.error("worker %d refused policy revision %s (did the files change again?); "
                      "the next change or SIGHUP loads them again", index, revision_text)
        settle(index)

    def on_exit(pid: int) -> None:
        worker_exited(pid, metrics_dir)
        for index in list(pending):  # forked again, it starts with the policy in force
            if supervisor.worker_pid(index) in (0, pid):
                settle(index)

    def run_worker(index: int, message_fd: int) -> int:
        reserved.close()
        if metrics_server is not None:
            metrics_server.forget()  # the parent's; this process only has its copy
        for handler in logging.getLogger().handlers:
            handler.setFormatter(
                logging.Formatter(f"garrison proxy (worker {index}): %(message)s")
            )
        writer = AccessLogWriter(log_config) if log_config is not None else None
        install_uvloop()
        try:
            worker = _Worker(index, address, message_fd, reloader.revision)
            return asyncio.run(_serve(args, options, current["policy"], writer, worker))
        finally:
            if writer is not None:
                writer.close()

    def on_tick() -> None:
        if reloader.changed():
            reloader.reload()

    def on_hup() -> None:
        log.info("SIGHUP: reloading the policy")
        reloader.reload()

    supervisor = Supervisor(
        options.workers, run_worker, on_exit=on_exit, on_message=on_message,
        on_hup=on_hup, on_tick=on_tick,
    )
    supervisor.block_signals()  # before the metrics thread starts: it must not get them
    try:
        if options.metrics is not None:
            try:
                metrics_server = serve_multiprocess(*options.metrics, metrics_dir)
            except OSError as exc:
                print(f"garrison proxy: --metrics {args.metrics}: {exc.strerror or exc}",
                      file=sys.stderr)
                return EXIT_RUNTIME

        def ready() -> None:
            log.info(
                "listening on %s (%s) -> upstream %s, policy for %s port %d, "
                "%d workers (pids %s)",
                _host_port(*address), options.protocol.value, _host_port(*options.upstream),
                options.dst_labels.short(), options.dport,
                options.workers, " ".join(str(pid) for pid in supervisor.pids),
            )
            if metrics_server is not None:
                log.info("metrics on http://%s:%d/metrics", metrics_server.host,
                         metrics_server.port)

        status = supervisor.run(ready)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if status == 0:
        log.info("stopped")
    return status


async def _serve(
    args: argparse.Namespace,
    options: _Options,
    policy: PolicySource,
    writer: AccessLogWriter | None,
    worker: _Worker | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    metrics = ProxyMetrics(MetricsConfig(worker=worker.index if worker is not None else 0))
    metrics.set_destination_selected(_selected(policy))
    metrics_server = None
    if options.metrics is not None and worker is None:
        try:
            metrics_server = metrics.serve(*options.metrics)
        except OSError as exc:
            print(f"garrison proxy: --metrics {args.metrics}: {exc.strerror or exc}",
                  file=sys.stderr)
            return EXIT_RUNTIME
    sink = FlowSink(
        writer=writer,
        metrics=metrics,
        verbose=sys.stderr if args.verbose else None,
        loop=loop,
    )
    destination = PeerInfo(
        DESTINATION_IDENTITY,
        options.dst_labels,
        options.upstream[0],
        options.dport,
        options.dst_namespace,
    )
    settings = ServerSettings(
        protocol=options.protocol,
        config=options.config,
        destination=StaticDestination(destination),
        advertise=options.listen if options.protocol is L7Protocol.KAFKA else None,
    )
    server = ProxyServer(settings, policy, sink, metrics=metrics)
    try:
        if worker is None:
            address = await server.listen_standalone(*options.listen, upstream=options.upstream)
        else:
            address = await server.listen_standalone(
                *worker.address, upstream=options.upstream, reuse_port=True
            )
    except ListenError as exc:
        print(f"garrison proxy: cannot listen: {exc.strerror}", file=sys.stderr)
        if metrics_server is not None:
            metrics_server.close()
        return EXIT_RUNTIME
    if options.protocol is L7Protocol.KAFKA and options.listen[1] == 0:
        # The advertised address must be the real one: rebuild settings with the bound port.
        server.settings = ServerSettings(
            protocol=settings.protocol,
            config=settings.config,
            destination=settings.destination,
            advertise=address,
        )
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # generations, so collections triggered by per-request garbage stay short.
    gc.collect()
    gc.freeze()
    def apply(new: PolicySource) -> None:
        metrics.set_destination_selected(_selected(new))
        server.update_policy(new)

    if worker is None:
        reloader = PolicyReloader(args.files, options.build_policy, apply)
        reloader.start(loop)
    else:  # the parent watches the files and sends SIGHUP once they are valid
        reloader = PolicyReloader(args.files, options.build_policy, apply,
                                  revision=worker.revision, announce=False)
        reloader.start(loop, sighup=False, watch=False)
        index, fd = worker.index, worker.message_fd

        def on_hup() -> None:
            if reloader.reload():
                message(fd, index, f"applied {reloader.revision}")
            else:  # the revision the parent asked for
                message(fd, index, f"refused {reloader.revision + 1}")

        loop.add_signal_handler(signal.SIGHUP, on_hup)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:
        log.info(
            "listening on %s (%s) -> upstream %s, policy for %s port %d",
            _host_port(*address), options.protocol.value, _host_port(*options.upstream),
            options.dst_labels.short(), options.dport,
        )
    else:  # the parent says it once every worker listens
        message(worker.message_fd, worker.index, "ready")
    if metrics_server is not None:
        log.info("metrics on http://%s:%d/metrics", metrics_server.host, metrics_server.port)
    check = (
        loop.create_task(_check_upstream(options.upstream))
        if worker is None or worker.index == 0 else None
    )
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        if check is not None:
            check.cancel()
        await reloader.stop()
        await server.close(grace=0.5)
        if metrics_server is not None:
            metrics_server.close()
    if worker is None:
        log.info("stopped")
    return 0


def _selected(policy: PolicySource) -> bool:
    return not isinstance(policy, StandalonePolicy) or policy.destination_selected


async def _check_upstream(upstream: tuple[str, int]) -> None:
    """Warn (not fail) when the upstream is not reachable now: it may come up later."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*upstream), 2.0)
    except (OSError, TimeoutError) as exc:
        log.warning(
            "upstream %s:%d is not reachable now (%s); clients get 503 until it is",
            upstream[0], upstream[1], getattr(exc, "strerror", None) or exc or "timeout",
        )
        return
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
