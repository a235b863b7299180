"""One node's membership in the cluster: what it publishes, and what it learns from the others.

`ClusterNode` publishes this node's record, heartbeat and endpoint addresses under its etcd
session (bound to its lease), and follows the other nodes, the ipcache, the policies and the
namespaces' labels with prefix watches. The watches' `Relisted` events (the first one, and
one after a compaction) are diffed against what was known, so the `ClusterHandler` only ever
hears about changes — the agent applies them to its maps incrementally, never by flushing.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

from garrison.cluster.keys import (
    HEARTBEAT_PREFIX,
    IP_PREFIX,
    NAMESPACES_PREFIX,
    NODES_PREFIX,
    POLICIES_PREFIX,
    ClusterRecordError,
    IPEntry,
    NodeRecord,
    StoredPolicy,
    decode_namespace_labels,
    encode_namespace_labels,
    namespace_key,
    parse_namespace_key,
    parse_policy_key,
    policy_key,
    relabelled,
)
from garrison.identity.namespaces import parse_changes
from garrison.kvstore.base import (
    KeyDeleted,
    KeyPut,
    KVStoreError,
    KVStoreUnavailableError,
    Relisted,
    WatchEvent,
)
from garrison.kvstore.etcd import EtcdKVStore, EtcdSession, EtcdWatch
from garrison.policies.labels import NAMESPACE_NAME_LABEL
from garrison.policies.repository import PolicyKey
from garrison.statefile import write_atomically

log = logging.getLogger("garrison.cluster")

DEFAULT_HEARTBEAT_S = 5.0
# What a node keeps on disk (nodes first: routes before the endpoints behind them).
# (Namespace labels are not in it: the agent's namespace store, written as each change
# arrives, is the fresher copy; `read_namespaces`.)
_CACHED = (NODES_PREFIX, POLICIES_PREFIX, IP_PREFIX)
# Attempts of a namespace label change that meets another node's change in between.
_LABEL_ATTEMPTS = 16
_T = TypeVar("_T")
# Refused records `status` names one by one (the rest are counted).
_REFUSED_SHOWN = 20
# Records no lease ends: the cluster's, kept by every node when etcd comes back without them.
_OUTLIVE_NODES = (POLICIES_PREFIX, NAMESPACES_PREFIX)


class ClusterHandler(Protocol):
    """What the agent does with news from the cluster (called from watch threads)."""

    def remote_endpoints_changed(
        self, upserts: list[IPEntry], gone: list[ipaddress.IPv4Address]
    ) -> None: ...

    def nodes_changed(self, upserts: list[NodeRecord], gone: list[str]) -> None: ...

    def policies_changed(
        self, upserts: dict[PolicyKey, StoredPolicy], gone: list[PolicyKey]
    ) -> None: ...

    def namespaces_changed(self, upserts: dict[str, dict[str, str]], gone: list[str]) -> None:
        """Namespaces whose labels changed (→ their labels, the name label left out), and
        those whose labels were all removed."""


def _ip_of_key(key: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(key.removeprefix(IP_PREFIX))
    except ValueError:
        return None


def _parsed(parse: Callable[[str], _T], key: str) -> _T | None:
    """A removed key's name (`parse`), None for a key of another shape (never handed on)."""
    try:
        return parse(key)
    except ClusterRecordError:
        return None


def _decode_policy(key: str, raw: bytes) -> StoredPolicy:
    parse_policy_key(key)  # a key of another shape is refused with its record
    return StoredPolicy.decode(key, raw)


def _decode_namespace(key: str, raw: bytes) -> dict[str, str]:
    parse_namespace_key(key)
    return decode_namespace_labels(key, raw)


def _diff(view: dict[str, bytes], event: WatchEvent) -> tuple[dict[str, bytes], list[str]]:
    """Apply `event` to `view`; the keys it set (key → value) and the keys it removed."""
    if isinstance(event, Relisted):
        gone = [key for key in view if key not in event.items]
        upserts = {k: v for k, v in event.items.items() if view.get(k) != v}
        view.clear()
        view.update(event.items)
        return upserts, gone
    if isinstance(event, KeyPut):
        if view.get(event.key) == event.value:
            return {}, []
        view[event.key] = event.value
        return {event.key: event.value}, []
    if isinstance(event, KeyDeleted) and view.pop(event.key, None) is not None:
        return {}, [event.key]
    return {}, []


class ClusterNode:
    def __init__(
        self,
        store: EtcdKVStore,
        session: EtcdSession,
        me: NodeRecord,
        handler: ClusterHandler,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
        cache_path: Path | None = None,
    ) -> None:
        self.store = store
        self.session = session
        self.me = me
        self._handler = handler
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._lock = threading.Lock()
        self._views: dict[str, dict[str, bytes]] = {
            NODES_PREFIX: {},
            IP_PREFIX: {},
            POLICIES_PREFIX: {},
            NAMESPACES_PREFIX: {},
            HEARTBEAT_PREFIX: {},
        }
        self._watches: list[EtcdWatch] = []
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        # When each watch last delivered (monotonic), and how many changes it applied.
        self.applied: dict[str, int] = dict.fromkeys(self._views, 0)
        # The etcd revision each prefix's view is at (0: read from the cache, not etcd).
        self.revisions: dict[str, int] = dict.fromkeys(self._views, 0)
        self.errors: list[str] = []
        # Records under the prefix this node refuses (key → why), while they are there: one
        # bad record is skipped alone, named in `garrison status`, logged once.
        self.refused: dict[str, str] = {}
        # Run after every heartbeat (in its thread): retries of writes that found etcd away.
        self.on_beat: list[Callable[[], object]] = []
        # What the other nodes published, kept on disk for a start while etcd is away.
        self._cache_path = cache_path
        self._cache_dirty = False
        self._cache_error = ""
        # The etcd revision the saved copy was seen at (None: not read yet).
        self._cache_revision: int | None = None
        self._restored_at_start: bool | None = None
        self.primed_from_cache = False

    # Publishing ----------------------------------------------------------------------------

    def start(self) -> None:
        self.session.put(self.me.key, self.me.encode())
        self._heartbeat()
        for prefix in self._views:
            self._watches.append(
                self.store.watch(prefix, self._on_event(prefix), name=f"watch-{prefix}")
            )
        self._beat = threading.Thread(target=self._beat_loop, name="cluster-heartbeat", daemon=True)
        self._beat.start()

    def prime(self) -> None:
        """Read the ipcache and the policies once, synchronously, and hand them to the handler
        as the watches would: the agent enforces them before its first reconcile. The watches
        (`start`) then begin with a re-list that finds nothing new."""
        cached = self._load_cache()
        try:
            snapshots = {p: self.store.snapshot(p) for p in _CACHED}
        except KVStoreError as exc:
            if cached is None and self.has_cache():
                raise KVStoreError(
                    f"{exc}; and the copy of the cluster saved at {self._cache_path} is"
                    f" unreadable ({self._cache_error}), so this node cannot start before etcd"
                    " answers"
                ) from None
            if cached is None:
                raise
            log.warning("cluster: %s; starting from the copy saved at %s", exc, self._cache_path)
            self.primed_from_cache = True
            snapshots = {p: (cached.get(p, {}), 0) for p in _CACHED}
        restored = not self.primed_from_cache and self._went_back(
            max(revision for _, revision in snapshots.values())
        )
        for prefix in _CACHED:
            items, revision = snapshots[prefix]
            reason = "cache" if self.primed_from_cache else "prime"
            lost: dict[str, bytes] = {}
            if restored and prefix in _OUTLIVE_NODES and cached is not None:
                # etcd lost them with its data while this node was away: kept, written back
                lost = {k: v for k, v in cached.get(prefix, {}).items() if k not in items}
                items = {**lost, **items}
            self._on_event(prefix)(Relisted(items=items, revision=revision, reason=reason))
            if lost:
                self._write_back(prefix, lost)
            # Deleted while this node was away: what the agent kept of them itself (the
            # policies imported here, saved beside its identities) goes too.
            away = [key for key in (cached or {}).get(prefix, {}) if key not in items]
            if away and prefix == POLICIES_PREFIX:
                try:
                    self._dispatch(prefix, {}, away)
                except (ClusterRecordError, KVStoreError) as exc:
                    self._record_error(str(exc))
        self.save_cache()

    def _went_back(self, revision: int) -> bool:
        """Whether etcd, at `revision` now, is behind the revision this node's saved copy was
        seen at (wiped, replaced, restored from an older backup while this node was away):
        what no lease ends and etcd lacks was lost, not deleted. Said once; the copy's
        revision is etcd's from then on."""
        if self._restored_at_start is not None:
            return self._restored_at_start  # the namespaces' read and `prime` agree
        if self._cache_revision is None:
            self._load_cache()
        seen = self._cache_revision or 0
        self._restored_at_start = revision < seen
        if revision >= seen:
            return False
        log.warning(
            "cluster: etcd is at revision %d, behind the %d this node saw (restored or"
            " replaced while it was away): the cluster's policies and namespace labels it"
            " lacks are kept and written back", revision, seen,
        )
        self._cache_revision = 0
        return True

    def read_namespaces(
        self, saved: Mapping[str, Mapping[str, str]]
    ) -> dict[str, dict[str, str]] | None:
        """The cluster's namespace labels (namespace → labels, the name label left out), read
        once at the agent's start, before its endpoints get their identities. With etcd away,
        None: the node goes on with `saved`, its own copy (the agent's namespace store, which
        each change reached as it arrived). Either way the watch begins from what is returned
        or saved, so it only brings what changed since; the handler is not called."""
        mine = {
            namespace_key(ns): encode_namespace_labels(labels)
            for ns, labels in saved.items()
            if set(labels) - {NAMESPACE_NAME_LABEL}
        }
        try:
            items, revision = self.store.snapshot(NAMESPACES_PREFIX)
        except KVStoreError as exc:
            log.warning("cluster: namespace labels not read (%s): this node's copy stays", exc)
            with self._lock:
                self._views[NAMESPACES_PREFIX] = mine
            return None
        if self._went_back(revision):
            lost = {k: v for k, v in mine.items() if k not in items}
            items = {**lost, **items}
            if lost:
                self._write_back(NAMESPACES_PREFIX, lost)
        out = {}
        for key, raw in items.items():
            try:
                out[parse_namespace_key(key)] = _decode_namespace(key, raw)
            except ClusterRecordError as exc:
                self.refuse(key, str(exc))
        with self._lock:
            self._views[NAMESPACES_PREFIX] = dict(items)
            self.revisions[NAMESPACES_PREFIX] = revision
        return out

    def has_cache(self) -> bool:
        return self._cache_path is not None and self._cache_path.is_file()

    def _load_cache(self) -> dict[str, dict[str, bytes]] | None:
        if not self.has_cache():
            return None
        assert self._cache_path is not None
        try:
            doc = json.loads(self._cache_path.read_text())
            revision = doc.get("revision", 0)
            if self._cache_revision is None:
                self._cache_revision = revision if type(revision) is int else 0
            return {
                prefix: {k: base64.b64decode(v) for k, v in items.items()}
                for prefix, items in doc["views"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("cluster: the saved copy %s is unreadable: %s", self._cache_path, exc)
            self._cache_error = f"{type(exc).__name__}: {exc}"
            return None

    def save_cache(self) -> None:
        """Write what the other nodes published (nodes, ipcache, policies) to the cache file,
        atomically; a no-op without one."""
        if self._cache_path is None:
            return
        with self._lock:
            views = {
                prefix: {k: base64.b64encode(v).decode() for k, v in self._views[prefix].items()}
                for prefix in _CACHED
            }
            self._cache_dirty = False
            # the etcd revision this copy was seen at (a start finding etcd behind it knows
            # etcd lost data: `_went_back`)
            seen = max(self._cache_revision or 0, *self.revisions.values())
        write_atomically(self._cache_path, json.dumps({"views": views, "revision": seen}))

    def _heartbeat(self) -> None:
        self.session.put(HEARTBEAT_PREFIX + self.me.name, f"{self._clock():.3f}".encode())

    def _beat_loop(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            self._heartbeat()
            if self._cache_dirty:
                try:
                    self.save_cache()
                except OSError as exc:
                    log.error("cluster: cannot save %s: %s", self._cache_path, exc)
            for hook in self.on_beat:
                try:
                    hook()
                except Exception:
                    log.exception("cluster: heartbeat hook %r failed", hook)

    def publish_endpoint(self, entry: IPEntry) -> None:
        """Bound to this node's lease; retried by the session while etcd is away."""
        self.session.put(entry.key, entry.encode())

    def withdraw_endpoint(self, ip: ipaddress.IPv4Address) -> None:
        self.session.delete(IP_PREFIX + str(ip))

    def published_endpoints(self) -> dict[str, bytes]:
        return {k: v for k, v in self.session.keys().items() if k.startswith(IP_PREFIX)}

    def publish_policy(self, key: PolicyKey, stored: StoredPolicy) -> None:
        """Stored for the whole cluster (no lease). Raises `KVStoreError` when etcd is away:
        an import must not look done on one node only."""
        self.store.put(policy_key(key), stored.encode())

    def delete_policy(self, key: PolicyKey) -> None:
        self.store.delete(policy_key(key))

    def label_namespace(
        self, namespace: str, changes: Sequence[str]
    ) -> tuple[dict[str, str], bytes | None, bytes | None]:
        """Apply `k=v` / `k-` changes to the namespace's labels in etcd, for the whole cluster
        (no lease), over the labels etcd holds (a compare-and-swap: a change another node makes
        at the same moment is never lost). Returns the labels after (the name label left out),
        the record replaced and the record written (None: no key).
        Raises `NamespaceError` for a bad change (before etcd is asked) and `KVStoreError` when
        etcd is away: nothing is changed on any node."""
        key = namespace_key(namespace)
        parse_changes(changes)
        try:
            for _ in range(_LABEL_ATTEMPTS):
                raw = self.store.get(key)
                current: dict[str, str] = {}
                if raw is not None:
                    try:
                        current = decode_namespace_labels(key, raw)
                    except ClusterRecordError as exc:  # replaced by the labels asked for
                        log.warning("cluster: %s; overwritten", exc)
                after = relabelled(namespace, current, changes)
                written = encode_namespace_labels(after) if after else None
                if raw == written:  # nothing to change
                    return after, raw, raw
                if written is None:
                    assert raw is not None
                    done = self.store.compare_and_delete(key, raw)
                else:
                    done = self.store.compare_and_swap(key, raw, written)
                if done:
                    return after, raw, written
        except KVStoreUnavailableError as exc:
            raise KVStoreUnavailableError(
                f"namespace {namespace} not labelled on any node (a cluster's namespace labels"
                f" live in etcd): {exc}"
            ) from None
        raise KVStoreError(
            f"namespace {namespace}: its labels changed on other nodes {_LABEL_ATTEMPTS} times"
            " while this change was made; nothing changed here, run the command again"
        )

    def namespace_value(self, namespace: str) -> bytes | None:
        """The namespace's record as this node's watch last saw it."""
        with self._lock:
            return self._views[NAMESPACES_PREFIX].get(namespace_key(namespace))

    # Following -----------------------------------------------------------------------------

    def _on_event(self, prefix: str) -> Callable[[WatchEvent], None]:
        def handle(event: WatchEvent) -> None:
            lost: dict[str, bytes] = {}
            with self._lock:
                if isinstance(event, Relisted) and event.restored and prefix in _OUTLIVE_NODES:
                    # etcd came back without records no node's lease ended: lost with its data,
                    # not deleted. Kept here (a policy is never dropped because etcd forgot
                    # it) and written back for every node.
                    view = self._views[prefix]
                    lost = {k: v for k, v in view.items() if k not in event.items}
                    event = replace(event, items={**lost, **event.items})
                upserts, gone = _diff(self._views[prefix], event)
                if event.revision:
                    self.revisions[prefix] = event.revision
            if lost:
                self._write_back(prefix, lost)
            if not upserts and not gone:
                return
            if prefix in _CACHED:
                self._cache_dirty = True
            self.applied[prefix] += len(upserts) + len(gone)
            try:
                self._dispatch(prefix, upserts, gone)
            except (ClusterRecordError, KVStoreError) as exc:
                self._record_error(str(exc))
            except Exception as exc:  # a bug must not stop the watch: logged and shown
                log.exception("cluster: applying %s failed", prefix)
                self.errors = [*self.errors[-9:], f"applying {prefix}: {exc!r}"]
            if prefix == POLICIES_PREFIX and not isinstance(event, Relisted):
                # saved now, not at the next heartbeat: a policy deleted while this node is
                # down is told from one it never saw by this copy (`prime`)
                try:
                    self.save_cache()
                except OSError as exc:
                    log.error("cluster: cannot save %s: %s", self._cache_path, exc)

        return handle

    def _write_back(self, prefix: str, lost: Mapping[str, bytes]) -> None:
        log.warning(
            "cluster: etcd came back without %d record(s) under %s (restored or replaced):"
            " kept in force here and written back: %s",
            len(lost), prefix, ", ".join(sorted(lost)),
        )
        for key, value in lost.items():
            try:
                self.store.create(key, value)  # another node's copy, written first, stays
            except KVStoreError as exc:
                self._record_error(f"{key}: not written back to etcd: {exc}")

    def _record_error(self, error: str) -> None:
        log.error("cluster: %s", error)
        self.errors = [*self.errors[-9:], error]

    def refuse(self, key: str, why: str) -> None:
        """The record at `key` is refused (`why` names it): shown in `garrison status` while
        it is there, logged once (again only when the reason changes)."""
        if self.refused.get(key) != why:
            self.refused[key] = why
            self._record_error(why)

    def _decoded(
        self, upserts: Mapping[str, bytes], decode: Callable[[str, bytes], _T]
    ) -> dict[str, _T]:
        """Each record decoded alone: a bad one is refused (`refuse`), the others go on."""
        out: dict[str, _T] = {}
        for key, raw in upserts.items():
            try:
                out[key] = decode(key, raw)
            except ClusterRecordError as exc:
                self.refuse(key, str(exc))
            else:
                self.refused.pop(key, None)
        return out

    def _dispatch(self, prefix: str, upserts: Mapping[str, bytes], gone: list[str]) -> None:
        for key in gone:  # a record deleted is no longer refused
            self.refused.pop(key, None)
        if prefix == IP_PREFIX:
            entries = [
                entry for entry in self._decoded(upserts, IPEntry.decode).values()
                if entry.node != self.me.name
            ]
            removed = [ip for key in gone if (ip := _ip_of_key(key)) is not None]
            if entries or removed:
                self._handler.remote_endpoints_changed(entries, removed)
        elif prefix == NODES_PREFIX:
            nodes = self._decoded(upserts, NodeRecord.decode).values()
            others = [n for n in nodes if n.name != self.me.name]
            names = [key.removeprefix(NODES_PREFIX) for key in gone]
            others_gone = [n for n in names if n != self.me.name]
            if others or others_gone:
                self._handler.nodes_changed(others, others_gone)
        elif prefix == POLICIES_PREFIX:
            policies = {
                parse_policy_key(key): stored
                for key, stored in self._decoded(upserts, _decode_policy).items()
            }
            removed_keys = [k for key in gone if (k := _parsed(parse_policy_key, key)) is not None]
            if policies or removed_keys:
                self._handler.policies_changed(policies, removed_keys)
        elif prefix == NAMESPACES_PREFIX:
            # one bad record is refused alone (its namespace keeps the labels it had here)
            labelled = {
                parse_namespace_key(key): labels
                for key, labels in self._decoded(upserts, _decode_namespace).items()
            }
            unlabelled = [
                ns for key in gone if (ns := _parsed(parse_namespace_key, key)) is not None
            ]
            if labelled or unlabelled:
                self._handler.namespaces_changed(labelled, unlabelled)

    # Views ---------------------------------------------------------------------------------

    def policy_revision(self) -> int:
        """The etcd revision of the cluster's policies as this node applied them."""
        with self._lock:
            return self.revisions[POLICIES_PREFIX]

    def nodes(self) -> dict[str, NodeRecord]:
        with self._lock:
            view = dict(self._views[NODES_PREFIX])
        out = {}
        for key, raw in view.items():
            try:
                out[key.removeprefix(NODES_PREFIX)] = NodeRecord.decode(key, raw)
            except ClusterRecordError:
                continue  # refused when it arrived (`refused`)
        return out

    def heartbeats(self) -> dict[str, float]:
        with self._lock:
            view = dict(self._views[HEARTBEAT_PREFIX])
        out = {}
        for key, raw in view.items():
            try:
                beat = float(raw)
            except ValueError:
                continue
            if math.isfinite(beat):  # "inf" would be a beat forever fresh
                out[key.removeprefix(HEARTBEAT_PREFIX)] = beat
        return out

    def status(self) -> dict[str, object]:
        now = self._clock()
        beats = self.heartbeats()
        session = self.session
        watches = {
            w.prefix: {
                "connected": w.connected,
                "next_revision": w.next_revision,
                "relists": w.relists,
                "reconnects": w.reconnects,
                **({"error": w.last_error} if w.last_error else {}),
            }
            for w in self._watches
        }
        silent = session.silent_for()
        error = session.last_error or (
            f"etcd has not renewed the lease for {silent:.0f} s (no answer on an open"
            " connection: etcd stopped, or the network to it)"
            if silent is not None else None
        )
        return {
            "node": self.me.name,
            "endpoints": list(self.store.endpoints),
            "connected": session.connected and all(w.connected for w in self._watches),
            "lease": f"{session.lease:x}" if session.lease is not None else None,
            "lease_ttl_s": session.ttl_s,
            **({"error": error} if error else {}),
            "revision": max((w.next_revision or 1) - 1 for w in self._watches)
            if self._watches
            else 0,
            "watches": watches,
            "nodes": {
                name: {
                    "ip": str(node.ip),
                    "pod_cidr": str(node.pod_cidr),
                    "heartbeat_age_s": round(now - beats[name], 1) if name in beats else None,
                    "healthy": name in beats and now - beats[name] < 3 * self._heartbeat_s,
                    **({"flow_api": node.flow_api} if node.flow_api else {}),
                }
                for name, node in sorted(self.nodes().items())
            },
            "errors": list(self.errors),
            # the first few by key (a writer may fill etcd with them), and how many there are
            **({"refused": dict(sorted(self.refused.items())[:_REFUSED_SHOWN]),
                "refused_count": len(self.refused)} if self.refused else {}),
            **({"started_from_cache": True} if self.primed_from_cache else {}),
        }

    def close(self, *, leave: bool = False) -> None:
        """Stop following. With `leave`, revoke the lease: this node's records vanish from
        every other node now; without, they stay until the lease expires (a restart within
        the TTL republishes them and nobody notices)."""
        self._stop.set()
        for watch in self._watches:
            watch.close()
        if self._beat is not None:
            self._beat.join(timeout=5)
        self.session.close(revoke=leave)
