"""Small builders for resolution tests: YAML in, a resolver with named endpoints out."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.mapstate import (
    PROTO_ICMP,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    LookupResult,
    lookup,
)
from garrison.policies.model import Direction, Policy
from garrison.policies.resolve import PolicyResolver, ResolverConfig, build_resolver

PROTOS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP, "ICMP": PROTO_ICMP}


def policies(yaml_text: str) -> tuple[Policy, ...]:
    return load_text(textwrap.dedent(yaml_text), "test.yaml").policies


@dataclass
class World:
    """Endpoints by name, with identities 256, 257, ... in the order given."""

    resolver: PolicyResolver
    ids: dict[str, int]

    def check(
        self, src: str, dst: str, port: int, proto: str = "TCP"
    ) -> tuple[LookupResult, LookupResult]:
        """(egress of src, ingress of dst) lookups, as the datapath would do them."""
        s, d = self.ids[src], self.ids[dst]
        p = PROTOS[proto]
        egress = lookup(self.resolver.map_state(s), Direction.EGRESS, d, p, port) if (
            s in self.resolver.endpoint_identities()
        ) else None
        ingress = lookup(self.resolver.map_state(d), Direction.INGRESS, s, p, port) if (
            d in self.resolver.endpoint_identities()
        ) else None
        assert ingress is not None
        return egress, ingress  # type: ignore[return-value]

    def allowed(self, src: str, dst: str, port: int, proto: str = "TCP") -> bool:
        egress, ingress = self.check(src, dst, port, proto)
        return (egress is None or egress.allowed) and ingress.allowed

    def ingress(self, src: str, dst: str, port: int, proto: str = "TCP") -> LookupResult:
        return self.check(src, dst, port, proto)[1]


RESERVED_BY_NAME = {"world": 2, "host": 1}


def world(
    yaml_text: str | Sequence[Policy],
    endpoints: dict[str, str],
    config: ResolverConfig | None = None,
) -> World:
    """`endpoints`: name -> "k=v,..." (namespace with `ns=NAME`; `reserved:world` allowed)."""
    pols = policies(yaml_text) if isinstance(yaml_text, str) else tuple(yaml_text)
    ids: dict[str, int] = {}
    eps: list[tuple[int, Labels]] = []
    next_id = 256
    for name, text in endpoints.items():
        if text.startswith("reserved:"):
            ids[name] = RESERVED_BY_NAME[text.removeprefix("reserved:")]
            continue
        parts = [p for p in text.split(",") if p]
        ns = next((p.split("=", 1)[1] for p in parts if p.startswith("ns=")), "default")
        labels = endpoint_labels(Labels.parse([p for p in parts if not p.startswith("ns=")]), ns)
        existing = next((i for i, lab in eps if lab == labels), None)
        if existing is None:
            existing = next_id
            next_id += 1
            eps.append((existing, labels))
        ids[name] = existing
    return World(build_resolver(pols, eps, config), ids)
