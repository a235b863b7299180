"""A deny rule's named port, where the endpoints sharing an identity map the name to different
numbers (a rolling update that moves `admin` from 8443 to 9443), denies every number the name
means there. An allow rule's name selects nothing there (which number a connection means
cannot be told: fail closed), and the deny used to do the same — so during such a rollout
`ingressDeny: [{toPorts: [{ports: [{port: admin}]}]}]` stopped applying to every endpoint of
the identity, and whatever else allowed the peer let it reach the admin port."""

from __future__ import annotations

from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.mapstate import PROTO_TCP, PROTO_UDP, lookup
from garrison.policies.model import Direction
from garrison.policies.resolve import PolicyResolver, build_resolver

from .helpers import policies

CLIENT, SERVER = 256, 257

ALLOW_ALL_DENY_ADMIN = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {role: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: client}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts: [{ports: [{port: admin}]}]
"""

EGRESS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out}
spec:
  endpointSelector: {matchLabels: {role: client}}
  egress:
  - toEndpoints: [{matchLabels: {role: server}}]
  egressDeny:
  - toPorts: [{ports: [{port: admin, protocol: TCP}]}]
"""


def resolver(text: str) -> PolicyResolver:
    r = build_resolver(
        policies(text),
        [
            (CLIENT, endpoint_labels(Labels.parse("role=client"), "default")),
            (SERVER, endpoint_labels(Labels.parse("role=server"), "default")),
        ],
    )
    # two endpoints of the server identity, mid-rollout: admin is 8443 on one, 9443 on the other
    r.set_named_ports(SERVER, {"admin": frozenset({(PROTO_TCP, 8443), (PROTO_TCP, 9443)})})
    return r


def test_ingress_deny_of_an_ambiguous_name_denies_every_number_it_means() -> None:
    r = resolver(ALLOW_ALL_DENY_ADMIN)
    state = r.map_state(SERVER)
    for port in (8443, 9443):
        result = lookup(state, Direction.INGRESS, CLIENT, PROTO_TCP, port)
        assert not result.allowed, port
    assert lookup(state, Direction.INGRESS, CLIENT, PROTO_TCP, 80).allowed
    assert lookup(state, Direction.INGRESS, CLIENT, PROTO_UDP, 8443).allowed  # not declared


def test_egress_deny_of_an_ambiguous_name_denies_every_number_it_means() -> None:
    r = resolver(EGRESS)
    state = r.map_state(CLIENT)
    for port in (8443, 9443):
        assert not lookup(state, Direction.EGRESS, SERVER, PROTO_TCP, port).allowed, port
    assert lookup(state, Direction.EGRESS, SERVER, PROTO_TCP, 80).allowed


ALLOW_ADMIN = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {role: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts: [{ports: [{port: admin}]}]
"""


def test_an_ambiguous_name_still_allows_nothing() -> None:
    state = resolver(ALLOW_ADMIN).map_state(SERVER)
    for port in (8443, 9443):
        assert not lookup(state, Direction.INGRESS, CLIENT, PROTO_TCP, port).allowed, port
