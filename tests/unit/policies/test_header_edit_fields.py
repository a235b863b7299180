"""headerMatches edits the proxy could never apply are policy errors, not runtime failures.

Before: `mismatch: REPLACE` on `Host` (or ADD of a value holding CR LF) loaded and validated
cleanly, then every request the rule matched was answered 500 over HTTP/1.1 (`header edit
refused`) and, over HTTP/2, the replaced `host` contradicted `:authority` upstream.
"""

from __future__ import annotations

import textwrap

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.l7rules import MismatchAction
from garrison.policies.loader import load_text


def policy(name: str, value: str, mismatch: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: p
        spec:
          endpointSelector: {{}}
          ingress:
          - toPorts:
            - ports: [{{port: "80", protocol: TCP}}]
              rules:
                http:
                - path: /v1/.*
                  headerMatches:
                  - name: {name}
                    value: {value}
                    mismatch: {mismatch}
        """)


def issues(text: str) -> list[str]:
    with pytest.raises(PolicyValidationError) as info:
        load_text(text, "test.yaml")
    return [str(i) for i in info.value.issues]


@pytest.mark.parametrize(
    "name",
    ["Host", "content-length", "Transfer-Encoding", "Connection", "Keep-Alive",
     "Proxy-Connection", "Upgrade", "TE"],
)
@pytest.mark.parametrize("mismatch", ["ADD", "REPLACE", "DELETE"])
def test_framing_and_connection_fields_cannot_be_edited(name: str, mismatch: str) -> None:
    assert issues(policy(name, "x.example", mismatch)) == [
        f"test.yaml:14: spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].name: "
        f"{mismatch} cannot edit '{name}': it frames or routes the request, and the proxy "
        f"forwards it as the client sent it"
    ]


@pytest.mark.parametrize("value", ['"a\\r\\nX-Evil: 1"', '"a\\nb"', '"a\\u0000b"', '"a\\u007fb"'])
@pytest.mark.parametrize("mismatch", ["ADD", "REPLACE"])
def test_an_added_value_must_be_a_valid_field_value(value: str, mismatch: str) -> None:
    assert issues(policy("X-Team", value, mismatch)) == [
        "test.yaml:15: spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].value: "
        "a header field value cannot hold control characters (CR, LF, NUL, DEL, ...)"
    ]


def test_other_edits_and_matches_still_load() -> None:
    for text in (
        policy("X-Team", '"doors\\ttab"', "REPLACE"),
        policy("Host", "x.example", '""'),  # matching Host is fine; only editing it is not
        policy("Host", "x.example", "LOG"),
    ):
        assert load_text(text, "test.yaml") is not None
    assert MismatchAction.REPLACE.value == "REPLACE"
