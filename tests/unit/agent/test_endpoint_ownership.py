"""The endpoint registry records what garrison created for each endpoint, and reads registries
written before it did (those endpoints were all garrison's own)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from garrison.agent.endpoints import (
    OWNS_ALL,
    EndpointError,
    EndpointRecord,
    EndpointRegistry,
    validate_name,
)

POOL = ipaddress.ip_network("198.18.0.0/15")


def test_an_older_registry_means_garrison_made_everything(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps({"next_id": 2, "endpoints": [
        {"id": 1, "name": "web", "namespace": "default", "labels": ["app=web"],
         "ipv4": "198.18.0.2", "identity": 256, "host_ifname": "gar0123456789"}]}))
    rec = EndpointRegistry(path, POOL).get("web")
    assert rec.owned == OWNS_ALL and not rec.adopted and rec.container_id == ""


def test_adopted_endpoints_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    reg = EndpointRegistry(path, POOL)
    reg.add(EndpointRecord(0, "a-container-with-a-long-name_1.x", "default", (), "10.88.0.7",
                           netns_path="/run/netns/netns-1", ifname="eth0", owned=("clsact",),
                           container_id="c0ffee", extra={"network": "garrison"}))
    rec = EndpointRegistry(path, POOL).get("a-container-with-a-long-name_1.x")
    assert rec.adopted and rec.owned == ("clsact",) and rec.netns_path == "/run/netns/netns-1"
    assert rec.extra == {"network": "garrison"}
    assert EndpointRegistry(path, POOL).by_container("c0ffee") == rec


def test_an_adopted_address_only_must_not_clash(tmp_path: Path) -> None:
    reg = EndpointRegistry(tmp_path / "e.json", POOL)
    assert reg.claim_ip("10.88.0.7") == "10.88.0.7"  # outside the pool: the workload's own
    reg.add(EndpointRecord(0, "one", "default", ("a=b",), "10.88.0.7"))
    with pytest.raises(EndpointError, match="already the address of endpoint 'one'"):
        reg.claim_ip("10.88.0.7")
    with pytest.raises(EndpointError, match="gateway"):
        reg.claim_ip("198.19.255.254")


def test_in_memory_updates_are_written_by_the_next_persisting_one(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    reg = EndpointRegistry(path, POOL)
    rec = reg.add(EndpointRecord(0, "one", "default", ("a=b",), "198.18.0.2"), persist=False)
    assert not path.exists()
    from dataclasses import replace

    reg.update(replace(rec, identity=300), persist=False)
    assert not path.exists()
    reg.update(replace(rec, identity=301))
    assert EndpointRegistry(path, POOL).get("one").identity == 301


@pytest.mark.parametrize("name", ["deathstar", "gc-a-rather-long-endpoint-name-12345",
                                  "Web_1.prod", "x", "x" * 253])
def test_names_a_container_may_have(name: str) -> None:
    validate_name(name)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 254, ".."])
def test_names_refused(name: str) -> None:
    with pytest.raises(EndpointError, match="endpoint name"):
        validate_name(name)
