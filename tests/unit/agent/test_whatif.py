"""The agent's resolver with policies in audit mode (garrison.io/audit): the enforced state
ignores an audited policy; the what-if state (what the kernel's gar_policy_audit gets) has it,
exists only while an audited policy does, and follows identities added after it was built.
"""

from __future__ import annotations

import textwrap

from garrison.agent.whatif import AuditingResolver
from garrison.bpf.sync import audits
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.mapstate import PROTO_TCP, DropReason, lookup
from garrison.policies.model import Direction, Policy
from garrison.policies.resolve import PolicyResolver

SERVER, CLIENT, LATE = 1001, 1002, 1003

ENFORCED = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: in-force}
spec:
  endpointSelector: {matchLabels: {app: srv}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: cli}}]
    toPorts: [{ports: [{port: "7000", protocol: TCP}]}]
"""
CANDIDATE = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: candidate
  annotations: {garrison.io/audit: "AUDIT"}
spec:
  endpointSelector: {matchLabels: {app: srv}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: cli}}]
"""


def load(text: str, audit: bool = True) -> Policy:
    text = text.replace('"AUDIT"', '"true"' if audit else '"false"')
    return load_text(textwrap.dedent(text), "t.yaml").policies[0]


def resolver() -> AuditingResolver:
    r = AuditingResolver()
    r.add_identity(SERVER, endpoint_labels(Labels.parse("app=srv")))
    r.add_identity(CLIENT, endpoint_labels(Labels.parse("app=cli")))
    r.add_policy(load(ENFORCED))
    return r


def allowed(r: PolicyResolver, identity: int, remote: int) -> bool:
    return lookup(r.map_state(identity), Direction.INGRESS, remote, PROTO_TCP, 7000).allowed


def test_an_audited_policy_changes_only_the_what_if_state() -> None:
    r = resolver()
    assert r.what_if is None and not audits(r.what_if, SERVER)
    changed = r.add_policy(load(CANDIDATE))
    assert SERVER in changed
    assert allowed(r, SERVER, CLIENT)  # enforced: the audited deny does nothing
    assert r.what_if is not None and audits(r.what_if, SERVER)
    assert not audits(r.what_if, CLIENT)
    would = lookup(r.what_if.map_state(SERVER), Direction.INGRESS, CLIENT, PROTO_TCP, 7000)
    assert not would.allowed and would.drop_reason is DropReason.POLICY_DENY
    assert [ref.name for ref in would.refs] == ["candidate"]


def test_identities_after_the_build_reach_the_what_if_state() -> None:
    r = resolver()
    r.add_policy(load(CANDIDATE))
    changed = r.add_identity(LATE, endpoint_labels(Labels.parse("app=srv")))
    assert LATE in changed
    assert r.what_if is not None and audits(r.what_if, LATE)
    assert allowed(r, LATE, CLIENT) and not allowed(r.what_if, LATE, CLIENT)


def test_the_annotation_taken_away_enforces_and_drops_the_what_if_state() -> None:
    r = resolver()
    audited = load(CANDIDATE)
    r.add_policy(audited)
    changed = r.remove_policy(audited) | r.add_policy(load(CANDIDATE, audit=False))
    assert SERVER in changed
    assert r.what_if is None and r.audited_policies() == []
    assert not allowed(r, SERVER, CLIENT)  # enforced now
