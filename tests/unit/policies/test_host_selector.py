"""A rule whose `endpointSelector` selects the host (`reserved:host`) is a host policy in
Cilium; garrison polices endpoints, not the host, so such a rule is refused, like a
`nodeSelector`, instead of loading as a policy that enforces nothing."""

from __future__ import annotations

import textwrap

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.loader import load_text


def ccnp(selector: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {{name: host-fw}}
        spec:
          endpointSelector: {selector}
          ingressDeny:
          - fromEntities: [world]
        """)


@pytest.mark.parametrize(
    "selector",
    [
        '{matchLabels: {"reserved:host": ""}}',
        "{matchExpressions: [{key: reserved:host, operator: Exists}]}",
    ],
)
def test_endpoint_selector_naming_the_host_is_refused(selector: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        load_text(ccnp(selector), "fw.yaml")
    assert [str(e) for e in info.value.issues] == [
        "fw.yaml:5: spec.endpointSelector: selects the host (reserved:host): not supported by "
        "garrison (host policies; garrison enforces policy on endpoints only)"
    ]


def test_selector_excluding_the_host_still_loads() -> None:
    (policy,) = load_text(
        ccnp("{matchExpressions: [{key: reserved:host, operator: DoesNotExist}]}"), "fw.yaml"
    ).policies
    assert policy.name == "host-fw"
