"""`garrison-cni` driven exactly as the CNI specification says a runtime drives it: a
subprocess, the verb and container in CNI_* environment variables, the network configuration
on stdin, a result or an error object `{cniVersion, code, msg[, details]}` on stdout.

No agent runs here: ADD and CHECK must fail closed with code 11 (try again later) and a
message that says to start the agent; DEL must succeed anyway, also twice, and leave a record
for the agent. Bad input of every kind is an error object with the spec's code — never a
traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PLUGIN = str(Path(sys.executable).with_name("garrison-cni"))
CONTAINER = "c0ffee" * 10 + "0123"
NETNS = "/run/netns/gc-unit-none"


def prev_result(ifname: str = "eth0") -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth1234abcd", "mac": "aa:bb:cc:dd:ee:01"},
            {"name": ifname, "mac": "aa:bb:cc:dd:ee:02", "sandbox": NETNS},
        ],
        "ips": [{"interface": 1, "address": "198.18.203.7/24", "gateway": "198.18.203.1"}],
        "routes": [{"dst": "198.18.0.0/15"}],
        "dns": {},
    }


def netconf(tmp: Path, **over: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0", "name": "gc-unit", "type": "garrison-cni",
        "agentSocket": str(tmp / "no-agent.sock"), "stateDir": str(tmp / "state"),
        "prevResult": prev_result(),
    }
    conf.update(over)
    return {k: v for k, v in conf.items() if v is not None}


def run(command: str | None, stdin: bytes, **env: str) -> tuple[int, Any, str]:
    environ = {
        "PATH": os.environ.get("PATH", ""), "GARRISON_PURE": "1",
        "CNI_CONTAINERID": CONTAINER, "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=gc-unit",
    }
    if "PYTHONPATH" in os.environ:  # the tree under test (a worktree), not the installed one
        environ["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if command is not None:
        environ["CNI_COMMAND"] = command
    environ.update(env)
    environ = {k: v for k, v in environ.items() if v != "<unset>"}
    done = subprocess.run([PLUGIN], input=stdin, capture_output=True, env=environ, timeout=30)
    out = done.stdout.decode()
    assert "Traceback" not in done.stderr.decode() + out
    return done.returncode, json.loads(out) if out.strip() else None, done.stderr.decode()


def assert_error(result: tuple[int, Any, str], code: int, *words: str) -> dict[str, Any]:
    rc, obj, _ = result
    assert rc != 0
    assert set(obj) <= {"cniVersion", "code", "msg", "details"}
    assert obj["code"] == code, obj
    assert isinstance(obj["msg"], str) and obj["cniVersion"]
    for word in words:
        assert word in obj["msg"], obj
    return obj


def test_version() -> None:
    rc, obj, _ = run("VERSION", b'{"cniVersion": "1.0.0"}')
    assert rc == 0
    assert obj == {"cniVersion": "1.0.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_add_without_an_agent_fails_closed_with_try_again_later(tmp_path: Path) -> None:
    obj = assert_error(run("ADD", json.dumps(netconf(tmp_path)).encode()), 11,
                       "start it with `garrison agent`", str(tmp_path / "no-agent.sock"))
    assert obj["cniVersion"] == "1.0.0"
    assert not (tmp_path / "state").exists()  # nothing recorded, nothing half-made


def test_del_without_an_agent_succeeds_twice_and_leaves_a_record(tmp_path: Path) -> None:
    body = json.dumps(netconf(tmp_path)).encode()
    for _ in range(2):
        rc, obj, _ = run("DEL", body)
        assert (rc, obj) == (0, None)
    pending = sorted((tmp_path / "state" / "cni-pending").iterdir())
    assert [p.name for p in pending] == [f"{CONTAINER}.json"]
    assert json.loads(pending[0].read_text())["container_id"] == CONTAINER


def test_del_without_prev_result_or_netns_still_succeeds(tmp_path: Path) -> None:
    body = json.dumps(netconf(tmp_path, prevResult=None)).encode()
    rc, obj, _ = run("DEL", body, CNI_NETNS="<unset>")
    assert (rc, obj) == (0, None)


def test_check_without_an_agent_is_try_again_later(tmp_path: Path) -> None:
    assert_error(run("CHECK", json.dumps(netconf(tmp_path)).encode()), 11)


def test_check_needs_040_or_later(tmp_path: Path) -> None:
    body = json.dumps(netconf(tmp_path, cniVersion="0.3.1")).encode()
    obj = assert_error(run("CHECK", body), 1, "0.4.0")
    assert obj["cniVersion"] == "0.3.1"


@pytest.mark.parametrize(
    ("over", "code", "word"),
    [
        ({"prevResult": None}, 7, "chained plugin"),
        ({"cniVersion": "9.9.9"}, 1, "9.9.9"),
        ({"cniVersion": None}, 7, "cniVersion"),
        ({"name": None}, 7, "name"),
        ({"agentSocket": 5}, 2, "agentSocket"),
        ({"prevResult": {"interfaces": [], "ips": []}}, 7, "eth0"),
        ({"prevResult": "x"}, 7, "prevResult"),
    ],
)
def test_bad_network_configuration(tmp_path: Path, over: dict[str, Any], code: int,
                                   word: str) -> None:
    conf = netconf(tmp_path)
    for key, value in over.items():
        if value is None:
            conf.pop(key)
        else:
            conf[key] = value
    assert_error(run("ADD", json.dumps(conf).encode()), code, word)


def test_unknown_interface(tmp_path: Path) -> None:
    assert_error(run("ADD", json.dumps(netconf(tmp_path)).encode(), CNI_IFNAME="eth9"), 7,
                 "eth9")


def test_interface_without_ipv4(tmp_path: Path) -> None:
    prev = prev_result()
    prev["ips"] = [{"interface": 1, "address": "2001:db8::7/64"}]
    assert_error(run("ADD", json.dumps(netconf(tmp_path, prevResult=prev)).encode()), 7,
                 "no IPv4")


@pytest.mark.parametrize(
    "body", [b"", b"{", b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 100000, b"{" * 100000]
)
def test_garbage_on_stdin(body: bytes) -> None:
    assert_error(run("ADD", body), 6)


@pytest.mark.parametrize(
    ("env", "word"),
    [
        ({"CNI_COMMAND": "<unset>"}, "CNI_COMMAND"),
        ({"CNI_COMMAND": "FROB"}, "FROB"),
        ({"CNI_NETNS": "<unset>"}, "CNI_NETNS"),
        ({"CNI_CONTAINERID": "<unset>", "CNI_IFNAME": "<unset>"}, "CNI_CONTAINERID, CNI_IFNAME"),
        ({"CNI_CONTAINERID": "../../etc/passwd"}, "CNI_CONTAINERID"),
    ],
)
def test_missing_or_bad_environment(tmp_path: Path, env: dict[str, str], word: str) -> None:
    command = env.pop("CNI_COMMAND", "ADD")
    result = run(None if command == "<unset>" else command,
                 json.dumps(netconf(tmp_path)).encode(), **env)
    assert_error(result, 4, word)
    assert not (tmp_path / "state").exists()


def test_status_without_an_agent_is_not_available(tmp_path: Path) -> None:
    body = json.dumps(netconf(tmp_path, cniVersion="1.1.0", prevResult=None)).encode()
    obj = assert_error(run("STATUS", body, CNI_CONTAINERID="<unset>", CNI_NETNS="<unset>",
                           CNI_IFNAME="<unset>"), 50, "start it with `garrison agent`")
    assert obj["cniVersion"] == "1.1.0"


def test_status_and_gc_need_110(tmp_path: Path) -> None:
    for verb in ("STATUS", "GC"):
        assert_error(run(verb, json.dumps(netconf(tmp_path)).encode()), 1, "1.1.0")


def test_gc_without_an_agent_is_try_again_later(tmp_path: Path) -> None:
    conf = netconf(tmp_path, cniVersion="1.1.0", prevResult=None)
    conf["cni.dev/valid-attachments"] = [{"containerID": CONTAINER, "ifname": "eth0"}]
    assert_error(run("GC", json.dumps(conf).encode()), 11)
    conf["cni.dev/valid-attachments"] = "all of them"
    assert_error(run("GC", json.dumps(conf).encode()), 7, "valid-attachments")


def test_gc_without_the_runtimes_attachments_removes_nothing(tmp_path: Path) -> None:
    """A GC with no list of valid attachments is refused before the agent is asked: taken as
    "none is valid" it would take the programs off every running container of the network
    (they would run unenforced)."""
    conf = netconf(tmp_path, cniVersion="1.1.0", prevResult=None)
    obj = assert_error(run("GC", json.dumps(conf).encode()), 7, "cni.dev/valid-attachments",
                       "nothing was removed")
    assert obj["cniVersion"] == "1.1.0"
    # libcni 1.2.0-1.2.2 sent the list as `cni.dev/attachments`: taken (then no agent: 11)
    conf["cni.dev/attachments"] = [{"containerID": CONTAINER, "ifname": "eth0"}]
    assert_error(run("GC", json.dumps(conf).encode()), 11)
    conf["cni.dev/attachments"] = "all of them"
    assert_error(run("GC", json.dumps(conf).encode()), 7, "cni.dev/attachments")


def test_no_prev_result_names_a_chain_that_works(tmp_path: Path) -> None:
    """The fix the message gives must work: garrison refuses a bridge port (L7 rules would not
    hold), so it names ptp, as `garrison cni install` writes it, and not bridge."""
    obj = assert_error(run("ADD", json.dumps(netconf(tmp_path, prevResult=None)).encode()), 7,
                       "chained plugin", "ptp", "garrison cni install")
    assert "bridge" not in obj["msg"], obj


def test_del_that_cannot_be_recorded_says_where_and_why(tmp_path: Path) -> None:
    """No agent, and the state directory cannot hold the record (here a file is in its way):
    a one-line error naming the directory and the fix, not `FileExistsError: [Errno 17]`."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    obj = assert_error(run("DEL", json.dumps(netconf(tmp_path)).encode()), 5,
                       f"{blocker}/cni-pending", "stateDir")
    assert "Errno" not in obj["msg"], obj
    assert blocker.read_text() == "not a directory"


def test_an_oversized_configuration_is_refused_before_it_is_held(tmp_path: Path) -> None:
    conf = netconf(tmp_path)
    conf["padding"] = "x" * (16 * 1024 * 1024)  # valid JSON, but no runtime sends this much
    obj = assert_error(run("ADD", json.dumps(conf).encode()), 7, "larger than 16 MiB")
    assert obj["msg"] == "network configuration on stdin is larger than 16 MiB: refused"
