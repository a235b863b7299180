"""Every validation error, rendered exactly, at the line of the offending field.

Each case marks the line the error must point at with `# <-`; the expected rendering is
`test.yaml:<that line>: <field path>: <reason>`, and it must be the only error.
"""

from __future__ import annotations

import textwrap

import pytest

from garrison.policies.errors import PolicyIssue, PolicyValidationError
from garrison.policies.loader import load_text

MARK = "# <-"

CNP_HEAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
spec:
"""


def cnp(spec: str, *, selector: bool = True) -> str:
    """A CiliumNetworkPolicy whose `spec` holds `spec` (and `endpointSelector: {}`)."""
    body = textwrap.dedent(spec).strip("\n") + "\n"
    if selector:
        body = "endpointSelector: {}\n" + body
    return CNP_HEAD + textwrap.indent(body, "  ")


def doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def knp(spec: str) -> str:
    head = doc(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: np
        spec:
        """
    )
    return head + textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")


def marked_line(text: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if MARK in line]
    assert len(lines) == 1, "a case marks exactly one line"
    return lines[0]


def load_issues(text: str) -> tuple[PolicyIssue, ...]:
    with pytest.raises(PolicyValidationError) as info:
        load_text(text, "test.yaml")
    return info.value.issues


CASES = [
    # --- documents, kinds, metadata -------------------------------------------------------
    pytest.param(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: [p}  # <-\n",
        "YAML syntax error: expected ',' or ']', but got '}' (while parsing a flow sequence)",
        id="yaml-syntax",
    ),
    pytest.param(
        cnp("""
            ingress: []
            ingress: []  # <-
            """),
        "spec.ingress: duplicate key 'ingress' (first at line 7)",
        id="duplicate-key",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v1  # <-
            kind: CiliumNetworkPolicy
            metadata: {name: p}
            spec: {endpointSelector: {}}
            """),
        "apiVersion: apiVersion 'cilium.io/v1' does not match kind CiliumNetworkPolicy "
        "(expected cilium.io/v2)",
        id="wrong-api-version",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2  # <-
            kind: NetworkPolicy
            metadata: {name: p}
            spec: {podSelector: {}}
            """),
        "apiVersion: apiVersion 'cilium.io/v2' does not match kind NetworkPolicy "
        "(expected networking.k8s.io/v1)",
        id="wrong-api-version-for-networkpolicy",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicies  # <-
            metadata: {name: p}
            """),
        "kind: unknown kind 'CiliumNetworkPolicies' (expected one of: "
        "CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, ClusterNetworkPolicy, List, "
        "NetworkPolicy)",
        id="unknown-kind",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2  # <-
            metadata: {name: p}
            """),
        "kind: missing required field",
        id="missing-kind",
    ),
    pytest.param(
        doc("""
            - endpointSelector: {}  # <-
              ingress: []
            """),
        "a policy document must be a mapping, not a list",
        id="bare-rule-list",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata:  # <-
              namespace: default
            spec: {endpointSelector: {}}
            """),
        "metadata.name: missing required field",
        id="missing-name",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata:
              name: Rule_1  # <-
            spec: {endpointSelector: {}}
            """),
        "metadata.name: invalid name 'Rule_1' (lower-case letters, digits, '-' and '.', "
        "starting and ending with a letter or digit, at most 253 characters)",
        id="invalid-name",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata:
              name: p
              namespace: team.a  # <-
            spec: {endpointSelector: {}}
            """),
        "metadata.namespace: invalid namespace 'team.a' (lower-case letters, digits and '-', "
        "starting and ending with a letter or digit, at most 63 characters)",
        id="invalid-namespace",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: p}
            specification: {}  # <-
            spec: {endpointSelector: {}}
            """),
        "specification: unknown field 'specification' (expected one of: apiVersion, "
        "description, kind, metadata, spec, specs, status)",
        id="unknown-top-level-field",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2  # <-
            kind: CiliumNetworkPolicy
            metadata: {name: p}
            """),
        "spec: missing required field",
        id="missing-spec",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: p}
            specs: []  # <-
            """),
        "specs: a policy needs at least one rule",
        id="empty-specs",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumClusterwideNetworkPolicy
            metadata: {name: host-fw}
            spec:
              nodeSelector: {}  # <-
              ingress: [{fromEntities: [world]}]
            """),
        "spec.nodeSelector: not supported by garrison (host policies)",
        id="node-selector",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: p}
            spec:  # <-
              ingress: []
            """),
        "spec.endpointSelector: missing required field",
        id="missing-endpoint-selector",
    ),
    pytest.param(
        cnp("""
            ingres: []  # <-
            """),
        "spec.ingres: unknown field 'ingres' (expected one of: description, egress, egressDeny, "
        "enableDefaultDeny, endpointSelector, ingress, ingressDeny, labels)",
        id="unknown-spec-field",
    ),
    pytest.param(
        cnp("""
            ingress:  # <-
            """),
        "spec.ingress: expected a list, got nothing (null) (write [] for an empty list)",
        id="null-list",
    ),
    pytest.param(
        cnp("""
            enableDefaultDeny:
              ingress: "false"  # <-
            """),
        "spec.enableDefaultDeny.ingress: expected true or false, got a string",
        id="default-deny-not-bool",
    ),
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: &meta {name: p}
            spec:
              endpointSelector: {}
              <<: *meta  # <-
            """),
        "spec.<<: YAML merge keys are not supported",
        id="merge-key",
    ),
    # --- selectors ---------------------------------------------------------------------------
    pytest.param(
        cnp(
            """
            endpointSelector:
              matchLabels:
                app:  # <-
            """,
            selector=False,
        ),
        "spec.endpointSelector.matchLabels.app: expected a string, got nothing (null)",
        id="label-value-null",
    ),
    pytest.param(
        cnp(
            """
            endpointSelector:
              matchLabel: {app: x}  # <-
            """,
            selector=False,
        ),
        "spec.endpointSelector.matchLabel: unknown field 'matchLabel' "
        "(expected one of: matchExpressions, matchLabels)",
        id="selector-unknown-field",
    ),
    pytest.param(
        cnp(
            """
            endpointSelector:
              matchExpressions:
              - key: app
                operator: Equals  # <-
                values: [x]
            """,
            selector=False,
        ),
        "spec.endpointSelector.matchExpressions[0].operator: unknown operator 'Equals' "
        "(expected one of: In, NotIn, Exists, DoesNotExist)",
        id="unknown-operator",
    ),
    pytest.param(
        cnp(
            """
            endpointSelector:
              matchExpressions:
              - key: app
                operator: In
                values: []  # <-
            """,
            selector=False,
        ),
        "spec.endpointSelector.matchExpressions[0].values: operator In needs at least one value",
        id="in-without-values",
    ),
    pytest.param(
        cnp(
            """
            endpointSelector:
              matchExpressions:
              - key: app  # <-
                operator: NotIn
            """,
            selector=False,
        ),
        "spec.endpointSelector.matchExpressions[0].values: operator NotIn needs at least one value",
        id="notin-values-absent",
    ),
    pytest.param(
        cnp(
            """
            endpointSelector:
              matchExpressions:
              - key: app
                operator: Exists
                values: [x]  # <-
            """,
            selector=False,
        ),
        "spec.endpointSelector.matchExpressions[0].values: operator Exists takes no values",
        id="exists-with-values",
    ),
    # --- peers -------------------------------------------------------------------------------
    pytest.param(
        cnp("""
            ingress:
            - fromEndpoints: [{}]
              fromCIDR: [10.0.0.0/8]  # <-
            """),
        "spec.ingress[0].fromCIDR: one peer kind per rule element: fromEndpoints, fromCIDR",
        id="two-peer-kinds",
    ),
    pytest.param(
        cnp("""
            egress:
            - toEntities:
              - world
              - internet  # <-
            """),
        "spec.egress[0].toEntities[1]: unknown entity 'internet' (expected one of: all, world, "
        "cluster, host, remote-node, health, init, unmanaged, none, kube-apiserver, ingress, "
        "world-ipv4, world-ipv6)",
        id="unknown-entity",
    ),
    pytest.param(
        cnp("""
            egress:
            - toCIDR:
              - 10.0.0.0/33  # <-
            """),
        "spec.egress[0].toCIDR[0]: invalid CIDR '10.0.0.0/33'",
        id="invalid-cidr",
    ),
    pytest.param(
        cnp("""
            ingress:
            - fromCIDR: [10.1.2.3/16]  # <-
            """),
        "spec.ingress[0].fromCIDR[0]: CIDR '10.1.2.3/16' has host bits set "
        "(did you mean 10.1.0.0/16?)",
        id="cidr-host-bits",
    ),
    pytest.param(
        cnp("""
            egress:
            - toCIDRSet:
              - cidr: 10.0.0.0/8
                except:
                - 10.96.0.0/12
                - 192.168.0.0/16  # <-
            """),
        "spec.egress[0].toCIDRSet[0].except[1]: except 192.168.0.0/16 is not inside 10.0.0.0/8",
        id="except-outside-cidr",
    ),
    pytest.param(
        cnp("""
            egress:
            - toCIDRSet:
              - cidrGroupRef: office  # <-
            """),
        "spec.egress[0].toCIDRSet[0].cidrGroupRef: not supported by garrison",
        id="cidr-group-ref",
    ),
    pytest.param(
        cnp("""
            egressDeny:
            - toFQDNs:  # <-
              - matchName: example.com
            """),
        "spec.egressDeny[0].toFQDNs: not supported by garrison; garrison cannot enforce this "
        "deny rule",
        id="unsupported-field-in-deny",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toEndpoints: [{}]  # <-
            """),
        "spec.ingress[0].toEndpoints: unknown field 'toEndpoints' (expected one of: "
        "fromCIDR, fromCIDRSet, fromEndpoints, fromEntities, icmps, toPorts)",
        id="egress-peer-in-ingress",
    ),
    pytest.param(
        cnp("""
            egress:
            - toPorts: [{ports: [{port: 53}]}]
              icmps:  # <-
              - fields: [{type: 8}]
            """),
        "spec.egress[0].icmps: icmps and toPorts cannot be combined in one rule element",
        id="icmps-with-toports",
    ),
    pytest.param(
        cnp("""
            egress:
            - icmps:
              - fields:
                - type: EchoRequest
                - type: Pong  # <-
            """),
        "spec.egress[0].icmps[0].fields[1].type: unknown IPv4 ICMP type 'Pong' (a number 0-255 "
        "or one of: EchoReply, DestinationUnreachable, Redirect, Echo, EchoRequest, "
        "RouterAdvertisement, RouterSelection, TimeExceeded, ParameterProblem, Timestamp, "
        "TimestampReply, Photuris, ExtendedEchoRequest, ExtendedEchoReply)",
        id="icmp-unknown-type",
    ),
    pytest.param(
        cnp("""
            egress:
            - icmps:
              - fields:
                - type: 256  # <-
            """),
        "spec.egress[0].icmps[0].fields[0].type: ICMP type 256 out of range 0-255",
        id="icmp-type-range",
    ),
    pytest.param(
        cnp("""
            egress:
            - icmps:
              - fields:
                - type: 8
                  family: IPv5  # <-
            """),
        "spec.egress[0].icmps[0].fields[0].family: unknown family 'IPv5' "
        "(expected one of: IPv4, IPv6)",
        id="icmp-family",
    ),
    # --- ports -------------------------------------------------------------------------------
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: Http  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].port: invalid port 'Http': neither a number "
        "0-65535 nor a port name (a port name has only lower-case letters, digits and '-')",
        id="named-port-upper-case",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: serve-80-tcp-and-more  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].port: invalid port 'serve-80-tcp-and-more': "
        "neither a number 0-65535 nor a port name (a port name has 1-15 characters)",
        id="named-port-too-long",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: 80-90  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].port: invalid port '80-90': neither a number "
        "0-65535 nor a port name (a port name has at least one letter)",
        id="named-port-no-letter",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: web--api  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].port: invalid port 'web--api': neither a number "
        "0-65535 nor a port name (a port name has no '--')",
        id="named-port-double-dash",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: -web  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].port: invalid port '-web': neither a number "
        "0-65535 nor a port name (a port name neither starts nor ends with '-')",
        id="named-port-leading-dash",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: web
                  endPort: 90  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].endPort: endPort needs a numeric port, not the "
        "named port 'web'",
        id="named-port-range",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: "65536"  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].port: port 65536 out of range 0-65535",
        id="port-out-of-range",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: 8080
                  endPort: 8000  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].endPort: endPort 8000 is below port 8080",
        id="end-port-below-port",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - endPort: 8000  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].endPort: endPort needs a non-zero port",
        id="end-port-without-port",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: 80
                  protocol: ICMP  # <-
            """),
        "spec.ingress[0].toPorts[0].ports[0].protocol: unknown protocol 'ICMP' "
        "(expected one of: TCP, UDP, SCTP, ANY)",
        id="unknown-protocol",
    ),
    pytest.param(
        cnp(
            "ingress:\n- toPorts:\n  - ports:  # <-\n"
            + "".join(f"    - port: {1000 + i}\n" for i in range(41))
        ),
        "spec.ingress[0].toPorts[0].ports: at most 40 ports per rule (got 41)",
        id="too-many-ports",
    ),
    # --- L7 ----------------------------------------------------------------------------------
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules:
                  http: [{}]
                  kafka: [{}]  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.kafka: one L7 type per port: http, kafka",
        id="two-l7-types",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 9092, protocol: TCP}]
                rules:
                  http: [{}]
            - fromEndpoints: [{}]
              toPorts:
              - ports: [{port: 9092}]
                rules:
                  kafka: [{role: consume}]  # <-
            """),
        "spec.ingress[1].toPorts[0].rules.kafka: port 9092/TCP has http rules at line 11; "
        "one L7 type per port",
        id="same-port-two-l7-types",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: 0  # <-
                rules:
                  http: [{}]
            """),
        "spec.ingress[0].toPorts[0].ports[0].port: L7 rules need a specific TCP port "
        "(port 0 means any port)",
        id="l7-port-zero",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - protocol: TCP  # <-
                rules:
                  http: [{}]
            """),
        "spec.ingress[0].toPorts[0].ports[0]: L7 rules need a specific TCP port",
        id="l7-port-absent",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - rules:  # <-
                  http: [{}]
            """),
        "spec.ingress[0].toPorts[0]: L7 rules need a specific TCP port",
        id="l7-no-ports",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: 8000
                  endPort: 8080  # <-
                rules:
                  http: [{}]
            """),
        "spec.ingress[0].toPorts[0].ports[0].endPort: L7 rules on a port range are not supported",
        id="l7-port-range",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports:
                - port: 53
                  protocol: UDP  # <-
                rules:
                  kafka: [{}]
            """),
        "spec.ingress[0].toPorts[0].ports[0].protocol: L7 rules need protocol TCP, not UDP",
        id="l7-udp",
    ),
    pytest.param(
        cnp("""
            ingressDeny:
            - toPorts:
              - ports: [{port: 80}]
                rules:  # <-
                  http: [{method: GET}]
            """),
        "spec.ingressDeny[0].toPorts[0].rules: L7 rules are not allowed in deny sections "
        "(a garrison extension: write apiVersion: garrison.io/v1 to use it)",
        id="l7-in-deny",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: "53", protocol: UDP}]
                rules:
                  dns: [{matchPattern: "*"}]  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.dns: DNS rules are not allowed on ingress (as in "
        "Cilium): they belong in an egress section",
        id="dns-on-ingress",
    ),
    pytest.param(
        cnp("""
            egressDeny:
            - toPorts:
              - ports: [{port: 443}]
                serverNames: [example.com]  # <-
            """),
        "spec.egressDeny[0].toPorts[0].serverNames: not supported by garrison; garrison cannot "
        "enforce this deny rule",
        id="server-names-in-deny",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules: {}  # <-
            """),
        "spec.ingress[0].toPorts[0].rules: rules need one of: http, kafka, grpc",
        id="empty-rules",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules:
                  http: []  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.http: needs at least one rule "
        "(write [{}] to allow all http)",
        id="empty-http-list",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules:
                  http:
                  - method: GET
                    path: "/v1/(unclosed"  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.http[0].path: invalid regular expression: "
        "missing ): /v1/(unclosed",
        id="http-bad-regex",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules:
                  http:
                  - headerMatches:
                    - name: X-Token
                      secret: {name: token}  # <-
                      value: abc
            """),
        "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].secret: "
        "not supported by garrison",
        id="header-match-secret",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules:
                  http:
                  - headerMatches:
                    - name: X-Token
                      value: abc
                      mismatch: DROP  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch: unknown mismatch "
        "action 'DROP' (expected \"\" or one of: LOG, ADD, DELETE, REPLACE)",
        id="header-match-mismatch",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules:
                  http:
                  - headers:
                    - "Bad Header: x"  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.http[0].headers[0]: invalid header 'Bad Header: x' "
        "(expected 'Name' or 'Name: value')",
        id="http-bad-header",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 80}]
                rules:
                  http:
                  - url: /x  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.http[0].url: unknown field 'url' "
        "(expected one of: headerMatches, headers, host, method, path)",
        id="http-unknown-field",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 9092}]
                rules:
                  kafka:
                  - role: produce
                    apiKey: produce  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.kafka[0].apiKey: role and apiKey cannot be combined "
        "in one Kafka rule",
        id="kafka-role-and-api-key",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 9092}]
                rules:
                  kafka:
                  - apiKey: publish  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.kafka[0].apiKey: unknown Kafka apiKey 'publish' "
        "(a name such as produce, fetch, metadata, apiversions, or a number 0-32767)",
        id="kafka-unknown-api-key",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 9092}]
                rules:
                  kafka:
                  - role: admin  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.kafka[0].role: unknown Kafka role 'admin' "
        "(expected produce or consume)",
        id="kafka-unknown-role",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 9092}]
                rules:
                  kafka:
                  - topic: "orders/eu"  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.kafka[0].topic: invalid Kafka topic 'orders/eu' "
        "(1-255 characters of a-z A-Z 0-9 . _ -)",
        id="kafka-bad-topic",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 9092}]
                rules:
                  kafka:
                  - apiVersion: -1  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion: invalid Kafka apiVersion -1 "
        "(expected a number >= 0)",
        id="kafka-negative-api-version",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 50051}]
                rules:
                  grpc:
                  - method: GetFeature  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.grpc[0].service: missing required field",
        id="grpc-missing-service",
    ),
    pytest.param(
        cnp("""
            ingress:
            - toPorts:
              - ports: [{port: 50051}]
                rules:
                  grpc:
                  - service: RouteGuide  # <-
            """),
        "spec.ingress[0].toPorts[0].rules.grpc[0].service: invalid gRPC service 'RouteGuide' "
        "(expected package.Service)",
        id="grpc-service-form",
    ),
    # --- specs paths ---------------------------------------------------------------------------
    pytest.param(
        doc("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: p}
            specs:
            - endpointSelector: {}
            - endpointSelector: {}
              egress:
              - toCIDRSet:
                - cidr: 10.0.0.0/8
                  except: [11.0.0.0/8]  # <-
            """),
        "specs[1].egress[0].toCIDRSet[0].except[0]: except 11.0.0.0/8 is not inside 10.0.0.0/8",
        id="specs-field-path",
    ),
    # --- NetworkPolicy -----------------------------------------------------------------------
    pytest.param(
        doc("""
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: np}
            spec:  # <-
              policyTypes: [Ingress]
            """),
        "spec.podSelector: missing required field",
        id="knp-missing-pod-selector",
    ),
    pytest.param(
        knp("""
            podSelector: {}
            policyTypes:
            - ingress  # <-
            """),
        "spec.policyTypes[0]: unknown policy type 'ingress' (expected Ingress or Egress)",
        id="knp-policy-type",
    ),
    pytest.param(
        knp("""
            podSelector: {}
            ingress:
            - from:
              - podSelector: {}
                ipBlock: {cidr: 10.0.0.0/8}  # <-
            """),
        "spec.ingress[0].from[0].ipBlock: ipBlock cannot be combined with podSelector or "
        "namespaceSelector",
        id="knp-ipblock-combined",
    ),
    pytest.param(
        knp("""
            podSelector: {}
            ingress:
            - from:
              - {}  # <-
            """),
        "spec.ingress[0].from[0]: a peer needs podSelector, namespaceSelector or ipBlock",
        id="knp-empty-peer",
    ),
    pytest.param(
        knp("""
            podSelector: {}
            ingress:
            - ports:
              - port: Metrics_1  # <-
            """),
        "spec.ingress[0].ports[0].port: invalid port 'Metrics_1': neither a number 0-65535 "
        "nor a port name (a port name has only lower-case letters, digits and '-')",
        id="knp-named-port",
    ),
    pytest.param(
        knp("""
            podSelector: {}
            ingress:
            - ports:
              - port: 80
                protocol: ANY  # <-
            """),
        "spec.ingress[0].ports[0].protocol: unknown protocol 'ANY' "
        "(expected one of: TCP, UDP, SCTP)",
        id="knp-protocol-any",
    ),
    pytest.param(
        knp("""
            podSelector: {}
            ingress:
            - fromEndpoints: [{}]  # <-
            """),
        "spec.ingress[0].fromEndpoints: unknown field 'fromEndpoints' "
        "(expected one of: from, ports)",
        id="knp-unknown-field",
    ),
    pytest.param(
        knp("""
            podSelector:
              matchLabels:
                k8s:app: web  # <-
            """),
        "spec.podSelector.matchLabels.k8s:app: invalid label key 'k8s:app' "
        "(Kubernetes keys have no source)",
        id="knp-source-prefix",
    ),
    # --- List --------------------------------------------------------------------------------
    pytest.param(
        doc("""
            apiVersion: v1
            kind: List
            items:
            - apiVersion: networking.k8s.io/v1
              kind: NetworkPolicy
              metadata: {name: a}
              spec:
                podSelector: {}
                egress:
                - to:
                  - ipBlock: {cidr: 10.0.0.0/40}  # <-
            """),
        "items[0].spec.egress[0].to[0].ipBlock.cidr: invalid CIDR '10.0.0.0/40'",
        id="list-item-path",
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_error_is_reported_at_the_offending_line(text: str, expected: str) -> None:
    line = marked_line(text)
    rendered = [str(issue) for issue in load_issues(text)]
    assert rendered == [f"test.yaml:{line}: {expected}"]


def test_every_error_of_a_file_is_reported() -> None:
    text = cnp("""
        ingress:
        - fromEntities: [internet]
          toPorts:
          - ports:
            - port: HTTP
        egress:
        - toCIDR: [10.0.0.1/8]
        """)
    rendered = [str(issue) for issue in load_issues(text)]
    assert rendered == [
        "test.yaml:8: spec.ingress[0].fromEntities[0]: unknown entity 'internet' (expected one "
        "of: all, world, cluster, host, remote-node, health, init, unmanaged, none, "
        "kube-apiserver, ingress, world-ipv4, world-ipv6)",
        "test.yaml:11: spec.ingress[0].toPorts[0].ports[0].port: invalid port 'HTTP': neither a "
        "number 0-65535 nor a port name (a port name has only lower-case letters, digits and "
        "'-')",
        "test.yaml:13: spec.egress[0].toCIDR[0]: CIDR '10.0.0.1/8' has host bits set "
        "(did you mean 10.0.0.0/8?)",
    ]


def test_errors_of_every_document_are_reported_with_their_document_index() -> None:
    text = doc("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: a}
        spec: {endpointSelector: {}, ingress: [{fromEntities: [nobody]}]}
        ---
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: b}
        spec: {endpointSelector: {}, egress: [{toPorts: [{ports: [{port: WEB}]}]}]}
        """)
    issues = load_issues(text)
    assert [(i.line, i.document, i.field) for i in issues] == [
        (4, 0, "spec.ingress[0].fromEntities[0]"),
        (10, 2, "spec.egress[0].toPorts[0].ports[0].port"),
    ]


def test_duplicate_policy_in_one_file() -> None:
    text = doc("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: p, namespace: web}
        spec: {endpointSelector: {}}
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          namespace: web
          name: p
        spec: {endpointSelector: {}}
        """)
    assert [str(i) for i in load_issues(text)] == [
        "test.yaml:10: metadata.name: duplicate policy CiliumNetworkPolicy web/p "
        "(also defined at test.yaml:3)"
    ]


def test_same_name_in_other_namespace_or_kind_is_no_duplicate() -> None:
    text = doc("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: p, namespace: a}
        spec: {endpointSelector: {}}
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: p, namespace: b}
        spec: {endpointSelector: {}}
        ---
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: p}
        spec: {endpointSelector: {}}
        """)
    assert len(load_text(text).policies) == 3


def test_recursive_alias_is_an_error_not_a_hang() -> None:
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: &m {name: p, x: *m}\n"
    rendered = [str(i) for i in load_issues(text)]
    assert rendered == ["test.yaml:1: a YAML alias refers to a node that contains it"]


def test_alias_expansion_is_bounded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]" for i in range(1, 7)]
    rendered = [str(i) for i in load_issues("\n".join(lines) + "\n")]
    assert rendered == [
        "test.yaml:1: the document expands to more than 200000 YAML nodes (alias expansion)"
    ]
