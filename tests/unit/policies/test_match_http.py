"""HTTP rule matching: full-match patterns, hosts, headers, headerMatches actions, allow_all,
the rule named on allow and the reason on deny."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.policies import match_http
from garrison.policies.l7rules import (
    GRPCRule,
    HeaderEdit,
    HeaderMatch,
    HTTPRule,
    L7Protocol,
    L7RuleSet,
    MismatchAction,
)
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.refs import PolicyKind, RuleRef


def ref(index: int) -> RuleRef:
    return RuleRef(PolicyKind.CNP, "default", "rule1", "ingress", rule_index=index)


def matcher(*rules: HTTPRule, allow_all: bool = False) -> HTTPMatcher:
    return HTTPMatcher(
        L7RuleSet(
            L7Protocol.HTTP,
            rules=tuple((rule, ref(i)) for i, rule in enumerate(rules)),
            allow_all=allow_all,
            allow_all_ref=ref(99) if allow_all else None,
        )
    )


Request = tuple[str, str, str | None, Sequence[tuple[str, str]]]


def req(
    method: str = "GET",
    path: str = "/",
    host: str | None = "deathstar",
    headers: Sequence[tuple[str, str]] = (),
) -> Request:
    return method, path, host, headers


# (rules, request, index of the allowing rule or None)
CASES: list[tuple[str, tuple[HTTPRule, ...], Request, int | None]] = [
    ("path exact", (HTTPRule(path="/v1/"),), req(path="/v1/"), 0),
    ("path is a full match", (HTTPRule(path="/v1/"),), req(path="/v1/x"), None),
    ("path no prefix match", (HTTPRule(path="/v1"),), req(path="/v1/"), None),
    ("path no suffix match", (HTTPRule(path="v1/"),), req(path="/v1/"), None),
    ("path regex", (HTTPRule(path="/v1/.*"),), req(path="/v1/ships/3"), 0),
    ("path alternation anchored", (HTTPRule(path="/a|/b"),), req(path="/b"), 0),
    ("path alternation no partial", (HTTPRule(path="/a|/b"),), req(path="/ab"), None),
    ("path with user anchors", (HTTPRule(path="^/v1/.*$"),), req(path="/v1/x"), 0),
    ("path anchors still full", (HTTPRule(path="^/v1"),), req(path="/v1/x"), None),
    ("path \\A \\z anchors", (HTTPRule(path="\\A/v1/x\\z"),), req(path="/v1/x"), 0),
    ("path \\A \\z mismatch", (HTTPRule(path="\\A/v1\\z"),), req(path="/v1/x"), None),
    ("query is part of the path", (HTTPRule(path="/s\\?q=1"),), req(path="/s?q=1"), 0),
    ("query must match too", (HTTPRule(path="/s"),), req(path="/s?q=1"), None),
    ("path case-sensitive", (HTTPRule(path="/V1/"),), req(path="/v1/"), None),
    ("method", (HTTPRule(method="GET"),), req(method="GET"), 0),
    ("method full match", (HTTPRule(method="GET"),), req(method="GETX"), None),
    ("method alternation", (HTTPRule(method="GET|HEAD"),), req(method="HEAD"), 0),
    ("method case-sensitive", (HTTPRule(method="get"),), req(method="GET"), None),
    (
        "method and path",
        (HTTPRule(method="POST", path="/v1/request-landing"),),
        req("POST", "/v1/request-landing"),
        0,
    ),
    (
        "method and path: one wrong",
        (HTTPRule(method="POST", path="/v1/request-landing"),),
        req("PUT", "/v1/request-landing"),
        None,
    ),
    ("host", (HTTPRule(host="deathstar"),), req(host="deathstar"), 0),
    ("host case-insensitive", (HTTPRule(host="deathstar"),), req(host="DeathStar"), 0),
    ("host pattern case", (HTTPRule(host="DeathStar"),), req(host="deathstar"), 0),
    ("host port not written", (HTTPRule(host="deathstar"),), req(host="deathstar:80"), 0),
    ("host port written", (HTTPRule(host="deathstar:8080"),), req(host="deathstar:8080"), 0),
    ("host other port", (HTTPRule(host="deathstar:8080"),), req(host="deathstar:80"), None),
    ("host port required", (HTTPRule(host="deathstar:8080"),), req(host="deathstar"), None),
    ("host full match", (HTTPRule(host="deathstar"),), req(host="deathstar.evil"), None),
    ("host suffix", (HTTPRule(host=".*\\.empire\\.gov"),), req(host="ds.empire.gov:443"), 0),
    ("host ipv6", (HTTPRule(host="\\[::1\\]"),), req(host="[::1]:8080"), 0),
    ("no host fails a host rule", (HTTPRule(host=".*"),), req(host=None), None),
    ("no host, no host rule", (HTTPRule(path="/"),), req(host=None), 0),
    ("empty rule matches all", (HTTPRule(),), req("DELETE", "/anything"), 0),
    ("empty patterns are absent", (HTTPRule(method="", path="", host=""),), req(), 0),
    (
        "header present",
        (HTTPRule(headers=("X-Has-Force",)),),
        req(headers=[("x-has-force", "whatever")]),
        0,
    ),
    ("header absent", (HTTPRule(headers=("X-Has-Force",)),), req(headers=[("x-other", "1")]), None),
    (
        "header value",
        (HTTPRule(headers=("X-Has-Force: True",)),),
        req(headers=[("X-HAS-FORCE", "True")]),
        0,
    ),
    (
        "header value exact",
        (HTTPRule(headers=("X-Has-Force: True",)),),
        req(headers=[("X-Has-Force", "true")]),
        None,
    ),
    (
        "header entry spacing",
        (HTTPRule(headers=("  X-Has-Force  :   True ",)),),
        req(headers=[("X-Has-Force", "True")]),
        0,
    ),
    ("header empty value", (HTTPRule(headers=("X-Empty:",)),), req(headers=[("X-Empty", "")]), 0),
    (
        "header repeated joins",
        (HTTPRule(headers=("X: a",)),),
        req(headers=[("X", "a"), ("X", "b")]),
        None,
    ),
    (
        "header repeated joined value",
        (HTTPRule(headers=("X: a,b",)),),
        req(headers=[("X", "a"), ("x", "b")]),
        0,
    ),
    ("all headers required", (HTTPRule(headers=("A", "B: 2")),), req(headers=[("A", "1")]), None),
    ("second rule", (HTTPRule(path="/a"), HTTPRule(path="/b")), req(path="/b"), 1),
    ("first matching rule named", (HTTPRule(path="/.*"), HTTPRule(path="/b")), req(path="/b"), 0),
    (
        "same patterns, headers differ",
        (HTTPRule(path="/b", headers=("A",)), HTTPRule(path="/b", headers=("B",))),
        req(path="/b", headers=[("B", "1")]),
        1,
    ),
]


@pytest.mark.parametrize(
    ("rules", "request_", "allowed_by"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_match_table(
    rules: tuple[HTTPRule, ...], request_: Request, allowed_by: int | None
) -> None:
    verdict = matcher(*rules).match(*request_)
    if allowed_by is None:
        assert not verdict.allowed and verdict.rule is None
        assert verdict.reason.startswith(f"no rule matches {request_[0]} {request_[1]}")
    else:
        assert verdict.allowed and verdict.rule == ref(allowed_by)
        assert (verdict.header_edits, verdict.logged_mismatches, verdict.reason) == ((), (), "")


def test_reason_names_the_request() -> None:
    m = matcher(
        HTTPRule(method="GET", path="/v1/"), HTTPRule(method="POST", path="/v1/request-landing")
    )
    verdict = m.match("PUT", "/v1/exhaust-port", "deathstar", [])
    assert verdict.reason == "no rule matches PUT /v1/exhaust-port"


def test_reason_names_the_header_problem_without_values() -> None:
    m = matcher(HTTPRule(method="PUT", path="/v1/exhaust-port", headers=("X-Has-Force: True",)))
    missing = m.match("PUT", "/v1/exhaust-port", "deathstar", [])
    assert missing.reason == "no rule matches PUT /v1/exhaust-port: header 'X-Has-Force' missing"
    wrong = m.match("PUT", "/v1/exhaust-port", "deathstar", [("X-Has-Force", "False")])
    assert wrong.reason.endswith("header 'X-Has-Force' has another value")
    assert "False" not in wrong.reason


def test_no_rules_deny_everything() -> None:
    verdict = matcher().match("GET", "/", "deathstar", [])
    assert not verdict.allowed and verdict.reason == "no rule matches GET /"


def test_allow_all() -> None:
    verdict = matcher(HTTPRule(path="/never"), allow_all=True).match("PUT", "/x", None, [])
    assert verdict.allowed and verdict.rule == ref(99)


def token(mismatch: MismatchAction | None) -> HTTPRule:
    return HTTPRule(path="/v1/.*", header_matches=(HeaderMatch("X-Token", "secret", mismatch),))


@pytest.mark.parametrize(
    ("mismatch", "headers", "allowed", "edits", "logs"),
    [
        (None, [("X-Token", "secret")], True, (), ()),
        (None, [("x-token", "other")], False, (), ()),
        (None, [], False, (), ()),
        (MismatchAction.LOG, [("X-Token", "secret")], True, (), ()),
        (MismatchAction.LOG, [("X-Token", "other")], True, (), ("X-Token: mismatch",)),
        (MismatchAction.LOG, [], True, (), ("X-Token: missing",)),
        (MismatchAction.ADD, [], True, (HeaderEdit(MismatchAction.ADD, "X-Token", "secret"),), ()),
        (
            MismatchAction.ADD,
            [("X-Token", "other")],
            True,
            (HeaderEdit(MismatchAction.ADD, "X-Token", "secret"),),
            (),
        ),
        (MismatchAction.ADD, [("X-Token", "secret")], True, (), ()),
        (
            MismatchAction.DELETE,
            [("X-Token", "other")],
            True,
            (HeaderEdit(MismatchAction.DELETE, "X-Token", ""),),
            (),
        ),
        (MismatchAction.DELETE, [], True, (), ()),
        (
            MismatchAction.REPLACE,
            [("X-Token", "other")],
            True,
            (HeaderEdit(MismatchAction.REPLACE, "X-Token", "secret"),),
            (),
        ),
        (
            MismatchAction.REPLACE,
            [],
            True,
            (HeaderEdit(MismatchAction.REPLACE, "X-Token", "secret"),),
            (),
        ),
        (
            MismatchAction.REPLACE,
            [("X-Token", "secret"), ("X-Token", "secret")],
            True,
            (HeaderEdit(MismatchAction.REPLACE, "X-Token", "secret"),),
            (),
        ),
    ],
)
def test_header_matches(
    mismatch: MismatchAction | None,
    headers: list[tuple[str, str]],
    allowed: bool,
    edits: tuple[HeaderEdit, ...],
    logs: tuple[str, ...],
) -> None:
    verdict = matcher(token(mismatch)).match("GET", "/v1/x", "deathstar", headers)
    assert verdict.allowed is allowed
    assert (verdict.header_edits, verdict.logged_mismatches) == (edits, logs)
    assert verdict.rule == (ref(0) if allowed else None)
    if not allowed:
        assert "secret" not in verdict.reason and "other" not in verdict.reason


def test_a_clean_match_wins_over_an_earlier_match_with_actions() -> None:
    m = matcher(token(MismatchAction.ADD), HTTPRule(path="/v1/x"))
    verdict = m.match("GET", "/v1/x", "deathstar", [])
    assert verdict.rule == ref(1) and verdict.header_edits == ()


def test_the_first_match_with_actions_decides_when_no_clean_one() -> None:
    m = matcher(token(MismatchAction.LOG), token(MismatchAction.ADD))
    verdict = m.match("GET", "/v1/x", "deathstar", [])
    assert verdict.rule == ref(0) and verdict.logged_mismatches == ("X-Token: missing",)


def test_rules_of_other_protocols_are_refused() -> None:
    with pytest.raises(ValueError, match="GRPCRule"):
        HTTPMatcher(L7RuleSet(L7Protocol.GRPC, rules=((GRPCRule("pkg.S"), None),)))


@pytest.mark.parametrize("pattern", ["/v1/(", "GET)|(?:.*", ".*)\n(?:.*", "a)(b"])
def test_invalid_pattern_is_a_value_error(pattern: str) -> None:
    """Also patterns that only become valid inside the combined pattern."""
    with pytest.raises(ValueError, match="RE2"):
        matcher(HTTPRule(method=pattern))
    with pytest.raises(ValueError, match="RE2"):
        matcher(HTTPRule(path=pattern))


def test_verdicts_are_shared_for_clean_matches() -> None:
    m = matcher(HTTPRule(path="/a"))
    assert m.match("GET", "/a", None, []) is m.match("GET", "/a", None, [])


PATHS = st.text(alphabet="/abv1.-", min_size=1, max_size=12)
PATTERNS = st.sampled_from(["/a", "/a.*", "/v1/.*", ".*b", "/(a|b)+", "/v1/", "[^/]*", "/a?b?"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([None, "GET", "GET|POST", "P.*"]), PATTERNS), max_size=6),
    st.sampled_from(["GET", "POST", "PUT"]),
    PATHS,
)
def test_one_re2_set_agrees_with_matching_rule_by_rule(
    rules: list[tuple[str | None, str]], method: str, path: str
) -> None:
    http_rules = tuple(HTTPRule(method=m, path=p) for m, p in rules)
    verdict = matcher(*http_rules).match(method, path, "deathstar", [])
    expected = next(
        (
            i
            for i, (m, p) in enumerate(rules)
            if (m is None or re.fullmatch(m, method)) and re.fullmatch(p, path)
        ),
        None,
    )
    assert verdict.rule == (None if expected is None else ref(expected))


# A matcher remembers recent answers (match_http's memo): the same requests, in any order and
# with any repeats, must get the verdicts a matcher that never saw a request before gives.
REQUESTS = st.tuples(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.sampled_from(["/a", "/ab", "/b", "/bab", "/v1/x", "/v1/"]) | PATHS,  # repeats likely
    st.sampled_from([None, "", "deathstar", "deathstar:80", "DEATHSTAR:8080", "other"]),
    st.sampled_from([[], [("X-Token", "secret")], [("x-token", "other")]]),
)
MEMO_RULES = (
    HTTPRule(method="GET", path="/a.*", host="deathstar"),
    HTTPRule(path="/v1/.*", header_matches=(HeaderMatch("X-Token", "secret"),)),
    HTTPRule(method="P.*", path="/(a|b)+", headers=("X-Token",)),
    HTTPRule(path="\\A/b.*\\z"),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(REQUESTS, min_size=1, max_size=40))
def test_a_remembered_answer_never_changes_a_verdict(
    requests: list[tuple[str, str, str | None, list[tuple[str, str]]]],
) -> None:
    shared = matcher(*MEMO_RULES)
    for method, path, host, headers in requests * 2:  # each request seen again
        assert shared.match(method, path, host, headers) == matcher(*MEMO_RULES).match(
            method, path, host, headers
        )


def test_host_none_and_empty_host_keep_their_own_verdicts() -> None:
    # `method \n host \n path` is the same text for both: no host fails rules with a host
    m = matcher(HTTPRule(path="/a", host=".*"), HTTPRule(path="/b"))
    assert m.match("GET", "/a", "", []).allowed
    assert not m.match("GET", "/a", None, []).allowed
    assert m.match("GET", "/a", "", []).allowed
    assert m.match("GET", "/b", None, []).rule == ref(1)


def test_unique_paths_keep_the_memo_bounded_and_the_verdicts_right() -> None:
    m = matcher(HTTPRule(method="GET", path="/v1/[0-9]+"))
    for i in range(5000):  # a hostile client: every path new
        assert m.match("GET", f"/v1/{i}", "deathstar", []).allowed
        denied = m.match("PUT", f"/v1/{i}", "deathstar", [])
        assert denied.reason == f"no rule matches PUT /v1/{i}"
    long_path = "/v1/" + "9" * 10_000  # longer than what is remembered: matched every time
    assert m.match("GET", long_path, "deathstar", []).allowed
    assert m.match("PUT", long_path, "deathstar", []).reason == f"no rule matches PUT {long_path}"
    assert len(m._seen) <= match_http._MEMO_ENTRIES
    assert len(m._denials) <= match_http._MEMO_ENTRIES
    assert all(len(text) <= match_http._MEMO_TEXT_MAX for text in m._seen)


def test_each_deny_rule_denies_in_its_own_words_every_time() -> None:
    deny_ref = RuleRef(PolicyKind.CNP, "default", "p", "ingressDeny", rule_index=1)
    m = HTTPMatcher(
        L7RuleSet(
            L7Protocol.HTTP,
            rules=((HTTPRule(), ref(0)),),
            deny_rules=((HTTPRule(method="PUT"), deny_ref), (HTTPRule(method="DELETE"), None)),
        )
    )
    for _ in range(2):
        put = m.match("PUT", "/v1/exhaust-port", "deathstar", [])
        assert (put.allowed, put.rule, put.denied_by) == (False, None, deny_ref)
        assert put.reason == "denied by CiliumNetworkPolicy default/p ingressDeny[1]"
        delete = m.match("DELETE", "/x", None, [])
        assert (delete.allowed, delete.denied_by, delete.reason) == (
            False,
            None,
            "denied by a deny rule",
        )
    assert m.match("PUT", "/a", None, []) is m.match("PUT", "/b", None, [])
    assert m.match("GET", "/a", None, []).rule == ref(0)
