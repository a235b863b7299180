"""`garrison cni install|uninstall`: a CNI network whose containers garrison governs.

install writes a conflist (`ptp` + `host-local`, `portmap`, then `garrison-cni` chained last)
into the runtime's configuration directory and the plugin into its plugin directory, and records
what it wrote (with each file's digest) in `<conf-dir>/.garrison-cni-<network>.json`.
uninstall removes exactly the files recorded there that still hold what install wrote.

Why ptp and not bridge: the datapath steers a connection into the L7 proxy with
`bpf_sk_assign` at tc ingress of the client's host-side veth, which only takes effect when the
host routes the packet. On a bridge, two containers of the same subnet are switched at layer 2
and the proxy never sees their connection (measured: an L7-denied request reached the app),
so the agent refuses a bridge port; ptp routes every packet through the host, as garrison's
own endpoints do.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from garrison.agent.config import DEFAULT_SOCKET, DEFAULT_STATE_DIR

PLUGIN = "garrison-cni"
# the CNI specification's network names; the name is also a file name in the conf directory
NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_NETWORK = "garrison"
DEFAULT_SUBNET = "198.18.128.0/17"
DEFAULT_ROUTES = ("198.18.0.0/15",)


def conflist(network: str, subnet: str, routes: list[str], socket: str,
             state_dir: str) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": r} for r in routes],
                },
            },
            # `podman run -p`: without it the mapping is accepted and publishes nothing
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": PLUGIN, "agentSocket": socket, "stateDir": state_dir},
        ],
    }


def plugin_script(python: str) -> str:
    """The plugin executable. `-IS` (-I -S): the runtime's environment (PYTHONPATH and the like)
    never changes what runs as root, and no site start-up. The plugin's modules use the
    standard library only, so it imports them without `garrison/__init__` (which checks the
    compiled proxy modules: ~70-200 ms a container start, bench/cni.py)."""
    package = Path(__file__).resolve().parent.parent
    return (
        f"#!{python} -IS\n"
        "# written by `garrison cni install`: the garrison CNI plugin (garrison/cni/)\n"
        "import sys\nimport types\n\n"
        "package = types.ModuleType('garrison')\n"
        f"package.__path__ = [{str(package)!r}]\n"
        "sys.modules['garrison'] = package\n"
        "from garrison.cni.plugin import main  # noqa: E402\n\n"
        "raise SystemExit(main())\n"
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_path(conf_dir: Path, network: str) -> Path:
    return conf_dir / f".garrison-cni-{network}.json"


def _bad_network(command: str, network: str) -> bool:
    if NETWORK_NAME.match(network):
        return False
    print(f"garrison cni {command}: --network {network!r}: a CNI network name is a letter or "
          "digit, then letters, digits, '_', '.' or '-'", file=sys.stderr)
    return True


def _read_record(command: str, record: Path) -> list[dict[str, str]] | None:
    """The files a record lists; None (after saying why) when it cannot be read."""
    try:
        files = json.loads(record.read_text())["files"]
        if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str)
            and isinstance(f.get("sha256"), str) for f in files
        ):
            raise ValueError("no list of files")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"garrison cni {command}: {record}: not a record garrison can read ({exc}); "
              "nothing removed: remove the network's conflist and record by hand",
              file=sys.stderr)
        return None
    return files


def _write(path: Path, data: bytes, mode: int, written: list[tuple[dict[str, str], bool]],
           ours: dict[str, str]) -> None:
    """Write `path` unless a file not garrison's is there; `ours`: path -> digest of what an
    earlier install wrote. Appends (record entry, whether it replaced such a file) to
    `written`."""
    replaced = False
    if path.exists():
        current = path.read_bytes()
        if current == data:
            return  # already there as wanted (not ours to remove unless we wrote it)
        if ours.get(str(path)) != _digest(current):
            raise FileExistsError(f"{path} exists with other content; garrison does not "
                                  "replace what it did not write: move it away or pick "
                                  "another name")
        replaced = True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    written.append(({"path": str(path), "sha256": _digest(data)}, replaced))


def install(args: argparse.Namespace) -> int:
    try:
        subnet = ipaddress.ip_network(args.subnet)
        routes = [str(ipaddress.ip_network(r)) for r in (args.route or DEFAULT_ROUTES)]
    except ValueError as exc:
        print(f"garrison cni install: {exc}", file=sys.stderr)
        return 2
    if _bad_network("install", args.network):
        return 2
    conf_dir, bin_dir = Path(args.cni_conf_dir), Path(args.cni_bin_dir)
    record = _record_path(conf_dir, args.network)
    previous = _read_record("install", record) if record.exists() else []
    if previous is None:
        return 1
    ours = {f["path"]: f["sha256"] for f in previous}
    fresh: list[tuple[dict[str, str], bool]] = []
    conf = conflist(args.network, str(subnet), routes, str(args.socket), str(args.state_dir))
    status = 0
    try:
        _write(bin_dir / PLUGIN, plugin_script(sys.executable).encode(), 0o755, fresh, ours)
        _write(conf_dir / f"{args.network}.conflist",
               (json.dumps(conf, indent=2) + "\n").encode(), 0o644, fresh, ours)
    except OSError as exc:
        for item, replaced in fresh:
            if not replaced:
                Path(item["path"]).unlink(missing_ok=True)
        fresh = [(item, True) for item, replaced in fresh if replaced]  # garrison's: recorded
        print(f"garrison cni install: {exc}", file=sys.stderr)
        status = 1
    paths = {item["path"] for item, _ in fresh}
    written = [f for f in previous if f["path"] not in paths] + [item for item, _ in fresh]
    if written:
        record.write_text(
            json.dumps({"network": args.network, "files": written}, indent=1) + "\n")
    if status:
        return status
    for item, replaced in fresh:
        print(f"{'replaced' if replaced else 'wrote'} {item['path']}")
    print(f"network {args.network!r} ({subnet}): podman run --network {args.network} ...")
    return 0


def uninstall(args: argparse.Namespace) -> int:
    if _bad_network("uninstall", args.network):
        return 2
    conf_dir = Path(args.cni_conf_dir)
    record = _record_path(conf_dir, args.network)
    if not record.exists():
        print(f"garrison cni uninstall: nothing recorded for network {args.network!r} in "
              f"{conf_dir} (was it installed with another --cni-conf-dir?)", file=sys.stderr)
        return 1
    files = _read_record("uninstall", record)
    if files is None:
        return 1
    status = 0
    for item in files:
        path = Path(item["path"])
        if not path.exists():
            continue
        if _digest(path.read_bytes()) != item["sha256"]:
            print(f"kept {path}: changed since install", file=sys.stderr)
            status = 1
            continue
        path.unlink()
        print(f"removed {path}")
    record.unlink()
    return status


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cni = sub.add_parser("cni", help="install the CNI plugin for podman and other runtimes")
    csub = cni.add_subparsers(dest="cni_command", metavar="SUBCOMMAND", required=True)
    for name, fn, helptext in (
        ("install", install, "write a conflist and the plugin where the runtime looks"),
        ("uninstall", uninstall, "remove exactly what install wrote"),
    ):
        p = csub.add_parser(name, help=helptext)
        p.add_argument("--network", default=DEFAULT_NETWORK,
                       help="the CNI network's name, as podman run --network NAME gives it "
                       "(default: %(default)s)")
        p.add_argument("--cni-conf-dir", default="/etc/cni/net.d",
                       help="where the runtime reads network configurations (NAME.conflist) "
                       "(default: %(default)s)")
        p.add_argument("--cni-bin-dir", default="/usr/lib/cni",
                       help="where the runtime looks for plugins (default: %(default)s)")
        if name == "install":
            p.add_argument("--subnet", default=DEFAULT_SUBNET,
                           help="the containers' addresses (ptp's host-local IPAM) "
                           "(default: %(default)s)")
            p.add_argument("--route", action="append", metavar="CIDR",
                           help="routes in the container (repeatable; default: "
                           f"{', '.join(DEFAULT_ROUTES)})")
            p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                           help="the agent's API socket (default: %(default)s)")
            p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                           help="the agent's state directory (default: %(default)s)")
        p.set_defaults(func=fn)
