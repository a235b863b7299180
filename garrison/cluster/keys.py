"""The cluster's key layout in etcd, after Cilium's kvstore mode, and its records (pure).

Under the store's root (`garrison/`):

| key                                           | value                          | lease   |
|-----------------------------------------------|--------------------------------|---------|
| `state/identities/v1/id/<n>`                  | canonical labels               | none    |
| `state/identities/v1/labels/<labels>`         | `{"id": n}`                    | none    |
| `state/identities/v1/refs/<labels>/<node>`    | `{"id": n, "owners": [...]}`   | node's  |
| `state/ip/v1/<ip>`                            | `IPEntry`: identity, node, ... | node's  |
| `state/nodes/v1/<node>`                       | `NodeRecord`: IP, pod CIDR,    | node's  |
|                                               | flow API address               |         |
| `state/heartbeat/v1/<node>`                   | unix time of the last beat     | node's  |
| `state/policies/v1/<kind>/<namespace>/<name>` | `{"path": ..., "text": ...}`   | none    |
| `state/namespaces/v1/<namespace>`             | `{"labels": {k: v, ...}}`      | none    |

(identities: `garrison.identity.allocator.ClusterIdentityAllocator`). Everything a node
publishes about itself is bound to its lease, so a dead node disappears from every other node
within the lease TTL; identities, policies and namespace labels outlive any one node.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

from garrison.identity.allocator import CLUSTER_IDENTITIES_PREFIX, parse_canonical
from garrison.identity.model import (
    MAX_ENDPOINT_ID,
    MIN_ENDPOINT_ID,
    RESERVED,
    RESERVED_BY_ID,
    IdentityError,
)
from garrison.identity.namespaces import (
    NamespaceError,
    check_label,
    check_namespace,
    parse_changes,
)
from garrison.policies.labels import NAMESPACE_NAME_LABEL, Labels
from garrison.policies.repository import PolicyKey

HOST_IDENTITY = RESERVED["host"].id
IDENTITIES_PREFIX = CLUSTER_IDENTITIES_PREFIX
IP_PREFIX = "state/ip/v1/"
NODES_PREFIX = "state/nodes/v1/"
HEARTBEAT_PREFIX = "state/heartbeat/v1/"
POLICIES_PREFIX = "state/policies/v1/"
NAMESPACES_PREFIX = "state/namespaces/v1/"


class ClusterRecordError(ValueError):
    """A value in the store that is not what this layout says (written by something else)."""


def _load(key: str, raw: bytes) -> dict[str, object]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ClusterRecordError(f"{key}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ClusterRecordError(f"{key}: expected a JSON object")
    return doc


def _dump(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node as the others see it: where its pod CIDR is routed, and where its agent serves
    its flow records read-only (`flow_api`, `IP:PORT`; empty: it serves none) and whether over
    TLS (`flow_api_tls`; absent, as in records older than it, or anything but JSON `true`:
    plaintext)."""

    name: str
    ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network
    flow_api: str = ""
    flow_api_tls: bool = False

    @property
    def key(self) -> str:
        return NODES_PREFIX + self.name

    def encode(self) -> bytes:
        doc: dict[str, object] = {
            "name": self.name, "ip": str(self.ip), "pod_cidr": str(self.pod_cidr)
        }
        if self.flow_api:  # absent, not empty: a record as an agent without one writes it
            doc["flow_api"] = self.flow_api
        if self.flow_api_tls:  # absent for plaintext: the record as agents before TLS wrote it
            doc["flow_api_tls"] = True
        return _dump(doc)

    @classmethod
    def decode(cls, key: str, raw: bytes) -> NodeRecord:
        doc = _load(key, raw)
        try:
            # kept as written: a reader checks it (`parse_host_port`), routing never needs it
            flow_api = doc.get("flow_api", "")
            if not isinstance(flow_api, str):
                flow_api = repr(flow_api)
            name = str(doc["name"])
            if key.startswith(NODES_PREFIX) and key != NODES_PREFIX + name:
                # a record under another node's key: its removal would leave this one
                raise ValueError(f"its name {name!r} is not its key's")
            return cls(
                name=name,
                ip=ipaddress.IPv4Address(str(doc["ip"])),
                pod_cidr=ipaddress.IPv4Network(str(doc["pod_cidr"])),
                flow_api=flow_api,
                flow_api_tls=doc.get("flow_api_tls") is True,
            )
        except (KeyError, ValueError) as exc:
            raise ClusterRecordError(f"{key}: bad node record: {exc}") from None


def parse_host_port(text: str) -> tuple[ipaddress.IPv4Address, int]:
    """`IP:PORT` (an IPv4 address, a port 0-65535) as a flow API address is written; raises
    `ValueError` naming the expected form."""
    host, sep, port = text.strip().rpartition(":")
    try:
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError
        return ipaddress.IPv4Address(host), int(port)
    except ValueError:
        raise ValueError(f"{text!r} is not IPV4:PORT (e.g. 198.19.0.1:4244)") from None


@dataclass(frozen=True, slots=True)
class IPEntry:
    """An endpoint address, its identity (with the identity's canonical labels, so a node can
    resolve policy for it without another read) and the node that hosts it."""

    ip: ipaddress.IPv4Address
    identity: int
    labels: str
    node: str
    endpoint: str = ""

    @property
    def key(self) -> str:
        return IP_PREFIX + str(self.ip)

    def encode(self) -> bytes:
        return _dump(
            {
                "ip": str(self.ip),
                "identity": self.identity,
                "labels": self.labels,
                "node": self.node,
                "endpoint": self.endpoint,
            }
        )

    @classmethod
    def decode(cls, key: str, raw: bytes) -> IPEntry:
        doc = _load(key, raw)
        try:
            identity = doc["identity"]
            if type(identity) is not int or identity <= 0:
                raise ValueError(f"identity {identity!r} is not a positive integer")
            if not (
                MIN_ENDPOINT_ID <= identity <= MAX_ENDPOINT_ID
                or (identity in RESERVED_BY_ID and identity != HOST_IDENTITY)
            ):
                # "host" is each node's own, and CIDR identities are node-local: another
                # node's endpoint never has either (a record that says so would make its
                # address the host, or a CIDR, in every policy here)
                raise ValueError(
                    f"identity {identity} is not an endpoint's (256-65535) nor a reserved one"
                    " another node's endpoint may have"
                )
            ip = ipaddress.IPv4Address(str(doc["ip"]))
            if key.startswith(IP_PREFIX) and key != IP_PREFIX + str(ip):
                # its deletion would remove another address: the entry would outlive it
                raise ValueError(f"its address {ip} is not its key's")
            return cls(
                ip=ip,
                identity=identity,
                labels=str(doc["labels"]),
                node=str(doc["node"]),
                endpoint=str(doc.get("endpoint", "")),
            )
        except (KeyError, ValueError) as exc:
            raise ClusterRecordError(f"{key}: bad ipcache entry: {exc}") from None


def policy_key(key: PolicyKey) -> str:
    """`state/policies/v1/<kind>/<namespace or _>/<name>`, each part percent-quoted."""
    kind, namespace, name = key
    parts = (kind, "_" if namespace is None else f"ns:{namespace}", name)
    return POLICIES_PREFIX + "/".join(quote(part, safe="") for part in parts)


def parse_policy_key(key: str) -> PolicyKey:
    parts = key.removeprefix(POLICIES_PREFIX).split("/")
    if len(parts) != 3:
        raise ClusterRecordError(f"{key}: not a policy key")
    kind, namespace, name = (unquote(part) for part in parts)
    return (kind, None if namespace == "_" else namespace.removeprefix("ns:"), name)


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """A policy as stored: the text of the file it came from (which may hold others)."""

    path: str
    text: str

    def encode(self) -> bytes:
        return _dump({"path": self.path, "text": self.text})

    @classmethod
    def decode(cls, key: str, raw: bytes) -> StoredPolicy:
        doc = _load(key, raw)
        try:
            return cls(path=str(doc["path"]), text=str(doc["text"]))
        except KeyError as exc:
            raise ClusterRecordError(f"{key}: bad policy record: missing {exc}") from None


def namespace_key(namespace: str) -> str:
    """`state/namespaces/v1/<namespace>`; raises `NamespaceError` for a name that is not a
    Kubernetes namespace name (which also keeps '/' and the like out of the key)."""
    return NAMESPACES_PREFIX + check_namespace(namespace)


def parse_namespace_key(key: str) -> str:
    try:
        return check_namespace(key.removeprefix(NAMESPACES_PREFIX))
    except NamespaceError as exc:
        raise ClusterRecordError(f"{key}: not a namespace key: {exc}") from None


def encode_namespace_labels(labels: Mapping[str, str]) -> bytes:
    """A namespace's labels as stored (the local store's form): its name label is left out,
    it is always the namespace's own name."""
    own = {k: v for k, v in sorted(labels.items()) if k != NAMESPACE_NAME_LABEL}
    return _dump({"labels": own})


def decode_namespace_labels(key: str, raw: bytes) -> dict[str, str]:
    """The labels stored at `key` (without the name label), each checked as `namespace
    label` checks it: a record written by something else never reaches a selector unchecked."""
    doc = _load(key, raw)
    labels = doc.get("labels")
    if not isinstance(labels, dict):
        raise ClusterRecordError(f"{key}: bad namespace record: 'labels' is not an object")
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(v, str):
            raise ClusterRecordError(f"{key}: bad namespace record: label {k!r} is not a string")
        if k == NAMESPACE_NAME_LABEL:
            continue  # always the namespace's own name, whatever a record says
        try:
            check_label(k, v)
        except NamespaceError as exc:
            raise ClusterRecordError(f"{key}: bad namespace record: {exc}") from None
        out[k] = v
    return out


def relabelled(
    namespace: str, current: Mapping[str, str], changes: Sequence[str]
) -> dict[str, str]:
    """`k=v` / `k-` changes (kubectl's form) applied to a namespace's `current` labels; the
    labels after them, without the name label. Raises `NamespaceError` for a bad name or
    change."""
    check_namespace(namespace)
    sets, removes = parse_changes(changes)
    after = {
        k: v for k, v in current.items() if k not in removes and k != NAMESPACE_NAME_LABEL
    }
    after.update(sets)
    return after


def identities_to_learn(
    entries: Iterable[IPEntry], labels_of: Callable[[int], Labels | None]
) -> tuple[dict[int, Labels], set[int], list[tuple[IPEntry, str]]]:
    """What other nodes' entries teach this node's policy resolver, which knows `labels_of`:
    identities to add (→ labels), those to remove first because their number now names other
    labels (collected and given out again while this node knew the old ones: the cluster's
    word wins), and the entries refused (with why)."""
    learn: dict[int, Labels] = {}
    replace: set[int] = set()
    refused = []
    for entry in entries:
        try:
            labels = parse_canonical(entry.labels)
        except IdentityError as exc:
            refused.append((entry, str(exc)))
            continue
        known = labels_of(entry.identity)
        if known == labels or learn.get(entry.identity) == labels:
            continue
        if entry.identity in learn:
            refused.append((entry, f"identity {entry.identity} has two label sets in one batch"))
            continue
        if known is not None:
            replace.add(entry.identity)
        learn[entry.identity] = labels
    return learn, replace, refused
