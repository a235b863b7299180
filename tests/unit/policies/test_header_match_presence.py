"""`headerMatches` without a value asks for the header's presence, as in Cilium.

Cilium's `HeaderMatch`: "If none of the optional fields is present, then the header value is
not matched, only presence of the header is enough" (and `value` is `omitempty`: written empty
it is absent). garrison refused the entry without `value` and read `value: ""` as "the header
is sent empty", denying every request that carries the header with a value."""

from __future__ import annotations

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.trace import HTTPRequestSpec, TraceEndpoint, trace

from .helpers import policies


def ep(labels: str) -> TraceEndpoint:
    return TraceEndpoint(endpoint_labels(Labels.parse(labels), "default"), "default")


def policy(header_match: str) -> str:
    return f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: web}}
        spec:
          endpointSelector: {{matchLabels: {{app: web}}}}
          ingress:
          - fromEndpoints: [{{matchLabels: {{app: client}}}}]
            toPorts:
            - ports: [{{port: "80", protocol: TCP}}]
              rules:
                http:
                - path: /api
                  headerMatches: [{header_match}]
        """


def get(*headers: tuple[str, str]) -> HTTPRequestSpec:
    return HTTPRequestSpec("GET", "/api", "web", headers)


@pytest.mark.parametrize("header_match", ["{name: X-Token}", '{name: X-Token, value: ""}'])
@pytest.mark.parametrize(
    ("request_", "allowed"),
    [
        (get(("X-Token", "abc")), True),
        (get(("x-token", "")), True),
        (get(), False),
        (get(("X-Other", "abc")), False),
    ],
)
def test_header_match_without_value_requires_presence(
    header_match: str, request_: HTTPRequestSpec, allowed: bool
) -> None:
    result = trace(policies(policy(header_match)), ep("app=client"), ep("app=web"), 80,
                   request=request_)
    assert result.allowed is allowed
    if not allowed:
        assert result.denied_at == "L7"
        assert result.steps[1].l7 is not None
        assert result.steps[1].l7.reason == "no rule matches GET /api: header 'X-Token' missing"


def test_header_match_action_still_needs_a_value() -> None:
    """ADD / REPLACE write the value: without one, the file is refused."""
    with pytest.raises(PolicyValidationError) as info:
        load_text(policy("{name: X-Token, mismatch: ADD}"), "p.yaml")
    assert [str(e) for e in info.value.issues] == [
        "p.yaml:14: spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].value: "
        "missing required field (a mismatch action needs a value)"
    ]
