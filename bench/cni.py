"""What garrison-cni costs a container start, and how soon a container is enforced.

Run (root, podman + containernetworking-plugins installed): .venv/bin/python bench/cni.py
    [--rounds 20] [--containers 5]

Starts its own agent (temporary state, pins and socket; free proxy ports) and, in one run:

1. The CNI ADD chain driven directly, as a runtime drives it (env vars + stdin), on a fresh
   network namespace each round (0.4 s apart, so the agent's label read of the previous
   round's container, a `podman inspect` after ADD returned, is not timed with the next
   ADD): `ptp` (+ `host-local`) alone, then `garrison-cni` with ptp's result as prevResult.
   The plugin's added time is its own ADD (process start included).
   The chain's DELs follow each round.
2. `podman run -d` on a network without garrison and on one chained with garrison-cni; for
   the latter, the time from starting `podman run` until the agent lists the container as an
   endpoint (enforced: reserved:init, deny both ways) and until its own labels' identity is in
   force (the label read after podman releases its lock).

Everything it creates (namespaces, networks, containers, host-local state, pins) it removes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from garrison.agent.api import AgentClient, AgentUnreachableError
from garrison.redirect import remove_pin_dir

BIN = Path(sys.executable).parent
GARRISON = str(BIN / "garrison")
TAG = str(os.getpid() % 100000)
SUBNET_DIRECT = "198.18.204.0/24"
SUBNET_PODMAN = "198.18.205.0/24"
SUBNET_PLAIN = "198.18.206.0/24"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:6.1f} ms, "
            f"min {min(values) * 1000:6.1f}, max {max(values) * 1000:6.1f} (n={len(values)})")


def run_plugin(path: str, command: str, conf: dict[str, Any], container: str, netns: str,
               cni_path: str) -> tuple[float, dict[str, Any] | None]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns,
           "CNI_IFNAME": "eth0", "CNI_PATH": cni_path, "PATH": os.environ["PATH"],
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAME={container}", "GARRISON_PURE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([path], input=json.dumps(conf).encode(), capture_output=True, env=env)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{path} {command}: {done.stdout.decode()} {done.stderr.decode()}")
    return elapsed, (json.loads(done.stdout) if done.stdout.strip() else None)


def direct_chain(rounds: int, work: Path, socket_path: Path, state: Path) -> None:
    network = f"gc-bench{TAG}"
    ptp = {"cniVersion": "1.0.0", "name": network, "type": "ptp", "ipMasq": False,
           "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET_DIRECT}]],
                    "routes": [{"dst": "198.18.0.0/15"}],
                    "dataDir": str(work / "ipam")}}
    gar = {"cniVersion": "1.0.0", "name": network, "type": "garrison-cni",
           "agentSocket": str(socket_path), "stateDir": str(state)}
    plugin = str(work / "bin" / "garrison-cni")
    base, added, dels = [], [], []
    for i in range(rounds):
        ns = f"gc-bench{TAG}-{i}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        netns = f"/run/netns/{ns}"
        container = f"gcbench{TAG}x{i}"
        try:
            t_ptp, result = run_plugin("/usr/lib/cni/ptp", "ADD", ptp, container, netns,
                                       "/usr/lib/cni")
            t_gar, _ = run_plugin(plugin, "ADD", {**gar, "prevResult": result}, container,
                                  netns, "/usr/lib/cni")
            base.append(t_ptp)
            added.append(t_gar)
            t_del, _ = run_plugin(plugin, "DEL", {**gar, "prevResult": result}, container,
                                  netns, "/usr/lib/cni")
            dels.append(t_del)
            run_plugin("/usr/lib/cni/ptp", "DEL", {**ptp, "prevResult": result}, container,
                       netns, "/usr/lib/cni")
            # the agent reads each new container's labels with `podman inspect` (~0.1 s of
            # CPU, after ADD returned): let it finish before the next round is timed
            time.sleep(0.4)
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print("CNI ADD chain, driven directly (process start included):")
    print(f"  ptp + host-local alone:          {ms(base)}")
    print(f"  garrison-cni added after it:     {ms(added)}")
    print(f"  garrison-cni DEL:                {ms(dels)}")
    # the plugin's own floor: the same process answering VERSION (no agent), and a bare start
    version, starts = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([plugin], input=b"{}", env={"CNI_COMMAND": "VERSION"}, check=True,
                       capture_output=True)
        version.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-IS", "-c", "pass"], check=True)
        starts.append(time.perf_counter() - t0)
    print(f"  garrison-cni VERSION (no agent): {ms(version)}")
    print(f"  python -IS -c pass, for scale:   {ms(starts)}")


def podman_runs(count: int, work: Path, client: AgentClient, env: dict[str, str]) -> None:
    names: list[str] = []
    plain = f"gc-plain{TAG}"
    (work / "net.d" / f"{plain}.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": plain, "plugins": [
            {"type": "ptp", "ipMasq": False, "ipam": {
                "type": "host-local", "ranges": [[{"subnet": SUBNET_PLAIN}]],
                "routes": [{"dst": "198.18.0.0/15"}]}},
            # as in garrison's conflist: the difference measured is garrison-cni's alone
            {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    try:
        t_plain, t_run, t_enforced, t_labels = [], [], [], []
        for i in range(count):
            name = f"gc-plain{TAG}-{i}"
            names.append(name)
            t0 = time.perf_counter()
            subprocess.run(["podman", "run", "-d", "--network", plain, "--name", name,
                            "--rootfs", "/:O", "sleep", "60"], check=True, env=env,
                           capture_output=True)
            t_plain.append(time.perf_counter() - t0)
        for i in range(count):
            name = f"gc-run{TAG}-{i}"
            names.append(name)
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                ["podman", "run", "-d", "--network", f"gc-pod{TAG}", "--name", name,
                 "--label", "app=bench", "--rootfs", "/:O", "sleep", "60"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            enforced = labelled = None
            while labelled is None and time.perf_counter() - t0 < 30:
                eps = client.call("EndpointList")["endpoints"]
                ep = next((e for e in eps if e["name"] == name), None)
                now = time.perf_counter() - t0
                if ep is not None and enforced is None:
                    enforced = now
                if ep is not None and ep["labels"]:
                    labelled = now
                time.sleep(0.002)
            proc.wait()
            t_run.append(time.perf_counter() - t0)
            assert enforced is not None and labelled is not None, name
            t_enforced.append(enforced)
            t_labels.append(labelled)
        print("podman run -d --rootfs /:O (sleep 60):")
        print(f"  network without garrison, returns after:   {ms(t_plain)}")
        print(f"  garrison-chained network, returns after:   {ms(t_run)}")
        print(f"  ... endpoint enforced (init, deny) after:  {ms(t_enforced)}")
        print(f"  ... its labels' identity in force after:   {ms(t_labels)}")
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", "--ignore", *names], env=env,
                       capture_output=True)
        shutil.rmtree(f"/var/lib/cni/networks/{plain}", ignore_errors=True)


def main() -> int:
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--containers", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("podman") is None:
        print("bench/cni.py needs root and podman", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gc-bench-"))
    state, sock = work / "state", work / "agent.sock"
    pins = Path(f"/sys/fs/bpf/gc-bench-{TAG}")
    ports = f"http={free_port()},grpc={free_port()},kafka={free_port()}"
    conf_dir, bin_dir = work / "net.d", work / "bin"
    containers_conf = work / "containers.conf"
    containers_conf.write_text(
        "[containers]\ndefault_ulimits = []\n[network]\nnetwork_backend = \"cni\"\n"
        f"cni_plugin_dirs = [\"{bin_dir}\", \"/usr/lib/cni\"]\n"
        f"network_config_dir = \"{conf_dir}\"\n")
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf)}
    argv = [GARRISON, "agent", "--state-dir", str(state), "--socket", str(sock),
            "--bpffs-root", str(pins), "--proxy-ports", ports, "--access-log",
            str(work / "access.log")]
    log = (work / "agent.log").open("wb")
    agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "GARRISON_PURE": "1"})
    client = AgentClient(sock)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.call("Status")
                break
            except AgentUnreachableError:
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise SystemExit(
                        f"agent did not start: {(work / 'agent.log').read_text()}") from None
                time.sleep(0.05)
        subprocess.run([GARRISON, "cni", "install", "--network", f"gc-pod{TAG}", "--subnet",
                        SUBNET_PODMAN, "--cni-bin-dir", str(bin_dir), "--cni-conf-dir",
                        str(conf_dir), "--socket", str(sock), "--state-dir", str(state)],
                       check=True, capture_output=True)
        direct_chain(args.rounds, work, sock, state)
        podman_runs(args.containers, work, client, env)
    finally:
        client.close()
        agent.terminate()
        agent.wait(30)
        subprocess.run([GARRISON, "agent", "--cleanup", *argv[2:]], capture_output=True)
        if pins.exists():
            remove_pin_dir(pins)
        shutil.rmtree(f"/var/lib/cni/networks/gc-pod{TAG}", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
