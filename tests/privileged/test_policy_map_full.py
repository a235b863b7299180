"""A policy map that fills up: the kernel keeps the previous verdict or a drop (never wider
access), the sync says it is behind, and once there is room the whole state goes in.

Before, a failed write (the map full) left the entries after it unwritten for good: the
desired state had moved on, so later changes never wrote them again, while `policy get` and
`policy trace` said the new policy was in force (a deny could be missing for ever).

A real datapath with a policy map of 8 entries (pins `garrison-test-<pid>-full`), one local
endpoint (its config written for an interface index no link has: only the maps are checked).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from garrison.bpf.loader import Datapath, DatapathConfig
from garrison.bpf.sync import KernelBehindError, LocalEndpoint, PolicySync
from garrison.policies.l7rules import L7Protocol
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.resolve import PolicyResolver, build_resolver
from garrison.redirect import ensure_bpffs, prepare_pin_dir, remove_pin_dir
from garrison.redirect.bpffs import BPFFS_MOUNT

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF)"),
]

PORTS = {L7Protocol.HTTP: 15080, L7Protocol.KAFKA: 15080, L7Protocol.GRPC: 15080}
SERVER = LocalEndpoint(ifindex=1_999_999, identity=300, ipv4=IPv4Address("198.18.237.10"))
CLIENTS = {301: "app=c1", 302: "app=c2", 303: "app=c3"}


def _resolver(ports: list[int]) -> PolicyResolver:
    text = textwrap.dedent(f"""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: server
        spec:
          endpointSelector:
            matchLabels:
              app: server
          ingress:
          - fromEndpoints:
            - matchLabels:
                app: c1
            - matchLabels:
                app: c2
            - matchLabels:
                app: c3
            toPorts:
            - ports: [{", ".join(f'{{port: "{p}", protocol: TCP}}' for p in ports)}]
        """)
    identities = [(SERVER.identity, endpoint_labels(Labels.parse("app=server")))]
    identities += [(n, endpoint_labels(Labels.parse(lab))) for n, lab in CLIENTS.items()]
    return build_resolver(load_text(text, "server.yaml").policies, identities)


@pytest.fixture(name="datapath")
def fixture_datapath() -> Iterator[Datapath]:
    ensure_bpffs()
    root = BPFFS_MOUNT / f"garrison-test-{os.getpid()}-full"
    prepare_pin_dir(root)
    dp = None
    try:
        dp = Datapath.load(DatapathConfig(pin_root=root, policy_max=8, ct_max=16384,
                                          events_pages=64))
        yield dp
    finally:
        if dp is not None:
            dp.close()
        remove_pin_dir(root)


def test_a_full_policy_map_is_caught_up_once_there_is_room(datapath: Datapath) -> None:
    sync = PolicySync(datapath.maps, PORTS)
    small = _resolver([80])  # 3 clients x 1 port, and the host's entry: fits
    sync.reconcile(small, [SERVER])
    assert sync.behind is None
    before = datapath.maps.policy.entries()
    assert len(before) == 4

    old_wanted = dict(sync.desired.entries())
    wide = _resolver([80, 81, 82])  # 10 entries: the map holds 8
    with pytest.raises(KernelBehindError, match="a kernel map write failed"):
        sync.reconcile(wide, [SERVER])
    assert sync.behind is not None and "retried every second" in sync.behind
    # what the kernel holds is the old state plus some of the new entries: each of them
    # an entry of the old or the new state, so no packet gets more than either allows
    written = datapath.maps.policy.entries()
    assert set(before) <= set(written) and len(written) <= 8
    assert all(k in sync.desired.entries() or k in old_wanted for k in written)
    # still no room: catching up fails again, and says so
    with pytest.raises(KernelBehindError):
        sync.catch_up(wide, [SERVER])

    narrower = _resolver([80, 81])  # 7 entries: fits once the stale ones are gone
    sync.catch_up(narrower, [SERVER])
    assert sync.behind is None
    assert datapath.maps.policy.entries() == sync.desired.entries()
    assert len(datapath.maps.policy.entries()) == 7
    assert sync.catch_up(narrower, [SERVER]) is None  # not behind: nothing to do
