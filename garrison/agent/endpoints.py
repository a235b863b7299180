"""The agent's endpoint registry: what it created, persisted so a restart finds it again.

An endpoint is a network namespace NAME with a veth pair to the host and an address from the
endpoint pool; or an adopted namespace (`netns_path`: one someone else made, e.g. a container
runtime's) whose host-side veth garrison governs. `owned` names what garrison created (of
`netns`, `veth`, `clsact`): a delete removes exactly that. The registry is a JSON file under
the state directory, replaced atomically on every change; addresses are allocated host-scope
from the pool, lowest free first (an adopted veth keeps the address it has).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from garrison.policies.labels import Labels, endpoint_labels
from garrison.statefile import StateFileError, write_atomically

# The host's side of every endpoint link (garrison.redirect.endpoint.DEFAULT_GATEWAY).
GATEWAY = ipaddress.IPv4Address("198.19.255.254")

# a container name is a valid endpoint name (podman's names have no length limit; 253 is a
# Kubernetes pod name's); interface names derive from a hash of it
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
OWNS_ALL = ("netns", "veth", "clsact")


class EndpointError(ValueError):
    """A request about endpoints that cannot be carried out; the message says why."""


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    """`labels` are the endpoint's own labels (`k=v` strings, no namespace label)."""

    id: int
    name: str
    namespace: str
    labels: tuple[str, ...]
    ipv4: str
    identity: int = 0
    host_ifname: str = ""
    created: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)
    netns_path: str = ""
    ifname: str = ""
    owned: tuple[str, ...] = OWNS_ALL
    container_id: str = ""
    # port names the workload declares (`http=8080/TCP`): named ports in policies resolve
    # against them
    ports: tuple[str, ...] = ()
    # the labels of its namespace (`k=v`) when its identity was allocated
    namespace_labels: tuple[str, ...] = ()
    # `garrison endpoint config NAME audit=true` (Cilium's PolicyAuditMode): its policy
    # verdicts are computed and recorded, what they would drop passes as AUDIT
    audit: bool = False
    # `garrison endpoint config NAME deny-response=drop|icmp|tcp-reset`: what a connection
    # its L3/L4 policy denies gets back (garrison.bpf.abi.DENY_RESPONSES)
    deny_response: str = "drop"

    @property
    def adopted(self) -> bool:
        return bool(self.netns_path)

    @property
    def full_labels(self) -> Labels:
        """The labels identity is derived from: its own, the namespace label and the labels
        of its namespace (`io.cilium.k8s.namespace.labels.<k>`)."""
        ns_labels = dict(kv.split("=", 1) for kv in self.namespace_labels)
        return endpoint_labels(Labels.parse(list(self.labels)), self.namespace, ns_labels)

    @property
    def host_veth(self) -> str:
        return self.host_ifname or host_veth_name(self.name)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def host_veth_name(name: str) -> str:
    """`gar-<name>`; interface names are at most 15 bytes."""
    return f"gar{name}"[:15]


def validate_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise EndpointError(
            f"endpoint name {name!r}: use 1-253 letters, digits, '_', '.' or '-', starting "
            "with a letter or digit (it names a network namespace)"
        )


class EndpointRegistry:
    def __init__(self, path: Path, pool: ipaddress.IPv4Network) -> None:
        self.path = path
        self.pool = pool
        self._endpoints: dict[str, EndpointRecord] = {}
        self._next_id = 1
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            for item in data.get("endpoints", []):
                item["labels"] = tuple(item.get("labels", ()))
                if "owned" in item:
                    item["owned"] = tuple(item["owned"])
                item["ports"] = tuple(item.get("ports", ()))
                item["namespace_labels"] = tuple(item.get("namespace_labels", ()))
                rec = EndpointRecord(**item)
                if not isinstance(rec.name, str) or not isinstance(rec.ipv4, str):
                    raise ValueError(f"endpoint {rec.name!r}: name and ipv4 must be strings")
                addr = ipaddress.IPv4Address(rec.ipv4)
                if "netns" in rec.owned and (addr not in self.pool or addr == GATEWAY):
                    # garrison would route it to a namespace it makes: never off the pool
                    raise ValueError(f"endpoint {rec.name!r}: ipv4 {rec.ipv4} is not in the "
                                     f"endpoint pool {self.pool}")
                self._endpoints[rec.name] = rec
            self._next_id = int(data.get("next_id", len(self._endpoints) + 1))
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
            raise StateFileError(
                f"{self.path}: not an endpoint registry ({exc}); repair or restore it (without"
                " it the agent forgets its endpoints, whose namespaces and programs stay)"
            ) from exc

    def _save(self) -> None:
        payload = {
            "next_id": self._next_id,
            "endpoints": [e.to_dict() for e in self._endpoints.values()],
        }
        write_atomically(self.path, json.dumps(payload, indent=1, sort_keys=True))

    def __iter__(self) -> Iterator[EndpointRecord]:
        return iter(sorted(self._endpoints.values(), key=lambda e: e.id))

    def __len__(self) -> int:
        return len(self._endpoints)

    def get(self, name_or_id: str) -> EndpointRecord:
        rec = self._endpoints.get(name_or_id)
        if rec is None and name_or_id.isdigit():
            rec = next((e for e in self._endpoints.values() if e.id == int(name_or_id)), None)
        if rec is None:
            known = ", ".join(sorted(self._endpoints)) or "none"
            raise EndpointError(f"no endpoint {name_or_id!r} (known: {known})")
        return rec

    def by_ip(self, ip: str) -> EndpointRecord | None:
        return next((e for e in self._endpoints.values() if e.ipv4 == ip), None)

    def by_container(self, container_id: str) -> EndpointRecord | None:
        if not container_id:
            return None
        return next((e for e in self._endpoints.values() if e.container_id == container_id), None)

    def claim_ip(self, ip: str) -> str:
        """An address the workload already has (an adopted veth's): only checked for clashes."""
        if ip == str(GATEWAY):
            raise EndpointError(f"{ip}: the host's gateway address on every link")
        other = self.by_ip(ip)
        if other is not None:
            raise EndpointError(f"{ip}: already the address of endpoint {other.name!r}")
        return ip

    def allocate_ip(self, wanted: str | None = None) -> str:
        used = {e.ipv4 for e in self._endpoints.values()}
        if wanted is not None:
            try:
                addr = ipaddress.ip_address(wanted)
            except ValueError as exc:
                raise EndpointError(f"--ip {wanted!r}: {exc}") from exc
            if addr not in self.pool:
                raise EndpointError(
                    f"--ip {wanted}: endpoint addresses must come from {self.pool} "
                    "(test hosts never route off this machine)"
                )
            if wanted in used:
                raise EndpointError(f"--ip {wanted}: already used by another endpoint")
            if addr == GATEWAY:
                raise EndpointError(f"--ip {wanted}: the host's gateway address on every link")
            return wanted
        # .0 is the network and .1 is kept; the gateway (the host's side of every endpoint
        # link) is never handed out
        for offset in range(2, self.pool.num_addresses - 1):
            candidate = str(self.pool.network_address + offset)
            if candidate not in used and candidate != str(GATEWAY):
                return candidate
        raise EndpointError(f"no free address left in {self.pool}")

    def add(self, record: EndpointRecord, persist: bool = True) -> EndpointRecord:
        validate_name(record.name)
        if record.name in self._endpoints:
            raise EndpointError(f"endpoint {record.name!r} already exists")
        rec = EndpointRecord(**{**record.to_dict(), "id": self._next_id})  # type: ignore[arg-type]
        self._next_id += 1
        self._endpoints[rec.name] = rec
        if persist:
            self._save()
        return rec

    def update(self, record: EndpointRecord, persist: bool = True) -> None:
        """`persist=False`: in memory only, a later update writes it (each write is an fsync,
        ~6 ms; an endpoint add makes one at its start and one at its end)."""
        self._endpoints[record.name] = record
        if persist:
            self._save()

    def remove(self, name: str) -> EndpointRecord:
        rec = self.get(name)
        del self._endpoints[rec.name]
        self._save()
        return rec
