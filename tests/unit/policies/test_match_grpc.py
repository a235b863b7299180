"""GRPCMatcher: exact method, whole service, allow-all, the rule named, the reason given."""

from __future__ import annotations

import pytest

from garrison.policies.l7rules import GRPCRule, HTTPRule, L7Protocol, L7RuleSet
from garrison.policies.match_grpc import GRPCMatcher
from garrison.policies.refs import PolicyKind, RuleRef


def ref(name: str, rule_index: int = 0) -> RuleRef:
    return RuleRef(PolicyKind.CNP, "default", name, "ingress", rule_index=rule_index)


MAINTENANCE = ref("maintenance")
READERS = ref("readers")
DOORS_ADMIN = ref("doors-admin")

RULES = L7RuleSet(
    protocol=L7Protocol.GRPC,
    rules=(
        (GRPCRule("doors.DoorManager", "GetName"), READERS),
        (GRPCRule("doors.DoorManager", "GetLocation"), READERS),
        (GRPCRule("doors.DoorManager", "RequestMaintenance"), MAINTENANCE),
        (GRPCRule("doors.Admin"), DOORS_ADMIN),
    ),
)


@pytest.mark.parametrize(
    ("service", "method", "allowed", "rule", "reason"),
    [
        ("doors.DoorManager", "GetName", True, READERS, ""),
        ("doors.DoorManager", "GetLocation", True, READERS, ""),
        ("doors.DoorManager", "RequestMaintenance", True, MAINTENANCE, ""),
        ("doors.Admin", "Rotate", True, DOORS_ADMIN, ""),
        ("doors.Admin", "AnythingElse", True, DOORS_ADMIN, ""),
        (
            "doors.DoorManager",
            "SetAccessCode",
            False,
            None,
            "no rule allows doors.DoorManager/SetAccessCode",
        ),
        (
            "doors.DoorManager",
            "GetStatus",
            False,
            None,
            "no rule allows doors.DoorManager/GetStatus",
        ),
        # Exact, case-sensitive names: no prefix, suffix or case folding.
        ("doors.DoorManager", "getname", False, None, "no rule allows doors.DoorManager/getname"),
        ("doors.doormanager", "GetName", False, None, "no rule allows doors.doormanager/GetName"),
        ("DoorManager", "GetName", False, None, "no rule allows DoorManager/GetName"),
        (
            "doors.DoorManager.v2",
            "GetName",
            False,
            None,
            "no rule allows doors.DoorManager.v2/GetName",
        ),
        ("doors.Admin2", "Rotate", False, None, "no rule allows doors.Admin2/Rotate"),
        ("doors", "Admin", False, None, "no rule allows doors/Admin"),
    ],
)
def test_match_table(
    service: str, method: str, allowed: bool, rule: RuleRef | None, reason: str
) -> None:
    verdict = GRPCMatcher(RULES).match(service, method)
    assert (verdict.allowed, verdict.rule, verdict.reason) == (allowed, rule, reason)


def test_allow_all_allows_every_call_and_names_its_rule() -> None:
    l4 = ref("l4-only")
    ruleset = L7RuleSet(protocol=L7Protocol.GRPC, allow_all=True, allow_all_ref=l4)
    verdict = GRPCMatcher(ruleset).match("anything.At", "All")
    assert verdict.allowed and verdict.rule == l4


def test_no_rules_deny_everything() -> None:
    verdict = GRPCMatcher(L7RuleSet(protocol=L7Protocol.GRPC)).match("doors.DoorManager", "GetName")
    assert not verdict.allowed
    assert verdict.reason == "no rule allows doors.DoorManager/GetName"


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        # The earliest matching rule in policy order is the one named, whichever kind it is.
        (((GRPCRule("s.S"), ref("whole")), (GRPCRule("s.S", "M"), ref("exact"))), "whole"),
        (((GRPCRule("s.S", "M"), ref("exact")), (GRPCRule("s.S"), ref("whole"))), "exact"),
        (((GRPCRule("s.S", "M"), ref("first")), (GRPCRule("s.S", "M"), ref("second"))), "first"),
        (((GRPCRule("s.S"), ref("first")), (GRPCRule("s.S"), ref("second"))), "first"),
    ],
)
def test_first_matching_rule_is_named(
    rules: tuple[tuple[GRPCRule, RuleRef], ...], expected: str
) -> None:
    verdict = GRPCMatcher(L7RuleSet(protocol=L7Protocol.GRPC, rules=rules)).match("s.S", "M")
    assert verdict.allowed
    assert verdict.rule is not None and verdict.rule.name == expected


def test_rule_without_ref_still_allows() -> None:
    ruleset = L7RuleSet(protocol=L7Protocol.GRPC, rules=((GRPCRule("s.S", "M"), None),))
    verdict = GRPCMatcher(ruleset).match("s.S", "M")
    assert verdict.allowed and verdict.rule is None


def test_other_rule_types_are_refused() -> None:
    ruleset = L7RuleSet(protocol=L7Protocol.HTTP, rules=((HTTPRule(path="/"), None),))
    with pytest.raises(TypeError):
        GRPCMatcher(ruleset)
