"""A container's endpoint exists before its labels are read (podman holds its own lock during
CNI ADD): it has the reserved `init` identity, which must be denied both ways whatever the
enforcement mode says for unselected endpoints, so its traffic is never unpoliced."""

from __future__ import annotations

from garrison.identity.model import RESERVED
from garrison.policies.model import EnforcementMode
from garrison.policies.resolve import LOCALHOST_KEY, PolicyResolver, ResolverConfig

INIT = RESERVED["init"]


def test_init_identity_is_default_deny_both_ways() -> None:
    resolver = PolicyResolver(ResolverConfig(EnforcementMode.DEFAULT))
    resolver.add_identity(INIT.id, INIT.labels)
    state = resolver.map_state(INIT.id)
    assert state.ingress_enforced and state.egress_enforced
    # nothing but the local host's ingress allow (allow-localhost, on by default)
    assert list(state.entries) == [LOCALHOST_KEY]
    strict = PolicyResolver(ResolverConfig(EnforcementMode.DEFAULT, allow_localhost=False))
    strict.add_identity(INIT.id, INIT.labels)
    assert not strict.map_state(INIT.id).entries


def test_never_mode_still_never_enforces() -> None:
    resolver = PolicyResolver(ResolverConfig(EnforcementMode.NEVER))
    resolver.add_identity(INIT.id, INIT.labels)
    state = resolver.map_state(INIT.id)
    assert not state.ingress_enforced and not state.egress_enforced
