"""`make install` and `make uninstall` as docs/operating.md describes them (issue 18, item 16).

Uninstall removes what garrison put on the machine and nothing else: it refuses while the
agent runs (it stops nothing), then removes the agent's endpoints, pins and the steering it
added (`garrison agent --cleanup`), the CNI files `garrison cni install` wrote, and the unit
and command link `make install` wrote — and keeps a unit or a command that is not garrison's.

The agent runs in a namespace of its own (`gm-op-<pid>`); every path the scripts write is
under the test's temporary directory (the scripts' GARRISON_* variables).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.redirect import ensure_bpffs, remove_pin_dir
from garrison.redirect.bpffs import BPFFS_MOUNT
from tests.privileged.agent_harness import NsAgent, ip

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, BPF")

REPO = Path(__file__).resolve().parents[2]
GARRISON = REPO / ".venv" / "bin" / "garrison"
ENDPOINT = "gm-op-ep"


@pytest.fixture(name="agent")
def fixture_agent(tmp_path: Path) -> Iterator[NsAgent]:
    if shutil.which("nsenter") is None or shutil.which("make") is None:
        pytest.skip("needs nsenter and make")
    ensure_bpffs()
    name = f"gm-op-{os.getpid()}"
    for ns in (name, ENDPOINT):
        assert not Path(f"/run/netns/{ns}").exists(), f"{ns} exists: not ours, left alone"
    subprocess.run(["ip", "netns", "add", name], check=True)
    workdir = tmp_path / "agent"
    workdir.mkdir()
    agent = NsAgent(name, workdir, BPFFS_MOUNT / f"gm-op-{os.getpid()}")
    try:
        ip(name, "link", "set", "lo", "up")
        yield agent
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
        if agent.pin_root.exists():
            agent.cleanup()
        if Path(f"/run/netns/{ENDPOINT}").exists():  # made by the agent for this test
            subprocess.run(["ip", "netns", "delete", ENDPOINT], check=False)
        if agent.pin_root.exists():
            remove_pin_dir(agent.pin_root)
        subprocess.run(["ip", "netns", "delete", name], check=True)  # ours: made above


def run(agent: NsAgent, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """A command inside the agent's namespace (the steering rule is per namespace)."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{agent.netns}", *argv], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def steering(netns: str) -> dict[str, object]:
    rules = [r for r in json.loads(ip(netns, "-j", "rule", "show"))
             if r.get("fwmark") == "0x200" and r.get("table") == "2004"]
    return {"rules": len(rules),
            "route": "local default dev lo" in ip(netns, "route", "show", "table", "2004")}


def test_install_then_uninstall_removes_what_garrison_made(agent: NsAgent,
                                                           tmp_path: Path) -> None:
    bin_dir, unit_dir = tmp_path / "bin", tmp_path / "systemd"
    cni_conf, cni_bin = tmp_path / "cni" / "net.d", tmp_path / "cni" / "bin"
    env = {
        "GARRISON_BIN_DIR": str(bin_dir), "GARRISON_UNIT_DIR": str(unit_dir),
        "GARRISON_STATE_DIR": str(agent.workdir / "state"), "GARRISON_SOCKET": str(agent.socket),
        "GARRISON_BPFFS_ROOT": str(agent.pin_root),
        "GARRISON_CNI_CONF_DIR": str(cni_conf), "GARRISON_CNI_BIN_DIR": str(cni_bin),
    }
    link, unit = bin_dir / "garrison", unit_dir / "garrison-agent.service"

    done = run(agent, env, "bash", "scripts/install.sh")  # what `make install` runs after setup
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"install: linked {link} -> {GARRISON}",
        f"install: wrote {unit}",
        "install: start it with: systemctl enable --now garrison-agent",
    ]
    assert os.readlink(link) == str(GARRISON)
    assert f"ExecStart={GARRISON} agent" in unit.read_text()
    again = run(agent, env, "bash", "scripts/install.sh")
    assert again.returncode == 0 and "(already)" in again.stdout and "wrote" not in again.stdout
    done = subprocess.run([str(GARRISON), "cni", "install", "--cni-conf-dir", str(cni_conf),
                           "--cni-bin-dir", str(cni_bin)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    agent.start()
    done = agent.cli("endpoint", "add", ENDPOINT, "--labels", "app=gm-op", "--ip",
                     "198.18.78.10")
    assert done.returncode == 0, done.stderr
    assert steering(agent.netns) == {"rules": 1, "route": True}

    # while the agent runs: refused, and nothing removed (it stops nothing)
    done = run(agent, env, "make", "-s", "uninstall")
    assert done.returncode != 0
    assert "is running; stop it first" in done.stderr
    assert "stop the agent first" in done.stderr
    assert link.is_symlink() and unit.exists() and agent.pin_root.exists()
    assert Path(f"/run/netns/{ENDPOINT}").exists()

    assert agent.stop() == 0
    done = run(agent, env, "make", "-s", "uninstall")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"removed endpoint {ENDPOINT}: its namespace and veth" in out
    assert f"removed the pinned maps under {agent.pin_root}" in out
    assert "removed the ip rule fwmark 0x200/0xf00 lookup 2004" in out
    assert "removed the local route in table 2004" in out
    assert f"removed {cni_conf}/garrison.conflist" in out
    assert f"uninstall: removed {unit}" in out and f"uninstall: removed {link}" in out
    assert not Path(f"/run/netns/{ENDPOINT}").exists() and not agent.pin_root.exists()
    assert steering(agent.netns) == {"rules": 0, "route": False}
    assert not link.exists() and not link.is_symlink() and not unit.exists()
    assert not list(cni_conf.glob("*")) and not list(cni_bin.glob("*"))
    assert (agent.workdir / "state").is_dir()  # kept, and said so
    assert f"uninstall: kept: {agent.workdir / 'state'}" in out

    # a unit and a command of someone else's stay
    unit.write_text("[Service]\nExecStart=/usr/bin/someone-elses-agent\n")
    link.write_text("#!/bin/sh\n")
    done = run(agent, env, "make", "-s", "uninstall")
    assert done.returncode != 0
    assert f"uninstall: kept {unit}: not the unit make install wrote" in done.stderr
    assert f"uninstall: kept {link}: not garrison's link" in done.stdout
    assert "nothing to clean up in the kernel" in done.stdout
    assert unit.read_text().endswith("someone-elses-agent\n") and link.read_text() == "#!/bin/sh\n"
    assert "Traceback" not in agent.log() + done.stdout + done.stderr
