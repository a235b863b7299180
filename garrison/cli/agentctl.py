"""Commands that talk to a running agent over its local API: endpoint, policy import/delete/get,
identity, bpf, status (`observe` lives in `garrison.cli.observe`). Each prints a table, or
`-o json`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from garrison.agent.api import AgentClient, AgentUnreachableError, APIError
from garrison.agent.config import DEFAULT_SOCKET
from garrison.cluster.status import cluster_lines, cluster_problems

EXIT_ERROR = 1
EXIT_UNREACHABLE = 3



def _common(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                   help="agent API socket (default: %(default)s)")
    if output:
        p.add_argument("-o", "--output", choices=["text", "json"], default="text",
                       help="text for people, json (typed fields) for scripts")


def _call(args: argparse.Namespace, method: str, **params: Any) -> dict[str, Any]:
    with AgentClient(args.socket) as client:
        return client.call(method, **params)


def _run(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except AgentUnreachableError as exc:
            print(f"garrison: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except APIError as exc:
            print(f"garrison: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return wrapped


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _print(args: argparse.Namespace, data: dict[str, Any], text: Callable[[], str]) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text())


# -- endpoint -------------------------------------------------------------------------------


def _endpoint_rows(eps: Sequence[dict[str, Any]]) -> str:
    rows = [
        (
            e["id"], e["name"], e["namespace"], e["identity"], ",".join(e["labels"]), e["ipv4"],
            "Enabled" if e["ingress_enforcement"] else "Disabled",
            "Enabled" if e["egress_enforcement"] else "Disabled",
            (e.get("container_id") or "")[:12] or ("adopted" if e.get("adopted") else "-"),
        )
        for e in eps
    ]
    header = ("ENDPOINT", "NAME", "NAMESPACE", "IDENTITY", "LABELS", "IPv4",
              "POLICY (ingress)", "POLICY (egress)", "CONTAINER")
    return _table(rows, header)


@_run
def endpoint_add(args: argparse.Namespace) -> int:
    netns = f"/proc/{args.pid}/ns/net" if args.pid is not None else args.netns
    data = _call(args, "EndpointAdd", name=args.name, labels=args.labels.split(","),
                 namespace=args.namespace, ip=args.ip, netns=netns, interface=args.interface,
                 ports=args.ports)
    _print(args, data, lambda: _endpoint_rows([data]))
    return 0


@_run
def endpoint_list(args: argparse.Namespace) -> int:
    data = _call(args, "EndpointList")
    _print(args, data, lambda: _endpoint_rows(data["endpoints"]))
    return 0


@_run
def endpoint_get(args: argparse.Namespace) -> int:
    data = _call(args, "EndpointGet", name=args.name)

    def text() -> str:
        rows = [
            (r["direction"], r["identity"] or "any", r["protocol"],
             _port(r["port"], r["end_port"]), r["verdict"], "; ".join(r["derived_from"]))
            for r in data["policy"]
        ]
        audited = data.get("audit_policies") or []
        return _endpoint_rows([data]) + "\n\n" + (
            f"Audit policies: {', '.join(audited)} (what they would deny is recorded AUDIT, "
            "not enforced; not in the table below)\n\n" if audited else ""
        ) + _table(
            rows, ("DIRECTION", "REMOTE IDENTITY", "PROTO", "PORT", "VERDICT", "FROM RULE")
        )

    _print(args, data, text)
    return 0


def _port(port: int, end: int) -> str:
    if not port:
        return "any"
    return str(port) if end in (0, port) else f"{port}-{end}"


@_run
def endpoint_delete(args: argparse.Namespace) -> int:
    data = _call(args, "EndpointDelete", name=args.name)
    _print(args, data, lambda: f"endpoint {data['deleted']} deleted")
    return 0


@_run
def endpoint_config(args: argparse.Namespace) -> int:
    settings: dict[str, str] = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise APIError(f"{item!r}: expected KEY=VALUE, e.g. audit=true")
        settings[key.strip()] = value.strip()
    data = _call(args, "EndpointConfig", name=args.name, settings=settings)
    _print(args, data, lambda: f"endpoint {data['name']}: audit={str(data['audit']).lower()} "
           f"deny-response={data.get('deny_response', 'drop')}")
    return 0


@_run
def endpoint_labels(args: argparse.Namespace) -> int:
    data = _call(args, "EndpointLabels", name=args.name, labels=args.labels.split(","))
    _print(args, data, lambda: _endpoint_rows([data]))
    return 0


def _namespace_rows(namespaces: list[dict[str, Any]]) -> str:
    rows = [(n["name"], ",".join(n["labels"]), len(n["endpoints"])) for n in namespaces]
    return _table(rows, ("NAMESPACE", "LABELS", "ENDPOINTS"))


@_run
def namespace_label(args: argparse.Namespace) -> int:
    data = _call(args, "NamespaceLabel", name=args.name, labels=args.labels)

    def text() -> str:
        moved = "".join(f"\nendpoint {e['name']}: identity {e['identity']}"
                        for e in data["relabelled"])
        return _namespace_rows([data]) + moved

    _print(args, data, text)
    return 0


@_run
def namespace_get(args: argparse.Namespace) -> int:
    data = _call(args, "NamespaceGet", name=args.name)
    _print(args, data, lambda: _namespace_rows([data]))
    return 0


@_run
def namespace_list(args: argparse.Namespace) -> int:
    data = _call(args, "NamespaceList")
    _print(args, data, lambda: _namespace_rows(data["namespaces"]))
    return 0


def endpoint_exec(args: argparse.Namespace) -> int:
    """Run a command inside the endpoint's network namespace, as kubectl exec does: the one the
    agent records for NAME (an adopted namespace or a container's keeps its own name), else the
    `ip netns` namespace NAME (garrison's own endpoints, or no agent answering)."""
    cmd = list(args.cmd)
    if cmd and cmd[0].startswith("-") and cmd[0] != "--":
        print(f"garrison endpoint exec: {cmd[0]} after NAME: options go before it "
              "(garrison endpoint exec [--socket PATH] NAME -- CMD...)", file=sys.stderr)
        return 2
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("garrison endpoint exec: give a command after --", file=sys.stderr)
        return 2
    netns, why = _endpoint_netns(args)
    if netns is None:
        print(f"garrison endpoint exec: no network namespace for endpoint {args.name!r}: {why} "
              "(see `garrison endpoint list`)", file=sys.stderr)
        return EXIT_ERROR
    tool = "ip" if netns.parent in NETNS_DIRS else "nsenter"
    path = shutil.which(tool)
    if path is None:
        package = "iproute2" if tool == "ip" else "util-linux"
        print(f"garrison endpoint exec: needs the `{tool}` command: apt-get install {package}",
              file=sys.stderr)
        return EXIT_ERROR
    if tool == "ip":
        os.execv(path, [path, "netns", "exec", netns.name, *cmd])
    os.execv(path, [path, f"--net={netns}", "--", *cmd])
    return 0  # not reached


NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))


def _endpoint_netns(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The endpoint's network namespace (None and why not): the agent's record of it first,
    else the `ip netns` namespace of its name."""
    try:
        recorded = _call(args, "EndpointGet", name=args.name).get("netns")
        why = f"the agent records none for it ({args.socket})"
    except AgentUnreachableError as exc:
        recorded, why = None, str(exc)
    except APIError as exc:
        recorded, why = None, str(exc)
    if recorded and Path(recorded).exists():
        return Path(recorded), ""
    if recorded:
        why = f"its namespace {recorded} is gone"
    own = NETNS_DIRS[0] / args.name
    if own.exists():
        return own, ""
    return None, why


# -- policy (agent side) ---------------------------------------------------------------------


@_run
def policy_import(args: argparse.Namespace) -> int:
    paths = [str(Path(p).resolve()) for p in args.paths]
    data = _call(args, "PolicyImport", paths=paths)
    _print(args, data, lambda: "\n".join(
        [*(f"imported {name}" for name in data["imported"]), f"revision {data['revision']}"]
    ))
    return 0


@_run
def policy_delete(args: argparse.Namespace) -> int:
    if not args.all and not args.name:
        print("garrison policy delete: give NAME or --all", file=sys.stderr)
        return 2
    data = _call(args, "PolicyDelete", name=args.name, namespace=args.namespace, all=args.all)
    _print(args, data, lambda: f"deleted {data['deleted']} policies, revision {data['revision']}")
    return 0


@_run
def policy_get(args: argparse.Namespace) -> int:
    data = _call(args, "PolicyGet")

    def text() -> str:
        rows = [(p["kind"], p["namespace"] or "", p["name"], p["rules"], p["source"] or "")
                for p in data["policies"]]
        cluster = (f" (the cluster's policies: etcd revision {data['cluster_revision']})"
                   if "cluster_revision" in data else "")
        return f"Revision: {data['revision']}{cluster}\n" + _table(
            rows, ("KIND", "NAMESPACE", "NAME", "RULES", "SOURCE")
        )

    _print(args, data, text)
    return 0


# -- identity / bpf / status ---------------------------------------------------------------


@_run
def identity_list(args: argparse.Namespace) -> int:
    data = _call(args, "IdentityList")
    _print(args, data, lambda: _table(
        [(i["id"], ", ".join(i["labels"])) for i in data["identities"]], ("ID", "LABELS")
    ))
    return 0


@_run
def identity_get(args: argparse.Namespace) -> int:
    data = _call(args, "IdentityGet", id=args.id)
    _print(args, data, lambda: _table([(data["id"], ", ".join(data["labels"]))], ("ID", "LABELS")))
    return 0


def _dump_table(entries: Sequence[dict[str, Any]]) -> str:
    if not entries:
        return "(empty)"
    header = list(entries[0].keys())
    return _table([[e.get(h, "") for h in header] for e in entries], [h.upper() for h in header])


@_run
def bpf_policy_get(args: argparse.Namespace) -> int:
    data = _call(args, "BpfPolicyGet", endpoint=args.endpoint)
    _print(args, data, lambda: f"endpoint {data['endpoint']} (identity {data['identity']})\n"
           + _dump_table(data["entries"]))
    return 0


@_run
def bpf_ipcache_list(args: argparse.Namespace) -> int:
    data = _call(args, "BpfIpcacheList")
    _print(args, data, lambda: _dump_table(data["entries"]))
    return 0


@_run
def bpf_ct_list(args: argparse.Namespace) -> int:
    data = _call(args, "BpfCtList")
    _print(args, data, lambda: ct_text(data["entries"]))
    return 0


def ct_text(entries: Sequence[dict[str, Any]]) -> str:
    """One line per connection, as `cilium-dbg bpf ct list global` prints them."""
    if not entries:
        return "(no connections tracked)"
    lines = []
    for e in entries:
        tcp = ""
        if e["protocol"] == "TCP":
            tcp = (f" tcp_flags={'|'.join(e['tcp_flags_orig']) or '-'}"
                   f"/{'|'.join(e['tcp_flags_reply']) or '-'}")
        lines.append(
            f"{e['protocol']} {e['source']}:{e['source_port']} -> "
            f"{e['destination']}:{e['destination_port']} "
            + ("expired" if e["expired"] else f"expires={e['expires_in_s']}s")
            + f" packets={e['packets_orig']}/{e['packets_reply']}{tcp}"
            f" flags=[{' '.join(e['flags'])}]"
            f" identity={e['src_identity']}->{e['dst_identity']}"
            + (f" proxy_port={e['proxy_port']}" if e["proxy_port"] else "")
        )
    return "\n".join(lines)


@_run
def status(args: argparse.Namespace) -> int:
    data = _call(args, "Status")
    problems = status_problems(data)
    _print(args, data, lambda: status_text(data, problems))
    return EXIT_ERROR if problems else 0


def status_problems(data: dict[str, Any]) -> list[str]:
    """What is wrong with a running agent (each a line that names the fix); none: exit 0."""
    out = []
    datapath = data.get("datapath", {})
    if not datapath.get("loaded", True):
        out.append("the datapath is not loaded: see the agent's log")
    if datapath.get("loaded", True) and not datapath.get("proxy_steering", True):
        out.append("the proxy steering ip rule or route is missing: redirected ports fail "
                   "closed; restart the agent to install it")
    policy_dir = data.get("policy_dir") or {}
    for error in policy_dir.get("errors", []):
        out.append(f"policy directory: {error}")
    out += cluster_problems(data)
    return out


def status_text(data: dict[str, Any], problems: Sequence[str]) -> str:
    datapath = data.get("datapath", {})
    pins = datapath.get("pin_root", "?")
    lines = [
        f"Datapath:        {'loaded' if datapath.get('loaded') else 'NOT LOADED'}, "
        f"maps pinned under {pins}",
    ]
    if "proxy_steering" in datapath:
        added = datapath.get("proxy_steering_added") or {}
        made = [part for part in ("rule", "route") if added.get(part)]
        lines.append(
            "Proxy steering:  "
            + ("installed" if datapath["proxy_steering"] else "MISSING")
            + " (fwmark 0x200 rule, table 2004 route; "
            + (f"this agent added the {' and the '.join(made)})" if made
               else "both there before this agent)")
        )
    proxy = data.get("proxy") or {}
    if proxy:
        lines.append("Proxy:           "
                     + ", ".join(f"{proto} on {addr}" for proto, addr in sorted(proxy.items())))
    lines.append(f"Policy revision: {data['policy_revision']} ({data['policies']} "
                 f"{'policy' if data['policies'] == 1 else 'policies'})")
    policy_dir = data.get("policy_dir")
    if policy_dir:
        errors = policy_dir.get("errors", [])
        lines.append(f"Policy dir:      {policy_dir['path']}: "
                     + (f"{len(errors)} problem{'' if len(errors) == 1 else 's'}, "
                        "the previous policy stays in force" if errors else "in force"))
        lines += [f"                   {e}" for e in errors]
    unselected = data.get("endpoints_unselected") or []
    lines.append(f"Endpoints:       {data['endpoints']}"
                 + (f" ({len(unselected)} selected by no policy, all traffic allowed: "
                    f"{', '.join(unselected)})" if unselected else ""))
    if data.get("audit_policies"):
        audited = data.get("endpoints_with_audit_policies") or []
        lines.append(f"Audit policies:  {data['audit_policies']} (garrison.io/audit: what they "
                     "would deny is recorded AUDIT"
                     + (f"; endpoints: {', '.join(audited)})" if audited else ")"))
    lines += cluster_lines(data)
    lines += [
        f"Identities:      {data['identities']}",
        f"Flows:           {data['flows']['total']} ({data['flows']['in_ring']} in memory)",
        f"Map writes:      {data['map_writes']}",
        f"Uptime:          {_duration(float(data['uptime_s']))}",
    ]
    if problems:
        lines.append("")
        lines += [f"PROBLEM: {p}" for p in problems]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{seconds:.1f}s"


# -- registration ----------------------------------------------------------------------------


def register_endpoint(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ep = sub.add_parser("endpoint", help="create, list, inspect and delete endpoints")
    esub = ep.add_subparsers(dest="endpoint_command", metavar="SUBCOMMAND", required=True)
    p = esub.add_parser("add", help="create an endpoint: netns, veth, address, identity")
    p.add_argument("name", help="the endpoint's name (and its network namespace's)")
    p.add_argument("--labels", required=True, metavar="k=v,...",
                   help="the labels policies select it by; they make its identity")
    p.add_argument("--namespace", default="default", metavar="NS",
                   help="its Kubernetes-style namespace (policies are namespaced)")
    p.add_argument("--ip", metavar="ADDR", help="an address from 198.18.0.0/15")
    p.add_argument("--port", dest="ports", action="append", default=[],
                   metavar="NAME=PORT/PROTO",
                   help="a port name the workload declares, e.g. http=8080/TCP (repeatable); "
                   "named ports in policies (port: http) resolve against it")
    adopt = p.add_mutually_exclusive_group()
    adopt.add_argument("--netns", metavar="PATH",
                       help="adopt this network namespace (a path or an `ip netns` name) "
                       "instead of creating one; garrison never deletes it")
    adopt.add_argument("--pid", type=int, metavar="PID",
                       help="adopt the network namespace of process PID")
    p.add_argument("--interface", default="eth0", metavar="IF",
                   help="with --netns/--pid: the workload's interface; an existing veth to "
                   "the host is used as it is, else garrison adds one (default: %(default)s)")
    _common(p)
    p.set_defaults(func=endpoint_add)
    p = esub.add_parser("list", help="list endpoints")
    _common(p)
    p.set_defaults(func=endpoint_list)
    p = esub.add_parser("get", help="an endpoint and its resolved policy")
    p.add_argument("name", help="the endpoint's name")
    _common(p)
    p.set_defaults(func=endpoint_get)
    p = esub.add_parser("delete", help="delete an endpoint and everything it created")
    p.add_argument("name", help="the endpoint's name")
    _common(p)
    p.set_defaults(func=endpoint_delete)
    p = esub.add_parser("labels", help="replace an endpoint's labels (new identity)")
    p.add_argument("name", help="the endpoint's name")
    p.add_argument("--labels", required=True, metavar="k=v,...",
                   help="the new labels, all of them (they replace the old ones)")
    _common(p)
    p.set_defaults(func=endpoint_labels)
    p = esub.add_parser("config", help="show or change an endpoint's settings "
                        "(audit=true, deny-response=icmp)")
    p.add_argument("name", help="the endpoint's name")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="audit=true: its policy verdicts are recorded, what they would drop "
                   "passes as AUDIT (Cilium's PolicyAuditMode); audit=false: enforced. "
                   "deny-response=drop|icmp|tcp-reset: what a connection its L3/L4 policy "
                   "denies gets back: nothing (drop, the default), ICMP unreachable "
                   "(administratively prohibited), or a TCP RST (other protocols: ICMP)")
    _common(p)
    p.set_defaults(func=endpoint_config)
    p = esub.add_parser("exec", help="run a command inside an endpoint")
    _common(p, output=False)
    p.add_argument("name", help="the endpoint's name")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...",
                   help="the command and its arguments, after --")
    p.set_defaults(func=endpoint_exec)


def register_policy(policy_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = policy_sub.add_parser("import", help="import policy files into the agent (all or nothing)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="policy file or directory (*.yaml, *.yml, *.json)")
    _common(p)
    p.set_defaults(func=policy_import)
    p = policy_sub.add_parser("delete", help="delete policies by name, or all")
    p.add_argument("name", nargs="?", help="the policy's metadata.name")
    p.add_argument("--namespace", metavar="NS",
                   help="only the policy of that name in NS (else in any namespace)")
    p.add_argument("--all", action="store_true", help="delete every policy the agent has")
    _common(p)
    p.set_defaults(func=policy_delete)
    p = policy_sub.add_parser("get", help="the policies in force, with the revision")
    _common(p)
    p.set_defaults(func=policy_get)


def register_others(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ident = sub.add_parser("identity", help="list and inspect identities")
    isub = ident.add_subparsers(dest="identity_command", metavar="SUBCOMMAND", required=True)
    p = isub.add_parser("list", help="every identity in use: number and labels")
    _common(p)
    p.set_defaults(func=identity_list)
    p = isub.add_parser("get", help="one identity's labels")
    p.add_argument("id", type=int, help="the identity number, e.g. 256")
    _common(p)
    p.set_defaults(func=identity_get)

    ns = sub.add_parser("namespace", help="label and list namespaces")
    nsub = ns.add_subparsers(dest="namespace_command", metavar="SUBCOMMAND", required=True)
    p = nsub.add_parser(
        "label", help="set (KEY=VALUE) or remove (KEY-) labels of a namespace",
        description="Set or remove labels of a namespace, as `kubectl label namespace`. "
        "NetworkPolicy namespaceSelector and io.cilium.k8s.namespace.labels.KEY selectors "
        "match them; the namespace's endpoints get new identities at once. "
        "kubernetes.io/metadata.name is always the namespace's name.")
    p.add_argument("name", help="the namespace, e.g. prod")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-", help="label changes")
    _common(p)
    p.set_defaults(func=namespace_label)
    p = nsub.add_parser("get", help="a namespace's labels and endpoints")
    p.add_argument("name", help="the namespace")
    _common(p)
    p.set_defaults(func=namespace_get)
    p = nsub.add_parser("list", help="namespaces that are labelled or have endpoints")
    _common(p)
    p.set_defaults(func=namespace_list)

    bpf = sub.add_parser("bpf", help="inspect the datapath maps")
    bsub = bpf.add_subparsers(dest="bpf_command", metavar="MAP", required=True)
    pol = bsub.add_parser("policy", help="an endpoint's policy map entries").add_subparsers(
        dest="c", metavar="get", required=True)
    p = pol.add_parser("get", help="the policy map entries of one endpoint's identity")
    p.add_argument("endpoint", help="the endpoint's name")
    _common(p)
    p.set_defaults(func=bpf_policy_get)
    ipc = bsub.add_parser("ipcache", help="address prefix → identity").add_subparsers(
        dest="c", metavar="list", required=True)
    p = ipc.add_parser("list", help="every ipcache entry")
    _common(p)
    p.set_defaults(func=bpf_ipcache_list)
    ct = bsub.add_parser("ct", help="the connection tracking table").add_subparsers(
        dest="c", metavar="list", required=True)
    p = ct.add_parser("list", help="every tracked connection, with flags and expiry")
    _common(p)
    p.set_defaults(func=bpf_ct_list)

    p = sub.add_parser(
        "status",
        help="agent health: exits 0 when healthy, 1 when something is wrong (a bad policy "
        "file, the proxy steering missing; each printed as PROBLEM), 3 when no agent answers",
    )
    _common(p)
    p.set_defaults(func=status)
