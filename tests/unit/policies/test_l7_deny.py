"""L7 deny rules and header value regex (garrison extensions, `apiVersion: garrison.io/v1`).

Validation in both dialects, the matchers (deny always wins), the resolver (where the deny
rules land: the rule set the proxy gets for each peer), the standalone proxy's view and
`policy trace` — all giving the same answer, request by request.
"""

from __future__ import annotations

import textwrap

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.l7rules import (
    GRPCRule,
    HeaderMatch,
    HTTPRule,
    KafkaRole,
    KafkaRule,
    L7Protocol,
    L7RuleSet,
)
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.mapstate import PROTO_TCP, lookup
from garrison.policies.match_grpc import GRPCMatcher
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.match_kafka import KafkaMatcher
from garrison.policies.model import Direction, Policy
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.policies.resolve import build_resolver, merge_contributions
from garrison.policies.trace import HTTPRequestSpec, TraceEndpoint, trace
from garrison.proxy.policyview import DESTINATION_IDENTITY, PeerMapping, StandalonePolicy

ALLOW = RuleRef(PolicyKind.CNP, "default", "p", "ingress")
DENY = RuleRef(PolicyKind.CNP, "default", "p", "ingressDeny")


def load(text: str) -> tuple[Policy, ...]:
    return load_text(textwrap.dedent(text).lstrip("\n"), "test.yaml").policies


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyValidationError) as info:
        load_text(textwrap.dedent(text).lstrip("\n"), "test.yaml")
    return [str(issue) for issue in info.value.issues]


DENY_POLICY = """
apiVersion: {version}
kind: CiliumNetworkPolicy
metadata: {{name: p}}
spec:
  endpointSelector: {{matchLabels: {{class: deathstar}}}}
  ingressDeny:
  - fromEndpoints: [{{matchLabels: {{class: tiefighter}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http: [{{method: PUT}}]
"""

REGEX_POLICY = """
apiVersion: {version}
kind: CiliumNetworkPolicy
metadata: {{name: p}}
spec:
  endpointSelector: {{}}
  ingress:
  - toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - headerMatches:
          - {{name: X-Token, regex: "tok-[0-9]+"}}
"""


# ---- validation ----------------------------------------------------------------------------


def test_cilium_dialect_rejects_l7_rules_in_deny_sections_naming_the_extension() -> None:
    assert errors(DENY_POLICY.format(version="cilium.io/v2")) == [
        "test.yaml:10: spec.ingressDeny[0].toPorts[0].rules: L7 rules are not allowed in deny "
        "sections (a garrison extension: write apiVersion: garrison.io/v1 to use it)"
    ]


def test_cilium_dialect_rejects_a_header_regex_naming_the_extension() -> None:
    assert errors(REGEX_POLICY.format(version="cilium.io/v2")) == [
        "test.yaml:12: spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].regex: "
        "headerMatches regex is a garrison extension: write apiVersion: garrison.io/v1 to use it"
    ]


def test_extension_dialect_loads_deny_rules_and_regex() -> None:
    (deny,) = load(DENY_POLICY.format(version="garrison.io/v1"))
    (section,) = deny.rules[0].ingress_deny or ()
    assert section.to_ports[0].rules is not None
    assert section.to_ports[0].rules.http == (HTTPRule(method="PUT"),)
    assert deny.kind is PolicyKind.CNP  # same kind, same refs: only the dialect differs
    (regex,) = load(REGEX_POLICY.format(version="garrison.io/v1"))
    rules = regex.rules[0].ingress[0].to_ports[0].rules  # type: ignore[index]
    assert rules is not None and rules.http == (
        HTTPRule(header_matches=(HeaderMatch("X-Token", "", regex="tok-[0-9]+"),)),
    )


@pytest.mark.parametrize(
    ("header_match", "message"),
    [
        ('{name: X, regex: "a", value: b}', "regex: give either value or regex, not both"),
        ('{name: X, regex: "a", mismatch: LOG}', "mismatch: mismatch needs a value, not a regex"),
        ('{name: X, regex: "a("}', "regex: invalid regular expression: missing ): a("),
        # without a value: presence (Cilium), but a mismatch action needs the value
        ("{name: X, mismatch: LOG}",
         "value: missing required field (a mismatch action needs a value)"),
    ],
)
def test_extension_dialect_header_regex_errors(header_match: str, message: str) -> None:
    text = REGEX_POLICY.format(version="garrison.io/v1").replace(
        '{name: X-Token, regex: "tok-[0-9]+"}', header_match
    )
    (error,) = errors(text)
    assert error.endswith(message), error
    assert error.startswith("test.yaml:12: spec.ingress[0].toPorts[0].rules.http[0]")


def test_deny_rules_have_no_mismatch_actions() -> None:
    text = DENY_POLICY.format(version="garrison.io/v1").replace(
        "http: [{method: PUT}]", "http: [{headerMatches: [{name: X, value: y, mismatch: LOG}]}]"
    )
    assert errors(text) == [
        "test.yaml:11: spec.ingressDeny[0].toPorts[0].rules.http[0].headerMatches[0].mismatch: "
        "mismatch actions are not allowed in deny rules"
    ]


def test_the_extension_apiversion_is_not_a_networkpolicy_version() -> None:
    text = """
    apiVersion: garrison.io/v1
    kind: NetworkPolicy
    metadata: {name: p}
    spec: {podSelector: {}}
    """
    assert errors(text) == [
        "test.yaml:1: apiVersion: apiVersion 'garrison.io/v1' does not match kind "
        "NetworkPolicy (expected networking.k8s.io/v1)"
    ]


# ---- matchers ------------------------------------------------------------------------------


def http_set(allow: list[HTTPRule], deny: list[HTTPRule], allow_all: bool = False) -> L7RuleSet:
    return L7RuleSet(
        L7Protocol.HTTP,
        tuple((r, ALLOW) for r in allow),
        allow_all,
        ALLOW if allow_all else None,
        tuple((r, DENY) for r in deny),
    )


@pytest.mark.parametrize("allow_all", [False, True])
def test_http_deny_wins_over_allow_rules_and_allow_all(allow_all: bool) -> None:
    matcher = HTTPMatcher(
        http_set([HTTPRule(method="PUT|GET")], [HTTPRule(method="PUT", path="/v1/exhaust-port")],
                 allow_all)
    )
    denied = matcher.match("PUT", "/v1/exhaust-port", "deathstar", [])
    assert (denied.allowed, denied.denied_by, denied.rule) == (False, DENY, None)
    assert denied.reason == "denied by CiliumNetworkPolicy default/p ingressDeny[0]"
    allowed = matcher.match("PUT", "/v1/other", "deathstar", [])
    assert (allowed.allowed, allowed.rule, allowed.denied_by) == (True, ALLOW, None)


def test_http_deny_rules_alone_allow_every_other_request() -> None:
    matcher = HTTPMatcher(http_set([], [HTTPRule(headers=("X-Debug",))], allow_all=True))
    assert not matcher.match("GET", "/", None, [("x-debug", "1")]).allowed
    assert matcher.match("GET", "/", None, [("x-other", "1")]).allowed


@pytest.mark.parametrize(
    ("values", "allowed"),
    [
        ([("X-Token", "tok-123")], True),
        ([("x-token", "tok-1")], True),
        ([("X-Token", "tok-123x")], False),  # full match, not search
        ([("X-Token", "xtok-1")], False),
        ([("X-Token", "tok-1"), ("X-Token", "tok-2")], False),  # joined: "tok-1,tok-2"
        ([], False),
    ],
)
def test_header_regex_is_an_re2_full_match_of_the_joined_value(
    values: list[tuple[str, str]], allowed: bool
) -> None:
    rule = HTTPRule(header_matches=(HeaderMatch("X-Token", "", regex="tok-[0-9]+"),))
    verdict = HTTPMatcher(http_set([rule], [])).match("GET", "/", None, values)
    assert verdict.allowed is allowed
    if not values:
        assert verdict.reason == "no rule matches GET /: header 'X-Token' missing"


def test_a_header_regex_in_a_deny_rule() -> None:
    deny = HTTPRule(header_matches=(HeaderMatch("Authorization", "", regex="(?i)basic .*"),))
    matcher = HTTPMatcher(http_set([HTTPRule()], [deny]))
    assert matcher.match("GET", "/", None, [("Authorization", "Basic eA==")]).denied_by == DENY
    assert matcher.match("GET", "/", None, [("Authorization", "Bearer x")]).allowed


def test_grpc_deny_wins() -> None:
    ruleset = L7RuleSet(
        L7Protocol.GRPC,
        ((GRPCRule("doors.DoorManager"), ALLOW),),
        deny_rules=((GRPCRule("doors.DoorManager", "Open"), DENY),),
    )
    matcher = GRPCMatcher(ruleset)
    assert matcher.match("doors.DoorManager", "Open").denied_by == DENY
    assert matcher.match("doors.DoorManager", "GetName").rule == ALLOW
    everything = GRPCMatcher(L7RuleSet(
        L7Protocol.GRPC, (), True, ALLOW, ((GRPCRule("doors.DoorManager"), DENY),)
    ))
    assert not everything.match("doors.DoorManager", "GetName").allowed
    assert everything.match("other.Service", "Call").allowed


def test_kafka_deny_wins_by_topic_and_fails_closed_on_unknown_topics() -> None:
    matcher = KafkaMatcher(L7RuleSet(
        L7Protocol.KAFKA,
        ((KafkaRule(role=KafkaRole.PRODUCE), ALLOW),),
        deny_rules=((KafkaRule(role=KafkaRole.PRODUCE, topic="deathstar-plans"), DENY),),
    ))
    denied = matcher.match(0, 9, "c", ["empire-announce", "deathstar-plans"])
    assert (denied.allowed, denied.denied_by) == (False, DENY)
    assert matcher.match(0, 9, "c", ["empire-announce"]).allowed
    assert matcher.match(18, 3, "c", []).allowed  # ApiVersions names no topic
    # all-topics Metadata: the allow rules decide, the answer must not list the denied topic
    every = matcher.match(3, 12, "c", [], all_topics=True)
    assert (every.allowed, every.filter_response, every.hidden_topics) == (
        True, True, frozenset({"deathstar-plans"}))
    assert matcher.match(0, 13, "c", [], unknown_topics=True).denied_by == DENY
    # a deny without a topic: every request of its API keys
    by_key = KafkaMatcher(L7RuleSet(
        L7Protocol.KAFKA, (), True, ALLOW, ((KafkaRule(api_key=19), DENY),)
    ))
    assert by_key.match(19, 7, "admin", ["t"]).denied_by == DENY
    assert by_key.match(0, 9, "c", ["t"]).allowed


# ---- resolver, proxy view and trace --------------------------------------------------------

DEATHSTAR = endpoint_labels(Labels.parse("org=empire,class=deathstar"))
SHIPS = {
    "tiefighter": ("127.0.0.2", "org=empire,class=tiefighter"),
    "shuttle": ("127.0.0.3", "org=empire,class=shuttle"),
    "xwing": ("127.0.0.4", "org=alliance,class=xwing"),
}

HEAD = """
apiVersion: garrison.io/v1
kind: CiliumNetworkPolicy
metadata: {name: NAME}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
"""
ALLOWS = {
    "l7-empire": """
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: PUT}, {method: GET}]}
""",
    "l4-empire": """
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
    "l3-empire": """
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
""",
    "l4-any": """
  ingress:
  - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
    "l4-tiefighter": """
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
}
DENIES = {
    "tiefighter": "fromEndpoints: [{matchLabels: {class: tiefighter}}]",
    "any-peer": "fromEntities: [all]",
    "empire": "fromEndpoints: [{matchLabels: {org: empire}}]",
}
DENY_SECTION = """
  ingressDeny:
  - PEERS
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: PUT, path: /v1/exhaust-port}]}
"""
REQUESTS = [("PUT", "/v1/exhaust-port"), ("PUT", "/v1/other"), ("GET", "/v1/")]


def scenario(allow: str, deny: str, together: bool) -> tuple[Policy, ...]:
    deny_text = DENY_SECTION.replace("PEERS", DENIES[deny])
    if together:
        return load(HEAD.replace("NAME", "p") + ALLOWS[allow] + deny_text)
    return load(HEAD.replace("NAME", "allow") + ALLOWS[allow] + "---" + HEAD.replace(
        "NAME", "deny") + deny_text)


def allowed_at_l3(allow: str, ship: str) -> bool:
    if allow in ("l4-any",):
        return True
    if allow == "l4-tiefighter":
        return ship == "tiefighter"
    return ship != "xwing"


def denied_peer(deny: str, ship: str) -> bool:
    return {"tiefighter": ship == "tiefighter", "any-peer": True,
            "empire": ship != "xwing"}[deny]


def expected(allow: str, deny: str, ship: str, method: str, path: str) -> bool:
    if not allowed_at_l3(allow, ship):
        return False
    # the allow rules permit PUT and GET, or allow every request at L4/L3
    return not (denied_peer(deny, ship) and (method, path) == ("PUT", "/v1/exhaust-port"))


@pytest.mark.parametrize("together", [True, False], ids=["one-policy", "two-policies"])
@pytest.mark.parametrize("deny", DENIES)
@pytest.mark.parametrize("allow", ALLOWS)
def test_resolver_proxy_view_and_trace_agree_deny_always_wins(
    allow: str, deny: str, together: bool
) -> None:
    pols = scenario(allow, deny, together)
    ships = {name: endpoint_labels(Labels.parse(lab)) for name, (_, lab) in SHIPS.items()}
    ids = {name: DESTINATION_IDENTITY + 1 + i for i, name in enumerate(ships)}
    resolver = build_resolver(
        pols, [(DESTINATION_IDENTITY, DEATHSTAR), *((ids[n], lab) for n, lab in ships.items())]
    )
    state = resolver.map_state(DESTINATION_IDENTITY)
    # the incremental merge and the reference merge agree with deny rules in play
    entries, l7 = merge_contributions(resolver._endpoints[DESTINATION_IDENTITY].contribs)
    assert (dict(state.entries), dict(state.l7)) == (entries, l7)
    view = StandalonePolicy(
        pols, DEATHSTAR, 80, L7Protocol.HTTP,
        [PeerMapping.parse(f"{ip}/32={lab}") for ip, lab in SHIPS.values()],
    )
    deny_name = "p" if together else "deny"
    for ship, (ip, _) in SHIPS.items():
        res = lookup(state, Direction.INGRESS, ids[ship], PROTO_TCP, 80)
        admission = view.admit(ip, "127.0.0.1", 80)
        for method, path in REQUESTS:
            want = expected(allow, deny, ship, method, path)
            verdict = res.l7 and HTTPMatcher(res.l7).match(method, path, None, [])
            model = res.allowed and (res.redirect is None or bool(verdict and verdict.allowed))
            traced = trace(
                pols, TraceEndpoint(ships[ship], "default"),
                TraceEndpoint(DEATHSTAR, "default"), 80,
                request=HTTPRequestSpec(method, path),
            )
            proxied = admission.allowed and HTTPMatcher(admission.ruleset).match(
                method, path, None, []
            ).allowed
            assert (model, traced.allowed, proxied) == (want, want, want), (ship, method, path)
            if res.allowed and denied_peer(deny, ship):
                # the deny rules reach the proxy: the peer is redirected on that port
                assert res.redirect is L7Protocol.HTTP, ship
            if res.allowed and not want:
                assert traced.denied_at == "L7"
                assert [r.name for r in traced.denied_by] == [deny_name]
                assert str(traced.denied_by[0]).endswith("ingressDeny[0]")


def test_l7_deny_alone_grants_nothing() -> None:
    pols = load(HEAD.replace("NAME", "p") + """
  ingress: [{}]
""" + DENY_SECTION.replace("PEERS", DENIES["any-peer"]))
    tie = endpoint_labels(Labels.parse(SHIPS["tiefighter"][1]))
    resolver = build_resolver(pols, [(DESTINATION_IDENTITY, DEATHSTAR), (300, tie)])
    state = resolver.map_state(DESTINATION_IDENTITY)
    res = lookup(state, Direction.INGRESS, 300, PROTO_TCP, 80)
    assert not res.allowed and res.redirect is None
    assert [k for k in state.l7 if k.identity == 300] == []


def test_an_l4_deny_still_denies_at_l4() -> None:
    pols = load(HEAD.replace("NAME", "p") + ALLOWS["l7-empire"] + """
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: PUT, path: /v1/exhaust-port}]}
""")
    tie = endpoint_labels(Labels.parse(SHIPS["tiefighter"][1]))
    resolver = build_resolver(pols, [(DESTINATION_IDENTITY, DEATHSTAR), (300, tie)])
    res = lookup(resolver.map_state(DESTINATION_IDENTITY), Direction.INGRESS, 300, PROTO_TCP, 80)
    assert not res.allowed and res.redirect is None


def test_removing_the_deny_policy_takes_the_deny_rules_away_incrementally() -> None:
    pols = scenario("l3-empire", "any-peer", together=False)
    tie = endpoint_labels(Labels.parse(SHIPS["tiefighter"][1]))
    resolver = build_resolver(pols, [(DESTINATION_IDENTITY, DEATHSTAR), (300, tie)])
    res = lookup(resolver.map_state(DESTINATION_IDENTITY), Direction.INGRESS, 300, PROTO_TCP, 80)
    assert res.l7 is not None and res.l7.allow_all and len(res.l7.deny_rules) == 1
    resolver.remove_policy(pols[1])
    resolver.updates([DESTINATION_IDENTITY])
    state = resolver.map_state(DESTINATION_IDENTITY)
    res = lookup(state, Direction.INGRESS, 300, PROTO_TCP, 80)
    assert res.allowed and res.redirect is None  # back to the L3-only entry
    resolver.add_policy(pols[1])
    resolver.updates([DESTINATION_IDENTITY])
    res = lookup(resolver.map_state(DESTINATION_IDENTITY), Direction.INGRESS, 300, PROTO_TCP, 80)
    assert res.l7 is not None and [str(ref) for _, ref in res.l7.deny_rules] == [
        "CiliumNetworkPolicy default/deny ingressDeny[0]"
    ]


def test_the_docs_show_the_cilium_dialect_errors_as_validate_prints_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from garrison.cli.main import main

    root = Path(__file__).resolve().parents[3]
    monkeypatch.chdir(root)
    docs = (root / "docs" / "policy.md").read_text()
    command = (
        "$ garrison policy validate tests/data/policies/invalid/cilium-dialect-extensions.yaml"
    )
    shown = docs.split(command + "\n", 1)[1].split("```", 1)[0].splitlines()
    code = main(command.split()[2:])
    assert code == 1
    assert capsys.readouterr().err.splitlines() == shown


def test_egress_deny_rules_apply_to_the_source_side() -> None:
    pols = load("""
apiVersion: garrison.io/v1
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-plans}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {class: deathstar}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  egressDeny:
  - toEndpoints: [{matchLabels: {class: deathstar}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{path: "/v1/plans.*"}]}
""")
    tie = endpoint_labels(Labels.parse(SHIPS["tiefighter"][1]))
    denied = trace(pols, TraceEndpoint(tie, "default"), TraceEndpoint(DEATHSTAR, "default"), 80,
                   request=HTTPRequestSpec("GET", "/v1/plans/secret"))
    assert (denied.allowed, denied.denied_at) == (False, "L7")
    assert [str(r) for r in denied.denied_by] == [
        "CiliumClusterwideNetworkPolicy no-plans egressDeny[0]"
    ]
    assert trace(pols, TraceEndpoint(tie, "default"), TraceEndpoint(DEATHSTAR, "default"), 80,
                 request=HTTPRequestSpec("GET", "/v1/")).allowed
