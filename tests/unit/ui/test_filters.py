"""The page's filter box reads observe's flags."""

from __future__ import annotations

import pytest

from garrison.flows.query import FilterError, FilterTerm
from garrison.ui.filters import parse_filter


def test_same_flags_as_observe() -> None:
    query = parse_filter("--verdict DROPPED --not --to-pod deathstar --http-path '/v1/.*'")
    assert query.terms == (
        FilterTerm("verdict", ("DROPPED",)),
        FilterTerm("to-pod", ("deathstar",), negated=True),
        FilterTerm("http-path", ("/v1/.*",)),
    )


@pytest.mark.parametrize(("text", "message"), [
    ("--verdict NOPE", "--verdict 'NOPE': expected one of"),
    ("--not", "--not must be followed by a filter flag"),
    ("deathstar", "not a filter flag: deathstar"),
    ("--to-pod", "expected one argument"),
    ("--last 5", "do not apply here"),
    ('"unclosed', "cannot split"),
    ("--since 1h --until 2h", "is after --until"),
])
def test_bad_filters_name_the_flag(text: str, message: str) -> None:
    with pytest.raises(FilterError, match=message.replace("(", r"\(")):
        parse_filter(text)
