"""An endpoint's or the host's ipcache entry outranks a CIDR identity for the same prefix."""

from __future__ import annotations

from ipaddress import IPv4Network

from garrison.agent.ipcacheclaims import IPCacheClaims

ADDR = IPv4Network("198.18.235.21/32")
CIDR_ID = (1 << 24) | 5


def test_a_cidr_prefix_is_written_where_nobody_holds_it() -> None:
    claims = IPCacheClaims()
    assert claims.set_cidr(ADDR, CIDR_ID) == CIDR_ID
    assert claims.delete_cidr(ADDR) is True


def test_an_endpoint_keeps_its_entry_and_gets_the_cidr_back_when_it_goes() -> None:
    claims = IPCacheClaims()
    claims.hold(ADDR, 257)
    assert claims.set_cidr(ADDR, CIDR_ID) is None  # not written over the endpoint
    assert claims.delete_cidr(ADDR) is False  # the endpoint's entry is not deleted
    claims.set_cidr(ADDR, CIDR_ID)
    assert claims.release(ADDR) == CIDR_ID  # endpoint gone: the CIDR identity comes back
    assert claims.release(ADDR) == CIDR_ID
    claims.delete_cidr(ADDR)
    assert claims.release(ADDR) is None


def test_an_endpoint_arriving_on_a_cidr_prefix_holds_it() -> None:
    claims = IPCacheClaims()
    assert claims.set_cidr(ADDR, CIDR_ID) == CIDR_ID
    claims.hold(ADDR, 300)
    assert claims.held(ADDR) == 300
    assert claims.delete_cidr(ADDR) is False
    assert claims.release(ADDR) is None
