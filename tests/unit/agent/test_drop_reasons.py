"""Every reason the datapath drops a packet for has its Hubble name and Cilium's code in the
flow record: an IPv6 packet from a container (garrison enforces IPv4 only, and drops the rest)
reads `UNSUPPORTED_L3_PROTOCOL`, not "Unknown drop reason"."""

from __future__ import annotations

from garrison.agent.events import DROP_REASONS
from garrison.bpf.abi import HUBBLE_DROP_NAMES, DropReason
from garrison.flows.record import DropReasonDesc


def test_every_datapath_drop_reason_is_named() -> None:
    assert set(DROP_REASONS) == set(DropReason)
    assert DropReasonDesc.DROP_REASON_UNKNOWN not in DROP_REASONS.values()


def test_names_and_codes_are_hubbles() -> None:
    for reason, desc in DROP_REASONS.items():
        if reason in (DropReason.PROXY_NOT_LISTENING, DropReason.PROXY_ASSIGN_FAILED):
            assert desc is DropReasonDesc.PROXY_NOT_LISTENING  # garrison's own
            continue
        assert desc.value == HUBBLE_DROP_NAMES.get(reason, reason.name)
        assert desc.code == int(reason)


def test_ipv6_drop_text() -> None:
    desc = DROP_REASONS[DropReason.UNSUPPORTED_L3]
    assert (desc.value, desc.text, desc.code) == (
        "UNSUPPORTED_L3_PROTOCOL", "Unsupported L3 protocol", 139
    )
