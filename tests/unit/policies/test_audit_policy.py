"""Audit per policy (`metadata.annotations: {garrison.io/audit: "true"}`): what that policy
would deny is let through and recorded AUDIT naming the rule that would have denied it; an
allow it adds allows nothing. The loader, `policy trace`, the standalone proxy's view and the
matchers (HTTP, gRPC, Kafka) agree.
"""

from __future__ import annotations

import textwrap

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.l7rules import (
    GRPCRule,
    HTTPRule,
    KafkaRole,
    KafkaRule,
    L7Protocol,
    L7RuleSet,
)
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.match_grpc import GRPCMatcher
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.match_kafka import KafkaMatcher
from garrison.policies.model import Policy
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.policies.trace import HTTPRequestSpec, TraceEndpoint, trace
from garrison.proxy.policyview import PeerMapping, StandalonePolicy

DEATHSTAR = endpoint_labels(Labels.parse("org=empire,class=deathstar"))
TIEFIGHTER = endpoint_labels(Labels.parse("org=empire,class=tiefighter"))
XWING = endpoint_labels(Labels.parse("org=alliance,class=xwing"))
PEERS = [PeerMapping.parse("127.0.0.2/32=org=empire,class=tiefighter"),
         PeerMapping.parse("127.0.0.3/32=org=alliance,class=xwing")]

ENFORCED = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: in-force}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
AUDITED = """
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata:
  name: candidate
  annotations: {garrison.io/audit: "true"}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: alliance}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: PUT, path: /v1/exhaust-port}]}
"""


def load(*texts: str) -> tuple[Policy, ...]:
    return load_text("---\n".join(textwrap.dedent(t) for t in texts), "test.yaml").policies


def test_the_annotation_marks_the_policy_audited_in_every_kind() -> None:
    in_force, candidate = load(ENFORCED, AUDITED)
    assert (in_force.audit, candidate.audit) == (False, True)
    knp = load("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: k, annotations: {garrison.io/audit: "true", other/thing: "x"}}
    spec: {podSelector: {}}
    """)
    assert knp[0].audit


def test_the_annotation_takes_true_or_false() -> None:
    with pytest.raises(PolicyValidationError) as info:
        load(AUDITED.replace('"true"', "yes"))
    assert str(info.value) == (
        "test.yaml:6: metadata.annotations.garrison.io/audit: garrison.io/audit must be "
        "\"true\" or \"false\", not 'yes'"
    )
    assert not load(AUDITED.replace('"true"', '"false"'))[0].audit


def traced(pols: tuple[Policy, ...], src: Labels, method: str, path: str):  # type: ignore[no-untyped-def]
    return trace(pols, TraceEndpoint(src, "default"), TraceEndpoint(DEATHSTAR, "default"), 80,
                 request=HTTPRequestSpec(method, path))


def test_trace_an_audited_l7_deny_is_allowed_and_named() -> None:
    pols = load(ENFORCED, AUDITED)
    result = traced(pols, TIEFIGHTER, "PUT", "/v1/exhaust-port")
    assert result.allowed and result.audited_at == "L7"
    assert [str(r) for r in result.audited_by] == [
        "CiliumNetworkPolicy default/candidate ingressDeny[0]"
    ]
    other = traced(pols, TIEFIGHTER, "PUT", "/v1/other")
    assert other.allowed and other.audited_by == () and other.audited_at is None


def test_trace_an_allow_added_by_an_audited_policy_allows_nothing() -> None:
    result = traced(load(ENFORCED, AUDITED), XWING, "GET", "/")
    assert not result.allowed and result.denied_at == "L3_L4"
    assert result.audited_at is None


def test_trace_an_audited_default_deny_is_audited_at_l3_l4() -> None:
    alone = load(AUDITED)  # nothing in force: the audited policy would switch to default-deny
    result = traced(alone, TIEFIGHTER, "GET", "/")
    assert result.allowed and result.audited_at == "L3_L4"


def test_proxy_view_admits_what_the_audited_policy_would_drop() -> None:
    view = StandalonePolicy(load(AUDITED), DEATHSTAR, 80, L7Protocol.HTTP, PEERS)
    admission = view.admit("127.0.0.2")
    assert admission.allowed and not admission.lookup.allowed  # recorded AUDIT at L3/L4
    assert not admission.audit  # only this policy is audited, not the endpoint


def test_proxy_view_hands_the_proxy_an_audit_layer() -> None:
    view = StandalonePolicy(load(ENFORCED, AUDITED), DEATHSTAR, 80, L7Protocol.HTTP, PEERS)
    tie = view.admit("127.0.0.2")
    assert tie.allowed and tie.lookup.allowed
    matcher = HTTPMatcher(tie.ruleset)
    put = matcher.match("PUT", "/v1/exhaust-port", None, [])
    assert put.allowed and put.audited
    assert [str(r) for r in put.audit_denied_by] == [
        "CiliumNetworkPolicy default/candidate ingressDeny[0]"
    ]
    get = matcher.match("GET", "/", None, [])
    assert get.allowed and not get.audited
    xwing = view.admit("127.0.0.3")
    assert not xwing.allowed  # the audited allow allows nothing


ALLOW = RuleRef(PolicyKind.CNP, "default", "in-force", "ingress")
AUDIT = RuleRef(PolicyKind.CNP, "default", "candidate", "ingress")


def test_grpc_and_kafka_matchers_audit_what_the_layer_denies() -> None:
    grpc = GRPCMatcher(L7RuleSet(
        L7Protocol.GRPC, (), True, ALLOW,
        audit_layer=L7RuleSet(L7Protocol.GRPC, ((GRPCRule("doors.DoorManager", "GetName"),
                                                  AUDIT),)),
    ))
    denied = grpc.match("doors.DoorManager", "SetAccessCode")
    assert (denied.allowed, denied.audited, denied.audit_denied_by) == (True, True, (AUDIT,))
    assert not grpc.match("doors.DoorManager", "GetName").audited
    kafka = KafkaMatcher(L7RuleSet(
        L7Protocol.KAFKA, (), True, ALLOW,
        audit_layer=L7RuleSet(L7Protocol.KAFKA, ((KafkaRule(role=KafkaRole.PRODUCE,
                                                            topic="empire-announce"), AUDIT),)),
    ))
    plans = kafka.match(0, 9, "c", ["deathstar-plans"])
    assert (plans.allowed, plans.audited, plans.audit_denied_by) == (True, True, (AUDIT,))
    assert not kafka.match(0, 9, "c", ["empire-announce"]).audited
    # an L7 allow that denies is not turned into an audit by the layer
    http = HTTPMatcher(L7RuleSet(
        L7Protocol.HTTP, ((HTTPRule(method="GET"), ALLOW),),
        audit_layer=L7RuleSet(L7Protocol.HTTP, ((HTTPRule(method="GET", path="/a"), AUDIT),)),
    ))
    assert not http.match("PUT", "/", None, []).allowed
    assert http.match("GET", "/b", None, []).audited
