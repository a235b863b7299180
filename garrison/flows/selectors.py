"""Kubernetes' label selector text, as `hubble observe --label` reads it: `k=v,k2 in (a,b),!k3`.

A key may carry a Cilium source (`k8s:app`, `reserved:world`); a key without one matches a
label of any source. Every requirement of one selector must hold on one endpoint's labels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from garrison.flows.errors import FilterError
from garrison.policies.labels import KNOWN_SOURCES, SOURCE_ANY


@dataclass(frozen=True, slots=True)
class Requirement:
    source: str
    key: str
    op: str  # in | notin | exists | !exists | gt | lt
    values: tuple[str, ...] = ()

    def holds(self, labels: Sequence[tuple[str, str, str]]) -> bool:
        found = [v for s, k, v in labels if k == self.key and self.source in (SOURCE_ANY, s)]
        if self.op == "in":
            return any(v in self.values for v in found)
        if self.op == "notin":
            return not any(v in self.values for v in found)
        if self.op == "exists":
            return bool(found)
        if self.op == "!exists":
            return not found
        bound = int(self.values[0])
        for v in found:
            try:
                number = int(v)
            except ValueError:
                continue
            if (number > bound) if self.op == "gt" else (number < bound):
                return True
        return False


_SET_OP = re.compile(r"^(!?)\s*([^\s=!()<>]+)\s+(in|notin)\s*\(([^()]*)\)$")
_EQ_OP = re.compile(r"^([^\s=!()<>]+)\s*(==|=|!=|>|<)\s*([^\s=!(),<>]*)$")
_KEY = re.compile(r"^(!?)\s*([^\s=!(),<>]+)$")


def _split_selector(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FilterError(f"label selector {text!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise FilterError(f"label selector {text!r}: unbalanced '('")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _source_key(text: str) -> tuple[str, str]:
    if ":" in text:
        source, _, key = text.partition(":")
        if source in KNOWN_SOURCES:
            return source, key
    return SOURCE_ANY, text


def parse_selector(text: str) -> tuple[Requirement, ...]:
    """Kubernetes' selector text: `k=v` (`==`), `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`,
    `!k`, `k>5`, `k<5`; keys may carry a source (`k8s:app`, `reserved:world`); a key without
    one matches any source. Every requirement must hold on one endpoint. As in Kubernetes'
    parser, an empty list `()` holds the empty value: `k notin ()` is "k absent or not
    empty"."""
    reqs = []
    for part in _split_selector(text):
        if m := _SET_OP.match(part):
            bang, key_text, op, values_text = m.groups()
            if bang:
                raise FilterError(f"label selector {text!r}: '!' before {op!r} in {part!r}")
            values = tuple(dict.fromkeys(v.strip() for v in values_text.split(",")))
            source, key = _source_key(key_text)
            reqs.append(Requirement(source, key, op, values))
        elif m := _EQ_OP.match(part):
            key_text, op, value = m.groups()
            source, key = _source_key(key_text)
            if op in "<>":
                if not re.fullmatch(r"-?\d+", value):
                    raise FilterError(f"label selector {text!r}: {op!r} needs an integer in "
                                      f"{part!r}")
                reqs.append(Requirement(source, key, "gt" if op == ">" else "lt", (value,)))
            else:
                reqs.append(Requirement(source, key, "notin" if op == "!=" else "in",
                                         (value,)))
        elif m := _KEY.match(part):
            bang, key_text = m.groups()
            source, key = _source_key(key_text)
            reqs.append(Requirement(source, key, "!exists" if bang else "exists"))
        else:
            raise FilterError(
                f"label selector {text!r}: cannot read {part!r} "
                "(write k=v, k!=v, k in (a,b), k notin (a,b), k or !k)"
            )
        if not reqs[-1].key:
            raise FilterError(f"label selector {text!r}: empty key in {part!r}")
    if not reqs:
        raise FilterError("empty label selector")
    return tuple(reqs)


def parsed_labels(labels: tuple[str, ...]) -> list[tuple[str, str, str]]:
    out = []
    for text in labels:
        key_part, _, value = text.partition("=")
        source, key = _source_key(key_part)
        out.append(("k8s" if source == SOURCE_ANY else source, key, value))
    return out
