"""NetworkPolicy fields read as the Kubernetes API server defaults and validates them.

A NetworkPolicy reaches Cilium only after the API server has defaulted it
(`SetDefaults_NetworkPolicy`: an empty or absent `policyTypes` becomes `[Ingress]`, plus
`Egress` when `egress` has at least one rule) and validated it (a numeric `port` is 1-65535).
garrison reads the file itself, so it must apply the same defaults and refuse what the API
server refuses: otherwise a file means something else here than in a cluster."""

from __future__ import annotations

import textwrap

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.model import Protocol
from garrison.policies.trace import TraceEndpoint, trace


def ep(labels: str, ns: str = "prod") -> TraceEndpoint:
    return TraceEndpoint(endpoint_labels(Labels.parse(labels), ns), ns)


def knp(spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    return (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        "metadata: {name: np, namespace: prod}\nspec:\n" + body
    )


WEB, DB = ep("app=web"), ep("app=db")


@pytest.mark.parametrize(
    "spec",
    [
        "podSelector: {matchLabels: {app: db}}\npolicyTypes: []",
        "podSelector: {matchLabels: {app: db}}\npolicyTypes: []\negress: [{}]",
    ],
)
def test_empty_policy_types_isolates_ingress_as_absent_ones_do(spec: str) -> None:
    """`policyTypes: []` is defaulted like an absent list: the policy isolates its pods for
    ingress. (It used to enforce no direction at all: every connection passed.)"""
    policies = load_text(knp(spec), "np.yaml").policies
    result = trace(policies, WEB, DB, 5432)
    assert not result.allowed
    assert result.denied_at == "L3_L4"
    assert {r.name for r in result.denied_by} == {"np"}


def test_empty_policy_types_with_egress_rules_isolates_egress_too() -> None:
    policies = load_text(
        knp("podSelector: {matchLabels: {app: web}}\npolicyTypes: []\n"
            "egress: [{ports: [{port: 53, protocol: UDP}]}]"),
        "np.yaml",
    ).policies
    assert not trace(policies, WEB, DB, 5432).allowed
    assert trace(policies, WEB, DB, 53, protocol=Protocol.UDP).allowed


def test_empty_egress_list_without_policy_types_leaves_egress_open() -> None:
    """Without `policyTypes`, only an `egress` list with a rule makes the policy an Egress
    one; `egress: []` does not (Kubernetes: `len(spec.Egress) != 0`). It used to deny every
    connection of the selected pods."""
    policies = load_text(
        knp("podSelector: {matchLabels: {app: web}}\ningress: [{}]\negress: []"), "np.yaml"
    ).policies
    result = trace(policies, WEB, DB, 5432)
    assert result.allowed
    assert not result.steps[0].enforced  # the source's egress


@pytest.mark.parametrize("port", ["0", '"0"'])
def test_port_zero_is_refused(port: str) -> None:
    """The API server refuses `port: 0` ("must be between 1 and 65535"); garrison read it as
    "every port", wider than any policy a cluster would run."""
    with pytest.raises(PolicyValidationError) as info:
        load_text(
            knp(f"podSelector: {{}}\ningress: [{{ports: [{{port: {port}, protocol: TCP}}]}}]"),
            "np.yaml",
        )
    assert [str(e) for e in info.value.issues] == [
        "np.yaml:6: spec.ingress[0].ports[0].port: port 0 is not valid in a NetworkPolicy "
        "(1-65535; leave port out for every port)"
    ]
