"""What the agent needs from the kernel side, as one interface.

`Datapath` is implemented over `garrison.bpf` (programs, maps, events) and
`garrison.redirect` (namespaces, veth, tc attach, proxy steering) by `KernelDatapath`
(`garrison.agent.kernel`). Keeping the agent on this interface lets the composition logic be
read — and its bookkeeping tested — apart from the kernel plumbing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from garrison.agent.endpoints import EndpointRecord
from garrison.policies.mapstate import MapState, MapStateEntry, MapStateKey
from garrison.policies.model import IPNetwork


@dataclass(frozen=True, slots=True)
class EndpointFlags:
    ingress_enforced: bool
    egress_enforced: bool
    audit: bool


class Datapath(Protocol):
    def start(self) -> None:
        """Load (or reuse pinned) programs and maps; install the proxy steering rule."""

    def close(self) -> None:
        """Release handles; pinned maps and attached programs stay (enforcement survives)."""

    def create_endpoint(self, endpoint: EndpointRecord) -> EndpointRecord:
        """Namespace, veth pair, address and routes; returns the record with its host ifname."""

    def delete_endpoint(self, endpoint: EndpointRecord) -> None:
        """Detach programs and remove everything `create_endpoint` made."""

    def attach(self, endpoint: EndpointRecord) -> None:
        """Attach the tc programs to the endpoint's host veth (replace: no gap)."""

    def set_endpoint(self, endpoint: EndpointRecord, identity: int, flags: EndpointFlags) -> None:
        ...

    def set_ipcache(
        self, prefix: IPNetwork, identity: int, endpoint: EndpointRecord | None
    ) -> None: ...

    def delete_ipcache(self, prefix: IPNetwork) -> None: ...

    def sync_policy(
        self,
        identity: int,
        state: MapState,
        proxy_ports: Mapping[str, int],
        changed: Iterable[MapStateKey] | None = None,
    ) -> int:
        """Make the kernel's policy entries of `identity` equal `state`; returns the number
        of map writes and deletes. `changed` narrows the work to those keys when given."""

    def delete_policy(self, identity: int) -> int: ...

    def dump_policy(self, identity: int) -> Sequence[Mapping[str, object]]: ...

    def dump_ipcache(self) -> Sequence[Mapping[str, object]]: ...

    def dump_ct(self) -> Sequence[Mapping[str, object]]: ...

    def gc_ct(self) -> int: ...

    def read_events(self, timeout_ms: int) -> Sequence[Mapping[str, object]]: ...

    def status(self) -> Mapping[str, object]: ...


def desired_entries(state: MapState) -> dict[MapStateKey, MapStateEntry]:
    return dict(state.entries)
