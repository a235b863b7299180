"""What the loader builds: the model the repository and resolution read."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from garrison.policies.l7rules import (
    GRPCRule,
    HeaderMatch,
    HTTPRule,
    KafkaRole,
    KafkaRule,
    L7Rules,
    MismatchAction,
)
from garrison.policies.labels import NAMESPACE_KEY
from garrison.policies.loader import LoadResult, load_text
from garrison.policies.model import (
    CIDRPeer,
    Direction,
    EndpointPeer,
    Entity,
    EntityPeer,
    ICMPField,
    Policy,
    PolicySection,
    PortProtocol,
    PortRule,
    Protocol,
    Rule,
    Source,
)
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.policies.selector import EndpointSelector, Operator, Requirement


def load(text: str) -> LoadResult:
    return load_text(textwrap.dedent(text).lstrip("\n"), "m.yaml")


def one_rule(text: str) -> Rule:
    (policy,) = load(text).policies
    (rule,) = policy.rules
    return rule


def cnp(spec: str, namespace: str = "web") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata: {{name: p, namespace: {namespace}}}\nspec:\n" + body
    )


def ccnp(spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n"
        "metadata: {name: p}\nspec:\n" + body
    )


def knp(spec: str, namespace: str = "prod") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    return (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        f"metadata: {{name: np, namespace: {namespace}}}\nspec:\n" + body
    )


def ns_in(namespace: str) -> Requirement:
    return Requirement(NAMESPACE_KEY, Operator.IN, (namespace,), "k8s")


def label(key: str, value: str, source: str = "any") -> Requirement:
    return Requirement(key, Operator.IN, (value,), source)


def peers(section: PolicySection) -> tuple[object, ...] | None:
    return section.peers


# --- sections: absent, empty, peers ---------------------------------------------------------


def test_direction_absent_or_empty_list_is_none() -> None:
    """Cilium: "If omitted or empty, this rule does not apply at ingress"."""
    rule = one_rule(cnp("endpointSelector: {}\ningress: []\negressDeny: []"))
    assert rule.ingress is None and rule.egress_deny is None
    assert rule.egress is None and rule.ingress_deny is None
    assert not rule.enforces(Direction.INGRESS) and not rule.enforces(Direction.EGRESS)


def test_empty_element_selects_nothing() -> None:
    rule = one_rule(cnp("endpointSelector: {}\ningress: [{}]"))
    assert rule.ingress is not None
    (section,) = rule.ingress
    assert section.peers == () and section.to_ports == () and section.icmps == ()


def test_to_ports_without_peers_selects_any_peer() -> None:
    rule = one_rule(cnp("endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: 80}]}]}]"))
    assert rule.ingress is not None
    assert rule.ingress[0].peers is None
    assert rule.ingress[0].to_ports == (PortRule(ports=(PortProtocol(80, 0, Protocol.ANY),)),)


def test_icmps_without_peers_selects_any_peer() -> None:
    rule = one_rule(cnp("endpointSelector: {}\negress: [{icmps: [{fields: [{type: 8}]}]}]"))
    assert rule.egress is not None
    assert rule.egress[0].peers is None
    assert rule.egress[0].icmps == (ICMPField("IPv4", 8),)


@pytest.mark.parametrize(
    "element",
    ["{fromEndpoints: []}", "{toPorts: []}", "{fromEntities: [], toPorts: [{ports: [{port: 1}]}]}"],
)
def test_explicitly_empty_peer_list_or_empty_ports_selects_nothing(element: str) -> None:
    rule = one_rule(cnp(f"endpointSelector: {{}}\ningress: [{element}]"))
    assert rule.ingress is not None
    assert rule.ingress[0].peers == ()


def test_cnp_subject_gets_the_policy_namespace() -> None:
    rule = one_rule(cnp("endpointSelector: {matchLabels: {app: api}}\ningress: []"))
    assert rule.endpoint_selector == EndpointSelector.of([label("app", "api"), ns_in("web")])
    assert rule.namespace == "web"


def test_cnp_subject_naming_another_namespace_selects_in_its_own() -> None:
    """Cilium replaces a matchLabels namespace of a namespaced policy's endpointSelector by
    the policy's own (with a warning); a matchExpressions condition stays (ANDed)."""
    rule = one_rule(
        cnp("endpointSelector: {matchLabels: {'k8s:io.kubernetes.pod.namespace': other}}")
    )
    assert rule.endpoint_selector.requirements == (ns_in("web"),)
    rule = one_rule(
        cnp(
            """
            endpointSelector:
              matchExpressions:
              - {key: 'k8s:io.kubernetes.pod.namespace', operator: In, values: [other]}
            """
        )
    )
    assert ns_in("other") in rule.endpoint_selector.requirements
    assert ns_in("web") in rule.endpoint_selector.requirements


def test_cnp_peers_are_limited_to_the_policy_namespace() -> None:
    rule = one_rule(
        cnp(
            """
            endpointSelector: {}
            ingress:
            - fromEndpoints:
              - matchLabels: {app: web}
              - matchLabels: {"k8s:io.kubernetes.pod.namespace": monitoring, app: prom}
              - matchLabels: {"reserved:host": ""}
              - {}
            """
        )
    )
    assert rule.ingress is not None
    assert rule.ingress[0].peers == (
        EndpointPeer(EndpointSelector.of([label("app", "web"), ns_in("web")])),
        EndpointPeer(EndpointSelector.of([ns_in("monitoring"), label("app", "prom")])),
        EndpointPeer(EndpointSelector.of([label("host", "", "reserved")])),
        EndpointPeer(EndpointSelector.of([ns_in("web")])),
    )


def test_ccnp_neither_subject_nor_peers_are_limited() -> None:
    (policy,) = load(
        ccnp(
            """
            endpointSelector: {matchLabels: {app: api}}
            ingress:
            - fromEndpoints: [{matchLabels: {app: web}}, {}]
            """
        )
    ).policies
    assert policy.namespace is None and policy.key == ("CiliumClusterwideNetworkPolicy", None, "p")
    (rule,) = policy.rules
    assert rule.namespace is None
    assert rule.endpoint_selector == EndpointSelector.of([label("app", "api")])
    assert rule.ingress is not None
    assert rule.ingress[0].peers == (
        EndpointPeer(EndpointSelector.of([label("app", "web")])),
        EndpointPeer(EndpointSelector()),
    )


def test_namespace_defaults_to_default() -> None:
    (policy,) = load(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: p}
        spec: {endpointSelector: {}}
        """
    ).policies
    assert policy.namespace == "default"
    assert policy.rules[0].namespace == "default"


def test_ccnp_namespace_is_ignored_with_a_warning() -> None:
    result = load(
        """
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata:
          name: p
          namespace: web
        spec: {endpointSelector: {}}
        """
    )
    assert result.policies[0].namespace is None
    assert [str(w) for w in result.warnings] == [
        "m.yaml:5: warning: metadata.namespace: ignored: a CiliumClusterwideNetworkPolicy "
        "is not namespaced"
    ]


def test_selector_expressions_and_label_values_as_text() -> None:
    rule = one_rule(
        ccnp(
            """
            endpointSelector:
              matchLabels: {version: 2, canary: true, "k8s:tier": web}
              matchExpressions:
              - {key: env, operator: in, values: [prod, staging]}
              - {key: "any:legacy", operator: DoesNotExist}
            """
        )
    )
    assert rule.endpoint_selector == EndpointSelector.of(
        [
            label("version", "2"),
            label("canary", "true"),
            label("tier", "web", "k8s"),
            Requirement("env", Operator.IN, ("prod", "staging")),
            Requirement("legacy", Operator.DOES_NOT_EXIST, (), "any"),
        ]
    )


def test_entities_and_cidrs() -> None:
    rule = one_rule(
        ccnp(
            """
            endpointSelector: {}
            egress:
            - toEntities: [world, kube-apiserver]
            - toCIDR: [192.0.2.7, "2001:db8::1", 10.0.0.0/8]
            - toCIDRSet:
              - cidr: 10.0.0.0/8
                except: [10.96.0.0/12, 10.0.0.0/8]
            """
        )
    )
    net = ipaddress.ip_network
    assert rule.egress is not None
    assert rule.egress[0].peers == (EntityPeer(Entity.WORLD), EntityPeer(Entity.KUBE_APISERVER))
    assert rule.egress[1].peers == (
        CIDRPeer(net("192.0.2.7/32")),
        CIDRPeer(net("2001:db8::1/128")),
        CIDRPeer(net("10.0.0.0/8")),
    )
    assert rule.egress[2].peers == (
        CIDRPeer(net("10.0.0.0/8"), (net("10.96.0.0/12"), net("10.0.0.0/8"))),
    )


def test_icmp_type_names_resolve_per_family() -> None:
    rule = one_rule(
        ccnp(
            """
            endpointSelector: {}
            ingress:
            - icmps:
              - fields:
                - {type: EchoRequest}
                - {type: EchoRequest, family: IPv6}
                - {type: "3", family: IPv4}
            """
        )
    )
    assert rule.ingress is not None
    assert rule.ingress[0].icmps == (
        ICMPField("IPv4", 8),
        ICMPField("IPv6", 128),
        ICMPField("IPv4", 3),
    )


# --- ports and L7 ---------------------------------------------------------------------------


def test_ports_quoted_lower_case_protocol_and_ranges() -> None:
    rule = one_rule(
        ccnp(
            """
            endpointSelector: {}
            egress:
            - toPorts:
              - ports:
                - {port: "53", protocol: udp}
                - {port: 8000, endPort: 8080, protocol: Tcp}
                - {port: 9000, endPort: 9000}
                - {protocol: SCTP}
            """
        )
    )
    assert rule.egress is not None
    assert rule.egress[0].to_ports == (
        PortRule(
            ports=(
                PortProtocol(53, 0, Protocol.UDP),
                PortProtocol(8000, 8080, Protocol.TCP),
                PortProtocol(9000, 0, Protocol.ANY),
                PortProtocol(0, 0, Protocol.SCTP),
            )
        ),
    )


def test_http_rules() -> None:
    rule = one_rule(
        ccnp(
            """
            endpointSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: "80"}]
                rules:
                  http:
                  - {method: GET, path: "/v1/.*", host: "api\\\\.example\\\\.com"}
                  - headers: ["X-Trace", "X-Env:  prod "]
                    headerMatches:
                    - {name: X-Token, value: abc, mismatch: ""}
                    - {name: X-Mode, value: safe, mismatch: replace}
                  - {}
            """
        )
    )
    assert rule.ingress is not None
    (port_rule,) = rule.ingress[0].to_ports
    assert port_rule.ports == (PortProtocol(80, 0, Protocol.TCP),)  # ANY with L7 -> TCP
    assert port_rule.rules == L7Rules(
        http=(
            HTTPRule(method="GET", path="/v1/.*", host="api\\.example\\.com"),
            HTTPRule(
                headers=("X-Trace", "X-Env: prod"),
                header_matches=(
                    HeaderMatch("X-Token", "abc", None),
                    HeaderMatch("X-Mode", "safe", MismatchAction.REPLACE),
                ),
            ),
            HTTPRule(),
        )
    )


def test_kafka_rules() -> None:
    rule = one_rule(
        ccnp(
            """
            endpointSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: 9092, protocol: TCP}]
                rules:
                  kafka:
                  - {role: Produce, topic: orders}
                  - {apiKey: Metadata, apiVersion: "9", clientID: app-1}
                  - {apiKey: 1, apiVersion: 12}
            """
        )
    )
    assert rule.ingress is not None
    assert rule.ingress[0].to_ports[0].rules == L7Rules(
        kafka=(
            KafkaRule(role=KafkaRole.PRODUCE, topic="orders"),
            KafkaRule(api_key=3, api_version=9, client_id="app-1"),
            KafkaRule(api_key=1, api_version=12),
        )
    )


def test_grpc_rules() -> None:
    rule = one_rule(
        ccnp(
            """
            endpointSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: 50051}]
                rules:
                  grpc:
                  - {service: routeguide.RouteGuide, method: GetFeature}
                  - {service: grpc.health.v1.Health}
            """
        )
    )
    assert rule.ingress is not None
    assert rule.ingress[0].to_ports[0].rules == L7Rules(
        grpc=(
            GRPCRule("routeguide.RouteGuide", "GetFeature"),
            GRPCRule("grpc.health.v1.Health", None),
        )
    )


def test_same_l7_type_on_one_port_in_two_elements_and_other_directions_are_fine() -> None:
    rule = one_rule(
        ccnp(
            """
            endpointSelector: {}
            ingress:
            - toPorts: [{ports: [{port: 80}], rules: {http: [{method: GET}]}}]
            - toPorts: [{ports: [{port: 80}], rules: {http: [{method: PUT}]}}]
            egress:
            - toPorts: [{ports: [{port: 80}], rules: {kafka: [{}]}}]
            """
        )
    )
    assert rule.ingress is not None and len(rule.ingress) == 2


# --- unsupported Cilium fields ----------------------------------------------------------------


def test_unsupported_allow_fields_warn_and_fail_closed() -> None:
    result = load(
        ccnp(
            """
            endpointSelector: {}
            egress:
            - toFQDNs: [{matchName: example.com}]
              toPorts: [{ports: [{port: 443}]}]
            - toEndpoints: [{}]
              toPorts:
              - ports: [{port: 53, protocol: UDP}]
                rules: {dns: [{matchPattern: "*"}]}
            - toPorts:
              - ports: [{port: 443}]
                serverNames: [example.com]
            - toEndpoints: [{}]
              authentication: {mode: required}
            """
        )
    )
    (rule,) = result.policies[0].rules
    assert rule.egress is not None
    assert [s.peers for s in rule.egress] == [(), (), (), ()]
    assert [str(w) for w in result.warnings] == [
        "m.yaml:7: warning: spec.egress[0].toFQDNs: not supported by garrison; "
        "this element allows nothing",
        "m.yaml:12: warning: spec.egress[1].toPorts[0].rules.dns: not supported by garrison; "
        "this element allows nothing",
        "m.yaml:15: warning: spec.egress[2].toPorts[0].serverNames: not supported by garrison; "
        "this element allows nothing",
        "m.yaml:17: warning: spec.egress[3].authentication: not supported by garrison; "
        "this element allows nothing",
    ]


def test_field_written_in_another_case_is_accepted_with_a_warning() -> None:
    result = load(
        ccnp(
            """
            endpointSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules:
                  HTTP: [{method: GET}]
            """
        )
    )
    (rule,) = result.policies[0].rules
    assert rule.ingress is not None
    assert rule.ingress[0].to_ports[0].rules == L7Rules(http=(HTTPRule(method="GET"),))
    assert [str(w) for w in result.warnings] == [
        "m.yaml:10: warning: spec.ingress[0].toPorts[0].rules.HTTP: field should be written 'http'"
    ]


# --- rule-level fields, refs, sources ---------------------------------------------------------


def test_default_deny_switches_description_and_labels() -> None:
    (policy,) = load(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        description: from the top
        metadata:
          name: p
          labels: {team: a, tier: 1}
          annotations: {note: x}
          resourceVersion: "42"
        specs:
        - endpointSelector: {}
          enableDefaultDeny: {ingress: false}
          ingress: [{fromEntities: [cluster]}]
          labels: [{key: owner, value: a, source: k8s}]
        - endpointSelector: {}
          description: its own
          enableDefaultDeny: {egress: false, ingress: true}
        status: {conditions: []}
        """
    ).policies
    first, second = policy.rules
    assert (first.default_deny_ingress, first.default_deny_egress) == (False, True)
    assert (second.default_deny_ingress, second.default_deny_egress) == (True, False)
    assert (first.description, second.description) == ("from the top", "its own")
    assert policy.labels == (("team", "a"), ("tier", "1"))


def test_rule_refs_name_the_spec_and_section() -> None:
    (policy,) = load(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: p, namespace: web}
        spec:
          endpointSelector: {}
          ingress: [{}, {fromEntities: [world]}]
        specs:
        - endpointSelector: {}
        - endpointSelector: {}
          egressDeny: [{toEntities: [world]}]
        """
    ).policies
    assert len(policy.rules) == 3
    ingress = policy.rules[0].ingress
    assert ingress is not None
    assert ingress[1].ref == RuleRef(PolicyKind.CNP, "web", "p", "ingress", 0, 1, False)
    assert str(ingress[1].ref) == "CiliumNetworkPolicy web/p ingress[1]"
    deny = policy.rules[2].egress_deny
    assert deny is not None
    assert deny[0].ref == RuleRef(PolicyKind.CNP, "web", "p", "egressDeny", 1, 0, True)
    assert str(deny[0].ref) == "CiliumNetworkPolicy web/p specs[1].egressDeny[0]"


def test_multi_document_sources_and_list_items() -> None:
    result = load(
        """
        # leading comment
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: a}
        spec: {endpointSelector: {}}
        ---
        ---
        apiVersion: v1
        kind: List
        items:
        - apiVersion: networking.k8s.io/v1
          kind: NetworkPolicy
          metadata: {name: b}
          spec: {podSelector: {}}
        ---
        kind: CiliumNetworkPolicyList
        apiVersion: cilium.io/v2
        metadata: {resourceVersion: "1"}
        items:
        - metadata: {name: c, namespace: x}
          spec: {endpointSelector: {}}
        """
    )
    assert [(p.kind, p.name, p.source) for p in result.policies] == [
        (PolicyKind.CNP, "a", Source("m.yaml", 0, 3)),
        (PolicyKind.KNP, "b", Source("m.yaml", 2, 12)),
        (PolicyKind.CNP, "c", Source("m.yaml", 3, 21)),
    ]
    assert result.files == ("m.yaml",)


def test_empty_text_loads_nothing() -> None:
    assert load("# nothing here\n---\n").policies == ()


# --- NetworkPolicy ----------------------------------------------------------------------------


def test_knp_empty_rule_allows_everything_and_missing_rules_deny() -> None:
    (policy,) = load(knp("podSelector: {}\npolicyTypes: [Ingress, Egress]\ningress: [{}]")).policies
    (rule,) = policy.rules
    assert rule.ingress is not None
    assert rule.ingress[0].peers is None and rule.ingress[0].to_ports == ()
    assert rule.egress == ()
    assert rule.endpoint_selector == EndpointSelector.of([ns_in("prod")])
    assert rule.ingress[0].ref == RuleRef(PolicyKind.KNP, "prod", "np", "ingress", 0, 0, False)


@pytest.mark.parametrize(
    ("spec", "ingress", "egress"),
    [
        ("podSelector: {}", (), None),
        # Kubernetes adds Egress only for an `egress` list with a rule (len(egress) != 0)
        ("podSelector: {}\negress: []", (), None),
        ("podSelector: {}\negress: [{}]", (), "one"),
        # an empty policyTypes list is defaulted as an absent one
        ("podSelector: {}\npolicyTypes: []", (), None),
        ("podSelector: {}\npolicyTypes: [Egress]", None, ()),
    ],
)
def test_knp_policy_types_default(spec: str, ingress: object, egress: object) -> None:
    rule = one_rule(knp(spec))
    got_egress = "one" if rule.egress is not None and len(rule.egress) == 1 else rule.egress
    assert (rule.ingress, got_egress) == (ingress, egress)


def test_knp_rules_outside_policy_types_are_ignored_with_a_warning() -> None:
    result = load(knp("podSelector: {}\npolicyTypes: [Egress]\ningress: [{}]"))
    assert result.policies[0].rules[0].ingress is None
    assert [str(w) for w in result.warnings] == [
        "m.yaml:7: warning: spec.ingress: ignored: policyTypes does not include Ingress"
    ]


def test_knp_peers() -> None:
    rule = one_rule(
        knp(
            """
            podSelector: {matchLabels: {app: db}}
            ingress:
            - from:
              - podSelector: {matchLabels: {role: api}}
              - namespaceSelector: {}
              - namespaceSelector:
                  matchLabels: {kubernetes.io/metadata.name: monitoring, team: ops}
              - namespaceSelector: {matchExpressions: [{key: env, operator: NotIn, values: [dev]}]}
                podSelector: {matchLabels: {role: client}}
              - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}
              ports:
              - {port: 5432}
              - {port: 8000, endPort: 8100, protocol: UDP}
            """
        )
    )
    k8s = "k8s"
    exists = Requirement(NAMESPACE_KEY, Operator.EXISTS, (), k8s)
    assert rule.endpoint_selector == EndpointSelector.of([label("app", "db", k8s), ns_in("prod")])
    assert rule.ingress is not None
    (section,) = rule.ingress
    assert section.peers == (
        EndpointPeer(EndpointSelector.of([label("role", "api", k8s), ns_in("prod")])),
        EndpointPeer(EndpointSelector.of([exists])),
        EndpointPeer(
            EndpointSelector.of(
                [
                    exists,
                    ns_in("monitoring"),
                    label("io.cilium.k8s.namespace.labels.team", "ops", k8s),
                ]
            )
        ),
        EndpointPeer(
            EndpointSelector.of(
                [
                    exists,
                    Requirement(
                        "io.cilium.k8s.namespace.labels.env", Operator.NOT_IN, ("dev",), k8s
                    ),
                    label("role", "client", k8s),
                ]
            )
        ),
        CIDRPeer(ipaddress.ip_network("172.17.0.0/16"), (ipaddress.ip_network("172.17.1.0/24"),)),
    )
    assert section.to_ports == (
        PortRule(
            ports=(PortProtocol(5432, 0, Protocol.TCP), PortProtocol(8000, 8100, Protocol.UDP))
        ),
    )


def test_knp_many_ports_are_split_into_rules_of_at_most_40() -> None:
    ports = ", ".join(f"{{port: {p}}}" for p in range(1, 46))
    rule = one_rule(knp(f"podSelector: {{}}\ningress: [{{ports: [{ports}]}}]"))
    assert rule.ingress is not None
    assert [len(r.ports) for r in rule.ingress[0].to_ports] == [40, 5]


def test_policy_equality_is_by_value() -> None:
    text = cnp("endpointSelector: {}\ningress: [{fromEntities: [world]}]")
    first: Policy = load(text).policies[0]
    assert first == load(text).policies[0]
