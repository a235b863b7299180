"""Endpoints a container runtime asks for through `garrison-cni`.

ADD adopts the container's namespace and its existing host-side veth; the endpoint is made
with the reserved `init` identity (default deny both ways) because podman holds the
container's lock during CNI ADD, so `podman inspect` from inside ADD would wait forever
(measured: it blocks until the ADD chain ends). A resolver thread then reads the container's
labels with `podman container inspect` (it returns as soon as podman releases the lock) and
relabels the endpoint: map writes only, the programs stay. DEL removes the endpoint and
releases its identity; a DEL the agent missed (it was down) is read from
`STATE/cni-pending/` on start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from garrison.agent.endpoints import EndpointError, EndpointRecord
from garrison.identity.model import RESERVED
from garrison.redirect.tc import attached_filters

if TYPE_CHECKING:
    from garrison.agent.daemon import Agent

log = logging.getLogger("garrison.agent.runtime")

PENDING_DIR = "cni-pending"  # garrison.cni.plugin.PENDING_DIR
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
INSPECT_TIMEOUT = 120.0
PODMAN = "podman"


def pending_deletes(state_dir: Path) -> dict[str, Path]:
    """Container ids whose DEL the agent missed, with the file that records each."""
    out = {}
    directory = state_dir / PENDING_DIR
    if directory.is_dir():
        for path in directory.glob("*.json"):
            out[path.stem] = path
    return out


def missed_delete_applies(path: Path, network: str) -> bool:
    """Whether the DEL recorded at `path` is for the endpoint on `network`: a DEL on another
    network (a refused second attachment) leaves it. An unreadable record leaves it too: an
    endpoint whose container is gone is forgotten anyway, its veth being gone."""
    try:
        recorded = json.loads(path.read_text()).get("network")
    except (OSError, ValueError, AttributeError):
        return False
    return not recorded or not network or recorded == network


def labels_from_podman(
    container_id: str, podman: str = PODMAN
) -> tuple[str, dict[str, str], dict[str, str]]:
    """(container name, labels, its networks with its address on each) from `podman container
    inspect`; waits while podman holds the container's lock."""
    done = subprocess.run(
        [podman, "container", "inspect", "--format", "json", container_id],
        capture_output=True, text=True, timeout=INSPECT_TIMEOUT, stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise LookupError(done.stderr.strip() or f"podman exited {done.returncode}")
    data = json.loads(done.stdout)
    item = data[0] if isinstance(data, list) and data else {}
    labels = (item.get("Config") or {}).get("Labels") or {}
    networks = (item.get("NetworkSettings") or {}).get("Networks") or {}
    return (
        str(item.get("Name") or ""),
        {str(k): str(v) for k, v in labels.items()},
        {str(k): str((v or {}).get("IPAddress") or "") for k, v in networks.items()},
    )


class RuntimeEndpoints:
    """The CNI requests of one agent and its label resolvers."""

    def __init__(self, agent: Agent, podman: str = PODMAN) -> None:
        self.agent = agent
        self.podman = podman
        # label reads wait on podman's lock: each in a worker of its own, never the ADD
        self._readers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="garrison-labels")

    # -- CNI verbs -------------------------------------------------------------------------

    def add(self, req: dict[str, Any]) -> EndpointRecord:
        agent = self.agent
        container_id = str(req["container_id"])
        ipv4 = str(req["ipv4"])
        interface = str(req.get("interface") or "eth0")
        with agent.lock:
            old = agent.endpoints.by_container(container_id)
            if old is not None:
                if old.ipv4 == ipv4 and old.netns_path == req["netns"]:
                    return old  # the runtime asked again: the same attachment
                if old.netns_path == req["netns"] and old.ifname != interface:
                    # replacing it would leave the first interface with no programs
                    raise EndpointError(
                        f"container {container_id[:12]} is already on garrison network "
                        f"{old.extra.get('network') or '?'} ({old.ifname} {old.ipv4}); "
                        "garrison enforces one interface per container: attach it to one "
                        "garrison network"
                    )
                agent.delete_endpoint(old.name)
            name = str(req["name"])
            held = next((e for e in agent.endpoints if e.name == name), None)
            if (
                held is not None and held.container_id and held.container_id != container_id
                and agent.datapath.link_of(held.name, held.host_ifname or None) is None
            ):
                # its container went without a DEL (the plugin could not run): a stale name
                log.warning("endpoint %s: container %s is gone (veth %s too) and its DEL never "
                            "came; container %s takes the name", name, held.container_id[:12],
                            held.host_ifname, container_id[:12])
                agent.delete_endpoint(name)
            elif held is not None and held.container_id != container_id:
                # a running container holds the name (renamed since: `podman rename`), or an
                # endpoint of `garrison endpoint add`: this one starts under a name of its own
                # rather than not at all
                unique = f"{name[:240]}-{container_id[:12]}"
                whose = (f"container {held.container_id[:12]}'s (renamed since?)"
                         if held.container_id else "not a container's")
                log.warning("endpoint %s is %s: container %s's endpoint is %s", name, whose,
                            container_id[:12], unique)
                name = unique
            gateway = self._gateway(str(req.get("gateway") or ""))
            record = agent.add_endpoint(
                name, [], str(req.get("namespace") or "default"), ipv4,
                netns=str(req["netns"]), interface=interface, make_interface=False,
                container_id=container_id, extra={"network": str(req.get("network") or "")},
                ports=[str(p) for p in req.get("ports") or []],  # NAME=PORT/PROTO
            )
            if gateway is not None:
                # the host's side of a ptp link answers from this address: it is the host
                # (written once the ADD holds; the container starts after ADD returns)
                agent.datapath.set_prefix(gateway, RESERVED["host"].id)
        self.resolve_later(record)
        return record

    def _gateway(self, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """prevResult's gateway as a host prefix, checked before anything is made: it must not
        be an endpoint's address (it becomes the host identity)."""
        if not text:
            return None
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise EndpointError(f"prevResult's gateway {text!r} is not an IP address") from None
        owner = self.agent.endpoints.by_ip(str(address))
        if owner is not None:
            raise EndpointError(
                f"prevResult's gateway {address} is the address of endpoint {owner.name!r}, "
                "not the host's side of the link; check the conflist"
            )
        return ipaddress.ip_network(address)

    def delete(self, req: dict[str, Any]) -> dict[str, Any]:
        # under the agent's lock, as ADD: the endpoint looked up is the one deleted, and the
        # registry is not read while another thread changes it
        with self.agent.lock:
            record = self.agent.endpoints.by_container(str(req["container_id"]))
            if record is None:
                return {"deleted": None}  # DEL twice, or for a container never added: success
            network = str(req.get("network") or "")
            if network and record.extra.get("network") not in (None, "", network):
                # a DEL on another network (one whose ADD was refused): the endpoint is not its
                return {"deleted": None}
            with contextlib.suppress(EndpointError):
                self.agent.delete_endpoint(record.name)
        return {"deleted": record.name}

    def gc(self, req: dict[str, Any]) -> dict[str, Any]:
        """CNI GC (spec 1.1): the endpoints of containers on `network` that the runtime no
        longer lists as attached go."""
        network = str(req.get("network") or "")
        valid = {str(c) for c in req.get("valid") or ()}
        with self.agent.lock:
            gone = [
                ep.name for ep in list(self.agent.endpoints)
                if ep.container_id and ep.extra.get("network") == network
                and ep.container_id not in valid
            ]
            for name in gone:
                with contextlib.suppress(EndpointError):
                    self.agent.delete_endpoint(name)
        return {"deleted": gone}

    def check(self, req: dict[str, Any]) -> dict[str, Any]:
        agent = self.agent
        problems = []
        with agent.lock:
            record = agent.endpoints.by_container(str(req["container_id"]))
        if record is None:
            return {"problems": [f"no endpoint for container {req['container_id']}"]}
        if req.get("ipv4") and req["ipv4"] != record.ipv4:
            problems.append(f"endpoint address {record.ipv4}, container has {req['ipv4']}")
        link = agent.datapath.link_of(record.name, record.host_ifname)
        if link is None:
            problems.append(f"host veth {record.host_ifname} is gone")
        else:
            names = {f.name for f in attached_filters(link.ifindex)}
            for prog in ("from_container", "to_container"):
                if prog not in names:
                    problems.append(f"{prog} is not attached to {record.host_ifname}")
        with agent.lock:
            cache = {e["prefix"]: e for e in agent.datapath.dump_ipcache()}
        entry = cache.get(f"{record.ipv4}/32")
        if entry is None or entry["identity"] != record.identity:
            problems.append(f"no ipcache entry {record.ipv4}/32 -> identity {record.identity}")
        return {"endpoint": record.name, "problems": problems}

    # -- labels ----------------------------------------------------------------------------

    def resolve_later(self, record: EndpointRecord) -> None:
        if record.labels or not record.container_id:
            return
        self._readers.submit(self._resolve, record.name, record.container_id)

    def _resolve(self, name: str, container_id: str) -> None:
        try:
            _, labels, networks = labels_from_podman(container_id, self.podman)
        except (LookupError, OSError, ValueError, AttributeError,
                subprocess.TimeoutExpired) as exc:
            log.error("container %s (%s): labels not read, it stays reserved:init (deny "
                      "all): %s", name, container_id[:12], exc)
            return
        with self.agent.lock:  # other threads add and remove endpoints
            record = self.agent.endpoints.by_container(container_id)
        ours = record.extra.get("network", "") if record is not None else ""
        others = [f"{net} ({ip or 'no IPv4'})" for net, ip in sorted(networks.items())
                  if net != ours]
        if record is not None and others:
            # an interface garrison does not govern: its traffic never meets the programs
            log.warning("container %s is also on %s: its traffic there bypasses garrison's "
                        "policy, egress included; put it on garrison networks only", name,
                        ", ".join(others))
        namespace = labels.get(NAMESPACE_LABEL) or None
        own = sorted(f"{k}={v}" for k, v in labels.items() if k != NAMESPACE_LABEL)
        if not own:
            log.warning("container %s has no labels: it stays reserved:init", name)
            return
        with self.agent.lock:
            current = self.agent.endpoints.by_container(container_id)
            if current is None or current.name != name:
                return  # deleted meanwhile
            try:
                self.agent.relabel_endpoint(name, own, namespace)
            except (EndpointError, ValueError) as exc:
                log.error("container %s: labels %s refused: %s", name, own, exc)
                return
        log.info("container %s: labels %s", name, ",".join(own))

    def resume(self) -> None:
        """On agent start: read the labels of containers whose labels were not read yet."""
        for record in list(self.agent.endpoints):
            self.resolve_later(record)
