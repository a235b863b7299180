"""The cluster's flow records from every node's flow API (what Hubble Relay does).

`ClusterFlowSource` reads the nodes from etcd (`state/nodes/v1/`, each record naming its
node's flow API), asks every node at once, and hands back each node's records; the caller
merges them in time order (`garrison.cluster.flowmerge`). A node that does not answer, or
publishes no flow API, is a `NodeFailure` (which node, which address, why); the others are
still read. `ClusterFollower` polls every node's `FlowsSince` in a thread of its own and
re-reads the node list every few seconds: nodes that join are followed from the moment the
follow began, nodes that leave are said so, a node that stops answering is named once and
again when it is back (an agent that restarted meanwhile is read from its new ring's start).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from garrison.cluster.flowapi import FlowAPIClient, FlowAPIError, ReaderTLS, load_reader_tls
from garrison.cluster.keys import (
    NODES_PREFIX,
    POLICIES_PREFIX,
    ClusterRecordError,
    NodeRecord,
    StoredPolicy,
    parse_host_port,
    parse_policy_key,
)
from garrison.kvstore.etcd import EtcdAuth, EtcdKVStore, EtcdTLS
from garrison.policies.errors import PolicyValidationError
from garrison.policies.loader import load_text
from garrison.policies.model import Policy

DEFAULT_TIMEOUT_S = 5.0
POLL_S = 0.25
RELIST_S = 5.0
MAX_BACKOFF_S = 5.0


@dataclass(frozen=True, slots=True)
class NodeFailure:
    """A node whose records are not in the view, and why (one line on standard error)."""

    node: str
    address: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node} ({self.address or 'no flow API'}): {self.reason}"


@dataclass(frozen=True, slots=True)
class NodeFlows:
    """One node's answer: its records (JSON texts, its ring's order), its cursor and ring."""

    node: str
    flows: list[str]
    cursor: int
    ring: str = ""


class ClusterFlowSource:
    """The cluster's nodes (from etcd) and their flow APIs. Raises `KVStoreError` when etcd
    does not answer. A node whose record says TLS is read over TLS with `flow_tls`
    (`--flow-api-ca/-cert/-key`; None: the system's CA roots, no client certificate), the
    others in plaintext."""

    def __init__(self, etcd_endpoints: str | Sequence[str],
                 timeout_s: float = DEFAULT_TIMEOUT_S, *, tls: EtcdTLS | None = None,
                 auth: EtcdAuth | None = None, flow_tls: ReaderTLS | None = None) -> None:
        self.store = EtcdKVStore(etcd_endpoints, timeout_s=timeout_s, tls=tls, auth=auth)
        self.timeout_s = timeout_s
        self.flow_tls = flow_tls

    def close(self) -> None:
        self.store.close()

    def nodes(self) -> tuple[list[NodeRecord], list[NodeFailure]]:
        """The nodes in etcd, by name; records that do not decode are failures."""
        items, _ = self.store.snapshot(NODES_PREFIX)
        nodes, bad = [], []
        for key, raw in sorted(items.items()):
            try:
                nodes.append(NodeRecord.decode(key, raw))
            except ClusterRecordError as exc:
                bad.append(NodeFailure(key.removeprefix(NODES_PREFIX), "", str(exc)))
        return nodes, bad

    def policies(self) -> list[Policy]:
        """The cluster's policies as stored in etcd (what every node enforces besides its own
        --policy-dir); a stored text that does not load is left out."""
        items, _ = self.store.snapshot(POLICIES_PREFIX)
        out = []
        for key, raw in sorted(items.items()):
            try:
                wanted = parse_policy_key(key)
                stored = StoredPolicy.decode(key, raw)
                out += [p for p in load_text(stored.text, stored.path).policies
                        if p.key == wanted]
            except (ClusterRecordError, PolicyValidationError):
                continue
        return out

    def client(self, node: NodeRecord) -> FlowAPIClient:
        """Raises `NodeFailure`-worthy `FlowAPIError` when the node publishes none."""
        if not node.flow_api:
            raise FlowAPIError("publishes no flow API (its agent runs with --flow-api none, or"
                               " predates it)")
        try:
            parse_host_port(node.flow_api)
        except ValueError as exc:
            raise FlowAPIError(f"publishes a bad flow API address: {exc}") from None
        if not node.flow_api_tls:
            return FlowAPIClient(node.flow_api, self.timeout_s)
        if self.flow_tls is None:
            self.flow_tls = load_reader_tls(None, None, None)
        return FlowAPIClient(node.flow_api, self.timeout_s, self.flow_tls)

    def recent(
        self, query: dict[str, Any], first: int | None, last: int
    ) -> tuple[list[NodeFlows], list[NodeFailure]]:
        """Every node's oldest `first` or newest `last` matching records, asked at once."""
        nodes, failures = self.nodes()
        params: dict[str, Any] = {"query": query}
        if first is not None:
            params["first"] = first
        else:
            params["limit"] = last

        def ask(node: NodeRecord) -> NodeFlows | NodeFailure:
            try:
                client = self.client(node)
            except FlowAPIError as exc:
                return NodeFailure(node.name, node.flow_api, str(exc))
            try:
                data = client.call("Flows", **params)
            except FlowAPIError as exc:
                return NodeFailure(node.name, node.flow_api, str(exc))
            finally:
                client.close()
            return NodeFlows(node.name, data["flows"], data["cursor"], data.get("ring", ""))

        answers: list[NodeFlows] = []
        if nodes:
            with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
                for result in pool.map(ask, nodes):
                    if isinstance(result, NodeFailure):
                        failures.append(result)
                    else:
                        answers.append(result)
        return answers, failures


# -- following -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowsArrived:
    node: str
    flows: list[str]
    missed: int


@dataclass(frozen=True, slots=True)
class NodeFailed:
    failure: NodeFailure


@dataclass(frozen=True, slots=True)
class NodeRecovered:
    node: str
    address: str


@dataclass(frozen=True, slots=True)
class NodeJoined:
    node: str
    address: str


@dataclass(frozen=True, slots=True)
class NodeLeft:
    node: str


@dataclass(frozen=True, slots=True)
class NodeListFailed:
    reason: str


FollowEvent = FlowsArrived | NodeFailed | NodeRecovered | NodeJoined | NodeLeft | NodeListFailed


class _Poller:
    """One node's FlowsSince loop from `position` (its ring and cursor there). None: read its
    ring from the start, the records from the follow's start on (a node that joined, or
    restarted, after the follow began)."""

    def __init__(self, follower: ClusterFollower, node: NodeRecord,
                 position: tuple[str, int] | None, failing: bool) -> None:
        self.node = node
        self._follower = follower
        self.ring = position[0] if position is not None else ""
        self.cursor: int | None = position[1] if position is not None else None
        self.failing = failing
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"follow-{node.name}",
                                       daemon=True)

    def _run(self) -> None:
        f = self._follower
        backoff = f.poll_s
        client: FlowAPIClient | None = None
        while not self.stop.is_set():
            try:
                if client is None:
                    client = f.source.client(self.node)
                query = f.query if self.cursor is not None else f.bounded_query
                data = client.call("FlowsSince", query=query, cursor=self.cursor or 0)
            except FlowAPIError as exc:
                if not self.failing:
                    self.failing = True
                    f.events.put(NodeFailed(NodeFailure(self.node.name, self.node.flow_api,
                                                        str(exc))))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                self.stop.wait(backoff)
                continue
            backoff = f.poll_s
            cursor, ring = int(data["cursor"]), str(data.get("ring", ""))
            if self.cursor is not None and (ring != self.ring or cursor < self.cursor):
                # a new agent process, a new ring: the cursor held names nothing in it
                self.cursor = None
                continue
            self.ring = ring
            if self.failing:
                self.failing = False
                f.events.put(NodeRecovered(self.node.name, self.node.flow_api))
            missed = data.get("missed", 0)
            if self.cursor is None:
                missed = 0  # a ring read from its start: what it lost predates the follow
            self.cursor = cursor
            if data["flows"] or missed:
                f.events.put(FlowsArrived(self.node.name, data["flows"],
                                          missed if isinstance(missed, int) else 0))
            self.stop.wait(f.poll_s)
        if client is not None:
            client.close()


class ClusterFollower:
    """New records of every node, as events on `events` (read them with `get`)."""

    def __init__(self, source: ClusterFlowSource, query: dict[str, Any], started_ns: int,
                 *, poll_s: float = POLL_S, relist_s: float = RELIST_S) -> None:
        self.source = source
        self.query = query
        since = query.get("since_ns")
        self.bounded_query = {
            **query, "since_ns": started_ns if since is None else max(since, started_ns)
        }
        self.poll_s = poll_s
        self.relist_s = relist_s
        self.events: queue.Queue[FollowEvent] = queue.Queue()
        self._pollers: dict[str, _Poller] = {}
        self._stop = threading.Event()
        self._lister = threading.Thread(target=self._relist_loop, name="follow-nodes",
                                        daemon=True)

    def start(self, positions: dict[str, tuple[str, int]], failed: Sequence[str]) -> None:
        """Follow from these positions (ring, cursor: where `recent()` left each node); the
        `failed` nodes, and nodes that join, from the start of the follow once they answer."""
        nodes, _ = self.source.nodes()
        for node in nodes:
            self._add(node, positions.get(node.name), failing=node.name in failed)
        self._lister.start()

    def _add(self, node: NodeRecord, position: tuple[str, int] | None, failing: bool) -> None:
        poller = _Poller(self, node, position, failing)
        self._pollers[node.name] = poller
        poller.thread.start()

    def _relist_loop(self) -> None:
        failing = False
        while not self._stop.wait(self.relist_s):
            try:
                nodes, _ = self.source.nodes()
            except Exception as exc:  # etcd away: keep following the nodes known
                if not failing:
                    failing = True
                    self.events.put(NodeListFailed(str(exc)))
                continue
            failing = False
            seen = {node.name: node for node in nodes}
            for name, poller in list(self._pollers.items()):
                node = seen.get(name)
                if node is None or (node.flow_api, node.flow_api_tls) != (
                        poller.node.flow_api, poller.node.flow_api_tls):
                    poller.stop.set()
                    del self._pollers[name]
                    if node is None:
                        self.events.put(NodeLeft(name))
            for name, node in seen.items():
                if name not in self._pollers and not self._stop.is_set():
                    self.events.put(NodeJoined(name, node.flow_api))
                    self._add(node, None, failing=False)

    def get(self, timeout_s: float) -> list[FollowEvent]:
        """The events so far, waiting up to `timeout_s` for the first."""
        out: list[FollowEvent] = []
        try:
            out.append(self.events.get(timeout=timeout_s))
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop.set()
        for poller in list(self._pollers.values()):
            poller.stop.set()
        deadline = time.monotonic() + 2
        for poller in list(self._pollers.values()):
            poller.thread.join(timeout=max(0.0, deadline - time.monotonic()))
