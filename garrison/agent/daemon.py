"""The node agent: endpoints, identities, policy → maps, proxy, flows, the local API.

Threads: the asyncio loop (main thread) runs the transparent proxy; the API server's worker
threads and the policy-directory watcher mutate agent state under `self.lock`; an event
thread turns datapath events into flow records. `PolicySource.admit` (called by the proxy on
the loop) takes the same lock briefly.

Changes reach the kernel incrementally: the resolver reports which endpoint identities a
change affects and which of their keys changed, and only those entries are written.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from garrison.agent.api import APIError
from garrison.agent.config import AgentConfig
from garrison.agent.endpoints import (
    GATEWAY,
    OWNS_ALL,
    EndpointError,
    EndpointRecord,
    EndpointRegistry,
)
from garrison.agent.kernel import KernelDatapath, Link
from garrison.agent.policystore import ImportedPolicies, RevisionRecord
from garrison.agent.runtime import missed_delete_applies, pending_deletes
from garrison.agent.whatif import AuditingResolver
from garrison.bpf.maps import DatapathEvent
from garrison.bpf.sync import KernelBehindError, LocalEndpoint, audits
from garrison.cluster.agent import AgentCluster
from garrison.flows.record import FlowRecord
from garrison.flows.store import FlowStore, StoreConfig
from garrison.identity.allocator import AllocatorConfig, IdentityAllocator
from garrison.identity.model import RESERVED, RESERVED_BY_ID, Identity
from garrison.identity.namespaces import NamespaceError, NamespaceStore, check_namespace
from garrison.kvstore.base import KVStoreError
from garrison.kvstore.sqlite import SQLiteKVStore
from garrison.policies.errors import PolicyValidationError
from garrison.policies.l7rules import L7Protocol, L7RuleSet
from garrison.policies.labels import NAMESPACE_NAME_LABEL, Labels
from garrison.policies.loader import load_paths
from garrison.policies.mapstate import PROTO_TCP, LookupResult, MapState, MatchType, lookup
from garrison.policies.model import (
    Direction,
    IPNetwork,
    NamedPort,
    Policy,
    named_port_map,
    parse_named_port,
)
from garrison.policies.repository import PolicyChange, PolicyKey, PolicyRepository
from garrison.policies.resolve import ResolverConfig
from garrison.policies.selectorcache import WORLD_IDENTITY
from garrison.proxy.policyview import Admission
from garrison.redirect import endpoint as netdev
from garrison.redirect.addresses import AddressWatch
from garrison.redirect.tc import ForeignFilterError
from garrison.statefile import StateWriteError

HOST_IDENTITY = RESERVED["host"].id

log = logging.getLogger("garrison.agent")

FlowSink = Callable[[FlowRecord], object]


class PolicyDirError(ValueError):
    """The policy directory does not validate at start: the message names the first issue."""


class Agent:
    def __init__(self, config: AgentConfig, datapath: KernelDatapath) -> None:
        self.config = config
        self.datapath = datapath
        self.lock = threading.RLock()
        self.started = time.time()
        state = config.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.kvstore = SQLiteKVStore.in_state_dir(state)
        self.allocator = IdentityAllocator(
            self.kvstore, AllocatorConfig(node_name=config.node_name)
        )
        self.endpoints = EndpointRegistry(state / "endpoints.json", config.endpoint_pool)
        # namespaces' labels, beside the identities they become part of
        self.namespaces = NamespaceStore(self.kvstore)
        # the revision counts on across restarts (audit lines and status name it)
        self.revisions = RevisionRecord(state / "policy-revision")
        self.repository = PolicyRepository(revision=self.revisions.load() + 1)
        # what `policy import` brought in survives a restart (or a crash)
        self.imported = ImportedPolicies(state / "policies.json")
        # the enforced policies; with policies in audit mode (garrison.io/audit) also their
        # what-if state (`resolver.what_if`, garrison/agent/whatif.py)
        self.resolver = AuditingResolver(
            ResolverConfig(config.enforcement, config.audit, config.allow_localhost)
        )
        self.flows = FlowStore(StoreConfig(capacity=config.flow_ring_size))
        # where flow records go; the agent command replaces this with the proxy's sink
        self.flow_sinks: list[FlowSink] = [self.flows.add]
        # called (from any thread) after a policy or identity change that the proxy must see
        self.policy_listeners: list[Callable[[], None]] = []
        # called on the event thread with every datapath event (the agent's metrics)
        self.event_listeners: list[Callable[[DatapathEvent], None]] = []
        self.proxy_status: dict[str, object] = {}
        self._cidr_ids: dict[IPNetwork, int] = {}
        # the node's own addresses this agent gave the host identity (not the gateway's)
        self._host_addresses: set[IPv4Address] = set()
        self._links: dict[str, Link] = {}
        self._policy_files: dict[Path, float] = {}
        # why the policy directory's current content is not in force (`garrison status`)
        self.policy_dir_errors: list[str] = []
        self._policy_dir_gone = False
        self._dir_keys: set[tuple[str, str | None, str]] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.map_writes = 0
        # policy changes applied ("success") and refused ("failure"): garrison_policy_change
        self.policy_changes: Counter[str] = Counter()
        self.cluster: AgentCluster | None = None
        if config.kvstore == "etcd":
            self.cluster = AgentCluster.for_agent(self, config)
            self.allocator = self.cluster.allocator

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile: datapath up (pinned maps reused), identities, endpoints, policy, maps."""
        with self.lock:
            # read before the kernel is touched: a record that does not read refuses the start
            stored = self.imported.load()
            self._check_policy_dir()
            self.datapath.start()
            for identity in RESERVED.values():
                self.resolver.add_identity(identity.id, identity.labels)
            if self.cluster is not None:
                # the cluster's namespace labels before the endpoints' identities are made of
                # them: an endpoint starts with the identity every node gives its labels
                self.cluster.prime_namespaces()
            # a container runtime's DEL that came while the agent was down
            pending = pending_deletes(self.config.state_dir)
            for ep in list(self.endpoints):
                missed = pending.get(ep.container_id) if ep.container_id else None
                if (
                    missed is not None and ep.created <= missed.stat().st_mtime
                    and missed_delete_applies(missed, ep.extra.get("network", ""))
                ):
                    log.info("endpoint %s: its container was deleted meanwhile", ep.name)
                    self._remove_endpoint(ep)
                    continue
                link = self.datapath.link_of(ep.name, ep.host_ifname or None)
                if link is None and ep.adopted:
                    # a namespace garrison did not make went away (a container stopped while
                    # the agent was down): forget it, never recreate someone else's network
                    log.warning("endpoint %s: its adopted network is gone; removing", ep.name)
                    self._remove_endpoint(ep)
                    continue
                if link is None:
                    log.warning("endpoint %s: its network is gone; recreating it", ep.name)
                    link = self.datapath.create_endpoint(ep.name, ep.ipv4)
                self._links[ep.name] = link
                stale = ep  # its namespace's labels may have changed meanwhile (a cluster's)
                ep = replace(ep, namespace_labels=self._namespace_labels(ep.namespace))
                ident = self._identity_for(ep, prefer=stale.identity)
                if ep != stale or ident.id != ep.identity or ep.host_ifname != link.host_ifname:
                    ep = replace(ep, identity=ident.id, host_ifname=link.host_ifname)
                    self.endpoints.update(ep)
                if (
                    stale.namespace_labels != ep.namespace_labels
                    and stale.identity
                    and stale.identity not in RESERVED_BY_ID
                ):
                    # the old labels' reference (not in the resolver yet: nothing to sync)
                    self.allocator.release(
                        Identity(stale.identity, stale.full_labels), owner=f"endpoint:{ep.name}"
                    )
                self.resolver.add_identity(ident.id, ident.labels)
            for ident_id in {ep.identity for ep in self.endpoints if ep.ports}:
                self._sync_named_ports(ident_id)
            for path in pending.values():
                path.unlink(missing_ok=True)
            # traffic from the host reaches endpoints from the gateway address: it is the host
            self.datapath.set_prefix(ipaddress.ip_network(f"{GATEWAY}/32"), HOST_IDENTITY)
            # and so is every other address of the node (watched from here on: the watch is
            # open before the first listing, so no change falls between the two)
            address_watch = self.datapath.address_watch()
            # the host entries a previous run left (pinned) are this run's to keep or remove:
            # an address the node lost while the agent was away is not the host any more
            self._host_addresses = {
                prefix.network_address
                for prefix in self.datapath.claims.held_by(HOST_IDENTITY)
                if prefix.prefixlen == 32 and prefix.network_address != GATEWAY
            }
            self._sync_host_addresses()
            if self.config.policy_dir is not None:
                self._load_policy_dir(initial=True)
            if stored:  # after the directory: an import overrides it
                self._apply(self.repository.upsert(stored))
            if self.cluster is not None:
                # the cluster's policies and remote endpoints before the first reconcile: a
                # restarted agent never enforces less than the cluster asks, not even briefly
                self.cluster.prime()
            self._sync_cidrs()
            self._reconcile()
            for ep in self.endpoints:
                link = self._links[ep.name]
                self.datapath.write_endpoint(
                    link, ep.identity, ep.ipv4, self.resolver, ep.audit, ep.deny_response,
                    self.resolver.what_if,
                )
                try:
                    self.datapath.attach(link)
                except ForeignFilterError as exc:
                    # someone's filter took garrison's place on this veth meanwhile: the other
                    # endpoints are still started (this one's maps are current)
                    log.error("endpoint %s: programs not attached: %s", ep.name, exc)
        if self.cluster is not None:
            self.cluster.start()
        gc.collect()
        gc.freeze()  # the resolved state is long-lived: keep it out of GC passes
        self._spawn(self._event_loop, "garrison-events")
        self._spawn(self._catch_up, "garrison-catch-up")
        self._spawn(lambda: self._watch_host_addresses(address_watch), "garrison-addresses")
        if self.config.policy_dir is not None:
            self._spawn(self._watch_policy_dir, "garrison-policy-watch")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if self.cluster is not None:
            self.cluster.close()
        with self.lock:
            self.datapath.close()
            self.kvstore.close()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- endpoints ---------------------------------------------------------------------------

    def add_endpoint(
        self, name: str, labels: Sequence[str], namespace: str = "default", ip: str | None = None,
        netns: str | None = None, interface: str = "eth0", container_id: str = "",
        extra: dict[str, str] | None = None, ports: Sequence[str] = (),
        make_interface: bool = True,
    ) -> EndpointRecord:
        """A new endpoint; with `netns` (a path or `ip netns` name) one adopting a namespace
        someone else made (`make_interface=False`: only an existing veth, never one of
        garrison's). Without labels (a container whose labels are still being read)
        the endpoint gets the reserved `init` identity, which is denied both ways until a
        policy selects it: no window where its traffic is unpoliced."""
        with self.lock:
            try:
                parsed = Labels.parse(list(labels))
            except ValueError as exc:
                raise EndpointError(f"--labels: {exc}") from exc
            if not parsed.items and not container_id:
                raise EndpointError("--labels: give at least one label, e.g. app=web")
            try:
                check_namespace(namespace)
            except NamespaceError as exc:
                raise EndpointError(f"--namespace: {exc}") from exc
            named = _named_ports(ports)
            netns_path = ""
            peer: tuple[int, str] | None = None
            if netns is not None:
                try:
                    netns_path = netdev.netns_path_of(netns)
                    peer, found = netdev.probe_interface(netns_path, interface)
                except (netdev.EndpointNetworkError, OSError) as exc:
                    raise EndpointError(str(exc)) from exc
                if peer is None and not make_interface:
                    raise EndpointError(
                        f"{netns_path} has no interface {interface!r}: garrison governs the "
                        "veth the interface plugin before it made (ptp); check CNI_IFNAME "
                        "and the conflist"
                    )
                if peer is not None and found is None:
                    raise EndpointError(
                        f"{netns_path}: {interface} has no IPv4 address; garrison identifies "
                        "an endpoint's traffic by it"
                    )
                if found is not None and ip is not None and ip != str(found):
                    raise EndpointError(f"--ip {ip}: {interface} already has {found}")
                ipv4 = self.endpoints.claim_ip(str(found)) if found else (
                    self.endpoints.allocate_ip(ip)
                )
            else:
                known = any(ep.name == name for ep in self.endpoints)
                if not known and (netdev.NETNS_DIR / name).exists():
                    # never create into (and on failure delete) a namespace of someone else's
                    raise EndpointError(
                        f"a network namespace named {name!r} exists and garrison did not "
                        f"create it: adopt it with `garrison endpoint add {name} --netns "
                        f"{name}`, or pick another name"
                    )
                ipv4 = self.endpoints.allocate_ip(ip)
            record = EndpointRecord(
                id=0,
                name=name,
                namespace=namespace,
                labels=tuple(sorted(f"{lab.key}={lab.value}" for lab in parsed)),
                ipv4=ipv4,
                created=time.time(),
                netns_path=netns_path,
                ifname=interface if netns_path else "",
                owned=() if netns_path else OWNS_ALL,
                container_id=container_id,
                extra=dict(extra or {}),
                ports=tuple(str(p) for p in named),
                namespace_labels=self._namespace_labels(namespace),
            )
            # garrison's own namespace is on disk before it exists (a crash leaves a record to
            # clean up); adopting creates nothing that outlives the workload's veth
            record = self.endpoints.add(record, persist=not netns_path)
            try:
                owned: tuple[str, ...] = ()
                if peer is not None:  # the workload's own veth, used as it is
                    link = Link(peer[1], peer[0])
                elif netns_path:
                    try:
                        link, _, owned = self.datapath.adopt_endpoint(
                            name, netns_path, interface, ipv4
                        )
                    except netdev.EndpointNetworkError as exc:
                        raise EndpointError(str(exc)) from exc
                    record = replace(record, host_ifname=link.host_ifname, owned=owned)
                    # a veth garrison made is on disk before anything else can fail
                    self.endpoints.update(record, persist=bool(owned))
                else:
                    link = self.datapath.create_endpoint(record.name, record.ipv4)
                self._links[name] = link
                ident = self._identity_for(record)
                record = replace(record, identity=ident.id, host_ifname=link.host_ifname)
                self.endpoints.update(record, persist=False)
                # a reserved identity (init) is in the resolver since start
                # port names first: a new identity's policy is then built once, with them
                changed = self._sync_named_ports(ident.id)
                if ident.id not in RESERVED_BY_ID:
                    changed |= self.resolver.add_identity(ident.id, ident.labels)
                # policy of the identity first, then the endpoint's config + ipcache, then
                # its programs: it is enforced from its first packet
                self._sync(changed | {ident.id})
                self.datapath.write_endpoint(
                    link, ident.id, record.ipv4, self.resolver, record.audit,
                    record.deny_response, self.resolver.what_if,
                )
                try:
                    made_clsact = self.datapath.attach(link)
                except ForeignFilterError as exc:
                    raise EndpointError(str(exc)) from exc
                if made_clsact and "clsact" not in record.owned:
                    record = replace(record, owned=(*record.owned, "clsact"))
                self.endpoints.update(record)
            except BaseException:
                self._remove_endpoint(record)
                raise
            if self.cluster is not None:
                self.cluster.endpoint_changed(record)
            return record

    def _identity_for(self, ep: EndpointRecord, prefer: int | None = None) -> Identity:
        """`prefer`: the number the endpoint had (a restart), kept if its identity was
        collected meanwhile (a cluster's) and the number is still free."""
        if not ep.labels:  # labels not known yet: reserved:init (Cilium's, for the same case)
            return RESERVED["init"]
        return self.allocator.allocate(ep.full_labels, owner=f"endpoint:{ep.name}",
                                       prefer=prefer or None)

    def delete_endpoint(self, name: str) -> EndpointRecord:
        with self.lock:
            record = self.endpoints.get(name)
            self._remove_endpoint(record)
            return record

    def configure_endpoint(
        self, name: str, audit: bool | None = None, deny_response: str | None = None
    ) -> EndpointRecord:
        """`endpoint config NAME audit=true|false deny-response=drop|icmp|tcp-reset`: the
        endpoint's own audit mode (Cilium's PolicyAuditMode) and what its denied connections
        get back (garrison.bpf.abi.DENY_RESPONSES); None leaves a setting as it is. One map
        write; kept across restarts in the registry."""
        with self.lock:
            record = self.endpoints.get(name)
            new = replace(
                record,
                audit=record.audit if audit is None else audit,
                deny_response=record.deny_response if deny_response is None else deny_response,
            )
            self.endpoints.update(new)
            link = self._links.get(name)
            if link is not None and new.identity:
                self.datapath.write_endpoint(
                    link, new.identity, new.ipv4, self.resolver, new.audit, new.deny_response,
                    self.resolver.what_if,
                )
            return new

    def relabel_endpoint(
        self, name: str, labels: Sequence[str], namespace: str | None = None
    ) -> EndpointRecord:
        """New labels → new identity: map writes only (policy of the new identity, then the
        endpoint's config and ipcache entry); no program is touched."""
        with self.lock:
            record = self.endpoints.get(name)
            parsed = Labels.parse(list(labels))
            ns = namespace or record.namespace
            try:
                check_namespace(ns)
            except NamespaceError as exc:
                raise EndpointError(str(exc)) from exc
            new = replace(record, labels=tuple(sorted(f"{la.key}={la.value}" for la in parsed)),
                          namespace=ns, namespace_labels=self._namespace_labels(ns))
            ident = self.allocator.allocate(new.full_labels, owner=f"endpoint:{name}")
            new = replace(new, identity=ident.id)
            self.endpoints.update(new)
            changed = self._sync_named_ports(ident.id)
            changed |= self.resolver.add_identity(ident.id, ident.labels)
            self._sync(changed | {ident.id})
            self.datapath.write_endpoint(
                self._links[name], ident.id, new.ipv4, self.resolver, new.audit,
                new.deny_response, self.resolver.what_if,
            )
            if ident.id != record.identity:
                self._release_identity(record)
            if self.cluster is not None:
                self.cluster.endpoint_changed(new)
            return new

    def _namespace_labels(self, namespace: str) -> tuple[str, ...]:
        labels = self.namespaces.labels(namespace)
        labels.pop(NAMESPACE_NAME_LABEL, None)
        return tuple(f"{k}={v}" for k, v in sorted(labels.items()))

    def label_namespace(
        self, namespace: str, changes: Sequence[str]
    ) -> tuple[dict[str, str], list[EndpointRecord]]:
        """`k=v` / `k-` on a namespace's labels; each endpoint of the namespace gets the
        identity of its new labels, written to the kernel as a relabel is (the new
        identity's policy, then its ipcache entry and endpoint config; the old identity is
        released). Returns the labels and the endpoints after the change."""
        if self.cluster is not None:
            return self._label_cluster_namespace(namespace, changes)
        with self.lock:
            labels, changed = self.namespaces.label(namespace, changes)
            moved = []
            if changed:
                for ep in list(self.endpoints):
                    if ep.namespace == namespace and ep.labels and ep.name in self._links:
                        moved.append(self.relabel_endpoint(ep.name, ep.labels))
            return labels, moved

    def _label_cluster_namespace(
        self, namespace: str, changes: Sequence[str]
    ) -> tuple[dict[str, str], list[EndpointRecord]]:
        """In a cluster the labels are the cluster's: changed in etcd first, over etcd's
        labels (refused whole when etcd is away), then applied here as the other nodes apply
        them from their watches."""
        assert self.cluster is not None
        with self.lock:
            before = {ep.name: ep for ep in self.endpoints if ep.namespace == namespace}
        labels, replaced, written = self.cluster.label_namespace(namespace, list(changes))
        with self.lock:
            if self.cluster.namespace_is_current(namespace, replaced, written):
                self.cluster.apply_namespace(namespace, labels)
            moved = [
                ep for ep in self.endpoints
                if ep.name in before and ep.identity != before[ep.name].identity
            ]
        return {**labels, NAMESPACE_NAME_LABEL: namespace}, moved

    def set_namespace_labels(
        self, namespace: str, labels: dict[str, str]
    ) -> list[EndpointRecord]:
        """The namespace's labels are `labels` now (a cluster's: from etcd): stored, and each
        of its endpoints that does not carry them yet relabelled as `label_namespace` does;
        the endpoints relabelled. Raises `KVStoreError` when an identity cannot be allocated
        (etcd away): called again, it goes on with the endpoints left."""
        with self.lock:
            wanted = {**labels, NAMESPACE_NAME_LABEL: namespace}
            if self.namespaces.labels(namespace) != wanted:
                self.namespaces.store(namespace, wanted)
            target = self._namespace_labels(namespace)
            return [
                self.relabel_endpoint(ep.name, ep.labels)
                for ep in list(self.endpoints)
                if ep.namespace == namespace and ep.labels and ep.name in self._links
                and ep.namespace_labels != target
            ]

    def endpoint_of_ifindex(self, ifindex: int) -> EndpointRecord | None:
        """The local endpoint whose host veth has `ifindex` (the one a datapath event names:
        from_container's events are of packets that endpoint sent). Call with the lock."""
        name = next((n for n, link in self._links.items() if link.ifindex == ifindex), None)
        return next((ep for ep in self.endpoints if ep.name == name), None) if name else None

    def _local_endpoints(self) -> list[LocalEndpoint]:
        return [
            LocalEndpoint(
                self._links[ep.name].ifindex, ep.identity, IPv4Address(ep.ipv4), ep.audit,
                ep.deny_response,
            )
            for ep in self.endpoints
            if ep.name in self._links and ep.identity
        ]

    def _remove_endpoint(self, record: EndpointRecord) -> None:
        try:
            self.datapath.delete_endpoint(
                record.name, record.ipv4, record.host_ifname or None, record.owned
            )
        finally:
            self._links.pop(record.name, None)
            with contextlib.suppress(EndpointError):
                self.endpoints.remove(record.name)
            if self.cluster is not None:
                self.cluster.endpoint_removed(record)
            self._release_identity(record)

    def _release_identity(self, record: EndpointRecord) -> None:
        if not record.identity or record.identity in RESERVED_BY_ID:
            return
        freed = self.allocator.release(
            Identity(record.identity, record.full_labels), owner=f"endpoint:{record.name}"
        )
        if freed:
            changed = self.resolver.remove_identity(record.identity)
            self._sync(changed)
            # no local endpoint has this identity any more: drop its policy entries
            self._reconcile()
        elif record.ports:  # the endpoints left with the identity declare what they declare
            self._sync(self._sync_named_ports(record.identity))

    def _sync_named_ports(self, identity: int) -> set[int]:
        """The port names of the local endpoints of `identity`, to the resolver (named ports
        in policies resolve against them); returns the identities whose policy changed."""
        if identity in RESERVED_BY_ID:
            return set()
        ports = [
            parse_named_port(text)
            for ep in self.endpoints
            if ep.identity == identity
            for text in ep.ports
        ]
        return self.resolver.set_named_ports(identity, named_port_map(ports))

    # -- policy ------------------------------------------------------------------------------

    def import_policies(self, paths: Sequence[str]) -> PolicyChange:
        """Validated first; rejected whole on any error (the old policy stays in force)."""
        try:
            loaded = load_paths(paths)
        except PolicyValidationError:
            self.policy_changes["failure"] += 1
            raise
        if not loaded.policies:  # an empty or truncated file: never a silent success
            self.policy_changes["failure"] += 1
            raise APIError(
                f"{', '.join(loaded.files or paths)}: no policy in it (empty?); nothing "
                "imported, the previous policy stays in force"
            )
        if self.cluster is not None:  # the cluster's first: refused whole when etcd is away
            self.cluster.policies_imported(loaded.policies)
        with self.lock:
            # on disk before in force: an import that cannot be kept (a full state dir) is
            # refused whole, never enforced now and lost at the next restart
            before = self.imported.snapshot()
            try:
                self.imported.record(loaded.policies)
                self.imported.save()
            except BaseException:
                self.imported.restore(before)
                raise
            change = self.repository.upsert(loaded.policies)
            self._apply(change)
            return change

    def delete_policies(self, name: str | None, namespace: str | None, all_: bool) -> int:
        with self.lock:
            if all_:
                keys = [p.key for p in self.repository]
            else:
                keys = [p.key for p in self.repository.find(name or "", namespace)]
                if not keys:
                    raise APIError(f"no policy named {name!r}", _not_found())
            if self.cluster is not None:
                self.cluster.policies_deleted(keys)
            # forgotten on disk first: a delete that cannot be kept is refused whole
            before = self.imported.snapshot()
            try:
                self.imported.forget(keys)
                self.imported.save()
            except BaseException:
                self.imported.restore(before)
                raise
            change = self.repository.delete(keys)
            self._apply(change)
            if self.config.policy_dir is not None and self._dir_keys & set(keys):
                # the directory's policy of a name that was also imported: in force again,
                # as on a restart
                self._load_policy_dir(initial=True)
            return len(change.removed)

    def _apply(self, change: PolicyChange) -> None:
        # one kernel sync for the whole change: no window with only half of it applied; the
        # resolver builds endpoints with the same rules once (PolicyResolver.add_policies)
        changed = self.resolver.apply(change)
        changed |= self._sync_cidrs(sync=False)
        self._sync(changed)
        try:
            self.revisions.save(self.repository.revision)
        except StateWriteError as exc:  # in force already: the next change writes it again
            log.error("policy revision %d: %s", self.repository.revision, exc)
        self.policy_changes["success"] += 1
        for listener in self.policy_listeners:
            listener()

    def reload_policy_dir(self) -> None:
        if self.config.policy_dir is None:
            return
        with self.lock:
            self._load_policy_dir(initial=True)

    def _load_policy_dir(self, initial: bool = False) -> None:
        assert self.config.policy_dir is not None
        directory = self.config.policy_dir
        if not directory.is_dir():
            # gone (or replaced by a file) while the agent runs: never read as "no policy"
            error = f"{directory}: not a directory any more; the previous policy stays"
            if self.policy_dir_errors != [error]:
                log.error("policy directory %s", error)
            self.policy_dir_errors = [error]
            self._policy_dir_gone = True
            return
        files = {
            p: p.stat().st_mtime
            for p in directory.rglob("*")
            if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
        }
        if files == self._policy_files and not initial and not self._policy_dir_gone:
            return
        self._policy_dir_gone = False
        try:
            loaded = load_paths([directory]) if files else None
        except PolicyValidationError as exc:
            self.policy_dir_errors = [str(issue) for issue in exc.issues]
            self.policy_changes["failure"] += 1
            for issue in exc.issues:
                log.error("policy directory: %s", issue)
            log.error("policy directory %s: change refused, the previous policy stays", directory)
            self._policy_files = files
            return
        self.policy_dir_errors = []
        policies: tuple[Policy, ...] = loaded.policies if loaded else ()
        # The directory owns only what it holds: policies imported through the API stay, and
        # an imported policy wins over the directory's of the same name, as on a restart
        # (a file removed or changed there never removes or replaces an imported one).
        keys = {p.key for p in policies}
        gone = [k for k in self._dir_keys - keys
                if self.repository.get(k) is not None and self.imported.policy(k) is None]
        changed = [p for p in policies
                   if self.repository.get(p.key) != p and self.imported.policy(p.key) is None]
        for p in policies:
            if self.imported.policy(p.key) is not None:
                log.warning("policy directory: %s/%s is also imported (policy import): the "
                            "imported one is in force", p.namespace or "", p.name)
        self._apply(self.repository.update(changed, gone))
        self._dir_keys = keys
        self._policy_files = files
        log.info("policy directory %s: revision %d", directory, self.repository.revision)

    def _check_policy_dir(self) -> None:
        """At start, before the kernel is touched: a --policy-dir that does not validate
        refuses the start (PolicyDirError). Started without its policies, the agent would
        enforce less than before its restart; the kernel goes on enforcing what it did."""
        directory = self.config.policy_dir
        if directory is None or not directory.is_dir() or not any(
            p.suffix in (".yaml", ".yml", ".json") and p.is_file() for p in directory.rglob("*")
        ):
            return
        try:
            load_paths([directory])
        except PolicyValidationError as exc:
            more = f" (and {len(exc.issues) - 1} more)" if len(exc.issues) > 1 else ""
            raise PolicyDirError(
                f"--policy-dir {directory} does not validate: {exc.issues[0]}{more}; fix it and "
                "start again (without its policies the agent would enforce less than before; "
                "until then the kernel enforces what it did)"
            ) from exc

    def _watch_policy_dir(self) -> None:
        while not self._stop.wait(self.config.policy_poll_interval):
            try:
                with self.lock:
                    self._load_policy_dir()
            except Exception:
                log.exception("policy directory watch failed")

    def _sync_host_addresses(self) -> None:
        """Every IPv4 address of the node's network namespace is the host, as in Cilium: an
        endpoint reaching the node on any of them reaches the host (`toEntities: [host]`
        allows it, an `egressDeny` of `host` denies it, `world` and CIDR rules do not cover
        it). An endpoint's own address is never taken."""
        now = self.datapath.host_addresses() - {GATEWAY}
        for address in sorted(now - self._host_addresses):
            prefix = ipaddress.IPv4Network(f"{address}/32")
            held = self.datapath.claims.held(prefix)
            if held is not None and held != HOST_IDENTITY:
                continue  # an endpoint's (an address shared by mistake): the endpoint keeps it
            self.datapath.set_prefix(prefix, HOST_IDENTITY)
            self._host_addresses.add(address)
        for address in sorted(self._host_addresses - now):
            self.datapath.delete_prefix(ipaddress.IPv4Network(f"{address}/32"))
            self._host_addresses.discard(address)

    def _watch_host_addresses(self, watch: AddressWatch) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if watch.wait(1.0):
                        with self.lock:
                            self._sync_host_addresses()
                except Exception:
                    log.exception("watching the node's addresses failed")
                    self._stop.wait(1.0)
        finally:
            watch.close()

    def _sync_cidrs(self, sync: bool = True) -> set[int]:
        """A CIDR identity and ipcache entry for every prefix the policies name. The ipcache
        entry of a new prefix is written once its identity is in the resolver; policy
        entries referring to it are synced here (sync=True) or by the caller."""
        changed: set[int] = set()
        wanted = self.repository.prefixes()
        added = []
        for prefix in wanted - set(self._cidr_ids):
            ident = self.allocator.cidr_identity(prefix)
            self._cidr_ids[prefix] = ident.id
            changed |= self.resolver.add_identity(ident.id, ident.labels)
            added.append(prefix)
        for prefix in set(self._cidr_ids) - wanted:
            ident_id = self._cidr_ids.pop(prefix)
            self.datapath.delete_cidr_prefix(prefix)
            changed |= self.resolver.remove_identity(ident_id)
        if sync:
            self._sync(changed)
        for prefix in added:
            self.datapath.set_cidr_prefix(prefix, self._cidr_ids[prefix])
        return changed

    # -- the cluster (garrison/cluster/agent.py, from its watch threads) ---------------------

    def sync_identities(self, identities: set[int]) -> None:
        with self.lock:
            self._sync(identities)

    def apply_cluster_policies(self, policies: list[Policy], gone: list[PolicyKey]) -> None:
        """Policies another node imported (or deleted), as one change."""
        with self.lock:
            new = [p for p in policies if self.repository.get(p.key) != p]
            self._apply(self.repository.update(new, [k for k in gone if self.repository.get(k)]))
            if gone:  # one imported here and deleted on another node: not back at a restart
                self.imported.forget(gone)
                self.imported.save()

    # -- kernel sync -------------------------------------------------------------------------

    def _sync(self, identities: set[int]) -> None:
        try:
            diff = self.datapath.apply_updates(
                self.resolver, identities, self._local_endpoints(), self.resolver.what_if
            )
        except KernelBehindError as exc:
            self._fell_behind(exc)
            return
        self.map_writes += len(diff.upserts) + len(diff.deletes)

    def _reconcile(self) -> None:
        """The whole desired state into the kernel (start, an identity's last endpoint gone)."""
        try:
            self.datapath.reconcile(self.resolver, self._local_endpoints(), self.resolver.what_if)
        except KernelBehindError as exc:
            self._fell_behind(exc)

    def _fell_behind(self, exc: KernelBehindError) -> None:
        """A kernel write failed (a map full): said in the log and in `garrison status`
        (`kernel_behind`); `_catch_up` retries the whole state every second. What the
        agent answers (`policy get`, trace) is what it wants, not yet all enforced."""
        log.error("datapath: %s", exc)

    def _catch_up(self) -> None:
        while not self._stop.wait(1.0):
            try:
                with self.lock:
                    if self.datapath.sync.behind is None:
                        continue
                    self.datapath.sync.catch_up(
                        self.resolver, self._local_endpoints(), self.resolver.what_if
                    )
                log.info("datapath: the kernel holds the whole policy state again")
            except KernelBehindError:
                pass  # said when it first failed; still behind
            except Exception:
                log.exception("datapath: catching up with the policy state failed")

    # -- proxy policy ------------------------------------------------------------------------

    def admit(self, src_ip: str, dst_ip: str, dst_port: int) -> Admission:
        """PolicySource for the transparent proxy: the L7 rules for this connection.

        The destination's ingress rules apply when its entry redirects; else the source's
        egress rules. When both sides redirect the same connection with L7 rules, garrison
        cannot apply two rule sets in one proxy hop yet: it denies every request (fail
        closed) and says so in the flow records' rule reference.
        """
        with self.lock:
            src = self.endpoints.by_ip(src_ip)
            dst = self.endpoints.by_ip(dst_ip)
            src_id = src.identity if src else self.identity_of_ip(src_ip)
            dst_id = dst.identity if dst else self.identity_of_ip(dst_ip)
            src_labels = self.resolver.cache.labels_of(src_id) or Labels()
            audit = self.config.audit
            ingress = egress = None
            if dst is not None:
                ingress = lookup(
                    self.resolver.map_state(dst_id), Direction.INGRESS, src_id, PROTO_TCP,
                    dst_port,
                )
            if src is not None:
                egress = lookup(
                    self.resolver.map_state(src_id), Direction.EGRESS, dst_id, PROTO_TCP,
                    dst_port,
                )
            results = [r for r in (ingress, egress) if r is not None]

            def side_audit(r: LookupResult) -> bool:
                # the agent's audit mode, or the deciding endpoint's own
                ep = dst if r is ingress else src
                return audit or bool(ep is not None and ep.audit)

            allowed = all(r.allowed or side_audit(r) for r in results)
            redirecting = [r for r in results if r.allowed and r.l7 is not None]
            decisive = redirecting[0] if redirecting else (results[0] if results else None)
            if len(redirecting) == 2 and redirecting[0].l7 != redirecting[1].l7:
                assert redirecting[0].l7 is not None
                ruleset = L7RuleSet(redirecting[0].l7.protocol, ())
            elif redirecting and redirecting[0].l7 is not None:
                ruleset = redirecting[0].l7
            else:
                ruleset = L7RuleSet(L7Protocol.HTTP, (), allow_all=True)
            # policies in audit mode: the what-if rule set of the side whose rules apply, as
            # the audit layer (with an allow-all rule set where only the audited policies
            # redirect: the kernel's GAR_REDIRECT_WHAT_IF, egress side first as there)
            def side_of(r: LookupResult) -> tuple[int, int, Direction]:
                if r is ingress:
                    return dst_id, src_id, Direction.INGRESS
                return src_id, dst_id, Direction.EGRESS

            if redirecting and ruleset is redirecting[0].l7 and ruleset.audit_layer is None:
                ruleset = self._audit_layer(ruleset, *side_of(redirecting[0]), dst_port) or ruleset
            elif not redirecting:
                for r in (egress, ingress):
                    layered = self._audit_layer(None, *side_of(r), dst_port) if (
                        r is not None and r.allowed) else None
                    if layered is not None:
                        ruleset = layered
                        break
            result = decisive or LookupResult(True, MatchType.NONE, enforced=False)
            if decisive is not None:
                audit = side_audit(decisive)
            side = None
            if decisive is not None:
                side = Direction.INGRESS if decisive is ingress else Direction.EGRESS
            return Admission(
                src_id, src_labels, src.namespace if src else None, allowed, result, ruleset,
                audit, src.name if src else self._remote_name(src_ip), side,
            )

    def _audit_layer(
        self, ruleset: L7RuleSet | None, identity: int, remote: int, direction: Direction,
        port: int,
    ) -> L7RuleSet | None:
        """`ruleset` (what the enforced policies redirect with; None: they do not redirect)
        with the rule set of the what-if state as its audit layer, when a policy in audit
        mode (garrison.io/audit) selects the deciding endpoint and would decide requests
        differently: the proxy then records AUDIT what the layer denies and the rule set
        allows, as the standalone proxy does. None when there is no such layer. A
        connection the what-if state denies at L3/L4 was recorded AUDIT by the kernel; its
        requests keep the enforced rules alone."""
        what_if = self.resolver.what_if
        if what_if is None or not audits(what_if, identity):
            return None
        would = lookup(what_if.map_state(identity), direction, remote, PROTO_TCP, port)
        if not would.allowed:
            return None
        if ruleset is None:  # only the what-if state redirects: every request passes
            if would.l7 is None or would.redirect is None:
                return None
            ruleset = L7RuleSet(would.l7.protocol, (), allow_all=True)
        if would.l7 is not None and would.redirect is ruleset.protocol:
            layer = would.l7
        else:  # L4 only in the what-if state: every request passes there
            layer = L7RuleSet(ruleset.protocol, (), allow_all=True,
                              allow_all_ref=would.refs[0] if would.refs else None)
        if layer == ruleset or (layer.allow_all and not layer.deny_rules):
            return None
        return replace(ruleset, audit_layer=layer)

    def _remote_name(self, ip: str) -> str | None:
        """Another node's endpoint's name, for the proxy's records (None: not one)."""
        if self.cluster is None:
            return None
        return self.cluster.remote_endpoint_name(ip) or None

    def identity_of_ip(self, ip: str) -> int:
        """The identity of a non-endpoint address, as the datapath's ipcache gives it: another
        node's endpoint's (cluster), the host's (the node's own addresses), another node's
        (remote-node), else its longest CIDR prefix, else world. (The proxy decides with it:
        an address the datapath calls host must not get world's L7 rules here.)"""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return WORLD_IDENTITY
        if self.cluster is not None:
            remote = self.cluster.remote_identity(addr)
            if remote is not None:
                return remote
        if isinstance(addr, IPv4Address):
            held = self.datapath.claims.held(ipaddress.IPv4Network((addr, 32)))
            if held is not None:
                return held
        best: tuple[int, int] | None = None
        for prefix, ident in self._cidr_ids.items():
            if addr.version == prefix.version and addr in prefix and (
                best is None or prefix.prefixlen > best[0]
            ):
                best = (prefix.prefixlen, ident)
        return best[1] if best else WORLD_IDENTITY

    @property
    def revision(self) -> int:
        return self.repository.revision

    # -- flows -------------------------------------------------------------------------------

    def emit(self, record: FlowRecord) -> None:
        for sink in self.flow_sinks:
            try:
                sink(record)
            except Exception:
                log.exception("flow sink failed")

    def _event_loop(self) -> None:
        from garrison.agent.events import event_to_record

        while not self._stop.is_set():
            try:
                events = self.datapath.read_events(200)
            except Exception:
                log.exception("reading datapath events failed")
                self._stop.wait(1.0)
                continue
            for event in events:
                for listener in self.event_listeners:
                    listener(event)
                try:
                    with self.lock:
                        record = event_to_record(self, event)
                except Exception:  # one event that makes no record must not end the stream
                    log.exception("datapath event %s: no flow record", event)
                    continue
                if record is not None:
                    self.emit(record)

    # -- queries for the API -----------------------------------------------------------------

    def map_state(self, identity: int) -> MapState:
        with self.lock:
            return self.resolver.map_state(identity)

    def audit_policies(self, identity: int) -> list[str]:
        """The policies in audit mode (garrison.io/audit) that select `identity`:
        `[namespace/]name` each; what they would deny is recorded AUDIT, not enforced."""
        with self.lock:
            what_if = self.resolver.what_if
            if what_if is None or not identity:
                return []
            return sorted({
                f"{p.namespace}/{p.name}" if p.namespace else p.name
                for p, _ in what_if.rules_selecting(identity) if p.audit
            })

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "datapath": dict(self.datapath.status()),
                # why the kernel does not hold all of the policy state (a map write failed)
                **({"kernel_behind": self.datapath.sync.behind}
                   if self.datapath.sync.behind is not None else {}),
                "proxy": dict(self.proxy_status),
                "policy_revision": self.repository.revision,
                "policies": len(self.repository),
                **({"policy_dir": {"path": str(self.config.policy_dir),
                                   "errors": list(self.policy_dir_errors)}}
                   if self.config.policy_dir is not None else {}),
                "endpoints": len(self.endpoints),
                # no rule selects them: all their traffic is allowed (no policy, no default
                # deny), which is worth seeing next to the count
                "endpoints_unselected": sorted(
                    ep.name for ep in self.endpoints
                    if ep.identity and not self.resolver.rules_selecting(ep.identity)
                ),
                # policies in audit mode (garrison.io/audit) and the endpoints they select
                "audit_policies": len(self.resolver.audited_policies()),
                "endpoints_with_audit_policies": sorted(
                    ep.name for ep in self.endpoints if self.audit_policies(ep.identity)
                ),
                "identities": self._identity_count(),
                **({"cluster": self.cluster.status()} if self.cluster is not None else {}),
                "flows": {"in_ring": len(self.flows), "total": self.flows.total},
                "map_writes": self.map_writes,
                "uptime_s": round(time.time() - self.started, 1),
            }

    def _identity_count(self) -> int | None:
        try:
            return len(self.allocator.all())
        except KVStoreError:  # etcd away: the status says so under "cluster"
            return None


def _named_ports(ports: Sequence[str]) -> list[NamedPort]:
    """`--port NAME=PORT/PROTO` values, checked; one number per name and protocol."""
    out: list[NamedPort] = []
    for text in ports:
        try:
            np = parse_named_port(str(text))
        except ValueError as exc:
            raise EndpointError(f"--port {exc}") from exc
        clash = next((o for o in out if o.name == np.name and o.protocol is np.protocol), None)
        if clash is not None and clash != np:
            raise EndpointError(
                f"--port {np}: the name {np.name!r} already means {clash}; one port per name "
                "and protocol"
            )
        if np not in out:
            out.append(np)
    return out


def _not_found() -> Any:
    import grpc

    return grpc.StatusCode.NOT_FOUND
