"""Allocation is a function of the identity-relevant labels."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.identity.allocator import IdentityAllocator
from garrison.identity.filter import LabelFilter
from garrison.kvstore import SQLiteKVStore
from garrison.policies.labels import Label, Labels

KEYS = [
    "app",
    "tier",
    "io.kubernetes.pod.namespace",
    "app.kubernetes.io/name",
    # volatile: must never influence the number
    "pod-template-hash",
    "controller-revision-hash",
    "io.kubernetes.pod.name",
    "statefulset.kubernetes.io/pod-name",
]
VALUES = ["a", "b", "prod;x=y", ""]

label_sets = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=5).map(
    lambda d: Labels.of(Label(key=k, value=v) for k, v in d.items())
)


@settings(max_examples=60, deadline=None)
@given(st.lists(label_sets, min_size=1, max_size=8))
def test_same_number_iff_same_relevant_labels(sets: list[Labels]) -> None:
    label_filter = LabelFilter()
    with SQLiteKVStore(":memory:") as kv:
        allocator = IdentityAllocator(kv)
        numbers: dict[Labels, int] = {}
        for owner, labels in enumerate(sets):
            relevant = label_filter.apply(labels)
            if not relevant:
                continue
            identity = allocator.allocate(labels, f"ep-{owner}")
            assert identity.labels == relevant
            assert numbers.setdefault(relevant, identity.id) == identity.id
        assert len(set(numbers.values())) == len(numbers)
        for relevant, number in numbers.items():
            found = allocator.lookup_id(number)
            assert found is not None and found.labels == relevant
