"""`policy trace`: would this source reach this destination, and why — offline and pure.

The evaluation is the one the datapath and the proxy perform: the source's egress policy,
then the destination's ingress policy, each with the lookup precedence of `mapstate.lookup`;
where the deciding entry redirects to the proxy and the caller describes the request, the L7
rules are evaluated with the same matchers the proxy uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from garrison.policies.l7rules import (
    KAFKA_API_NAMES,
    L7Protocol,
    L7RuleSet,
    L7Verdict,
)
from garrison.policies.labels import NAMESPACE_KEY, SOURCE_RESERVED, Label, Labels
from garrison.policies.mapstate import (
    DropReason,
    LookupResult,
    lookup,
)
from garrison.policies.model import (
    IP_PROTO,
    Direction,
    NamedPort,
    Policy,
    Protocol,
    Rule,
    named_port_map,
)
from garrison.policies.refs import RuleRef
from garrison.policies.resolve import ResolverConfig, build_resolver, prefix_identities
from garrison.policies.selectorcache import RESERVED_IDENTITIES, WORLD_IDENTITY, is_endpoint

SOURCE_IDENTITY = 256
DESTINATION_IDENTITY = 257
HOST_IDENTITY = RESERVED_IDENTITIES["host"]
INIT_IDENTITY = RESERVED_IDENTITIES["init"]  # a local endpoint whose labels are not known yet
PROXY_UNREACHABLE = "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL"


@dataclass(frozen=True, slots=True)
class HTTPRequestSpec:
    """`path` as the proxy's rules see it (already normalized by the caller);
    `rejected`: the proxy's answer ("400 Bad Request: reason", "501 Not Implemented: ...")
    when its request parser refuses the request before any rule is consulted."""

    method: str = "GET"
    path: str = "/"
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    rejected: str | None = None


@dataclass(frozen=True, slots=True)
class GRPCRequestSpec:
    service: str
    method: str


@dataclass(frozen=True, slots=True)
class KafkaRequestSpec:
    api_key: int
    api_version: int | None = None
    client_id: str | None = None
    topics: tuple[str, ...] = ()


L7RequestSpec = HTTPRequestSpec | GRPCRequestSpec | KafkaRequestSpec


@dataclass(frozen=True, slots=True)
class TraceEndpoint:
    """An endpoint by its labels (namespace label included by the caller), or an address
    outside the endpoints (`address`; no labels): the identity the agent's ipcache gives it,
    the CIDR identity of the longest prefix the policies name that holds it, else world."""

    labels: Labels
    namespace: str | None = None
    name: str = ""
    # the port names the endpoint declares (named ports in policies resolve against them)
    ports: tuple[NamedPort, ...] = ()
    address: IPv4Address | IPv6Address | None = None

    def describe(self) -> str:
        if self.address is not None:
            names = ",".join(sorted(f"{lab.source}:{lab.key}" for lab in self.labels.items))
            return f"{self.address} ({names})" if names else str(self.address)
        own = Labels.of(lab for lab in self.labels.items if lab.key != NAMESPACE_KEY)
        who = self.name or own.short()
        return f"{self.namespace}/{who}" if self.namespace else who


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One side's decision: egress of the source or ingress of the destination."""

    direction: Direction
    endpoint: str
    identity: int
    remote_identity: int
    enforced: bool
    enforced_by: tuple[RuleRef, ...]
    lookup: LookupResult | None
    l7: L7Verdict | None = None
    l7_protocol: L7Protocol | None = None
    l7_evaluated: bool = False
    note: str = ""
    # the destination's ingress redirects a connection from the host: the datapath judges
    # it at to_container, where it cannot reach the proxy, and drops it
    # (PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL, bpf_lxc.c)
    proxy_unreachable: bool = False

    @property
    def allowed(self) -> bool:
        if self.proxy_unreachable:
            return False
        if self.lookup is not None and not self.lookup.allowed:
            return False
        return not (self.l7 is not None and not self.l7.allowed)


@dataclass(frozen=True, slots=True)
class TraceResult:
    source: TraceEndpoint
    destination: TraceEndpoint
    source_identity: int
    destination_identity: int
    protocol: Protocol
    port: int
    steps: tuple[TraceStep, ...]
    request: L7RequestSpec | None = None
    notes: tuple[str, ...] = field(default=())
    audit: bool = False
    # audited policies (garrison.io/audit) would deny what the others allow: allowed, and
    # recorded AUDIT naming these rules; `audited_at`: L3_L4 | L7
    audited_by: tuple[RuleRef, ...] = ()
    audited_at: str | None = None

    @property
    def allowed(self) -> bool:
        return all(s.allowed for s in self.steps)

    @property
    def denied_at(self) -> str | None:
        for step in self.steps:
            if step.proxy_unreachable or (step.lookup is not None and not step.lookup.allowed):
                return "L3_L4"
            if step.l7 is not None and not step.l7.allowed:
                return "L7"
        return None

    @property
    def redirected(self) -> bool:
        return any(s.lookup is not None and s.lookup.redirect is not None for s in self.steps)

    @property
    def l7_state(self) -> str:
        if not self.redirected:
            return "not applicable"
        if any(s.l7_protocol is not None and not s.l7_evaluated for s in self.steps):
            return "not evaluated"
        return "evaluated"

    @property
    def allowed_by(self) -> list[RuleRef]:
        out: list[RuleRef] = []
        for s in self.steps:
            if s.lookup is not None and s.lookup.allowed:
                out.extend(s.lookup.refs)
            if s.l7 is not None and s.l7.allowed and s.l7.rule is not None:
                out.append(s.l7.rule)
        return _unique(out)

    @property
    def denied_by(self) -> list[RuleRef]:
        out: list[RuleRef] = []
        for s in self.steps:
            if s.lookup is None or s.lookup.allowed:
                continue
            if s.lookup.drop_reason is DropReason.POLICY_DENY:
                out.extend(s.lookup.refs)
            else:  # default-deny: the rules that switched the direction to default-deny
                out.extend(s.enforced_by)
        for s in self.steps:
            if s.l7 is not None and not s.l7.allowed and s.l7.denied_by is not None:
                out.append(s.l7.denied_by)  # an L7 deny rule (garrison extension)
            elif s.l7 is not None and not s.l7.allowed and s.lookup is not None:
                out.extend(s.lookup.refs)
        return _unique(out)

    def to_dict(self) -> dict[str, object]:
        return {
            "verdict": "allowed" if self.allowed else "denied",
            "audit": self.audit,
            "audited_by": [r.to_dict() for r in self.audited_by],
            "audited_at": self.audited_at,
            "denied_at": self.denied_at,
            "allowed_by": [r.to_dict() for r in self.allowed_by],
            "denied_by": [r.to_dict() for r in self.denied_by],
            "redirected": self.redirected,
            "l7": self.l7_state,
            "source": {
                "labels": [str(lab) for lab in self.source.labels],
                "namespace": self.source.namespace,
                "identity": self.source_identity,
                **({"ip": str(self.source.address)} if self.source.address else {}),
            },
            "destination": {
                "labels": [str(lab) for lab in self.destination.labels],
                "namespace": self.destination.namespace,
                "identity": self.destination_identity,
                **({"ip": str(self.destination.address)} if self.destination.address else {}),
                "port_names": [str(p) for p in self.destination.ports],
                "port": self.port,
                "protocol": self.protocol.value,
            },
            "steps": [_step_dict(s) for s in self.steps],
            "notes": list(self.notes),
        }


def _unique(refs: list[RuleRef]) -> list[RuleRef]:
    return list(dict.fromkeys(refs))


def _step_dict(step: TraceStep) -> dict[str, object]:
    out: dict[str, object] = {
        "direction": step.direction.value,
        "endpoint": step.endpoint,
        "enforced": step.enforced,
        "enforced_by": [r.to_dict() for r in step.enforced_by],
        "allowed": step.allowed,
    }
    if step.lookup is not None:
        out["l3_l4"] = {
            "allowed": step.lookup.allowed,
            "match_type": step.lookup.match_type.value,
            "drop_reason": step.lookup.drop_reason.value if step.lookup.drop_reason else None,
            "entry": str(step.lookup.key) if step.lookup.key else None,
            "rules": [r.to_dict() for r in step.lookup.refs],
            "redirect": step.lookup.redirect.value if step.lookup.redirect else None,
            # which tier decided: Admin | NetworkPolicy | Baseline | default allow / deny
            "tier": step.lookup.decided_by,
            "action": step.lookup.entry.action.value
            if step.lookup.entry is not None and step.lookup.entry.action is not None
            else None,
            "passed_by": [r.to_dict() for r in step.lookup.passed],
        }
    if step.l7_protocol is not None:
        l7: dict[str, object] = {"protocol": step.l7_protocol.value}
        if step.l7 is None:
            l7["evaluated"] = False
        else:
            l7.update(
                evaluated=True,
                allowed=step.l7.allowed,
                rule=step.l7.rule.to_dict() if step.l7.rule else None,
                reason=step.l7.reason,
            )
            if step.l7.denied_by is not None:
                l7["denied_by"] = step.l7.denied_by.to_dict()
        out["l7"] = l7
    if step.proxy_unreachable:
        out["drop_reason"] = PROXY_UNREACHABLE
    if step.note:
        out["note"] = step.note
    return out


def _identity_for(labels: Labels, default: int) -> int:
    """Reserved labels alone (`reserved:world`) name a reserved identity."""
    reserved = [lab for lab in labels.items if lab.source == SOURCE_RESERVED]
    if reserved and len(reserved) == len(labels.items) and len(reserved) == 1:
        return RESERVED_IDENTITIES.get(reserved[0].key, default)
    return default


def address_identity(
    policies: Sequence[Policy], address: IPv4Address | IPv6Address
) -> tuple[int, Labels]:
    """The identity (and its labels) the agent's ipcache gives an address outside the
    endpoints: the longest prefix the policies name that holds it, else world."""
    holding = [p for p in prefix_identities(policies) if p.version == address.version
               and address in p]
    if not holding:
        return WORLD_IDENTITY, Labels.of([Label("world", "", SOURCE_RESERVED)])
    prefix = max(holding, key=lambda p: p.prefixlen)
    labels = Labels.of([Label(str(prefix), "", "cidr"), Label("world", "", SOURCE_RESERVED)])
    return prefix_identities(policies)[prefix], labels


def trace(
    policies: Sequence[Policy],
    source: TraceEndpoint,
    destination: TraceEndpoint,
    port: int,
    protocol: Protocol = Protocol.TCP,
    request: L7RequestSpec | None = None,
    config: ResolverConfig | None = None,
) -> TraceResult:
    """The verdict of the policies for one connection (and request). Audited policies
    (garrison.io/audit) enforce nothing: the others decide; where they allow what all the
    policies together would deny, the result is allowed with `audited_by`/`audited_at`."""
    enforced = [p for p in policies if not p.audit]
    result = _trace(enforced, source, destination, port, protocol, request, config)
    if len(enforced) == len(policies) or not result.allowed:
        return result
    would = _trace(policies, source, destination, port, protocol, request, config)
    if would.allowed:
        return result
    at = would.denied_at or "L3_L4"
    by = tuple(would.denied_by)
    names = ", ".join(str(r) for r in by) or "default deny"
    note = (f"audited policies (garrison.io/audit) would deny it at {at.replace('_', '/')} "
            f"({names}): allowed, recorded AUDIT")
    return replace(result, audited_by=by, audited_at=at, notes=(*result.notes, note))


def _trace(
    policies: Sequence[Policy],
    source: TraceEndpoint,
    destination: TraceEndpoint,
    port: int,
    protocol: Protocol = Protocol.TCP,
    request: L7RequestSpec | None = None,
    config: ResolverConfig | None = None,
) -> TraceResult:
    if source.address is not None:
        src_id, labels = address_identity(policies, source.address)
        source = replace(source, labels=labels)
    else:
        src_id = _identity_for(source.labels, SOURCE_IDENTITY)
    if destination.address is not None:
        dst_id, labels = address_identity(policies, destination.address)
        destination = replace(destination, labels=labels)
    else:
        dst_id = _identity_for(destination.labels, DESTINATION_IDENTITY)
    if src_id == SOURCE_IDENTITY and dst_id == DESTINATION_IDENTITY and (
        source.labels == destination.labels
    ):
        dst_id = src_id  # same labels, same identity
    endpoints = [(i, ep.labels) for i, ep in ((src_id, source), (dst_id, destination))
                 if ep.address is None]
    resolver = build_resolver(policies, endpoints, config)
    declared: dict[int, list[NamedPort]] = {}
    for ident, ep in ((src_id, source), (dst_id, destination)):
        declared.setdefault(ident, []).extend(ep.ports)
    for ident, ports in declared.items():
        if ports:
            resolver.set_named_ports(ident, named_port_map(ports))
    proto_num = IP_PROTO[protocol]
    notes: list[str] = []
    steps = []
    for direction, endpoint, ident, remote in (
        (Direction.EGRESS, source, src_id, dst_id),
        (Direction.INGRESS, destination, dst_id, src_id),
    ):
        if ident not in resolver.endpoint_identities():
            steps.append(
                TraceStep(
                    direction,
                    endpoint.describe(),
                    ident,
                    remote,
                    False,
                    (),
                    None,
                    note="not a garrison endpoint: its policy is not enforced here",
                )
            )
            continue
        state = resolver.map_state(ident)
        enforced_by = tuple(
            ref
            for policy, rule in resolver.enforcing_rules(ident, direction)
            for ref in rule_refs(policy, rule, direction)
        )
        result = lookup(state, direction, remote, proto_num, port)
        step = TraceStep(
            direction,
            endpoint.describe(),
            ident,
            remote,
            state.enforced(direction),
            enforced_by,
            result,
        )
        if (direction is Direction.INGRESS and result.allowed and result.redirect is not None
                and not (is_endpoint(remote) or remote == INIT_IDENTITY)):
            if remote == HOST_IDENTITY:
                step = replace(step, proxy_unreachable=True)
            else:
                notes.append(
                    f"a connection from {source.describe()} reaches the proxy only where it "
                    "enters the node on a cluster node's underlay device (from_netdev); on a "
                    f"single-node agent the datapath drops it ({PROXY_UNREACHABLE})")
        if (result.allowed and result.redirect is not None and result.l7 is not None
                and not step.proxy_unreachable):
            step = _evaluate_l7(step, result.l7, request, notes)
        steps.append(step)
    audit = resolver.config.audit
    return TraceResult(
        source, destination, src_id, dst_id, protocol, port, tuple(steps), request,
        tuple(notes), audit,
    )


def rule_refs(policy: Policy, rule: Rule, direction: Direction) -> list[RuleRef]:
    """One ref per policy rule that enforces `direction` (its first section of it)."""
    sections = (rule.ingress, rule.ingress_deny) if direction is Direction.INGRESS else (
        rule.egress, rule.egress_deny
    )
    for group in sections:
        for section in group or ():
            if section.ref is not None:
                return [section.ref]
    name = "ingress" if direction is Direction.INGRESS else "egress"
    index = policy.rules.index(rule)
    return [
        RuleRef(policy.kind, policy.namespace, policy.name, name, index, 0, len(policy.rules) > 1)
    ]


def _evaluate_l7(
    step: TraceStep, ruleset: L7RuleSet, request: L7RequestSpec | None, notes: list[str]
) -> TraceStep:
    from dataclasses import replace

    protocol = ruleset.protocol
    if request is None:
        notes.append(
            f"port redirects to the {protocol.value} proxy ({step.direction.value} of "
            f"{step.endpoint}); give L7 flags (--http-*, --grpc-*, --kafka-*) to evaluate L7"
        )
        return replace(step, l7_protocol=protocol)
    verdict = match_l7(ruleset, request)
    if verdict is None:
        notes.append(
            f"the {protocol.value} proxy on this port does not see a "
            f"{type(request).__name__.removesuffix('RequestSpec')} request; L7 not evaluated"
        )
        return replace(step, l7_protocol=protocol)
    return replace(step, l7_protocol=protocol, l7=verdict, l7_evaluated=True)


def match_l7(
    ruleset: L7RuleSet,
    request: L7RequestSpec,
    matchers: dict[int, tuple[L7RuleSet, Any]] | None = None,
) -> L7Verdict | None:
    """Evaluate `request` with the proxy's own matchers; None if the port's parser would not
    see such a request (e.g. Kafka flags on an HTTP port). `matchers`: a cache of compiled
    matchers by rule set, for callers that match many requests against the same sets."""
    protocol = ruleset.protocol
    if matchers is not None:
        cached = matchers.get(id(ruleset))
        if cached is None or cached[0] is not ruleset:
            from garrison.policies.match_grpc import GRPCMatcher
            from garrison.policies.match_http import HTTPMatcher
            from garrison.policies.match_kafka import KafkaMatcher

            kinds: dict[L7Protocol, Any] = {
                L7Protocol.HTTP: HTTPMatcher, L7Protocol.GRPC: GRPCMatcher,
                L7Protocol.KAFKA: KafkaMatcher,
            }
            cached = matchers[id(ruleset)] = (ruleset, kinds[protocol](ruleset))
        return _match_with(cached[1], ruleset, request)
    from garrison.policies.match_grpc import GRPCMatcher
    from garrison.policies.match_http import HTTPMatcher
    from garrison.policies.match_kafka import KafkaMatcher

    kinds = {L7Protocol.HTTP: HTTPMatcher, L7Protocol.GRPC: GRPCMatcher,
             L7Protocol.KAFKA: KafkaMatcher}
    return _match_with(kinds[protocol](ruleset), ruleset, request)


def _match_with(matcher: Any, ruleset: L7RuleSet, request: L7RequestSpec) -> L7Verdict | None:
    protocol = ruleset.protocol
    if protocol is L7Protocol.HTTP:
        if isinstance(request, GRPCRequestSpec):
            # gRPC is HTTP/2 POST /pkg.Service/Method: HTTP rules apply to it.
            request = HTTPRequestSpec(
                "POST",
                f"/{request.service}/{request.method}",
                None,
                (("content-type", "application/grpc"),),
            )
        if not isinstance(request, HTTPRequestSpec):
            return None
        if request.rejected:
            return L7Verdict(False, None, f"answered {request.rejected}")
        verdict: L7Verdict = matcher.match(
            request.method, request.path, request.host, list(request.headers)
        )
        return verdict
    if protocol is L7Protocol.GRPC:
        if isinstance(request, HTTPRequestSpec):
            parts = request.path.split("?")[0].strip("/").split("/")
            if request.method != "POST" or len(parts) != 2:
                return L7Verdict(False, None, f"{request.method} {request.path} is not a gRPC call")
            request = GRPCRequestSpec(parts[0], parts[1])
        if not isinstance(request, GRPCRequestSpec):
            return None
        grpc_verdict: L7Verdict = matcher.match(request.service, request.method)
        return grpc_verdict
    if not isinstance(request, KafkaRequestSpec):
        return None
    version = request.api_version if request.api_version is not None else -1
    kafka_verdict: L7Verdict = matcher.match(
        request.api_key, version, request.client_id, list(request.topics)
    )
    return kafka_verdict


def describe_request(request: L7RequestSpec) -> str:
    if isinstance(request, HTTPRequestSpec):
        host = f" host {request.host}" if request.host else ""
        return f"HTTP {request.method} {request.path}{host}"
    if isinstance(request, GRPCRequestSpec):
        return f"gRPC {request.service}/{request.method}"
    name = KAFKA_API_NAMES.get(request.api_key, str(request.api_key))
    topics = f" topics {','.join(request.topics)}" if request.topics else ""
    version = f" v{request.api_version}" if request.api_version is not None else ""
    return f"Kafka {name}{version}{topics}"
