"""ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2): what the API documents, case by
case — the tiers, priorities, rule order, Accept / Deny / Pass — on the API project's own
conformance manifests and user-story examples (kubernetes-sigs/network-policy-api,
conformance/base and site-src/user-story-examples; namespace names shortened), through
`policy trace` (the same resolver and lookup the agent and the kernel use), `policy validate`
and the loader's errors.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from garrison.cli.main import main
from garrison.policies.errors import PolicyIssue, PolicyValidationError
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.model import (
    Direction,
    EnforcementMode,
    NamedPort,
    Protocol,
    Tier,
    TierAction,
)
from garrison.policies.resolve import ResolverConfig
from garrison.policies.trace import TraceEndpoint, trace

HEAD = """\
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
"""

# conformance/base/admin_tier/standard-ingress-tcp-rules.yaml, rules in the order written
INGRESS_TCP_RULES = {
    "allow-ravenclaw": """
  - name: allow-from-ravenclaw-everything
    action: Accept
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: ravenclaw}}}]""",
    "deny-ravenclaw": """
  - name: deny-from-ravenclaw-everything
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: ravenclaw}}}]""",
    "pass-ravenclaw": """
  - name: pass-from-ravenclaw-everything
    action: Pass
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: ravenclaw}}}]""",
    "deny-slytherin-80": """
  - name: deny-from-slytherin-at-port-80
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: slytherin}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]""",
    "pass-slytherin-80": """
  - name: pass-from-slytherin-at-port-80
    action: Pass
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: slytherin}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]""",
    "allow-hufflepuff-80": """
  - name: allow-from-hufflepuff-at-port-80
    action: Accept
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: hufflepuff}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]""",
    "deny-hufflepuff": """
  - name: deny-from-hufflepuff-everything-else
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: hufflepuff}}}]""",
}
WRITTEN = list(INGRESS_TCP_RULES)


def ingress_tcp(order: list[str]) -> str:
    return HEAD + """\
metadata: {name: ingress-tcp}
spec:
  tier: Admin
  priority: 3
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: gryffindor}}}
  ingress:""" + "".join(INGRESS_TCP_RULES[name] for name in order) + "\n"


def swapped(i: int, j: int) -> list[str]:
    order = list(WRITTEN)
    order[i], order[j] = order[j], order[i]
    return order


def pod(namespace: str, app: str = "x", ports: tuple[NamedPort, ...] = ()) -> TraceEndpoint:
    return TraceEndpoint(endpoint_labels(Labels.parse(f"app={app}"), namespace), namespace,
                         ports=ports)


GRYFFINDOR = pod("gryffindor", "harry-potter")

# (case id, rule order, source namespace, port, allowed) — the conformance test's pokes:
# conformance/tests/admin-network-policy-standard-ingress-tcp-rules.go
INGRESS_TCP_CASES = [
    ("allow-first", WRITTEN, "ravenclaw", 80, True),
    ("allow-first", WRITTEN, "ravenclaw", 8080, True),
    ("allow-at-port", WRITTEN, "hufflepuff", 80, True),
    ("allow-at-port", WRITTEN, "hufflepuff", 8080, False),
    ("deny-first", swapped(0, 1), "ravenclaw", 80, False),
    ("deny-first", swapped(0, 1), "ravenclaw", 8080, False),
    ("deny-at-port", WRITTEN, "slytherin", 80, False),
    ("deny-at-port", WRITTEN, "slytherin", 8080, True),
    ("pass-first", swapped(0, 2), "ravenclaw", 80, True),
    ("pass-first", swapped(0, 2), "ravenclaw", 8080, True),
    ("pass-at-port", swapped(3, 4), "slytherin", 80, True),
    ("pass-at-port", swapped(3, 4), "slytherin", 8080, True),
]


@pytest.mark.parametrize(("order", "source", "port", "allowed"),
                         [c[1:] for c in INGRESS_TCP_CASES],
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in INGRESS_TCP_CASES])
def test_rule_order_decides_within_a_policy(
    order: list[str], source: str, port: int, allowed: bool
) -> None:
    pols = load_text(ingress_tcp(order), "cnp.yaml").policies
    result = trace(pols, pod(source), GRYFFINDOR, port)
    assert result.allowed is allowed
    ingress = result.steps[1].lookup
    assert ingress is not None
    first = next((name for name in order if source in name
                  and ("80" not in name or port == 80)), None)
    if first is None:  # no rule of the policy matches: nothing else selects, allowed
        assert ingress.decided_by == "default allow" and not ingress.passed
        return
    action = INGRESS_TCP_RULES[first].split("action: ")[1].split()[0]
    if action == "Pass":
        assert ingress.decided_by == "default allow"
        assert [r.rule_name for r in ingress.passed] == [
            INGRESS_TCP_RULES[first].split("name: ")[1].split()[0]
        ]
    else:
        assert ingress.decided_by == "Admin"
        assert ingress.entry is not None and ingress.entry.action is TierAction(action)
        [ref] = ingress.refs
        assert ref.rule_index == order.index(first)


# conformance/base/admin_tier/standard-priority-field.yaml (and the test's priority update)
def priority_policies(pass_priority: int) -> str:
    peer = ("{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "
            "slytherin}}, podSelector: {}}}")
    subject = "{namespaces: {matchLabels: {kubernetes.io/metadata.name: gryffindor}}}"
    return f"""\
{HEAD}metadata: {{name: priority-50-example}}
spec:
  tier: Admin
  priority: 50
  subject: {subject}
  ingress: [{{name: deny-all-ingress-from-slytherin, action: Deny, from: [{peer}]}}]
  egress: [{{name: deny-all-egress-to-slytherin, action: Deny, to: [{peer}]}}]
---
{HEAD}metadata: {{name: old-priority-60-new-priority-40-example}}
spec:
  tier: Admin
  priority: {pass_priority}
  subject: {subject}
  ingress: [{{name: pass-all-ingress-from-slytherin, action: Pass, from: [{peer}]}}]
  egress: [{{name: pass-all-egress-to-slytherin, action: Pass, to: [{peer}]}}]
---
{HEAD}metadata: {{name: default}}
spec:
  tier: Baseline
  priority: 10
  subject: {subject}
  ingress: [{{name: allow-all-ingress-from-slytherin, action: Accept, from: [{peer}]}}]
  egress: [{{name: allow-all-egress-to-slytherin, action: Deny, to: [{peer}]}}]
"""


@pytest.mark.parametrize(("pass_priority", "ingress", "egress", "tier"), [
    (60, False, False, "Admin"),  # the Deny of priority 50 comes first
    (40, True, False, "Baseline"),  # Pass first: no NetworkPolicy, so Baseline decides
])
def test_lower_priority_value_comes_first(
    pass_priority: int, ingress: bool, egress: bool, tier: str
) -> None:
    pols = load_text(priority_policies(pass_priority), "cnp.yaml").policies
    inbound = trace(pols, pod("slytherin"), GRYFFINDOR, 80)
    outbound = trace(pols, GRYFFINDOR, pod("slytherin"), 80)
    assert inbound.allowed is ingress
    assert outbound.allowed is egress
    assert inbound.steps[1].lookup is not None
    assert inbound.steps[1].lookup.decided_by == tier


# conformance/base/api_integration/standard-anp-np-banp.yaml: Admin, NetworkPolicy, Baseline
def integration(admin_action: str, with_np: bool = True) -> str:
    ns_peer = "{namespaces: {matchLabels: {kubernetes.io/metadata.name: slytherin}}}"
    subject = "{namespaces: {matchLabels: {kubernetes.io/metadata.name: gryffindor}}}"
    np = """\
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-gress-from-to-slytherin-to-gryffindor, namespace: gryffindor}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: slytherin}}}]}]
  egress: [{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: slytherin}}}]}]
""" if with_np else ""
    return f"""\
{HEAD}metadata: {{name: pass-example}}
spec:
  tier: Admin
  priority: 10
  subject: {subject}
  ingress: [{{action: {admin_action}, from: [{ns_peer}]}}]
  egress: [{{action: {admin_action}, to: [{ns_peer}]}}]
{np}---
{HEAD}metadata: {{name: default}}
spec:
  tier: Baseline
  priority: 10
  subject: {subject}
  ingress: [{{action: Deny, from: [{ns_peer}]}}]
  egress: [{{action: Deny, to: [{ns_peer}]}}]
"""


@pytest.mark.parametrize(("admin", "with_np", "allowed", "tier"), [
    ("Deny", True, False, "Admin"),  # the NetworkPolicy's allow cannot lift an Admin Deny
    ("Pass", True, True, "NetworkPolicy"),  # Pass: the NetworkPolicy allows, Baseline unused
    ("Pass", False, False, "Baseline"),  # no NetworkPolicy selects: Baseline's Deny
    ("Accept", False, True, "Admin"),
])
def test_tiers_admin_then_networkpolicy_then_baseline(
    admin: str, with_np: bool, allowed: bool, tier: str
) -> None:
    pols = load_text(integration(admin, with_np), "cnp.yaml").policies
    for src, dst, side in ((pod("slytherin"), GRYFFINDOR, 1), (GRYFFINDOR, pod("slytherin"), 0)):
        result = trace(pols, src, dst, 80)
        assert result.allowed is allowed
        step = result.steps[side].lookup
        assert step is not None and step.decided_by == tier


def test_admin_accept_beats_a_cilium_deny_and_default_deny() -> None:
    """An Admin Accept is final: a CiliumNetworkPolicy ingressDeny (deny wins only within
    its own tier) and the default deny a NetworkPolicy switches on do not apply."""
    text = f"""\
{HEAD}metadata: {{name: monitoring}}
spec:
  tier: Admin
  priority: 30
  subject: {{namespaces: {{}}}}
  ingress:
  - action: Accept
    name: allow-monitoring-ns-ingress
    from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: monitoring-ns}}}}}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: lockdown, namespace: shop}}
spec:
  endpointSelector: {{}}
  ingressDeny: [{{fromEntities: [all]}}]
"""
    pols = load_text(text, "cnp.yaml").policies
    assert trace(pols, pod("monitoring-ns"), pod("shop"), 9090).allowed
    denied = trace(pols, pod("other"), pod("shop"), 9090)
    assert not denied.allowed
    assert [str(r) for r in denied.denied_by] == [
        "CiliumNetworkPolicy shop/lockdown ingressDeny[0]"
    ]


def test_baseline_deny_is_overridden_by_any_networkpolicy_selecting_the_pod() -> None:
    """user-story-5.yaml (zero-trust default): Baseline denies ingress from every namespace;
    a NetworkPolicy selecting a pod in a direction replaces it there."""
    text = f"""\
{HEAD}metadata: {{name: default}}
spec:
  tier: Baseline
  priority: 10
  subject: {{namespaces: {{}}}}
  ingress:
  - action: Deny
    from: [{{namespaces: {{}}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress: [{{ports: [{{port: 80}}]}}]
"""
    pols = load_text(text, "cnp.yaml").policies
    assert not trace(pols, pod("a"), pod("shop", "db"), 5432).allowed
    assert trace(pols, pod("a"), pod("shop", "web"), 80).allowed
    assert not trace(pols, pod("a"), pod("shop", "web"), 81).allowed  # the NP's default deny
    # egress is not selected by the Baseline policy: allowed by default
    world = TraceEndpoint(Labels.parse("reserved:world"))
    assert trace(pols, pod("shop", "db"), world, 80).allowed


def test_equal_priority_ties_are_decided_deny_first() -> None:
    """Two policies of one priority, rules at the same place: the API lets the
    implementation choose; garrison takes Deny (then Pass, then Accept), whatever order."""
    def policy(name: str, action: str) -> str:
        return f"""{HEAD}metadata: {{name: {name}}}
spec:
  tier: Admin
  priority: 7
  subject: {{namespaces: {{}}}}
  ingress: [{{action: {action}, from: [{{namespaces: {{}}}}]}}]
"""
    for text in (policy("a", "Accept") + "---\n" + policy("b", "Deny"),
                 policy("a", "Deny") + "---\n" + policy("b", "Accept")):
        result = trace(load_text(text, "cnp.yaml").policies, pod("x"), pod("y"), 80)
        assert not result.allowed


def test_named_ports_ranges_and_protocols() -> None:
    text = f"""\
{HEAD}metadata: {{name: ports}}
spec:
  tier: Admin
  priority: 1
  subject: {{pods: {{podSelector: {{matchLabels: {{app: db}}}}}}}}
  ingress:
  - action: Accept
    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: api}}}}}}}}]
    protocols:
    - destinationNamedPort: pg
    - udp: {{destinationPort: {{range: {{start: 5000, end: 5010}}}}}}
    - sctp: {{}}
  - action: Deny
    from: [{{namespaces: {{}}}}]
"""
    pols = load_text(text, "cnp.yaml").policies
    db = pod("data", "db", (NamedPort("pg", 5432, Protocol.TCP),))
    api = pod("shop", "api")
    assert trace(pols, api, db, 5432).allowed
    assert not trace(pols, api, db, 5433).allowed
    assert trace(pols, api, db, 5010, Protocol.UDP).allowed
    assert not trace(pols, api, db, 5011, Protocol.UDP).allowed
    assert trace(pols, api, db, 9, Protocol.SCTP).allowed
    # the name means nothing on an endpoint that does not declare it
    assert not trace(pols, api, pod("data", "db"), 5432).allowed


def test_egress_networks_and_nodes() -> None:
    text = f"""\
{HEAD}metadata: {{name: egress}}
spec:
  tier: Admin
  priority: 1
  subject: {{namespaces: {{}}}}
  egress:
  - action: Accept
    to: [{{nodes: {{}}}}]
    protocols: [{{tcp: {{destinationPort: {{number: 10250}}}}}}]
  - action: Deny
    to: [{{networks: [0.0.0.0/0]}}]
"""
    pols = load_text(text, "cnp.yaml").policies
    world = TraceEndpoint(Labels.parse("reserved:world"))
    host = TraceEndpoint(Labels.parse("reserved:host"))
    assert not trace(pols, pod("a"), world, 443).allowed
    assert trace(pols, pod("a"), host, 10250).allowed
    assert trace(pols, pod("a"), pod("b"), 443).allowed  # endpoints: by identity, not CIDR


def test_enforcement_never_ignores_the_tiers_and_always_skips_baseline() -> None:
    text = integration("Pass", with_np=False)
    pols = load_text(text, "cnp.yaml").policies
    never = ResolverConfig(enforcement=EnforcementMode.NEVER)
    assert trace(pols, pod("slytherin"), GRYFFINDOR, 80, config=never).allowed
    always = ResolverConfig(enforcement=EnforcementMode.ALWAYS)
    result = trace(pols, pod("slytherin"), GRYFFINDOR, 80, config=always)
    assert not result.allowed
    assert result.steps[1].lookup is not None
    assert result.steps[1].lookup.decided_by == "default deny"


def test_model_of_a_loaded_policy() -> None:
    [policy] = load_text(ingress_tcp(WRITTEN), "cnp.yaml").policies
    [rule] = policy.rules
    assert policy.namespace is None and rule.tier is Tier.ADMIN and rule.priority == 3
    assert [s.action for s in rule.ingress or ()] == [
        TierAction.ACCEPT, TierAction.DENY, TierAction.PASS, TierAction.DENY, TierAction.PASS,
        TierAction.ACCEPT, TierAction.DENY,
    ]
    assert rule.egress is None
    assert not rule.enforces(Direction.INGRESS)  # no implicit isolation


# ---- validation: file, line, field and reason -------------------------------------------------

MARK = "# <-"


def issues_of(text: str) -> list[PolicyIssue]:
    with pytest.raises(PolicyValidationError) as info:
        load_text(text, "test.yaml")
    return [i for i in info.value.issues if not i.warning]


def spec(body: str) -> str:
    return HEAD + "metadata: {name: p}\nspec:\n" + textwrap.indent(textwrap.dedent(body), "  ")


VALID_SUBJECT = "subject: {namespaces: {}}\n"
ERRORS = [
    ("priority: 1\n" + VALID_SUBJECT, "spec.tier: missing required field"),
    ("tier: Middle  # <-\npriority: 1\n" + VALID_SUBJECT,
     "spec.tier: unknown tier 'Middle' (expected Admin or Baseline)"),
    ("tier: Admin\npriority: 1001  # <-\n" + VALID_SUBJECT,
     "spec.priority: priority 1001 out of range 0-1000"),
    ("tier: Admin\npriority: 1\nsubject: {namespaces: {}, pods: {podSelector: {}}}  # <-\n",
     "spec.subject: subject needs exactly one of namespaces or pods (got namespaces, pods)"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Allow  # <-\n  from: [{namespaces: {}}]\n",
     "spec.ingress[0].action: unknown action 'Allow' (expected Accept, Deny or Pass)"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Deny\n  from: []  # <-\n",
     "spec.ingress[0].from: from needs 1-25 peers (got 0)"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Deny\n  from: [{}]  # <-\n",
     "spec.ingress[0].from[0]: a peer needs exactly one of namespaces or pods"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Deny\n  from: [{networks: [10.0.0.0/8]}]  # <-\n",
     "spec.ingress[0].from[0].networks: unknown field 'networks'"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "egress:\n- action: Accept\n  to:\n  - domainNames: [example.com]  # <-\n",
     "spec.egress[0].to[0].domainNames: domainNames not supported by garrison"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "egress:\n- action: Accept\n  to:\n  - nodes: {matchLabels: {role: x}}  # <-\n",
     "spec.egress[0].to[0].nodes: a nodes selector with labels is not supported by garrison"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "egress:\n- action: Accept\n  to: [{networks: [10.0.0.0/8]}]\n  protocols:\n"
     "  - destinationNamedPort: http  # <-\n",
     "spec.egress[0].protocols[0]: destinationNamedPort cannot be used with networks or nodes"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Accept\n  from: [{namespaces: {}}]\n  protocols:\n"
     "  - tcp: {destinationPort: {range: {start: 90, end: 80}}}  # <-\n",
     "spec.ingress[0].protocols[0].tcp.destinationPort.range: range start 90 must be less "
     "than end 80"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Accept\n  from: [{namespaces: {}}]\n  protocols:\n"
     "  - tcp: {destinationPort: {number: 0}}  # <-\n",
     "spec.ingress[0].protocols[0].tcp.destinationPort.number: port 0 out of range 1-65535"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Accept\n  from: [{namespaces: {}}]\n  protocols:\n"
     "  - {tcp: {destinationPort: {number: 80}}, udp: {}}  # <-\n",
     "spec.ingress[0].protocols[0]: a protocols entry needs exactly one of tcp or udp or sctp "
     "or destinationNamedPort"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Accept\n  from: [{namespaces: {}}]\n  protocols:\n"
     "  - destinationNamedPort: HTTP  # <-\n",
     "spec.ingress[0].protocols[0].destinationNamedPort: invalid port name 'HTTP'"),
    ("tier: Admin\npriority: 1\n" + VALID_SUBJECT
     + "ingress:\n- action: Accept\n  from:\n  - pods: {namespaceSelector: {}}  # <-\n",
     "spec.ingress[0].from[0].pods.podSelector: missing required field"),
]


@pytest.mark.parametrize(("body", "expected"), ERRORS, ids=[e[1].split(":")[0] + str(i)
                                                            for i, e in enumerate(ERRORS)])
def test_invalid_policies_name_file_line_field_and_reason(body: str, expected: str) -> None:
    text = spec(body)
    issues = issues_of(text)
    rendered = [str(i) for i in issues]
    assert any(expected in r for r in rendered), rendered
    hit = next(i for i in issues if expected in str(i))
    assert str(hit).startswith("test.yaml:")
    lines = [n for n, line in enumerate(text.splitlines(), 1) if MARK in line]
    if lines:
        assert hit.line == lines[0], rendered


def test_too_many_rules_and_a_namespace_are_reported() -> None:
    def text(count: int) -> str:
        rules = "".join("- {action: Deny, from: [{namespaces: {}}]}\n" for _ in range(count))
        return (HEAD + "metadata: {name: p, namespace: x}\nspec:\n  tier: Admin\n"
                "  priority: 1\n  subject: {namespaces: {}}\n  ingress:\n"
                + textwrap.indent(rules, "  "))
    with pytest.raises(PolicyValidationError) as info:
        load_text(text(26), "test.yaml")
    rendered = [str(i) for i in info.value.issues]
    assert "test.yaml:8: spec.ingress: at most 25 rules (got 26)" in rendered
    result = load_text(text(25), "test.yaml")
    assert [str(w) for w in result.warnings] == [
        "test.yaml:3: warning: metadata.namespace: ignored: a ClusterNetworkPolicy is not "
        "namespaced"
    ]
    assert result.policies[0].namespace is None


def test_networks_in_deny_rules_warn_about_cluster_addresses() -> None:
    text = spec("tier: Admin\npriority: 1\n" + VALID_SUBJECT
                + "egress:\n- action: Deny\n  to: [{networks: [10.0.0.0/8]}]\n")
    result = load_text(text, "test.yaml")
    [warning] = result.warnings
    assert "networks match addresses outside the cluster only" in str(warning)


# ---- the CLI: validate and trace ------------------------------------------------------------


def test_validate_and_trace_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cnp.yaml"
    path.write_text(ingress_tcp(swapped(3, 4)))
    assert main(["policy", "validate", str(path)]) == 0
    capsys.readouterr()
    args = ["policy", "trace", "-f", str(path), "--src-labels", "app=draco",
            "--src-namespace", "slytherin", "--dst-labels", "app=harry",
            "--dst-namespace", "gryffindor", "--dport", "80"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("Pass by ClusterNetworkPolicy ingress-tcp ingress[3] "
            "(pass-from-slytherin-at-port-80) [Admin 3]: on to the next tier") in out
    assert "Final verdict: ALLOWED" in out
    args[args.index("--src-namespace") + 1] = "hufflepuff"
    args[-1] = "8080"
    main(args)
    out = capsys.readouterr().out
    assert ("L3/L4 DENIED in the Admin tier by Deny rule ClusterNetworkPolicy ingress-tcp "
            "ingress[6] (deny-from-hufflepuff-everything-else) [Admin 3]") in out
    assert "Final verdict: DENIED" in out
    main([*args, "-o", "json"])
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "denied"
    assert data["steps"][1]["l3_l4"]["tier"] == "Admin"
    assert data["steps"][1]["l3_l4"]["action"] == "Deny"
    assert data["denied_by"][0]["rule_name"] == "deny-from-hufflepuff-everything-else"


def test_validate_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(spec("tier: Admin\npriority: 1\n" + VALID_SUBJECT
                         + "egress:\n- action: Accept\n  to: [{domainNames: [a.example]}]\n"))
    assert main(["policy", "validate", str(path)]) != 0
    err = capsys.readouterr().err
    assert f"{path}:10: spec.egress[0].to[0].domainNames: domainNames not supported" in err
