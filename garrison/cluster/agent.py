"""The agent's side of the cluster: etcd client, session, cluster identities, and what the
other nodes' news does to this node's maps and routes.

`AgentCluster` is built by the agent when it runs with `--kvstore etcd`. It
- allocates endpoint identities cluster-wide (`ClusterIdentityAllocator`; CIDR identities stay
  in the node's SQLite store);
- publishes each local endpoint's address, identity and labels (`IPEntry`, lease-bound);
- for every other node's endpoint: adds its identity to the policy resolver (so selectors
  match it), writes the policy entries that changed, then its ipcache entry — removal in the
  reverse order; nothing is flushed;
- routes other nodes' pod CIDRs through their node IPs;
- stores imported policies in etcd and applies the ones other nodes imported;
- keeps namespace labels cluster-wide: `namespace label` writes them to etcd, and every
  node relabels its endpoints of a namespace whose labels another node changed.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from garrison.cluster.keys import (
    HEARTBEAT_PREFIX,
    NODES_PREFIX,
    ClusterRecordError,
    IPEntry,
    NodeRecord,
    StoredPolicy,
    identities_to_learn,
    policy_key,
)
from garrison.cluster.node import DEFAULT_HEARTBEAT_S, ClusterNode
from garrison.cluster.routes import (
    ROUTES_RECORD,
    NodeRoutes,
    RouteError,
    interface_with_address,
    source_address_towards,
)
from garrison.identity.allocator import (
    AllocatorConfig,
    ClusterIdentityAllocator,
    canonical_labels,
)
from garrison.identity.model import MAX_ENDPOINT_ID, MIN_ENDPOINT_ID, RESERVED
from garrison.kvstore.base import KVStore, KVStoreError
from garrison.kvstore.etcd import EtcdAuth, EtcdKVStore, EtcdTLS, load_auth, parse_endpoints
from garrison.policies.errors import PolicyValidationError
from garrison.policies.labels import NAMESPACE_NAME_LABEL
from garrison.policies.loader import load_text
from garrison.policies.model import Policy
from garrison.policies.repository import PolicyKey

if TYPE_CHECKING:
    from garrison.agent.config import AgentConfig
    from garrison.agent.daemon import Agent
    from garrison.agent.endpoints import EndpointRecord

REMOTE_NODE_IDENTITY = RESERVED["remote-node"].id
log = logging.getLogger("garrison.cluster")

DEFAULT_LEASE_TTL_S = 15
DEFAULT_IDENTITY_GC_GRACE_S = 900.0
CACHE_FILE = "cluster-cache.json"
START_TIMEOUT_S = 10.0


class ClusterConfigError(ValueError):
    """The agent's cluster flags do not fit together; the message names the fix."""


class AgentCluster:
    def __init__(
        self,
        agent: Agent,
        endpoints: tuple[str, ...],
        node_name: str,
        node_ip: ipaddress.IPv4Address,
        pod_cidr: ipaddress.IPv4Network,
        local_store: KVStore,
        *,
        lease_ttl_s: int = DEFAULT_LEASE_TTL_S,
        identity_gc_grace_s: float = DEFAULT_IDENTITY_GC_GRACE_S,
        cache_path: Path | None = None,
        routes_record: Path | None = None,
        tls: EtcdTLS | None = None,
        auth: EtcdAuth | None = None,
    ) -> None:
        self._agent = agent
        self.store = EtcdKVStore(endpoints, tls=tls, auth=auth)
        self.session = self.store.session(lease_ttl_s, name=f"node-{node_name}")
        me = NodeRecord(node_name, node_ip, pod_cidr)
        has_cache = cache_path is not None and cache_path.is_file()
        # etcd away at start: go on from the saved copy of the cluster (enforcement as before
        # the restart, endpoints keep their identities), else refuse to start.
        self.degraded = not self.session.wait_ready(START_TIMEOUT_S)
        if self.degraded and not has_cache:
            error = self.session.last_error or "no answer"
            self.store.close()
            raise KVStoreError(
                f"cannot join the cluster: {error} (this node has never been connected, so it"
                " has no saved copy of the cluster to start from)"
            )
        if not self.degraded:
            self._check_joinable(me)
        self.allocator = ClusterIdentityAllocator(
            self.store,
            AllocatorConfig(node_name=node_name),
            local_store=local_store,
            lease=self.session.require_lease,
        )
        self.session.on_new_lease(self._restore_identities)
        self.routes = NodeRoutes(routes_record)
        self.node = ClusterNode(self.store, self.session, me, self, cache_path=cache_path)
        self.node.on_beat.append(self.allocator.flush_pending)
        # Namespaces whose endpoints could not all be relabelled (→ the labels), retried on
        # each heartbeat; read and written under the agent's lock.
        self._namespaces_pending: dict[str, dict[str, str]] = {}
        self.node.on_beat.append(self._retry_namespaces)
        self._gc_grace_s = identity_gc_grace_s
        self._gc_last = 0.0
        self.node.on_beat.append(self._collect_identities)
        self.node.on_beat.append(self._restore_routes)
        if self.degraded:
            log.warning(
                "cluster: etcd does not answer (%s): starting from the saved copy; new"
                " identities and policy imports wait for it",
                self.session.last_error,
            )
            for record in agent.endpoints:
                if record.identity >= 256 and record.labels:
                    # the owner name the agent allocates with (Agent._identity_for)
                    self.allocator.adopt(
                        record.full_labels, f"endpoint:{record.name}", record.identity
                    )
        self._remote: dict[ipaddress.IPv4Address, IPEntry] = {}
        # other nodes' addresses, written as remote-node: node name -> its /32
        self._node_ips: dict[str, ipaddress.IPv4Network] = {}
        # When each remote IP's ipcache entry was last written (time.time()), for benchmarks.
        self.learnt_at: dict[ipaddress.IPv4Address, float] = {}
        self.route_errors: dict[str, str] = {}
        # The underlay device with from_netdev attached (garrison.redirect.underlay records
        # it, and whether its clsact is garrison's, in the state directory).
        self._netdev: int | None = None
        self.netdev_error: str | None = None
        # Why this node serves no flow API although it was to (the default address failed).
        self.flow_api_error: str | None = None
        self.flow_api_security = "plaintext"

    def _check_joinable(self, me: NodeRecord) -> None:
        """Refuse to join beside a running node (another address that beat within three
        heartbeats) that has `me`'s name — it would flap every node's route to the name and
        take this node's endpoints as its own — or a pod CIDR overlapping `me`'s — one address
        for two endpoints, their entries overwriting each other. A record of this address
        is this node's own (a restart within the lease, or under another name)."""
        try:
            records, _ = self.store.snapshot(NODES_PREFIX)
            beats, _ = self.store.snapshot(HEARTBEAT_PREFIX)
        except KVStoreError:
            return  # the start goes on and says so
        now = time.time()
        for key, raw in sorted(records.items()):
            try:
                other = NodeRecord.decode(key, raw)
                age = now - float(beats[HEARTBEAT_PREFIX + other.name])
            except (ClusterRecordError, KeyError, ValueError):
                continue  # of no use to anyone: not a running node
            if other.ip == me.ip or age >= 3 * DEFAULT_HEARTBEAT_S:
                continue
            if other.name == me.name:
                problem = (
                    f"--node-name {me.name} is taken: node {me.name} at {other.ip} (pod CIDR"
                    f" {other.pod_cidr}) beat {max(age, 0.0):.1f} s ago; give this node its own"
                    " --node-name (or stop that node's agent)"
                )
            elif other.pod_cidr.overlaps(me.pod_cidr):
                problem = (
                    f"--pod-cidr {me.pod_cidr} overlaps node {other.name}'s {other.pod_cidr}"
                    f" (at {other.ip}, beat {max(age, 0.0):.1f} s ago); give each node a block"
                    " of its own"
                )
            else:
                continue
            self.store.close()
            raise ClusterConfigError(problem)

    @classmethod
    def for_agent(cls, agent: Agent, config: AgentConfig) -> AgentCluster:
        if not config.kvstore_endpoints:
            raise ClusterConfigError(
                "--kvstore etcd needs --kvstore-endpoints http://HOST:PORT[,...]"
            )
        if config.pod_cidr is None:
            raise ClusterConfigError(
                "--kvstore etcd needs --pod-cidr: the block this node's endpoints get addresses"
                " from, which the other nodes route here (e.g. 198.18.1.0/24)"
            )
        endpoints = parse_endpoints(config.kvstore_endpoints)
        node_ip = config.node_ip or source_address_towards(endpoints[0].rpartition(":")[0])
        tls = EtcdTLS(config.kvstore_ca, config.kvstore_cert, config.kvstore_key)
        return cls(
            agent,
            config.kvstore_endpoints,  # the URLs: their scheme says TLS or not
            config.node_name,
            node_ip,
            config.pod_cidr,
            agent.kvstore,
            lease_ttl_s=config.kvstore_lease_ttl_s,
            identity_gc_grace_s=config.identity_gc_grace_s,
            cache_path=config.state_dir / CACHE_FILE,
            routes_record=config.state_dir / ROUTES_RECORD,
            tls=tls if tls.given else None,
            auth=load_auth(config.kvstore_user, config.kvstore_password_file),
        )

    def serve_flow_api(self, address: str, security: str = "plaintext") -> None:
        """Publish where this node's flow API listens (`IP:PORT`) and whether over TLS
        (`security`: plaintext, tls, or mtls) in its node record: called before `start()`,
        which writes the record."""
        self.flow_api_security = security
        self.node.me = replace(self.node.me, flow_api=address,
                               flow_api_tls=security != "plaintext")

    def start(self) -> None:
        """Steer connections from other nodes to the proxy, publish this node and its
        endpoints, then follow the others."""
        ifindex = interface_with_address(self.node.me.ip)
        if ifindex is None:
            self.netdev_error = (
                f"no interface holds the node IP {self.node.me.ip}: connections from other"
                " nodes that an L7 rule here redirects are dropped; fix --node-ip"
            )
            log.error("cluster: %s", self.netdev_error)
        else:
            self._agent.datapath.attach_netdev(ifindex)
            self._netdev = ifindex
        for record in list(self._agent.endpoints):
            if record.identity:
                self.endpoint_changed(record)
        self.node.start()

    def prime(self) -> None:
        """The cluster's policies and other nodes' endpoints, now (the agent's start); routes
        an earlier run left for nodes that are gone are removed."""
        self.routes.adopt_existing()
        self.node.prime()
        wanted = {n.pod_cidr for n in self.node.nodes().values() if n.name != self.node.me.name}
        for cidr in set(self.routes.installed()) - wanted:
            self.routes.remove(cidr)
        self._drop_stale_remote_entries()

    def _drop_stale_remote_entries(self) -> None:
        """The pinned ipcache outlives the agent: another node's endpoint removed while this
        agent was away kept its entry (its address → its identity, a number etcd may give
        other labels later). Entries of the endpoint identities' range that are neither this
        node's endpoints nor the cluster's now go (CIDR identities and reserved ones stay)."""
        agent = self._agent
        local = {ep.ipv4 for ep in agent.endpoints}
        for row in agent.datapath.dump_ipcache():
            prefix = ipaddress.IPv4Network(str(row["prefix"]))
            identity = int(str(row["identity"]))
            gone_node = (identity == REMOTE_NODE_IDENTITY
                         and prefix not in self._node_ips.values())
            if not gone_node and (
                prefix.prefixlen != 32
                or row.get("local_endpoint")
                or not MIN_ENDPOINT_ID <= identity <= MAX_ENDPOINT_ID
                or str(prefix.network_address) in local
                or prefix.network_address in self._remote
            ):
                continue
            agent.datapath.delete_prefix(prefix)
            log.info(
                "cluster: %s (identity %d) left the cluster while this agent was away:"
                " its ipcache entry is removed", prefix.network_address, identity,
            )

    def prime_namespaces(self) -> None:
        """The cluster's namespace labels into this node's namespace store, at the agent's
        start before its endpoints get their identities: etcd's word wins over what the node
        held (a namespace labelled here before it joined the cluster loses its labels, said in
        the log). With etcd away the store stays as it is: it is the node's saved copy, which
        every change reached as it arrived (so its endpoints keep their identities)."""
        store = self._agent.namespaces
        saved = store.all()
        cluster = self.node.read_namespaces(saved)
        if cluster is None:
            return
        for namespace, labels in saved.items():
            if namespace not in cluster and set(labels) != {NAMESPACE_NAME_LABEL}:
                log.warning(
                    "cluster: namespace %s: its labels here (%s) are not in etcd (removed on"
                    " another node, or set before this node joined the cluster): dropped;"
                    " `garrison namespace label %s KEY=VALUE` sets labels for every node",
                    namespace,
                    ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
                    namespace,
                )
                store.store(namespace, {})
        for namespace, labels in cluster.items():
            if store.labels(namespace) != {**labels, NAMESPACE_NAME_LABEL: namespace}:
                store.store(namespace, labels)

    def label_namespace(
        self, namespace: str, changes: list[str]
    ) -> tuple[dict[str, str], bytes | None, bytes | None]:
        """Change the namespace's labels in etcd, for every node (`ClusterNode.label_namespace`:
        refused whole when etcd is away); the labels after, the record replaced and the one
        written."""
        return self.node.label_namespace(namespace, changes)

    def namespace_is_current(
        self, namespace: str, replaced: bytes | None, written: bytes | None
    ) -> bool:
        """Whether a change this node wrote (`label_namespace`) is still the newest its watch
        knows of, so the node applies it now; if the watch brought a newer one it applies
        that itself. Called with the agent's lock held (the watch applies under it too)."""
        return self.node.namespace_value(namespace) in (replaced, written)

    def remote_identity(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
        """The identity of another node's endpoint at `address` (for the proxy's source)."""
        if not isinstance(address, ipaddress.IPv4Address):
            return None
        entry = self._remote.get(address)
        return entry.identity if entry is not None else None

    def is_remote_endpoint(self, address: str) -> bool:
        """Whether `address` is another node's endpoint: the proxy's upstream connections to
        it leave from the client's own address (transparent), so that node judges the
        client's identity (docs/cluster.md). Called from the proxy's loop: one dict read."""
        try:
            return ipaddress.IPv4Address(address) in self._remote
        except ValueError:
            return False

    def remote_endpoint_name(self, address: str) -> str:
        """The name of another node's endpoint at `address` ("" when none is known): flow
        records name remote peers as they name local ones."""
        try:
            entry = self._remote.get(ipaddress.IPv4Address(address))
        except ValueError:
            return ""
        return entry.endpoint if entry is not None else ""

    def close(self) -> None:
        if self._netdev is not None:
            try:
                self._agent.datapath.detach_netdev()
            except OSError as exc:
                log.warning("cluster: from_netdev not detached: %s", exc)
            self._netdev = None
        self.node.close()
        # Routes stay, like the maps and programs: traffic between nodes keeps flowing while
        # the agent restarts (`garrison agent --cleanup` removes them).
        self.store.close()

    def _restore_identities(self, _lease: int) -> None:
        changed = self.allocator.restore()
        self.allocator.flush_pending()
        for old, new in changed.items():
            log.error(
                "identity %d was collected while this node was away and its number reused;"
                " its endpoints keep %d in their maps until relabelled (now %d in etcd)",
                old,
                old,
                new,
            )

    # Local endpoints -----------------------------------------------------------------------

    def endpoint_changed(self, record: EndpointRecord) -> None:
        labels = self._agent.resolver.cache.labels_of(record.identity)
        entry = IPEntry(
            ip=ipaddress.IPv4Address(record.ipv4),
            identity=record.identity,
            labels=canonical_labels(labels) if labels is not None else "",
            node=self.node.me.name,
            endpoint=record.name,
        )
        self.node.publish_endpoint(entry)

    def endpoint_removed(self, record: EndpointRecord) -> None:
        self.node.withdraw_endpoint(ipaddress.IPv4Address(record.ipv4))

    # Policies ------------------------------------------------------------------------------

    def policies_imported(self, policies: tuple[Policy, ...]) -> None:
        texts: dict[str, str] = {}
        for policy in policies:
            path = policy.source.path if policy.source else ""
            if path not in texts:
                with open(path, encoding="utf-8") as fh:
                    texts[path] = fh.read()
            self.node.publish_policy(policy.key, StoredPolicy(path, texts[path]))

    def policies_deleted(self, keys: list[PolicyKey]) -> None:
        for key in keys:
            self.node.delete_policy(key)

    # ClusterHandler ------------------------------------------------------------------------

    def remote_endpoints_changed(
        self, upserts: list[IPEntry], gone: list[ipaddress.IPv4Address]
    ) -> None:
        agent = self._agent
        with agent.lock:
            local_ips = {ipaddress.IPv4Address(ep.ipv4) for ep in agent.endpoints}
            changed: set[int] = set()
            new_ids: set[int] = set()
            remote = []
            for entry in upserts:
                if entry.ip in local_ips:
                    log.error("cluster: %s of node %s is a local endpoint's", entry.ip, entry.node)
                else:
                    remote.append(entry)
            learn, replace, refused = identities_to_learn(remote, agent.resolver.cache.labels_of)
            for entry, why in refused:
                log.error("cluster: %s of node %s refused: %s", entry.ip, entry.node, why)
            for identity in replace:
                log.warning("cluster: identity %d now names %s", identity, learn[identity])
                changed |= agent.resolver.remove_identity(identity)
            for identity, labels in learn.items():
                changed |= agent.resolver.add_identity(identity, labels)
                new_ids.add(identity)
            # Policy entries that allow the new identities first, then the ipcache entries
            # that make their traffic carry them: no packet sees half of it.
            if changed or new_ids:
                agent.sync_identities(changed | new_ids)
            old_ids: set[int] = set()
            for entry in upserts:
                if entry.ip in local_ips or agent.resolver.cache.labels_of(entry.identity) is None:
                    continue
                previous = self._remote.get(entry.ip)
                if previous is not None and previous.identity != entry.identity:
                    old_ids.add(previous.identity)
                self._remote[entry.ip] = entry
                agent.datapath.set_prefix(ipaddress.IPv4Network(f"{entry.ip}/32"), entry.identity)
                self.learnt_at[entry.ip] = time.time()
            for ip in gone:
                previous = self._remote.pop(ip, None)
                if previous is None:
                    continue
                agent.datapath.delete_prefix(ipaddress.IPv4Network(f"{ip}/32"))
                self.learnt_at.pop(ip, None)
                old_ids.add(previous.identity)
            self._forget_unused(old_ids)

    def _forget_unused(self, identities: set[int]) -> None:
        agent = self._agent
        in_use = {e.identity for e in self._remote.values()} | {
            ep.identity for ep in agent.endpoints
        }
        changed: set[int] = set()
        for identity in identities - in_use:
            if identity >= 256:  # reserved identities stay
                changed |= agent.resolver.remove_identity(identity)
        if changed:
            agent.sync_identities(changed)

    def nodes_changed(self, upserts: list[NodeRecord], gone: list[str]) -> None:
        self._remote_node_entries(upserts, gone)
        for node in upserts:
            try:
                self.routes.set(node.pod_cidr, node.ip)
                self.route_errors.pop(node.name, None)
            except RouteError as exc:
                log.error("cluster: node %s: %s", node.name, exc)
                self.route_errors[node.name] = str(exc)
        installed = self.routes.installed()
        known = self.node.nodes()
        for name in gone:
            self.route_errors.pop(name, None)
            for cidr in list(installed):
                if not any(n.pod_cidr == cidr for n in known.values()):
                    self.routes.remove(cidr)

    def _remote_node_entries(self, upserts: list[NodeRecord], gone: list[str]) -> None:
        """Other nodes' addresses are `remote-node` (6) in the ipcache, as in Cilium: an
        endpoint reaching another node's host, or that host reaching an endpoint here, is
        judged as remote-node, never as `world`. This node's own addresses stay the host."""
        agent = self._agent
        with agent.lock:
            for node in upserts:
                prefix = ipaddress.IPv4Network(f"{node.ip}/32")
                previous = self._node_ips.get(node.name)
                if previous is not None and previous != prefix:
                    agent.datapath.delete_prefix(previous)
                held = agent.datapath.claims.held(prefix)
                if held is not None and held != REMOTE_NODE_IDENTITY:
                    log.error("cluster: node %s's address %s is this node's or an endpoint's:"
                              " not made remote-node", node.name, node.ip)
                    self._node_ips.pop(node.name, None)
                    continue
                self._node_ips[node.name] = prefix
                agent.datapath.set_prefix(prefix, REMOTE_NODE_IDENTITY)
            for name in gone:
                left = self._node_ips.pop(name, None)
                if left is not None and left not in self._node_ips.values():
                    agent.datapath.delete_prefix(left)

    def _restore_routes(self) -> None:
        """Routes to other nodes' pod CIDRs that left the kernel (the underlay link went down
        and up: the kernel flushed them) are added again at each heartbeat."""
        names = {n.pod_cidr: name for name, n in self.node.nodes().items()}
        for cidr, error in self.routes.restore_missing():
            name = names.get(cidr, str(cidr))
            if error is None:
                log.warning("cluster: the route to node %s (%s) was gone: added again", name, cidr)
                self.route_errors.pop(name, None)
            else:
                if self.route_errors.get(name) != error:
                    log.error("cluster: node %s: %s", name, error)
                self.route_errors[name] = error

    def policies_changed(
        self, upserts: dict[PolicyKey, StoredPolicy], gone: list[PolicyKey]
    ) -> None:
        policies = []
        for key, stored in upserts.items():
            try:
                found = [p for p in load_text(stored.text, stored.path).policies if p.key == key]
            except PolicyValidationError as exc:
                self.node.refuse(policy_key(key), f"{policy_key(key)}: policy refused: {exc}")
                continue
            if not found:
                self.node.refuse(
                    policy_key(key), f"{policy_key(key)}: policy not in its stored text"
                )
                continue
            policies.append(found[0])
        self._agent.apply_cluster_policies(policies, gone)

    def namespaces_changed(self, upserts: dict[str, dict[str, str]], gone: list[str]) -> None:
        for namespace, labels in upserts.items():
            self.apply_namespace(namespace, labels)
        for namespace in gone:
            self.apply_namespace(namespace, {})

    def apply_namespace(self, namespace: str, labels: dict[str, str]) -> None:
        """The namespace's labels to this node (`Agent.set_namespace_labels`). An endpoint
        whose new identity cannot be allocated now (etcd gone again) keeps its identity and
        is retried on the next heartbeat; the labels are stored already."""
        with self._agent.lock:
            try:
                self._agent.set_namespace_labels(namespace, labels)
            except KVStoreError as exc:
                if namespace not in self._namespaces_pending:
                    log.error(
                        "cluster: namespace %s: endpoints not relabelled yet (%s); retried on"
                        " each heartbeat",
                        namespace,
                        exc,
                    )
                self._namespaces_pending[namespace] = labels
            else:
                self._namespaces_pending.pop(namespace, None)

    def _collect_identities(self) -> None:
        """Identities of dead nodes (no node references them) leave etcd after the grace:
        swept at most every quarter of the grace (and at most once a minute), so an identity
        goes between 1 and 1.25 graces after its last reference."""
        now = time.monotonic()
        if now - self._gc_last < min(self._gc_grace_s / 4, 60.0):
            return
        self._gc_last = now
        try:
            freed = self.allocator.collect_garbage(self._gc_grace_s, now)
        except KVStoreError as exc:
            log.warning("cluster: identity garbage collection: %s", exc)
            return
        if freed:
            log.info("cluster: identities no node references any more deleted from etcd: %s",
                     ", ".join(map(str, sorted(freed))))

    def _retry_namespaces(self) -> None:
        with self._agent.lock:
            for namespace, labels in list(self._namespaces_pending.items()):
                self.apply_namespace(namespace, labels)

    # Status --------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        out = self.node.status()
        out["remote_endpoints"] = len(self._remote)
        out["root"] = self.store.root
        # When the latest remote entries reached this node's ipcache (bench/cluster.py).
        latest = sorted(self.learnt_at.items(), key=lambda item: item[1])[-256:]
        out["ipcache_written_at"] = {str(ip): at for ip, at in latest}
        out["routes"] = {str(c): str(v) for c, v in self.routes.installed().items()}
        if self.route_errors:
            out["route_errors"] = dict(self.route_errors)
        if self._netdev is not None:
            out["underlay_ifindex"] = self._netdev
        if self.netdev_error:
            out["underlay_error"] = self.netdev_error
        out["flow_api"] = self.node.me.flow_api or None
        if self.node.me.flow_api:
            out["flow_api_security"] = self.flow_api_security
        if self.store.tls_description is not None:
            out["tls"] = self.store.tls_description
        if self.store.auth is not None:
            out["user"] = self.store.auth.user
        if self.flow_api_error:
            out["flow_api_error"] = self.flow_api_error
        if self._namespaces_pending:
            out["namespaces_not_applied"] = sorted(self._namespaces_pending)
        return out
