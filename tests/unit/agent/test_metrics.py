"""The labels of the agent's metrics (issue 18, item 12): drop reasons as the flow records and
`observe --drop-reason-desc` name them, Hubble's names for the rest; identity types."""

from __future__ import annotations

from garrison.agent.metrics import drop_reason_name, identity_type
from garrison.bpf.abi import DropReason
from garrison.flows.record import DropReasonDesc
from garrison.identity.model import CIDR_ID_FLAG, RESERVED


def test_drop_reasons_are_named_as_the_flow_records_name_them() -> None:
    assert drop_reason_name(DropReason.POLICY_DENIED) == DropReasonDesc.POLICY_DENIED.value
    assert drop_reason_name(DropReason.POLICY_DENY) == DropReasonDesc.POLICY_DENY.value
    assert drop_reason_name(DropReason.PROXY_NOT_LISTENING) == "PROXY_NOT_LISTENING"
    assert drop_reason_name(DropReason.PROXY_ASSIGN_FAILED) == "PROXY_NOT_LISTENING"
    assert drop_reason_name(DropReason.INVALID_PACKET) == "INVALID_PACKET_DROPPED"
    assert drop_reason_name(DropReason.INVALID_SOURCE_IP) == "INVALID_SOURCE_IP"
    assert drop_reason_name(250) == "UNKNOWN_250"
    assert len({drop_reason_name(r) for r in DropReason}) >= len(DropReason) - 1


def test_identity_types() -> None:
    assert identity_type(RESERVED["world"].id) == "reserved"
    assert identity_type(RESERVED["init"].id) == "reserved"
    assert identity_type(256) == "cluster_local"
    assert identity_type(CIDR_ID_FLAG | 7) == "node_local"
