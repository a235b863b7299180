"""The underlay record: whose clsact the underlay device's is, across a killed agent.

Unprivileged: the records name the loopback device (ifindex 1, present in every network
namespace) or a device that does not exist, so no tc change is ever made here; the
privileged cluster test (tests/privileged/test_cluster.py) kills and restarts a real agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from garrison.redirect.underlay import Underlay, UnderlayRecord, interface_name

LO = 1


def _record(tmp_path: Path, ifindex: int, ifname: str, clsact: bool) -> UnderlayRecord:
    path = tmp_path / "state" / "underlay.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"ifindex": ifindex, "ifname": ifname, "clsact": clsact}))
    return UnderlayRecord(path)


def test_the_loopback_device_is_named() -> None:
    assert interface_name(LO) == "lo"


def test_a_clsact_this_agent_made_is_recorded_as_garrisons(tmp_path: Path) -> None:
    record = UnderlayRecord(tmp_path / "state" / "underlay.json")
    assert record.attached(LO, made_clsact=True) is True
    assert record.load() == Underlay(LO, "lo", True)


def test_a_killed_agents_clsact_stays_garrisons_for_the_next_agent(tmp_path: Path) -> None:
    # the first agent made it and was killed: the next finds the clsact there (made False)
    record = _record(tmp_path, LO, "lo", True)
    assert record.attached(LO, made_clsact=False) is True
    assert record.load() == Underlay(LO, "lo", True)


def test_a_clsact_that_was_there_before_garrison_is_never_garrisons(tmp_path: Path) -> None:
    record = _record(tmp_path, LO, "lo", False)
    assert record.attached(LO, made_clsact=False) is False
    assert UnderlayRecord(tmp_path / "state" / "underlay.json").attached(LO, False) is False


def test_a_record_of_another_device_does_not_make_this_ones_clsact_garrisons(
    tmp_path: Path,
) -> None:
    # the node IP moved: the recorded device is gone, so nothing is detached there, and the
    # clsact found on the new device is not garrison's
    record = _record(tmp_path, 99999, "gone-u1", True)
    assert record.attached(LO, made_clsact=False) is False
    assert record.load() == Underlay(LO, "lo", False)


def test_release_leaves_a_device_that_is_gone_or_renamed_alone(tmp_path: Path) -> None:
    for ifindex, name in ((99999, "gone-u1"), (LO, "renamed0")):
        record = _record(tmp_path, ifindex, name, True)
        released = record.release()
        assert released.underlay == Underlay(ifindex, name, True)
        assert released.removed is False
        assert not record.path.exists()


def test_release_without_a_record_does_nothing(tmp_path: Path) -> None:
    released = UnderlayRecord(tmp_path / "underlay.json").release()
    assert released.underlay is None and released.removed is False


def test_a_damaged_record_is_an_error_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "underlay.json"
    path.write_text("{\"ifindex\": 3")
    with pytest.raises(ValueError, match=r"underlay\.json: not an underlay record .*remove it"):
        UnderlayRecord(path).load()
