"""HTTP rules that are each valid RE2 but together exceed what one RE2 set may compile (its
memory budget) still work: the matcher falls back to matching rule by rule. They used to
validate, then raise `re2.error: failed to compile Set` wherever the rules were matched
(`policy trace` crashed with a traceback; the proxy could not build its matcher)."""

from __future__ import annotations

import pytest

from garrison.policies.l7rules import HTTPRule, L7Protocol, L7RuleSet
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.trace import HTTPRequestSpec, TraceEndpoint, trace

from .helpers import policies

RULES = 40
PATTERN = "/p{i}/[a-z]{{1,1000}}[0-9]{{1,1000}}"


def ep(labels: str) -> TraceEndpoint:
    return TraceEndpoint(endpoint_labels(Labels.parse(labels), "default"), "default")


def policy() -> str:
    rules = "\n".join(
        f'                - {{method: GET, path: "{PATTERN.format(i=i)}"}}' for i in range(RULES)
    )
    return f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: big}}
        spec:
          endpointSelector: {{matchLabels: {{app: web}}}}
          ingress:
          - fromEndpoints: [{{matchLabels: {{app: client}}}}]
            toPorts:
            - ports: [{{port: "80", protocol: TCP}}]
              rules:
                http:
{rules}
                - {{path: /health, host: "web\\\\.local", headers: [X-Probe]}}
        """


@pytest.mark.parametrize(
    ("method", "path", "host", "headers", "allowed"),
    [
        ("GET", "/p3/ab12", "web", (), True),
        ("GET", "/p39/z9", "web", (), True),
        ("POST", "/p3/ab12", "web", (), False),
        ("GET", "/p3/ab", "web", (), False),
        ("GET", "/p40/ab12", "web", (), False),
        ("GET", "/health", "WEB.local:80", (("X-Probe", "1"),), True),
        ("GET", "/health", "web.local", (), False),
        ("GET", "/health", None, (("X-Probe", "1"),), False),
    ],
)
def test_rules_too_large_for_one_set_are_matched_one_by_one(
    method: str, path: str, host: str | None, headers: tuple[tuple[str, str], ...],
    allowed: bool,
) -> None:
    result = trace(policies(policy()), ep("app=client"), ep("app=web"), 80,
                   request=HTTPRequestSpec(method, path, host, headers))
    assert result.allowed is allowed
    assert result.denied_at == (None if allowed else "L7")


def test_matcher_answers_the_same_with_and_without_the_set() -> None:
    small = L7RuleSet(L7Protocol.HTTP, tuple(
        (HTTPRule(method="GET", path=PATTERN.format(i=i)), None) for i in range(3)
    ))
    large = L7RuleSet(L7Protocol.HTTP, tuple(
        (HTTPRule(method="GET", path=PATTERN.format(i=i)), None) for i in range(RULES)
    ))
    for path in ("/p1/a1", "/p2/zz00", "/p0/a1", "/p1/1a", "/p1/a1?x", "/p0/"):
        assert (HTTPMatcher(small).match("GET", path, "h", []).allowed
                == HTTPMatcher(large).match("GET", path, "h", []).allowed)
