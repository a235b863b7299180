"""Acceptance: the example policies Cilium and Kubernetes publish load, with their meaning.

The fixtures under tests/data/policies/cilium/ follow Cilium's published examples (each file
names the one it follows); tests/data/policies/k8s/ holds the Kubernetes documentation's
NetworkPolicy examples.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.l7rules import KafkaRole, KafkaRule, L7Protocol
from garrison.policies.labels import NAMESPACE_KEY, Labels, endpoint_labels
from garrison.policies.loader import LoadResult, load_paths, load_text
from garrison.policies.model import (
    CIDRPeer,
    EndpointPeer,
    Entity,
    EntityPeer,
    ICMPField,
    Policy,
    PortProtocol,
    Protocol,
    Rule,
)
from garrison.policies.refs import PolicyKind
from garrison.policies.selector import Operator, Requirement

DATA = Path(__file__).resolve().parents[2] / "data" / "policies"
CILIUM = DATA / "cilium"
K8S = DATA / "k8s"


def load_one(path: Path) -> tuple[Policy, LoadResult]:
    result = load_paths([path])
    (policy,) = result.policies
    return policy, result


def warnings(result: LoadResult) -> list[str]:
    return [f"{w.line}: {w.field}" for w in result.warnings]


def pod(labels: str, namespace: str = "default") -> Labels:
    return endpoint_labels(Labels.parse(labels), namespace)


CILIUM_FILES = sorted(p.name for p in CILIUM.iterdir())


def test_there_are_enough_cilium_examples() -> None:
    assert len(CILIUM_FILES) >= 10


@pytest.mark.parametrize("name", CILIUM_FILES)
def test_cilium_example_loads(name: str) -> None:
    result = load_paths([CILIUM / name])
    assert len(result.policies) == 1
    assert result.policies[0].rules


def test_example_directory_reports_the_names_the_examples_share() -> None:
    """Cilium's examples reuse `rule1`: each is meant to replace the other when applied.
    Loaded together they are duplicates, reported at the later files (sorted order)."""
    with pytest.raises(PolicyValidationError) as info:
        load_paths([CILIUM])
    assert [(Path(i.path).name, i.line, i.field, i.reason) for i in info.value.issues] == [
        (
            name,
            line,
            "metadata.name",
            "duplicate policy CiliumNetworkPolicy default/rule1 "
            f"(also defined at {CILIUM / 'kafka-apikey.yaml'}:6)",
        )
        for name, line in (("sw-l3-l4-l7.yaml", 6), ("sw-l3-l4.yaml", 7))
    ]


def test_examples_without_the_replacements_load_in_the_order_given() -> None:
    names = [n for n in CILIUM_FILES if n not in ("sw-l3-l4-l7.yaml", "sw-l3-l4.yaml")]
    result = load_paths([CILIUM / n for n in reversed(names)])
    assert [Path(f).name for f in result.files] == list(reversed(names))
    assert len(result.policies) == len(names)


def test_sw_l3_l4_top_level_description_and_quoted_port() -> None:
    policy, result = load_one(CILIUM / "sw-l3-l4.yaml")
    (rule,) = policy.rules
    assert rule.description == "L3-L4 policy to restrict deathstar access to empire ships only"
    assert rule.endpoint_selector.matches(pod("org=empire,class=deathstar"))
    assert not rule.endpoint_selector.matches(pod("org=empire,class=deathstar", "other"))
    assert rule.ingress is not None
    (section,) = rule.ingress
    assert section.to_ports[0].ports == (PortProtocol(80, 0, Protocol.TCP),)
    assert section.to_ports[0].rules is None
    (peer,) = section.peers or ()
    assert isinstance(peer, EndpointPeer)
    assert peer.selector.matches(pod("org=empire,class=tiefighter"))
    assert not peer.selector.matches(pod("org=alliance"))
    assert result.warnings == ()


def test_sw_l7_http_rule() -> None:
    policy, _ = load_one(CILIUM / "sw-l3-l4-l7.yaml")
    (rule,) = policy.rules
    assert rule.description == "L7 policy to restrict access to specific HTTP call"
    assert rule.ingress is not None
    (port_rule,) = rule.ingress[0].to_ports
    assert port_rule.rules is not None and port_rule.rules.http is not None
    assert [(r.method, r.path) for r in port_rule.rules.http] == [("POST", "/v1/request-landing")]


def test_sw_default_deny_selects_nothing() -> None:
    policy, _ = load_one(CILIUM / "sw-default-deny.yaml")
    (rule,) = policy.rules
    assert rule.ingress is not None
    assert [s.peers for s in rule.ingress] == [()]
    assert rule.default_deny_ingress


def test_kafka_specs_with_roles() -> None:
    policy, _ = load_one(CILIUM / "kafka-sw-security.yaml")
    assert len(policy.rules) == 3
    first = policy.rules[0]
    assert first.description == "Allow only permitted Kafka requests to empire Kafka broker"
    assert first.ingress is not None
    kafka = first.ingress[0].to_ports[0].rules
    assert kafka is not None and kafka.protocol is L7Protocol.KAFKA
    assert kafka.kafka == (
        KafkaRule(role=KafkaRole.PRODUCE, topic="deathstar-plans"),
        KafkaRule(role=KafkaRole.PRODUCE, topic="empire-announce"),
    )
    # The element with peers and no ports allows the Kafka pods on every port.
    assert first.ingress[1].to_ports == ()
    ref = first.ingress[1].ref
    assert str(ref) == "CiliumNetworkPolicy default/secure-empire-kafka specs[0].ingress[1]"


def test_kafka_api_keys() -> None:
    policy, _ = load_one(CILIUM / "kafka-apikey.yaml")
    assert policy.rules[0].ingress is not None
    rules = policy.rules[0].ingress[0].to_ports[0].rules
    assert rules is not None and rules.kafka is not None
    assert [(r.api_key, r.topic) for r in rules.kafka] == [
        (18, None),
        (3, None),
        (0, "deathstar-plans"),
        (0, "empire-announce"),
    ]


def test_http_headers_with_upper_case_key() -> None:
    policy, result = load_one(CILIUM / "http-headers.yaml")
    assert policy.rules[0].ingress is not None
    section = policy.rules[0].ingress[0]
    assert section.peers is None
    rules = section.to_ports[0].rules
    assert rules is not None and rules.http is not None
    assert rules.http[1].headers == ("X-My-Header: true",)
    assert warnings(result) == ["17: spec.ingress[0].toPorts[0].rules.HTTP"]


def test_http_header_matches() -> None:
    policy, result = load_one(CILIUM / "http-header-matches.yaml")
    assert policy.rules[0].ingress is not None
    rules = policy.rules[0].ingress[0].to_ports[0].rules
    assert rules is not None and rules.http is not None
    assert [(m.name, m.mismatch) for m in rules.http[0].header_matches] == [
        ("X-Request-Source", "LOG"),
        ("X-Forwarded-Proto", "REPLACE"),
    ]
    assert rules.http[1].method is None and rules.http[1].path is None
    assert result.warnings == ()


def test_l7_multi_specs_egress_host() -> None:
    policy, _ = load_one(CILIUM / "l7-multi.yaml")
    second = policy.rules[1]
    assert second.egress is not None
    assert second.egress[0].peers is None
    rules = second.egress[0].to_ports[0].rules
    assert rules is not None and rules.http is not None
    assert rules.http[0].host == "^external-service.org$"


def test_cidr_and_cidr_set_except() -> None:
    policy, _ = load_one(CILIUM / "cidr.yaml")
    egress = policy.rules[0].egress
    assert egress is not None
    assert egress[0].peers == (CIDRPeer(ipaddress.ip_network("20.1.1.1/32")),)
    assert egress[1].peers == (
        CIDRPeer(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.96.0.0/12"),)),
    )


def test_clusterwide_world_deny() -> None:
    policy, _ = load_one(CILIUM / "from-world-deny.yaml")
    assert policy.kind is PolicyKind.CCNP and policy.namespace is None
    (rule,) = policy.rules
    assert rule.ingress_deny is not None and rule.ingress is not None
    assert rule.ingress_deny[0].peers == (EntityPeer(Entity.WORLD),)
    assert rule.ingress[0].peers == (EntityPeer(Entity.ALL),)
    assert rule.endpoint_selector.is_empty


def test_egress_deny() -> None:
    policy, _ = load_one(CILIUM / "egress-deny.yaml")
    (rule,) = policy.rules
    assert rule.egress is not None and rule.egress_deny is not None
    assert rule.egress[0].peers == (EntityPeer(Entity.ALL),)
    (peer,) = rule.egress_deny[0].peers or ()
    assert isinstance(peer, EndpointPeer)
    assert peer.selector.matches(pod("role=backend"))
    assert not peer.selector.matches(pod("role=backend", "other"))


def test_icmps() -> None:
    policy, _ = load_one(CILIUM / "icmp.yaml")
    egress = policy.rules[0].egress
    assert egress is not None
    assert egress[0].peers is None
    assert egress[0].icmps == (ICMPField("IPv4", 8), ICMPField("IPv6", 128))


def test_enable_default_deny_false_and_dns_rules_warning() -> None:
    policy, result = load_one(CILIUM / "enable-default-deny.yaml")
    (rule,) = policy.rules
    assert (rule.default_deny_ingress, rule.default_deny_egress) == (False, False)
    assert rule.egress is not None
    assert rule.egress[0].peers == ()  # the DNS rules cannot be enforced: fail closed
    assert warnings(result) == ["33: spec.egress[0].toPorts[0].rules.dns"]
    assert not rule.endpoint_selector.matches(pod("k8s-app=kube-dns", "kube-system"))
    assert rule.endpoint_selector.matches(pod("app=web", "default"))


def test_to_fqdns_warns_and_allows_nothing() -> None:
    policy, result = load_one(CILIUM / "fqdn.yaml")
    egress = policy.rules[0].egress
    assert egress is not None
    (dns,) = egress[0].peers or ()
    assert isinstance(dns, EndpointPeer)
    assert dns.selector.matches(pod("k8s-app=kube-dns", "kube-system"))
    assert egress[1].peers == ()
    assert warnings(result) == ["16: spec.egress[1].toFQDNs"]


def test_dns_visibility_two_warnings() -> None:
    policy, result = load_one(CILIUM / "dns-visibility.yaml")
    egress = policy.rules[0].egress
    assert egress is not None
    assert [s.peers for s in egress] == [(), ()]
    assert warnings(result) == [
        "21: spec.egress[0].toPorts[0].rules.dns",
        "25: spec.egress[1].toFQDNs",
    ]
    assert Requirement("org", Operator.IN, ("alliance",), "any") in (
        policy.rules[0].endpoint_selector.requirements
    )


def test_port_range() -> None:
    policy, _ = load_one(CILIUM / "port-range.yaml")
    egress = policy.rules[0].egress
    assert egress is not None
    assert egress[0].to_ports[0].ports == (PortProtocol(80, 444, Protocol.TCP),)


def test_kubedns_block_style_empty_selector() -> None:
    policy, _ = load_one(CILIUM / "kubedns.yaml")
    (rule,) = policy.rules
    assert rule.endpoint_selector.matches(pod("app=anything"))
    assert rule.egress is not None
    assert rule.egress[0].to_ports[0].ports == (PortProtocol(53, 0, Protocol.UDP),)


def test_cross_namespace_peer_is_not_limited() -> None:
    policy, _ = load_one(CILIUM / "cross-namespace.yaml")
    (rule,) = policy.rules
    assert policy.namespace == "ns1"
    assert rule.endpoint_selector.matches(pod("name=leia", "ns1"))
    assert rule.ingress is not None
    (peer,) = rule.ingress[0].peers or ()
    assert isinstance(peer, EndpointPeer)
    assert peer.selector.matches(pod("name=luke", "ns2"))
    assert not peer.selector.matches(pod("name=luke", "ns1"))


def test_clusterwide_wildcard_from_endpoints() -> None:
    policy, _ = load_one(CILIUM / "wildcard-from-endpoints.yaml")
    (rule,) = policy.rules
    assert rule.ingress is not None
    (peer,) = rule.ingress[0].peers or ()
    assert isinstance(peer, EndpointPeer)
    assert peer.selector.matches(pod("app=x", "any-namespace"))
    assert rule.description.startswith("Policy for ingress allow to kube-dns")


def test_or_of_selectors_with_lower_case_operator() -> None:
    policy, _ = load_one(CILIUM / "match-expressions-or.yaml")
    ingress = policy.rules[0].ingress
    assert ingress is not None
    first, second = ingress[0].peers or ()
    assert isinstance(first, EndpointPeer) and isinstance(second, EndpointPeer)
    assert Requirement("cilium.example.com/policy", Operator.IN, ("strict",), "k8s") in (
        second.selector.requirements
    )
    # The example's key `k8s.io.kubernetes.pod.namespace` is a plain label key, not the
    # namespace label, so the peer stays limited to the policy's namespace.
    assert Requirement(NAMESPACE_KEY, Operator.IN, ("default",), "k8s") in (
        first.selector.requirements
    )


@pytest.mark.parametrize(
    ("name", "warning"),
    [
        ("service.yaml", "11: spec.egress[0].toServices"),
        ("sni.yaml", "15: spec.egress[0].toPorts[0].serverNames"),
    ],
)
def test_unsupported_examples_load_failing_closed(name: str, warning: str) -> None:
    policy, result = load_one(CILIUM / name)
    sections = [s for r in policy.rules for s in (r.ingress or ()) + (r.egress or ())]
    assert [s.peers for s in sections] == [()]
    assert warnings(result) == [warning]
    assert all("this element allows nothing" in w.reason for w in result.warnings)


def test_requires_example_narrows_instead_of_granting() -> None:
    policy, result = load_one(CILIUM / "requires.yaml")
    assert warnings(result) == []
    (section,) = policy.rules[0].ingress or ()
    assert section.peers == ()  # grants nothing by itself
    assert [str(sel) for sel in section.requires] == [
        "{env=prod, k8s:io.kubernetes.pod.namespace=default}"
    ]


def test_json_policy() -> None:
    policy, _ = load_one(CILIUM / "world.json")
    assert policy.rules[0].ingress is not None
    assert policy.rules[0].ingress[0].peers == (EntityPeer(Entity.WORLD),)


def test_published_example_with_misindented_match_labels_is_rejected() -> None:
    """Cilium's examples/policies/l4/l3_l4_combined.yaml indents `role: frontend` beside
    `matchLabels:` instead of under it. Cilium's decoder drops the unknown key and reads an
    empty selector, which allows every endpoint; garrison refuses it."""
    text = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: l4-rule}\n"
        "spec:\n  endpointSelector: {matchLabels: {role: backend}}\n  ingress:\n"
        "  - fromEndpoints:\n    - matchLabels:\n      role: frontend\n"
    )
    with pytest.raises(PolicyValidationError) as info:
        load_text(text, "l3_l4_combined.yaml")
    assert [str(i) for i in info.value.issues] == [
        "l3_l4_combined.yaml:8: spec.ingress[0].fromEndpoints[0].matchLabels: "
        "expected a mapping, got nothing (null)",
        "l3_l4_combined.yaml:9: spec.ingress[0].fromEndpoints[0].role: unknown field 'role' "
        "(expected one of: matchExpressions, matchLabels)",
    ]


# --- Kubernetes NetworkPolicy examples --------------------------------------------------------


def rule_of(result: LoadResult, name: str) -> Rule:
    (policy,) = [p for p in result.policies if p.name == name]
    assert policy.kind is PolicyKind.KNP
    (rule,) = policy.rules
    return rule


def test_k8s_examples_load() -> None:
    result = load_paths([K8S])
    assert sorted(p.name for p in result.policies) == [
        "allow-all-egress",
        "allow-all-ingress",
        "and-vs-or",
        "default-deny-all",
        "default-deny-egress",
        "default-deny-ingress",
        "multi-port-egress",
        "test-network-policy",
    ]
    assert result.warnings == ()


def test_k8s_default_policies() -> None:
    result = load_paths([K8S / "defaults.yaml"])
    deny_in = rule_of(result, "default-deny-ingress")
    assert (deny_in.ingress, deny_in.egress) == ((), None)
    allow_in = rule_of(result, "allow-all-ingress")
    assert allow_in.ingress is not None
    assert [(s.peers, s.to_ports) for s in allow_in.ingress] == [(None, ())]
    deny_out = rule_of(result, "default-deny-egress")
    assert (deny_out.ingress, deny_out.egress) == (None, ())
    allow_out = rule_of(result, "allow-all-egress")
    assert allow_out.egress is not None
    assert [(s.peers, s.to_ports) for s in allow_out.egress] == [(None, ())]
    deny_all = rule_of(result, "default-deny-all")
    assert (deny_all.ingress, deny_all.egress) == ((), ())
    assert deny_all.endpoint_selector.matches(pod("app=x", "default"))
    assert not deny_all.endpoint_selector.matches(pod("app=x", "other"))


def test_k8s_test_network_policy() -> None:
    rule = rule_of(load_paths([K8S / "test-network-policy.yaml"]), "test-network-policy")
    assert rule.ingress is not None and rule.egress is not None
    block, namespace, pods = rule.ingress[0].peers or ()
    assert block == CIDRPeer(
        ipaddress.ip_network("172.17.0.0/16"), (ipaddress.ip_network("172.17.1.0/24"),)
    )
    assert isinstance(namespace, EndpointPeer) and isinstance(pods, EndpointPeer)
    in_project = pod("app=x", "team").union(
        Labels.parse("io.cilium.k8s.namespace.labels.project=myproject")
    )
    assert namespace.selector.matches(in_project)
    assert not namespace.selector.matches(pod("app=x", "team"))
    assert not namespace.selector.matches(Labels.parse("reserved:world"))
    assert pods.selector.matches(pod("role=frontend"))
    assert not pods.selector.matches(pod("role=frontend", "other"))
    assert rule.ingress[0].to_ports[0].ports == (PortProtocol(6379, 0, Protocol.TCP),)
    assert rule.egress[0].peers == (CIDRPeer(ipaddress.ip_network("10.0.0.0/24")),)
    assert rule.egress[0].to_ports[0].ports == (PortProtocol(5978, 0, Protocol.TCP),)


def test_k8s_port_range() -> None:
    rule = rule_of(load_paths([K8S / "multi-port-egress.yaml"]), "multi-port-egress")
    assert rule.ingress is None and rule.egress is not None
    assert rule.egress[0].to_ports[0].ports == (PortProtocol(32000, 32768, Protocol.TCP),)


def test_k8s_namespace_and_pod_selector_and_vs_or() -> None:
    rule = rule_of(load_paths([K8S / "namespace-and-pod.yaml"]), "and-vs-or")
    assert rule.ingress is not None
    alice = Labels.parse("io.cilium.k8s.namespace.labels.user=alice")
    client_in_alice = pod("role=client", "alice-ns").union(alice)
    other_in_alice = pod("role=other", "alice-ns").union(alice)
    client_in_prod = pod("role=client", "prod")
    (both,) = rule.ingress[0].peers or ()
    assert isinstance(both, EndpointPeer)
    assert both.selector.matches(client_in_alice)
    assert not both.selector.matches(other_in_alice)
    assert not both.selector.matches(client_in_prod)
    either = rule.ingress[1].peers or ()
    assert [
        any(isinstance(p, EndpointPeer) and p.selector.matches(labels) for p in either)
        for labels in (client_in_alice, other_in_alice, client_in_prod)
    ] == [True, True, True]
    (by_name,) = rule.ingress[2].peers or ()
    assert isinstance(by_name, EndpointPeer)
    assert by_name.selector.matches(pod("app=prometheus", "monitoring"))
    assert not by_name.selector.matches(pod("app=prometheus", "prod"))
    assert rule.ingress[2].to_ports[0].ports == (PortProtocol(9090, 0, Protocol.TCP),)
