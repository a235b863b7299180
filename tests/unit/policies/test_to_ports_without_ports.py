"""A `toPorts` entry without ports selects no port in Cilium (its merge loops over the entry's
ports, and a non-empty `toPorts` is not an L3-only rule), so `{fromEndpoints: [...],
toPorts: [{}]}` allows nothing there. garrison read such an entry as "every port", wider than
Cilium (and, in a deny section, denied every port where Cilium denies none). The meaning is a
trap either way: the entry is refused with the fix in the message."""

from __future__ import annotations

import textwrap

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.loader import load_text

MESSAGE = (
    "a toPorts entry without ports selects no port (as in Cilium): list its ports "
    "(a port without number means every port), or leave toPorts out for every port"
)


def cnp(section: str, to_ports: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: p}}
        spec:
          endpointSelector: {{matchLabels: {{app: db}}}}
          {section}:
          - fromEndpoints: [{{matchLabels: {{app: web}}}}]
            toPorts: {to_ports}
        """)


@pytest.mark.parametrize("section", ["ingress", "ingressDeny"])
@pytest.mark.parametrize(
    ("to_ports", "field"),
    [
        ("[{}]", "toPorts[0]"),
        ("[{ports: []}]", "toPorts[0].ports"),
        ('[{ports: [{port: "80"}]}, {}]', "toPorts[1]"),
    ],
)
def test_to_ports_entry_without_ports_is_refused(section: str, to_ports: str, field: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        load_text(cnp(section, to_ports), "p.yaml")
    assert [str(e) for e in info.value.issues] == [
        f"p.yaml:8: spec.{section}[0].{field}: {MESSAGE}"
    ]


@pytest.mark.parametrize("to_ports", ["[]", "[{ports: [{}]}]", '[{ports: [{port: "0"}]}]'])
def test_every_port_is_still_written_as_before(to_ports: str) -> None:
    (policy,) = load_text(cnp("ingress", to_ports), "p.yaml").policies
    assert policy.name == "p"
