"""Kafka rule fields written empty mean what Cilium says: "if omitted or empty", the field
matches every request (`role`, `apiKey`, `apiVersion`, `clientID`, `topic`; Cilium's
`kafka.PortRule`). garrison used to refuse `topic: ""` and the empty role, apiKey and
apiVersion, and to read `clientID: ""` as "only clients that send an empty client id",
denying every real client a Cilium policy allows."""

from __future__ import annotations

import pytest

from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.trace import KafkaRequestSpec, TraceEndpoint, trace

from .helpers import policies

PRODUCE, FETCH = 0, 1


def ep(labels: str) -> TraceEndpoint:
    return TraceEndpoint(endpoint_labels(Labels.parse(labels), "default"), "default")


def policy(rule: str) -> str:
    return f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: kafka}}
        spec:
          endpointSelector: {{matchLabels: {{app: kafka}}}}
          ingress:
          - fromEndpoints: [{{matchLabels: {{app: client}}}}]
            toPorts:
            - ports: [{{port: "9092", protocol: TCP}}]
              rules:
                kafka: [{rule}]
        """


@pytest.mark.parametrize(
    ("rule", "request_", "allowed"),
    [
        ('{role: produce, clientID: ""}', KafkaRequestSpec(PRODUCE, 9, "app-1", ("t",)), True),
        ('{role: produce, topic: ""}', KafkaRequestSpec(PRODUCE, 9, "app-1", ("any",)), True),
        ('{role: produce, topic: ""}', KafkaRequestSpec(FETCH, 9, "app-1", ("any",)), False),
        ('{apiKey: "", topic: t}', KafkaRequestSpec(FETCH, 9, "app-1", ("t",)), True),
        ('{apiKey: "", topic: t}', KafkaRequestSpec(FETCH, 9, "app-1", ("u",)), False),
        ('{role: "", apiKey: fetch}', KafkaRequestSpec(FETCH, 9, "app-1", ("t",)), True),
        ('{role: "", apiKey: fetch}', KafkaRequestSpec(PRODUCE, 9, "app-1", ("t",)), False),
        ('{apiKey: fetch, apiVersion: ""}', KafkaRequestSpec(FETCH, 12, None, ("t",)), True),
        ('{apiKey: fetch, clientID: c1}', KafkaRequestSpec(FETCH, 12, "c2", ("t",)), False),
    ],
)
def test_empty_kafka_fields_match_every_request(
    rule: str, request_: KafkaRequestSpec, allowed: bool
) -> None:
    result = trace(policies(policy(rule)), ep("app=client"), ep("app=kafka"), 9092,
                   request=request_)
    assert result.allowed is allowed
    assert result.denied_at == (None if allowed else "L7")
