"""policymap: MapState -> kernel entries, the kernel lookup mirrored in Python, diffs.

The central property: for any MapState, the kernel's lookup over the entries policymap
writes (`lookup_entries`, the step-for-step mirror of lib/policy.h) returns exactly the
verdict of `mapstate.lookup`. The privileged precedence test then proves the C does what
`lookup_entries` does.
"""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.bpf.abi import EndpointFlags
from garrison.bpf.policymap import (
    DesiredPolicy,
    MissingProxyPortError,
    PolicyDiff,
    PolicyKey,
    PolicyValue,
    diff_entries,
    endpoint_flags,
    kernel_entries,
    lookup_entries,
    port_blocks,
    specificity,
    state_entries,
)
from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.mapstate import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    MapState,
    MapStateEntry,
    MapStateKey,
    lookup,
    precedence,
    prefix_block,
)
from garrison.policies.model import Direction
from garrison.policies.resolve import build_resolver

PROXY_PORTS = {L7Protocol.HTTP: 15001, L7Protocol.KAFKA: 15002, L7Protocol.GRPC: 15003}
EP = 300
PEERS = (301, 302, 2)
INGRESS, EGRESS = Direction.INGRESS, Direction.EGRESS


# ---- port blocks ---------------------------------------------------------------------------


@given(st.integers(1, 65535), st.integers(0, 4000))
def test_port_blocks_tile_the_range_like_prefix_block(start: int, span: int) -> None:
    end = min(65535, start + span)
    blocks = port_blocks(start, end)
    covered = []
    for block_start, plen in blocks:
        size = 1 << (16 - plen)
        assert block_start % size == 0, "blocks are aligned"
        assert 1 <= plen <= 16
        covered.extend(range(block_start, block_start + size))
        # every port of the block sees the model's width for it
        for port in {block_start, block_start + size - 1}:
            assert prefix_block(start, end, port) == size
    assert covered == list(range(start, end + 1))


def test_port_blocks_examples() -> None:
    assert port_blocks(0, 0) == [(0, 0)]
    assert port_blocks(80, 80) == [(80, 16)]
    assert port_blocks(80, 95) == [(80, 12)]
    assert port_blocks(79, 80) == [(79, 16), (80, 16)]
    assert port_blocks(1, 65535)[-1] == (32768, 1)
    with pytest.raises(ValueError):
        port_blocks(90, 80)


@given(
    st.sampled_from([0, 301]),
    st.sampled_from([0, PROTO_TCP]),
    st.integers(1, 2000),
    st.integers(0, 300),
    st.integers(0, 2400),
)
def test_specificity_is_the_models_precedence(
    ident: int, proto: int, start: int, span: int, port: int
) -> None:
    for key in (
        MapStateKey(INGRESS, ident, proto, start, start + span),
        MapStateKey(INGRESS, ident, proto, 0, 0),
    ):
        if not key.covers(ident or 301, proto or PROTO_TCP, port):
            continue
        entries = kernel_entries(EP, key, MapStateEntry(False), PROXY_PORTS)
        [(pkey, _)] = [(k, v) for k, v in entries if k.port <= port <= k.port_end]
        cls, width, proto_any = precedence(key, port)
        got = specificity(pkey)
        assert (got[0], got[2]) == (cls, proto_any)
        if key.port:
            assert 1 << got[1] == width


# ---- the kernel lookup agrees with the model ----------------------------------------------

ports = st.one_of(
    st.just((0, 0)),
    st.integers(1, 120).map(lambda p: (p, p)),
    st.tuples(st.integers(1, 120), st.integers(0, 70)).map(lambda t: (t[0], t[0] + t[1])),
)


@st.composite
def map_states(draw: st.DrawFn) -> MapState:
    entries: dict[MapStateKey, MapStateEntry] = {}
    for _ in range(draw(st.integers(0, 12))):
        direction = draw(st.sampled_from([INGRESS, EGRESS]))
        ident = draw(st.sampled_from([0, *PEERS]))
        proto = draw(st.sampled_from([0, PROTO_TCP, PROTO_UDP]))
        port, end = draw(ports)
        deny = draw(st.booleans())
        redirect = None
        if not deny and proto == PROTO_TCP and port and port == end and draw(st.booleans()):
            redirect = L7Protocol.HTTP
        entries[MapStateKey(direction, ident, proto, port, end)] = MapStateEntry(deny, redirect)
    return MapState(EP, draw(st.booleans()), draw(st.booleans()), entries)


probe_ports = st.sampled_from([0, 1, 7, 8, 15, 16, 53, 63, 64, 79, 80, 81, 100, 127, 128, 190])


@settings(max_examples=400, deadline=None)
@given(
    map_states(),
    st.lists(
        st.tuples(
            st.sampled_from([INGRESS, EGRESS]),
            st.sampled_from(PEERS),
            st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP]),
            probe_ports,
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_kernel_lookup_equals_model_lookup(
    state: MapState, probes: list[tuple[Direction, int, int, int]]
) -> None:
    entries = state_entries(state, PROXY_PORTS)
    for direction, remote, proto, port in probes:
        model = lookup(state, direction, remote, proto, port)
        kernel = lookup_entries(
            entries, EP, direction, remote, proto, port, state.enforced(direction)
        )
        assert kernel.allowed == model.allowed
        assert kernel.match_type is model.match_type
        assert kernel.drop_reason is model.drop_reason
        if model.allowed and model.key is not None:
            # the model breaks a tie of equal precedence by dict order; the kernel merges a
            # tie into one entry where a redirect wins (see policymap's docstring)
            best = precedence(model.key, port)
            tied = [
                e for k, e in state.entries.items()
                if k.direction is direction and not e.deny
                and k.covers(remote, proto, port) and precedence(k, port) == best
            ]
            assert kernel.redirect == any(e.redirect is not None for e in tied)
            if len(tied) == 1:
                assert kernel.redirect == (model.redirect is not None)
        else:
            assert not kernel.redirect


def test_deny_beats_a_more_specific_allow() -> None:
    state = MapState(
        EP,
        True,
        True,
        {
            MapStateKey(INGRESS, 0, 0, 0, 0): MapStateEntry(True),
            MapStateKey(INGRESS, 301, PROTO_TCP, 80, 80): MapStateEntry(False),
        },
    )
    verdict = lookup_entries(state_entries(state, PROXY_PORTS), EP, INGRESS, 301, PROTO_TCP,
                             80, True)
    assert not verdict.allowed
    assert verdict.drop_reason is not None and verdict.drop_reason.value == "POLICY_DENY"


def test_redirect_entry_carries_the_proxy_port() -> None:
    key = MapStateKey(INGRESS, 301, PROTO_TCP, 80, 80)
    [(pkey, value)] = kernel_entries(EP, key, MapStateEntry(False, L7Protocol.KAFKA), PROXY_PORTS)
    assert value == PolicyValue(True, 15002, 16)
    assert pkey == PolicyKey(EP, INGRESS, False, 301, PROTO_TCP, 80, 16)


def test_missing_proxy_port_is_an_error_naming_the_entry() -> None:
    key = MapStateKey(INGRESS, 301, PROTO_TCP, 80, 80)
    with pytest.raises(MissingProxyPortError, match="kafka"):
        kernel_entries(EP, key, MapStateEntry(False, L7Protocol.KAFKA), {})


def test_endpoint_flags() -> None:
    assert endpoint_flags(MapState(EP, True, False)) == EndpointFlags.INGRESS_ENFORCED
    assert endpoint_flags(MapState(EP, False, True, audit=True)) == (
        EndpointFlags.EGRESS_ENFORCED | EndpointFlags.AUDIT
    )


# ---- incremental desired state and diffs ---------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(map_states(), min_size=1, max_size=5))
def test_desired_policy_tracks_replaced_states(states: list[MapState]) -> None:
    desired = DesiredPolicy(PROXY_PORTS)
    kernel: dict[PolicyKey, PolicyValue] = {}
    for state in states:
        diff = desired.replace(state)
        for key, value in diff.ops():
            if value is None:
                del kernel[key]
            else:
                kernel[key] = value
        assert kernel == state_entries(state, PROXY_PORTS) == desired.entries(EP)
    gone = desired.remove(EP)
    assert set(gone.deletes) == set(kernel) and not gone.upserts
    assert desired.entries() == {}


def _verdict(entries: dict[PolicyKey, PolicyValue], probe: tuple[Direction, int, int, int],
             enforced: bool) -> tuple[bool, bool]:
    v = lookup_entries(entries, EP, *probe, enforced)
    return v.allowed, v.redirect


@settings(max_examples=300, deadline=None)
@given(
    map_states(),
    map_states(),
    st.lists(
        st.tuples(
            st.sampled_from([INGRESS, EGRESS]),
            st.sampled_from(PEERS),
            st.sampled_from([PROTO_TCP, PROTO_UDP]),
            probe_ports,
        ),
        min_size=1,
        max_size=10,
    ),
    st.booleans(),
    st.booleans(),
)
def test_diff_order_never_opens_access(
    old: MapState, new: MapState, probes: list[tuple[Direction, int, int, int]], enforced: bool,
    room_first: bool,
) -> None:
    """Applying a diff op by op: every intermediate verdict is the old one, the new one or a
    drop — never an allow (or an un-redirected allow) that neither state gives; also in the
    order that makes room in a full map first (`room_first`)."""
    before = state_entries(old, PROXY_PORTS)
    after = state_entries(new, PROXY_PORTS)
    diff = diff_entries(after, before)
    kernel = dict(before)
    for key, value in diff.ops(room_first):
        if value is None:
            del kernel[key]
        else:
            kernel[key] = value
        for probe in probes:
            now = _verdict(kernel, probe, enforced)
            allowed = {_verdict(before, probe, enforced), _verdict(after, probe, enforced)}
            assert now in allowed or not now[0], (probe, now, allowed)
    assert kernel == after


def test_diff_then_combines() -> None:
    a = PolicyKey(EP, INGRESS, False, 301, 6, 80, 16)
    b = PolicyKey(EP, INGRESS, True, 0, 0, 0, 0)
    v = PolicyValue(False, 0, 16)
    first = PolicyDiff({a: v}, frozenset({b}))
    second = PolicyDiff({b: PolicyValue(False, 0, 0)}, frozenset({a}))
    both = first.then(second)
    assert both.upserts == {b: PolicyValue(False, 0, 0)}
    assert both.deletes == frozenset({a})
    assert not PolicyDiff() and len(both) == 2


STAR_WARS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""
DENY_RANGE = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fence}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {org: alliance}}]
    toPorts: [{ports: [{port: "1", endPort: 1023, protocol: ANY}]}]
"""


def test_resolver_updates_feed_the_desired_policy_incrementally() -> None:
    def labels(text: str) -> Labels:
        return endpoint_labels(Labels.parse(text.split(",")), "default")

    eps = [
        (256, labels("org=empire,class=deathstar")),
        (257, labels("org=empire,class=tiefighter")),
        (258, labels("org=alliance,class=xwing")),
    ]
    first = load_text(textwrap.dedent(STAR_WARS), "sw.yaml").policies
    resolver = build_resolver(first, eps)
    desired = DesiredPolicy(PROXY_PORTS)
    for ident in resolver.endpoint_identities():
        desired.replace(resolver.map_state(ident))
    resolver.updates(resolver.endpoint_identities())
    changed = resolver.add_policies(load_text(textwrap.dedent(DENY_RANGE), "d.yaml").policies)
    assert changed == {256}
    for ident, keys in resolver.updates(changed).items():
        diff = desired.update(ident, {k: resolver.entry(ident, k) for k in keys})
        assert diff.upserts and all(k.deny for k in diff.upserts)
    for ident in resolver.endpoint_identities():
        state = resolver.map_state(ident)
        assert desired.entries(ident) == state_entries(state, PROXY_PORTS)
    entries = desired.entries(256)
    xwing = lookup_entries(entries, 256, INGRESS, 258, PROTO_TCP, 80, True)
    assert not xwing.allowed and xwing.drop_reason is not None
    tie = lookup_entries(entries, 256, INGRESS, 257, PROTO_TCP, 80, True)
    assert tie.allowed and tie.redirect and tie.proxy_port == 15001
