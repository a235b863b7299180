"""HTTP rule matching: one request (plain values) against one L7RuleSet → L7Verdict.

Compiled once per rule set. Pinned meaning (POLICY-SEMANTICS, and where it is silent):

- `method`, `path`, `host` are RE2 patterns that must match the whole value (`/v1/` does not
  match `/v1/x`). An empty pattern means the same as an absent one (Cilium's zero value).
  `path` is matched against the normalized target including its query string.
- `method` and `path` are case-sensitive. `host` is matched case-insensitively (DNS names are)
  against the Host value; when the value carries a port, a pattern matches with or without it:
  `deathstar` matches `deathstar` and `deathstar:80`, `deathstar:8080` matches only that port.
  A request without a host (HTTP/1.0 without Host) fails every rule that has a `host`.
- `headers: ["Name"]` requires the field; `["Name: value"]` requires that exact value (name
  case-insensitive, value case-sensitive, surrounding whitespace of the entry ignored).
- `headerMatches`: exact value. When a field occurs more than once its values are compared
  joined with `,` (as Envoy does), so `X: good` plus `X: bad` is not `good`. On mismatch
  (absent or different): `mismatch` None → the rule fails; LOG → the rule matches and
  `logged_mismatches` gets `"<name>: missing"` / `"<name>: mismatch"` (never the values: they
  are often secrets); ADD → the rule matches, edit ADD(name, value) (append a field); REPLACE →
  edit REPLACE(name, value) (drop every field of that name, add this one); DELETE → edit
  DELETE(name, "") when the field is present (nothing to do when it is absent).
- `headerMatches` with `regex` (garrison extension): the joined value must fully match the
  RE2 pattern; an absent field fails the rule.
- `deny_rules` (garrison extension): a request matching any deny rule (same matching as an
  allow rule, header conditions included) is denied, naming the deny rule in `denied_by`,
  whatever the allow rules and `allow_all` say. Deny rules have no mismatch actions.
- Several rules can match: the first one (in rule order) that matches with no mismatch at all
  wins; only if none does, the first that matches with mismatch actions decides, and its
  edits and logs are the verdict's.
- `allow_all` rule sets allow every request and name `allow_all_ref`. An empty rule list
  without `allow_all` denies everything.
- A denial says why: `no rule matches PUT /v1/exhaust-port`, followed by the first header
  problem when some rule matched method, path and host (`...: header 'X-Has-Force' missing`).

How it is compiled: each rule's method, host and path patterns become one RE2 pattern over the
text `method \\n host \\n path` (values never contain a newline), and all rules form a single
RE2 `Set` run once per request. Each part is wrapped in `(?m:...)` so a user's `^` and `$`
still anchor at the part's edges; a sub-pattern that swallowed a newline would leave the
pattern one separator short, so parts cannot shift into each other. Patterns using `\\A` or
`\\z` (text anchors) are checked one by one instead, and so is every rule when the set as a
whole exceeds RE2's memory budget (rules that are each valid can together be too large for
one set). Header conditions are then checked on the candidate rules only.

Each matcher remembers the set's answer for the last few texts it matched, and the denial
of the last few requests no rule matched (`_MEMO_ENTRIES` each, texts of at most
`_MEMO_TEXT_MAX` characters): clients repeat their requests, and running the set through
pyre2's Python wrapper and building the denial (an interpreted dataclass `__init__`) were 15%
of the instructions of a denied request, the set 4% of an allowed one (callgrind,
BENCHMARKS.md). Both remembered answers are functions of the text alone, so a memo never
changes a verdict; a memo that is full is emptied, so hostile unique paths cost a little CPU
and at most `_MEMO_ENTRIES` entries, never memory without bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import re2

from garrison.policies.l7rules import (
    HeaderEdit,
    HeaderMatch,
    HTTPRule,
    L7RuleSet,
    L7Verdict,
    MismatchAction,
    audit_refs,
    audited,
)
from garrison.policies.refs import RuleRef

__all__ = ["HTTPMatcher"]

_ANY_PART = "[^\n]*"
_PORT_SUFFIX = "(?::[0-9]*)?"
_MEMO_ENTRIES = 128  # per memo: at most ~60 KB each, with texts of `_MEMO_TEXT_MAX`
_MEMO_TEXT_MAX = 256  # longer requests are matched every time, not remembered


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    ref: RuleRef | None
    # (lower-case name, display name, exact value or None for presence)
    required: tuple[tuple[str, str, str | None], ...]
    header_matches: tuple[tuple[str, HeaderMatch, re2._Regexp | None], ...]
    has_header_conditions: bool
    allowed: L7Verdict  # the verdict of a clean match, built once
    # Rules whose patterns use text anchors are matched field by field.
    separate: tuple[tuple[int, re2._Regexp], ...] = ()


class HTTPMatcher:
    """Compiled HTTP rules of one L7RuleSet. `match()` is pure and thread-safe."""

    def __init__(self, ruleset: L7RuleSet) -> None:
        self._audit: HTTPMatcher | None = None
        self._audit_refs: tuple[RuleRef, ...] = ()
        if ruleset.audit_layer is not None:
            self._audit = HTTPMatcher(ruleset.audit_layer)
            self._audit_refs = audit_refs(ruleset.audit_layer)
        self._deny: HTTPMatcher | None = None
        # the denial naming each deny rule, built once (it does not depend on the request)
        self._denied_by: dict[RuleRef | None, L7Verdict] = {}
        if ruleset.deny_rules:
            self._deny = HTTPMatcher(L7RuleSet(ruleset.protocol, ruleset.deny_rules))
            for _, deny_ref in ruleset.deny_rules:
                self._denied_by[deny_ref] = _denial_by(deny_ref)
        self._allow_all = ruleset.allow_all
        self._allow_all_verdict = L7Verdict(allowed=True, rule=ruleset.allow_all_ref)
        rules: list[_CompiledRule] = []
        patterns: dict[str, int] = {}  # combined pattern -> bitmask of rules
        host_free = 0  # rules without a host pattern (they accept a request without host)
        for index, (rule, ref) in enumerate(ruleset.rules):
            if not isinstance(rule, HTTPRule):
                raise ValueError(f"HTTPMatcher got a {type(rule).__name__}, not an HTTPRule")
            bit = 1 << index
            method, path, host = rule.method or None, rule.path or None, rule.host or None
            for pattern in (method, path, host):
                _check_alone(pattern)
            if host is None:
                host_free |= bit
            separate: tuple[tuple[int, re2._Regexp], ...] = ()
            if any(p is not None and ("\\A" in p or "\\z" in p) for p in (method, path, host)):
                separate = _compile_separately(method, host, path)
                patterns[f"{_ANY_PART}\n{_ANY_PART}\n{_ANY_PART}"] = (
                    patterns.get(f"{_ANY_PART}\n{_ANY_PART}\n{_ANY_PART}", 0) | bit
                )
            else:
                combined = "\n".join(
                    (
                        _part(method),
                        f"(?i:{_part(host)}){_PORT_SUFFIX}" if host else _ANY_PART,
                        _part(path),
                    )
                )
                patterns[combined] = patterns.get(combined, 0) | bit
            rules.append(
                _CompiledRule(
                    ref=ref,
                    required=tuple(_parse_header_entry(entry) for entry in rule.headers),
                    header_matches=tuple(
                        (hm.name.lower(), hm, _compile_value(hm.regex))
                        for hm in rule.header_matches
                    ),
                    has_header_conditions=bool(rule.headers or rule.header_matches),
                    allowed=L7Verdict(allowed=True, rule=ref),
                    separate=separate,
                )
            )
        self._rules = tuple(rules)
        self._host_free = host_free
        self._set: re2.Set | None = None
        self._masks: tuple[int, ...] = ()
        self._all_rules = 0  # every rule a candidate: the set could not be compiled
        # the candidate rules of `method \n host \n path` texts, and the denials by reason
        self._seen: dict[str, int] = {}
        self._denials: dict[str, L7Verdict] = {}
        if patterns:
            rule_set = re2.Set.FullMatchSet()
            masks: list[int] = []
            for pattern, mask in patterns.items():
                try:
                    rule_set.Add(pattern)
                except re2.error as exc:
                    raise ValueError(f"invalid RE2 pattern in HTTP rules: {exc}") from exc
                masks.append(mask)
            try:
                rule_set.Compile()
            except re2.error:
                # Each pattern is valid, but together they exceed what one RE2 set may
                # compile (its memory budget): match every rule on its own instead.
                self._rules = tuple(
                    _matched_alone(c, r)
                    for c, (r, _) in zip(self._rules, ruleset.rules, strict=True)
                    if isinstance(r, HTTPRule)
                )
                self._all_rules = (1 << len(self._rules)) - 1
            else:
                self._set = rule_set
                self._masks = tuple(masks)

    def match(
        self,
        method: str,
        path: str,
        host: str | None,
        headers: Sequence[tuple[str, str]],
    ) -> L7Verdict:
        """The verdict for one request. `headers`: (name, value) as received, any case."""
        verdict = self._match(method, path, host, headers)
        if self._audit is not None and verdict.allowed:
            would = self._audit.match(method, path, host, headers)
            if not would.allowed:
                return audited(verdict, would, self._audit_refs)
        return verdict

    def _match(
        self,
        method: str,
        path: str,
        host: str | None,
        headers: Sequence[tuple[str, str]],
    ) -> L7Verdict:
        if self._deny is not None:
            denied = self._deny.match(method, path, host, headers)
            if denied.allowed:
                verdict = self._denied_by.get(denied.rule)
                return verdict if verdict is not None else _denial_by(denied.rule)
        if self._allow_all:
            return self._allow_all_verdict
        candidates = self._all_rules
        if self._set is not None:
            candidates = self._candidates(f"{method}\n{host or ''}\n{path}")
        if host is None:
            candidates &= self._host_free
        if not candidates:
            return self._no_match(f"no rule matches {method} {path}")

        fields: dict[str, list[str]] | None = None
        first_problem = ""
        fallback: L7Verdict | None = None
        rules = self._rules
        while candidates:
            lowest = candidates & -candidates
            candidates ^= lowest
            rule = rules[lowest.bit_length() - 1]
            if rule.separate and not _separate_match(rule.separate, method, host, path):
                continue
            if not rule.has_header_conditions:
                return rule.allowed
            if fields is None:
                fields = {}
                for name, value in headers:
                    fields.setdefault(name.lower(), []).append(value)
            problem, edits, logs = _check_headers(rule, fields)
            if problem:
                first_problem = first_problem or problem
                continue
            if not edits and not logs:
                return rule.allowed
            if fallback is None:
                fallback = L7Verdict(
                    allowed=True, rule=rule.ref, header_edits=edits, logged_mismatches=logs
                )
        if fallback is not None:
            return fallback
        reason = f"no rule matches {method} {path}"
        if first_problem:
            reason += f": {first_problem}"
        return self._no_match(reason)

    def _candidates(self, text: str) -> int:
        """The bitmask of the rules whose method, host and path patterns match `text`."""
        seen = self._seen
        known = seen.get(text)
        if known is not None:
            return known
        candidates = 0
        assert self._set is not None
        hits = self._set.Match(text.encode())
        if hits:
            masks = self._masks
            for hit in hits:
                candidates |= masks[hit]
        if len(text) <= _MEMO_TEXT_MAX:
            if len(seen) >= _MEMO_ENTRIES:
                seen.clear()
            seen[text] = candidates
        return candidates

    def _no_match(self, reason: str) -> L7Verdict:
        """The denial saying `reason` (one verdict per reason while it is remembered)."""
        denials = self._denials
        verdict = denials.get(reason)
        if verdict is None:
            verdict = L7Verdict(allowed=False, reason=reason)
            if len(reason) <= _MEMO_TEXT_MAX:
                if len(denials) >= _MEMO_ENTRIES:
                    denials.clear()
                denials[reason] = verdict
        return verdict


def _matched_alone(compiled: _CompiledRule, rule: HTTPRule) -> _CompiledRule:
    """`compiled`, with its method, host and path patterns compiled on their own."""
    if compiled.separate or not (rule.method or rule.path or rule.host):
        return compiled
    return _CompiledRule(
        ref=compiled.ref,
        required=compiled.required,
        header_matches=compiled.header_matches,
        has_header_conditions=compiled.has_header_conditions,
        allowed=compiled.allowed,
        separate=_compile_separately(rule.method or None, rule.host or None, rule.path or None),
    )


def _denial_by(rule: RuleRef | None) -> L7Verdict:
    """The verdict of a request that matched the deny rule `rule`."""
    return L7Verdict(
        allowed=False,
        reason=f"denied by {rule}" if rule else "denied by a deny rule",
        denied_by=rule,
    )


def _check_alone(pattern: str | None) -> None:
    """Each pattern must be valid on its own: wrapped in the combined pattern, an unbalanced
    `)` could otherwise close our group and change what the other parts mean."""
    if pattern is None:
        return
    try:
        re2.compile(pattern)
    except re2.error as exc:
        raise ValueError(f"invalid RE2 pattern {pattern!r} in HTTP rules: {exc}") from exc


def _compile_value(pattern: str | None) -> re2._Regexp | None:
    if pattern is None:
        return None
    try:
        return re2.compile(pattern)
    except re2.error as exc:
        raise ValueError(f"invalid RE2 pattern {pattern!r} in headerMatches: {exc}") from exc


def _part(pattern: str | None) -> str:
    return f"(?m:(?:{pattern}))" if pattern else _ANY_PART


def _compile_separately(
    method: str | None, host: str | None, path: str | None
) -> tuple[tuple[int, re2._Regexp], ...]:
    compiled: list[tuple[int, re2._Regexp]] = []
    for position, pattern in enumerate((method, host, path)):
        if pattern is None:
            continue
        text = f"(?i:{pattern}){_PORT_SUFFIX}" if position == 1 else pattern
        try:
            compiled.append((position, re2.compile(text)))
        except re2.error as exc:
            raise ValueError(f"invalid RE2 pattern {pattern!r} in HTTP rules: {exc}") from exc
    return tuple(compiled)


def _separate_match(
    compiled: tuple[tuple[int, re2._Regexp], ...], method: str, host: str | None, path: str
) -> bool:
    values = (method, host, path)
    for position, regexp in compiled:
        value = values[position]
        if value is None or regexp.fullmatch(value) is None:
            return False
    return True


def _parse_header_entry(entry: str) -> tuple[str, str, str | None]:
    name, colon, value = entry.partition(":")
    name = name.strip()
    return name.lower(), name, value.strip() if colon else None


def _check_headers(
    rule: _CompiledRule, fields: dict[str, list[str]]
) -> tuple[str, tuple[HeaderEdit, ...], tuple[str, ...]]:
    """(first problem or "", edits, logged mismatches) of one rule's header conditions."""
    for lname, name, expected in rule.required:
        values = fields.get(lname)
        if values is None:
            return f"header {name!r} missing", (), ()
        if expected is not None and ",".join(values) != expected:
            return f"header {name!r} has another value", (), ()
    edits: list[HeaderEdit] = []
    logs: list[str] = []
    for lname, header_match, regex in rule.header_matches:
        values = fields.get(lname)
        if regex is not None:
            if values is None:
                return f"header {header_match.name!r} missing", (), ()
            if regex.fullmatch(",".join(values)) is None:
                return f"header {header_match.name!r} does not match {header_match.regex!r}", (), ()
            continue
        if values is not None and ",".join(values) == header_match.value:
            continue
        action = header_match.mismatch
        state = "missing" if values is None else "mismatch"
        if action is None:
            return f"header {header_match.name!r} {state}", (), ()
        if action is MismatchAction.LOG:
            logs.append(f"{header_match.name}: {state}")
        elif action is MismatchAction.DELETE:
            if values is not None:
                edits.append(HeaderEdit(MismatchAction.DELETE, header_match.name, ""))
        else:  # ADD, REPLACE
            edits.append(HeaderEdit(action, header_match.name, header_match.value))
    return "", tuple(edits), tuple(logs)
