"""Match a gRPC call (service, method) against the `rules.grpc` of one L7RuleSet.

Pure and parser-free: the engine passes the service and method it read from `:path`
(`garrison.parsers.grpc.GrpcCall`). Semantics (docs POLICY-SEMANTICS "gRPC rules"):

- `{service, method}` matches that exact method, case-sensitively (gRPC paths are);
- `{service}` (method absent) matches every method of that service;
- `allow_all` (another rule allows the peer on this port at L4 only) allows every call;
- a call is allowed when any rule matches; the first matching rule in policy order is named;
- `deny_rules` (garrison extension): a call matching any deny rule is denied whatever the allow
  rules and `allow_all` say, naming the first matching deny rule (`denied_by`).
"""

from __future__ import annotations

from garrison.policies.l7rules import GRPCRule, L7RuleSet, L7Verdict, audit_refs, audited
from garrison.policies.refs import RuleRef


class GRPCMatcher:
    """Compiled once per rule set, then `match()` per call: two dict lookups."""

    __slots__ = (
        "_allow_all", "_allow_all_ref", "_audit", "_audit_refs", "_deny", "_methods", "_services"
    )

    def __init__(self, ruleset: L7RuleSet) -> None:
        self._audit: GRPCMatcher | None = None
        self._audit_refs: tuple[RuleRef, ...] = ()
        if ruleset.audit_layer is not None:
            self._audit = GRPCMatcher(ruleset.audit_layer)
            self._audit_refs = audit_refs(ruleset.audit_layer)
        self._deny: GRPCMatcher | None = None
        if ruleset.deny_rules:
            self._deny = GRPCMatcher(L7RuleSet(ruleset.protocol, ruleset.deny_rules))
        self._allow_all = ruleset.allow_all
        self._allow_all_ref = ruleset.allow_all_ref
        # (position in the rule set, ref): the earliest matching rule is the one named.
        self._services: dict[str, tuple[int, RuleRef | None]] = {}
        self._methods: dict[tuple[str, str], tuple[int, RuleRef | None]] = {}
        for index, (rule, ref) in enumerate(ruleset.rules):
            if not isinstance(rule, GRPCRule):
                raise TypeError(f"GRPCMatcher given a {type(rule).__name__}, not a GRPCRule")
            if rule.method is None:
                self._services.setdefault(rule.service, (index, ref))
            else:
                self._methods.setdefault((rule.service, rule.method), (index, ref))

    def match(self, service: str, method: str) -> L7Verdict:
        verdict = self._match(service, method)
        if self._audit is not None and verdict.allowed:
            would = self._audit.match(service, method)
            if not would.allowed:
                return audited(verdict, would, self._audit_refs)
        return verdict

    def _match(self, service: str, method: str) -> L7Verdict:
        if self._deny is not None:
            denied = self._deny.match(service, method)
            if denied.allowed:
                return L7Verdict(
                    allowed=False, reason=f"denied by {denied.rule}", denied_by=denied.rule
                )
        if self._allow_all:
            return L7Verdict(allowed=True, rule=self._allow_all_ref, reason="allow-all at L4")
        exact = self._methods.get((service, method))
        whole = self._services.get(service)
        if exact is not None or whole is not None:
            candidates = [c for c in (exact, whole) if c is not None]
            return L7Verdict(allowed=True, rule=min(candidates, key=lambda c: c[0])[1])
        return L7Verdict(allowed=False, reason=f"no rule allows {service}/{method}")
