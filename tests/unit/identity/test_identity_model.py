"""Identity numbers, reserved identities, CIDR labels and the canonical label encoding."""

from __future__ import annotations

import ipaddress

import pytest

from garrison.identity.allocator import canonical_labels, parse_canonical
from garrison.identity.model import (
    CIDR_ID_FLAG,
    RESERVED,
    RESERVED_BY_ID,
    Identity,
    InvalidIdentityLabelsError,
    UnknownReservedIdentityError,
    cidr_labels,
    cidr_prefix,
    parse_prefix,
    reserved_identity,
    reserved_identity_for_labels,
)
from garrison.policies.labels import Label, Labels

RESERVED_TABLE = [
    (1, "host"),
    (2, "world"),
    (3, "unmanaged"),
    (4, "health"),
    (5, "init"),
    (6, "remote-node"),
    (7, "kube-apiserver"),
    (8, "ingress"),
]


@pytest.mark.parametrize(("number", "name"), RESERVED_TABLE)
def test_reserved_identities(number: int, name: str) -> None:
    identity = reserved_identity(name)
    assert identity.id == number
    assert identity.labels == Labels.of([Label(key=name, value="", source="reserved")])
    assert str(identity.labels) == f"reserved:{name}="
    assert RESERVED[name] is identity
    assert RESERVED_BY_ID[number] is identity
    assert identity.is_reserved and not identity.is_endpoint and not identity.is_cidr


def test_reserved_set_is_exactly_the_eight() -> None:
    assert {(i.id, name) for name, i in RESERVED.items()} == set(RESERVED_TABLE)


def test_reserved_mapping_is_read_only() -> None:
    with pytest.raises(TypeError):
        RESERVED["evil"] = Identity(9, Labels())  # type: ignore[index]


def test_unknown_reserved_name() -> None:
    with pytest.raises(UnknownReservedIdentityError, match="no reserved identity 'cluster'"):
        reserved_identity("cluster")


@pytest.mark.parametrize(
    ("number", "reserved", "endpoint", "cidr"),
    [
        (1, True, False, False),
        (255, True, False, False),
        (256, False, True, False),
        (65535, False, True, False),
        (CIDR_ID_FLAG | 1, False, False, True),
        (CIDR_ID_FLAG | 0xFFFFFF, False, False, True),
        (2 << 24, False, False, False),  # another scope
    ],
)
def test_identity_kinds(number: int, reserved: bool, endpoint: bool, cidr: bool) -> None:
    identity = Identity(number, Labels())
    assert (identity.is_reserved, identity.is_endpoint, identity.is_cidr) == (
        reserved,
        endpoint,
        cidr,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("reserved:host", "host"),
        ("reserved:host,k8s:node-role=worker", "host"),  # node labels ride along
        ("reserved:remote-node,k8s:zone=a", "remote-node"),
        ("reserved:world", "world"),
        ("reserved:health", "health"),
        ("k8s:app=web", None),
    ],
)
def test_reserved_identity_for_labels(text: str, expected: str | None) -> None:
    found = reserved_identity_for_labels(Labels.parse(text))
    assert found == (None if expected is None else RESERVED[expected])


@pytest.mark.parametrize("text", ["reserved:world,k8s:app=web", "reserved:cluster"])
def test_reserved_labels_cannot_be_smuggled_into_workloads(text: str) -> None:
    with pytest.raises(InvalidIdentityLabelsError):
        reserved_identity_for_labels(Labels.parse(text))


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits cleared
        ("192.0.2.1", "192.0.2.1/32"),
        ("2001:db8::1/32", "2001:db8::/32"),
        (ipaddress.ip_network("198.18.0.0/15"), "198.18.0.0/15"),
    ],
)
def test_cidr_labels(given: str, normalised: str) -> None:
    labels = cidr_labels(given)
    assert labels == Labels.of(
        [Label(key=normalised, source="cidr"), Label(key="world", source="reserved")]
    )
    assert str(cidr_prefix(labels)) == normalised


@pytest.mark.parametrize("bad", ["", "10.0.0.0/33", "not-an-ip", "10.0.0.0/8/8"])
def test_bad_prefixes(bad: str) -> None:
    with pytest.raises(InvalidIdentityLabelsError, match="invalid CIDR prefix"):
        parse_prefix(bad)


@pytest.mark.parametrize(
    ("labels", "canonical"),
    [
        (
            Labels.parse("app=web,io.kubernetes.pod.namespace=prod"),
            "k8s:app=web;k8s:io.kubernetes.pod.namespace=prod",
        ),
        (Labels.parse("app.kubernetes.io/name=web"), "k8s:app.kubernetes.io/name=web"),
        (Labels.parse("reserved:host"), "reserved:host="),
        # separators inside parts are escaped, so different label sets never collide
        (Labels.of([Label(key="a", value="b;k8s:c=d")]), "k8s:a=b%3Bk8s%3Ac%3Dd"),
        (Labels.of([Label(key="a=b", value="")]), "k8s:a%3Db="),
        (Labels.of([Label(key="k", value="ünï 100%")]), "k8s:k=%C3%BCn%C3%AF%20100%25"),
    ],
)
def test_canonical_labels_round_trip(labels: Labels, canonical: str) -> None:
    assert canonical_labels(labels) == canonical
    assert parse_canonical(canonical) == labels


def test_canonical_labels_do_not_collide() -> None:
    one = Labels.of([Label(key="a", value="b;k8s:c=d")])
    two = Labels.of([Label(key="a", value="b"), Label(key="c", value="d")])
    assert canonical_labels(one) != canonical_labels(two)
