"""StandalonePolicy and PeerMapping: who a client is and what the proxy enforces for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from garrison.policies.l7rules import HTTPRule, L7Protocol
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_paths, load_text
from garrison.policies.mapstate import DropReason
from garrison.policies.resolve import ResolverConfig
from garrison.policies.selectorcache import WORLD_IDENTITY
from garrison.proxy.policyview import (
    DESTINATION_IDENTITY,
    PeerMapping,
    PolicyConfigError,
    StandalonePolicy,
)

STARWARS = Path(__file__).resolve().parents[3] / "examples" / "starwars"
DEATHSTAR = endpoint_labels(Labels.parse("org=empire,class=deathstar"))
PEERS = [
    PeerMapping.parse("127.0.0.2/32=org=empire,class=tiefighter"),
    PeerMapping.parse("127.0.0.3/32=org=alliance,class=xwing"),
]


def standalone(path: Path, protocol: L7Protocol = L7Protocol.HTTP, **kwargs: object
               ) -> StandalonePolicy:
    policies = load_paths([path]).policies
    return StandalonePolicy(policies, DEATHSTAR, 80, protocol, PEERS, **kwargs)  # type: ignore[arg-type]


def test_peer_mapping_parses_labels_and_namespace() -> None:
    peer = PeerMapping.parse("10.0.0.0/8=app=web,tier=front,ns=shop")
    assert str(peer.network) == "10.0.0.0/8"
    assert peer.namespace == "shop"
    assert peer.labels == endpoint_labels(Labels.parse("app=web,tier=front"), "shop")
    assert PeerMapping.parse("127.0.0.2=app=x").network.prefixlen == 32


@pytest.mark.parametrize("text", ["127.0.0.2", "127.0.0.2/32=", "nonsense=app=x", "1.2.3.4/99=a=b"])
def test_peer_mapping_refuses_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="--peer"):
        PeerMapping.parse(text)


def test_l7_policy_admits_empire_with_its_http_rules() -> None:
    policy = standalone(STARWARS / "sw_l3_l4_l7_policy.yaml")
    admission = policy.admit("127.0.0.2", "127.0.0.1", 80)
    assert admission.allowed
    assert admission.identity not in (DESTINATION_IDENTITY, WORLD_IDENTITY)
    assert admission.namespace == "default"
    assert admission.labels.get("class") == "tiefighter"
    assert not admission.ruleset.allow_all
    [(rule, ref)] = admission.ruleset.rules
    assert rule == HTTPRule(method="POST", path="/v1/request-landing")
    assert ref is not None and ref.name == "rule1"


def test_l7_policy_drops_the_alliance_and_the_world() -> None:
    policy = standalone(STARWARS / "sw_l3_l4_l7_policy.yaml")
    xwing = policy.admit("127.0.0.3")
    assert not xwing.allowed
    assert xwing.lookup.drop_reason is DropReason.POLICY_DENIED
    world = policy.admit("192.0.2.1")
    assert not world.allowed and world.identity == WORLD_IDENTITY
    assert world.labels.has("world", "reserved")


def test_l4_policy_gives_an_allow_all_rule_set_with_its_ref() -> None:
    admission = standalone(STARWARS / "sw_l3_l4_policy.yaml").admit("127.0.0.2")
    assert admission.allowed and admission.ruleset.allow_all
    assert admission.ruleset.allow_all_ref is not None
    assert admission.ruleset.allow_all_ref.name == "rule1"


def test_the_most_specific_peer_wins() -> None:
    peers = [PeerMapping.parse("127.0.0.0/8=org=alliance"),
             PeerMapping.parse("127.0.0.2/32=org=empire")]
    policies = load_paths([STARWARS / "sw_l3_l4_l7_policy.yaml"]).policies
    policy = StandalonePolicy(policies, DEATHSTAR, 80, L7Protocol.HTTP, peers)
    assert policy.admit("127.0.0.2").allowed
    assert not policy.admit("127.0.0.9").allowed


def test_protocol_mismatch_is_a_config_error() -> None:
    with pytest.raises(PolicyConfigError, match="--protocol http"):
        standalone(STARWARS / "sw_l3_l4_l7_policy.yaml", L7Protocol.KAFKA)


def test_audit_mode_admits_what_would_be_dropped() -> None:
    policy = standalone(STARWARS / "sw_l3_l4_l7_policy.yaml", config=ResolverConfig(audit=True))
    admission = policy.admit("127.0.0.3")
    assert admission.allowed and admission.audit
    assert not admission.lookup.allowed


def test_unselected_destination_is_unrestricted() -> None:
    other = load_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: other}\n"
        "spec:\n  endpointSelector: {matchLabels: {app: other}}\n  ingress: [{}]\n"
    ).policies
    policy = StandalonePolicy(other, DEATHSTAR, 80, L7Protocol.HTTP, PEERS)
    admission = policy.admit("127.0.0.3")
    assert admission.allowed and admission.ruleset.allow_all

