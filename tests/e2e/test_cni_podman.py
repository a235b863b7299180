"""Containers started by podman (4.3, CNI backend) on a garrison-chained network.

One agent and one network per module: `garrison cni install` writes a ptp + host-local +
garrison-cni conflist and the plugin into this module's own directories, and podman is pointed
at them through its own containers.conf (CONTAINERS_CONF), so nothing of the user's podman
set-up is read or changed. Containers run on the host's root with an overlay
(`--rootfs /:O`): no image is pulled.

The Star Wars scenario as containers (deathstar, tiefighter, xwing): the xwing is dropped at
L3/L4, the tiefighter's `PUT /v1/exhaust-port` gets the proxy's 403, and the flow records name
the containers. Then the lifecycle: stop/start/remove, the agent down during ADD (the container
does not start) and during DEL (cleaned up when the agent starts), and an agent restart with
containers running (enforcement never stops).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from garrison.flows.record import DropReasonDesc, FlowType, Verdict
from garrison.redirect import ensure_bpffs, remove_pin_dir
from garrison.redirect.bpffs import BPFFS_MOUNT
from tests.privileged.agent_harness import AgentProcess, other_agents, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (apt-get install podman "
                       "containernetworking-plugins; make setup)"),
    pytest.mark.skipif(not Path("/usr/lib/cni/ptp").exists(),
                       reason="the reference CNI plugins are not installed "
                       "(apt-get install containernetworking-plugins)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, tc, podman)"),
]

REPO = Path(__file__).resolve().parents[2]
STARWARS = REPO / "examples" / "starwars"
TAG = f"{os.getpid() % 100000}"
NET = f"gc-e2e{TAG}"
SUBNET = "198.18.203.0/24"
NET2 = f"gc-e2e2-{TAG}"  # a second garrison network (installed by the test that needs it)
SUBNET2 = "198.18.204.0/24"
PLAIN = f"gc-plain{TAG}"  # a network without garrison-cni (ptp + host-local only)
SUBNET3 = "198.18.205.0/24"
CURL_TIMEOUT = 2.0


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# the harness's agent, on proxy ports of this module's own (the last --proxy-ports wins)
_PORTS = free_ports(3)
AGENT_ARGS = ("--proxy-ports", f"http={_PORTS[0]},grpc={_PORTS[1]},kafka={_PORTS[2]}")


@dataclass
class Runtime:
    agent: AgentProcess
    dir: Path
    env: dict[str, str]
    names: list[str]

    def podman(self, *args: str, check: bool = True,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["podman", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def run(self, short: str, labels: str, *cmd: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        name = f"gc-{short}{TAG}"
        self.names.append(name)
        label_args = [a for kv in labels.split(",") if kv for a in ("--label", kv)]
        return self.podman("run", "-d", "--network", NET, "--name", name, *label_args,
                           "--rootfs", "/:O", *cmd, check=check)

    def endpoint(self, name: str) -> dict[str, object] | None:
        eps = self.agent.call("EndpointList")["endpoints"]
        return next((e for e in eps if e["name"] == name), None)

    def labelled(self, name: str) -> dict[str, object]:
        """The container's endpoint once its labels were read (identity no longer init)."""
        found: dict[str, object] = {}

        def ready() -> bool:
            ep = self.endpoint(name)
            if ep and ep["labels"] and int(str(ep["identity"])) >= 256:
                found.update(ep)
                return True
            return False

        wait_for(ready, f"endpoint {name} with its labels", timeout=20)
        return found

    def curl(self, ship: str, method: str, ip: str, path: str) -> tuple[int, int, str]:
        done = subprocess.run(
            ["podman", "exec", ship, "curl", "-s", "-i", "-m", str(CURL_TIMEOUT), "-X", method,
             f"http://{ip}{path}"], capture_output=True, env=self.env, timeout=60,
            stdin=subprocess.DEVNULL)
        head, _, body = done.stdout.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        return done.returncode, status, body.decode()


@pytest.fixture(scope="module")
def rt(request: pytest.FixtureRequest,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    work = tmp_path_factory.mktemp("cni")
    conf_dir, bin_dir = work / "net.d", work / "bin"
    containers_conf = work / "containers.conf"
    containers_conf.write_text(
        "[containers]\ndefault_ulimits = []\n[network]\nnetwork_backend = \"cni\"\n"
        f"cni_plugin_dirs = [\"{bin_dir}\", \"/usr/lib/cni\"]\n"
        f"network_config_dir = \"{conf_dir}\"\n"
    )
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf)}
    agent_dir = work / "agent"
    agent_dir.mkdir()
    ensure_bpffs()
    pin_root = BPFFS_MOUNT / f"garrison-test-{os.getpid()}-cni"
    agent = AgentProcess(agent_dir, pin_root, AGENT_ARGS)
    runtime = Runtime(agent, work, env, [])
    garrison = str(Path(sys.executable).with_name("garrison"))
    try:
        agent.start()
        subprocess.run(
            [garrison, "cni", "install", "--network", NET, "--subnet", SUBNET,
             "--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir),
             "--socket", str(agent.socket), "--state-dir", str(agent_dir / "state")],
            check=True, capture_output=True)
        yield runtime
    finally:
        if runtime.names:
            subprocess.run(["podman", "rm", "-f", "-t", "0", "--ignore", *runtime.names],
                           env=env, capture_output=True, timeout=120)
        for net in (NET, NET2):
            subprocess.run([garrison, "cni", "uninstall", "--network", net, "--cni-conf-dir",
                            str(conf_dir)], capture_output=True)
        (conf_dir / f"{PLAIN}.conflist").unlink(missing_ok=True)
        for net in (NET, NET2, PLAIN):
            shutil.rmtree(f"/var/lib/cni/networks/{net}", ignore_errors=True)
            # libcni's cached results of a DEL that failed (the missed-DEL test's)
            for cached in Path("/var/lib/cni/results").glob(f"{net}-*"):
                cached.unlink(missing_ok=True)
        if agent.alive:
            agent.stop()
        # the agent's pins (and the steering it added, when no other agent runs)
        if not other_agents(set()):
            agent.cli("agent", "--cleanup", *agent.argv()[2:], check=False, socket_arg=False)
        if pin_root.exists():
            remove_pin_dir(pin_root)
    assert "Traceback" not in agent.log(), f"the agent logged a crash:\n{agent.log()}"
    left = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], env=env,
                          capture_output=True, text=True).stdout.split()
    assert not set(left) & set(runtime.names), f"containers left: {left}"
    registry = agent_dir / "state" / "endpoints.json"
    assert not registry.exists() or not any(
        e["container_id"] for e in json.loads(registry.read_text())["endpoints"]
    ), "a removed container is still an endpoint"


@dataclass(frozen=True)
class Galaxy:
    deathstar: dict[str, object]
    tiefighter: dict[str, object]
    xwing: dict[str, object]


@pytest.fixture(scope="module")
def galaxy(rt: Runtime) -> Galaxy:
    rt.run("deathstar", "org=empire,class=deathstar", sys.executable,
           str(STARWARS / "deathstar.py"), "--listen", "0.0.0.0:80")
    rt.run("tiefighter", "org=empire,class=tiefighter", "sleep", "600")
    rt.run("xwing", "org=alliance,class=xwing", "sleep", "600")
    return Galaxy(rt.labelled(f"gc-deathstar{TAG}"), rt.labelled(f"gc-tiefighter{TAG}"),
                  rt.labelled(f"gc-xwing{TAG}"))


def test_containers_are_endpoints_with_their_labels(rt: Runtime, galaxy: Galaxy) -> None:
    ds = galaxy.deathstar
    assert ds["labels"] == ["class=deathstar", "org=empire"]
    assert ds["namespace"] == "default"
    assert ipaddress.ip_address(str(ds["ipv4"])) in ipaddress.ip_network(SUBNET)
    cid = rt.podman("inspect", "--format", "{{.Id}}", str(ds["name"])).stdout.strip()
    assert ds["container_id"] == cid
    listed = rt.agent.cli("endpoint", "list").stdout
    assert any(str(ds["name"]) in line and cid[:12] in line for line in listed.splitlines())
    check = rt.agent.call("CniCheck", container_id=cid, ipv4=ds["ipv4"])
    assert check["problems"] == []


def test_starwars_l3_l4_drops_the_xwing_and_l7_denies_the_exhaust_port(
    rt: Runtime, galaxy: Galaxy
) -> None:
    ds_ip = str(galaxy.deathstar["ipv4"])
    tie, xwing = str(galaxy.tiefighter["name"]), str(galaxy.xwing["name"])
    # no policy: both land
    assert rt.curl(xwing, "POST", ds_ip, "/v1/request-landing") == (0, 200, "Ship landed\n")
    rt.agent.import_file(STARWARS / "sw_l3_l4_policy.yaml")
    t0 = time.time_ns()
    assert rt.curl(tie, "POST", ds_ip, "/v1/request-landing") == (0, 200, "Ship landed\n")
    code, status, _ = rt.curl(xwing, "POST", ds_ip, "/v1/request-landing")
    assert (code, status) == (28, 0)  # curl's timeout: the SYN was dropped
    drop = rt.agent.wait_flow(lambda r: r.time >= t0 and r.verdict is Verdict.DROPPED
                              and r.source.ip == galaxy.xwing["ipv4"], cli=True)
    assert drop.type is FlowType.L3_L4
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert (drop.source.pod_name, drop.destination.pod_name) == (xwing, galaxy.deathstar["name"])
    assert (drop.source.identity, drop.destination.identity) == (
        galaxy.xwing["identity"], galaxy.deathstar["identity"])

    rt.agent.import_file(STARWARS / "sw_l3_l4_l7_policy.yaml")
    assert rt.curl(tie, "POST", ds_ip, "/v1/request-landing") == (0, 200, "Ship landed\n")
    assert rt.curl(tie, "PUT", ds_ip, "/v1/exhaust-port") == (0, 403, "Access denied\r\n")
    rec = rt.agent.wait_access_record(
        lambda r: r.get("l7", {}).get("http", {}).get("method") == "PUT"
        and r["source"].get("ip") == galaxy.tiefighter["ipv4"])
    assert rec["verdict"] == "DROPPED" and rec["Type"] == "L7"
    assert (rec["source"]["pod_name"], rec["destination"]["pod_name"]) == (
        tie, galaxy.deathstar["name"])
    rt.agent.delete_policies()


def test_stop_start_and_remove(rt: Runtime) -> None:
    rt.run("shuttle", "org=empire,class=shuttle", "sleep", "600")
    name = f"gc-shuttle{TAG}"
    first = rt.labelled(name)
    ident = int(str(first["identity"]))
    rt.podman("stop", "-t", "0", name)
    assert rt.endpoint(name) is None
    ids = {i["id"] for i in rt.agent.call("IdentityList")["identities"]}
    assert ident not in ids, "the identity outlived its only endpoint"
    assert f"{first['ipv4']}/32" not in {
        e["prefix"] for e in rt.agent.call("BpfIpcacheList")["entries"]}
    rt.podman("start", name)
    again = rt.labelled(name)
    assert again["labels"] == first["labels"]
    rt.podman("rm", "-f", "-t", "0", name)
    assert rt.endpoint(name) is None


def test_agent_down_during_add_fails_the_container(rt: Runtime) -> None:
    rt.agent.stop()
    try:
        done = rt.run("nopolicy", "org=empire", "sleep", "600", check=False)
        assert done.returncode != 0
        assert "start it with `garrison agent`" in done.stderr, done.stderr
        running = rt.podman("ps", "--format", "{{.Names}}").stdout.split()
        assert f"gc-nopolicy{TAG}" not in running
    finally:
        rt.agent.start()
    assert rt.endpoint(f"gc-nopolicy{TAG}") is None


def test_agent_down_during_del_is_cleaned_up_on_start(rt: Runtime) -> None:
    rt.run("probe", "org=empire,class=probe", "sleep", "600")
    name = f"gc-probe{TAG}"
    ep = rt.labelled(name)
    rt.agent.stop()
    try:
        rt.podman("rm", "-f", "-t", "0", name)  # DEL succeeds with no agent
        pending = list((rt.agent.workdir / "state" / "cni-pending").glob("*.json"))
        assert [p.stem for p in pending] == [ep["container_id"]]
    finally:
        rt.agent.start()
    assert rt.endpoint(name) is None
    assert f"{ep['ipv4']}/32" not in {
        e["prefix"] for e in rt.agent.call("BpfIpcacheList")["entries"]}
    assert not list((rt.agent.workdir / "state" / "cni-pending").glob("*.json"))


def test_agent_restart_keeps_running_containers_enforced(rt: Runtime, galaxy: Galaxy) -> None:
    rt.agent.import_file(STARWARS / "sw_l3_l4_policy.yaml")
    ds_ip = str(galaxy.deathstar["ipv4"])
    xwing, tie = str(galaxy.xwing["name"]), str(galaxy.tiefighter["name"])
    rt.agent.kill()  # no clean-up at all
    try:
        # enforcement outlives the agent: programs and maps stay
        assert rt.curl(xwing, "POST", ds_ip, "/v1/request-landing")[:2] == (28, 0)
    finally:
        rt.agent.start()
    after = {e["name"]: e for e in rt.agent.call("EndpointList")["endpoints"]}
    for ep in (galaxy.deathstar, galaxy.tiefighter, galaxy.xwing):
        assert after[str(ep["name"])]["identity"] == ep["identity"]
    assert rt.curl(tie, "POST", ds_ip, "/v1/request-landing") == (0, 200, "Ship landed\n")
    assert rt.curl(xwing, "POST", ds_ip, "/v1/request-landing")[:2] == (28, 0)
    rt.agent.delete_policies()


def test_a_refused_add_leaves_no_endpoint(rt: Runtime, galaxy: Galaxy) -> None:
    """The plugin as podman runs it, against the live agent, with a prevResult that does not
    match the namespace (another address): error 100, nothing made, the real one untouched."""
    tie = str(galaxy.tiefighter["name"])
    sandbox = rt.podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}",
                        tie).stdout.strip()
    conf = json.loads((rt.dir / "net.d" / f"{NET}.conflist").read_text())
    plugin = {**conf["plugins"][-1], "cniVersion": "1.0.0", "name": NET, "prevResult": {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "vethx"}, {"name": "eth0", "sandbox": sandbox}],
        "ips": [{"interface": 1, "address": "198.18.203.250/24", "gateway": "198.18.203.1"}],
    }}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "gcbogus" + TAG, "CNI_NETNS": sandbox,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", "GARRISON_PURE": "1",
           "CNI_ARGS": f"K8S_POD_NAME=gc-bogus{TAG}"}
    done = subprocess.run([str(rt.dir / "bin" / "garrison-cni")], input=json.dumps(plugin),
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 1
    err = json.loads(done.stdout)
    assert err["code"] == 100 and str(galaxy.tiefighter["ipv4"]) in err["msg"], err
    assert rt.endpoint(f"gc-bogus{TAG}") is None
    still = rt.endpoint(tie)
    assert still is not None
    assert (still["identity"], still["ipv4"], still["host_veth"]) == (
        galaxy.tiefighter["identity"], galaxy.tiefighter["ipv4"], galaxy.tiefighter["host_veth"])


def test_namespace_comes_from_the_kubernetes_namespace_label(rt: Runtime) -> None:
    rt.run("nsprobe", "io.kubernetes.pod.namespace=empire-ns,app=nsprobe", "sleep", "600")
    name = f"gc-nsprobe{TAG}"
    ep = rt.labelled(name)
    assert (ep["namespace"], ep["labels"]) == ("empire-ns", ["app=nsprobe"])
    ident = int(str(ep["identity"]))
    labels = next(i["labels"] for i in rt.agent.call("IdentityList")["identities"]
                  if i["id"] == ident)
    assert "k8s:io.kubernetes.pod.namespace=empire-ns" in labels, labels
    rt.podman("rm", "-f", "-t", "0", name)
    assert rt.endpoint(name) is None



def test_a_namespace_label_kubernetes_would_refuse_leaves_the_container_denied(
    rt: Runtime,
) -> None:
    """A namespace is a label value of every identity: one Kubernetes would refuse as a
    namespace name is refused, logged, and the container stays reserved:init (denied)."""
    rt.run("badns", "io.kubernetes.pod.namespace=Empire_NS,app=badns", "sleep", "600")
    name = f"gc-badns{TAG}"
    wait_for(lambda: f"container {name}: labels ['app=badns'] refused: namespace 'Empire_NS'"
             in rt.agent.log(), "the agent's refusal", timeout=15)
    ep = rt.endpoint(name)
    assert ep is not None and ep["identity"] == 5 and ep["namespace"] == "default"
    rt.podman("rm", "-f", "-t", "0", name)
    assert rt.endpoint(name) is None

def run_plugin(rt: Runtime, command: str, conf: dict[str, object]) -> tuple[int, str]:
    env = {"CNI_COMMAND": command, "CNI_PATH": "/usr/lib/cni", "GARRISON_PURE": "1"}
    done = subprocess.run([str(rt.dir / "bin" / "garrison-cni")], input=json.dumps(conf),
                          capture_output=True, text=True, env=env, timeout=30)
    return done.returncode, done.stdout


def test_status_and_gc_of_spec_110(rt: Runtime, galaxy: Galaxy) -> None:
    conflist = json.loads((rt.dir / "net.d" / f"{NET}.conflist").read_text())
    conf = {**conflist["plugins"][-1], "cniVersion": "1.1.0", "name": NET}
    assert run_plugin(rt, "STATUS", conf) == (0, "")
    rt.run("gcprobe", "app=gcprobe", "sleep", "600")
    name = f"gc-gcprobe{TAG}"
    rt.labelled(name)
    # a GC without the runtime's list removes nothing: every container stays enforced
    rc, out = run_plugin(rt, "GC", conf)
    assert rc == 1 and json.loads(out)["code"] == 7, out
    assert rt.endpoint(name) is not None
    assert all(rt.endpoint(str(e["name"])) for e in (galaxy.deathstar, galaxy.tiefighter,
                                                     galaxy.xwing))
    keep = [str(e["container_id"]) for e in (galaxy.deathstar, galaxy.tiefighter,
                                              galaxy.xwing)]
    conf["cni.dev/valid-attachments"] = [{"containerID": c, "ifname": "eth0"} for c in keep]
    assert run_plugin(rt, "GC", conf) == (0, "")
    assert rt.endpoint(name) is None  # the runtime no longer lists it: gone
    assert all(rt.endpoint(str(e["name"])) for e in (galaxy.deathstar, galaxy.tiefighter,
                                                     galaxy.xwing))
    rt.podman("rm", "-f", "-t", "0", name)


def test_check_through_the_plugin(rt: Runtime, galaxy: Galaxy) -> None:
    """CHECK as a runtime runs it: the container's prevResult, the live agent."""
    ds = galaxy.deathstar
    sandbox = rt.podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}",
                        str(ds["name"])).stdout.strip()
    conflist = json.loads((rt.dir / "net.d" / f"{NET}.conflist").read_text())
    conf = {**conflist["plugins"][-1], "cniVersion": "1.0.0", "name": NET, "prevResult": {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": str(ds["host_veth"])}, {"name": "eth0", "sandbox": sandbox}],
        "ips": [{"interface": 1, "address": f"{ds['ipv4']}/24"}],
    }}

    def check(container_id: str) -> tuple[int, str]:
        env = {"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": container_id, "CNI_NETNS": sandbox,
               "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", "GARRISON_PURE": "1"}
        done = subprocess.run([str(rt.dir / "bin" / "garrison-cni")], input=json.dumps(conf),
                              capture_output=True, text=True, env=env, timeout=30)
        return done.returncode, done.stdout

    assert check(str(ds["container_id"])) == (0, "")
    rc, out = check("gcunknown" + TAG)
    assert rc == 1
    err = json.loads(out)
    assert err["code"] == 101 and f"no endpoint for container gcunknown{TAG}" in err["msg"]


def test_a_container_whose_labels_are_unknown_is_denied_both_ways(
    rt: Runtime, galaxy: Galaxy
) -> None:
    """Until its labels are read a container is reserved:init, denied both ways; one without
    labels stays so (with no policy at all, every other container may talk)."""
    rt.agent.delete_policies()
    rt.run("nolabels", "", "sleep", "600")
    name = f"gc-nolabels{TAG}"
    wait_for(lambda: rt.endpoint(name) is not None, f"endpoint {name}")
    ep = rt.endpoint(name)
    assert ep is not None and ep["identity"] == 5 and ep["labels"] == []
    assert ep["ingress_enforcement"] and ep["egress_enforcement"]
    ds_ip = str(galaxy.deathstar["ipv4"])
    assert rt.curl(name, "POST", ds_ip, "/v1/request-landing")[:2] == (28, 0)
    assert rt.curl(str(galaxy.tiefighter["name"]), "POST", ds_ip,
                   "/v1/request-landing") == (0, 200, "Ship landed\n")
    rt.podman("rm", "-f", "-t", "0", name)


def test_the_cni_socket_answers_garbage_with_an_error(rt: Runtime) -> None:
    """The plugin's socket is root only, but a bad request must not hurt the agent."""
    import socket

    from garrison.cni.wire import cni_socket_for

    path = cni_socket_for(str(rt.agent.socket))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    for payload in (b"not json\n", b"[1]\n", b'{"method": "Shutdown", "params": {}}\n',
                    b'{"method": "CniAdd", "params": {}}\n', b"{" * 70000 + b"\n",
                    b"[" * 70000 + b"\n", b"x" * (2 << 20)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # too large: the agent answered and closed before reading it all
            answer = json.loads(sock.makefile("rb").readline())
        assert answer["ok"] is False and answer["error"], (payload[:40], answer)
    assert rt.agent.call("Status")["endpoints"] >= 0  # still serving


def test_a_container_with_a_long_name_starts_as_its_endpoint(rt: Runtime) -> None:
    """podman takes a name of any length (`podman kube play` names a container
    `<pod>-<container>`); garrison refused every endpoint name over 63 characters, so such a
    container could not start on its network (ADD refused)."""
    short = "longname-" + "x" * 90
    name = f"gc-{short}{TAG}"
    done = rt.run(short, "app=longname", "sleep", "600", check=False)
    assert done.returncode == 0, done.stderr
    ep = rt.labelled(name)
    assert ep["labels"] == ["app=longname"]
    assert any(line.startswith(f"{ep['id']} ") and name in line
               for line in rt.agent.cli("endpoint", "list").stdout.splitlines())
    rt.podman("rm", "-f", "-t", "0", name)
    assert rt.endpoint(name) is None


def install_second_network(rt: Runtime) -> None:
    net2 = ipaddress.ip_network(SUBNET2)
    # a route of its own: a second 198.18.0.0/15 route in the container is ptp's EEXIST
    route = f"{list(net2.hosts())[-1]}/32"
    subprocess.run(
        [str(Path(sys.executable).with_name("garrison")), "cni", "install", "--network", NET2,
         "--subnet", SUBNET2, "--route", route, "--cni-bin-dir", str(rt.dir / "bin"),
         "--cni-conf-dir", str(rt.dir / "net.d"), "--socket", str(rt.agent.socket),
         "--state-dir", str(rt.agent.workdir / "state")], check=True, capture_output=True)


def test_a_second_garrison_network_is_refused_and_never_unenforces_the_first(
    rt: Runtime,
) -> None:
    """garrison enforces one interface per container. A container on two garrison networks
    had its first endpoint silently replaced by the second: its first interface ran with no
    programs (unenforced). Now the second attachment is refused (the container does not
    start), and `podman network connect` of a running container is refused too, its first
    endpoint untouched (also by the DEL podman sends to undo the refused ADD)."""
    install_second_network(rt)
    both = f"gc-twonets{TAG}"
    rt.names.append(both)
    done = rt.podman("run", "-d", "--network", f"{NET},{NET2}", "--name", both, "--label",
                     "app=twonets", "--rootfs", "/:O", "sleep", "600", check=False)
    assert done.returncode != 0
    assert "one garrison network" in done.stderr, done.stderr
    assert rt.endpoint(both) is None
    rt.podman("rm", "-f", "-t", "0", both)

    rt.run("onenet", "app=onenet", "sleep", "600")
    name = f"gc-onenet{TAG}"
    ep = rt.labelled(name)
    done = rt.podman("network", "connect", NET2, name, check=False)
    assert done.returncode != 0 and "one garrison network" in done.stderr, done.stderr
    still = rt.endpoint(name)
    assert still is not None and (still["ipv4"], still["identity"]) == (
        ep["ipv4"], ep["identity"])
    assert rt.agent.call("CniCheck", container_id=ep["container_id"],
                         ipv4=ep["ipv4"])["problems"] == []
    rt.podman("rm", "-f", "-t", "0", name)
    assert rt.endpoint(name) is None



def test_a_name_left_by_a_missed_del_is_taken_by_the_new_container(rt: Runtime) -> None:
    """A container removed while its plugin could not run (here: `garrison cni uninstall`
    first) leaves its endpoint behind, its veth gone. A new container of the same name was
    refused (`endpoint ... already exists`) until the agent restarted; now the stale endpoint
    gives way, and the agent's log says so."""
    rt.run("reused", "app=reused-old", "sleep", "600")
    name = f"gc-reused{TAG}"
    old = rt.labelled(name)
    garrison = str(Path(sys.executable).with_name("garrison"))
    subprocess.run([garrison, "cni", "uninstall", "--network", NET, "--cni-conf-dir",
                    str(rt.dir / "net.d")], check=True, capture_output=True)
    try:
        rt.podman("rm", "-f", "-t", "0", name)  # its DEL fails: no plugin
    finally:
        subprocess.run(
            [garrison, "cni", "install", "--network", NET, "--subnet", SUBNET,
             "--cni-bin-dir", str(rt.dir / "bin"), "--cni-conf-dir", str(rt.dir / "net.d"),
             "--socket", str(rt.agent.socket), "--state-dir", str(rt.agent.workdir / "state")],
            check=True, capture_output=True)
    assert rt.endpoint(name) is not None  # what the missed DEL left
    done = rt.run("reused", "app=reused-new", "sleep", "600", check=False)
    assert done.returncode == 0, done.stderr
    new = rt.labelled(name)
    assert new["container_id"] != old["container_id"] and new["labels"] == ["app=reused-new"]
    assert f"container {str(old['container_id'])[:12]} is gone" in rt.agent.log()
    rt.podman("rm", "-f", "-t", "0", name)
    assert rt.endpoint(name) is None


def test_a_refused_add_leaves_the_ipcache_as_it_was(rt: Runtime, galaxy: Galaxy) -> None:
    """ADD mapped prevResult's gateway to the host identity before anything was checked, and
    kept it when the ADD was refused: a gateway that is another container's address (a
    misconfigured chain) turned that container into `host` in the ipcache, for every policy
    and flow record. Now a refused ADD changes nothing, and a gateway that is an endpoint's
    address is refused by name."""
    tie, ds = galaxy.tiefighter, galaxy.deathstar
    sandbox = rt.podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}",
                        str(tie["name"])).stdout.strip()
    conf = json.loads((rt.dir / "net.d" / f"{NET}.conflist").read_text())

    def add(address: str, gateway: str, cid: str) -> dict[str, object]:
        plugin = {**conf["plugins"][-1], "cniVersion": "1.0.0", "name": NET, "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "vethx"}, {"name": "eth0", "sandbox": sandbox}],
            "ips": [{"interface": 1, "address": address, "gateway": gateway}],
        }}
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid + TAG, "CNI_NETNS": sandbox,
               "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", "GARRISON_PURE": "1",
               "CNI_ARGS": f"K8S_POD_NAME=gc-{cid}{TAG}"}
        done = subprocess.run([str(rt.dir / "bin" / "garrison-cni")],
                              input=json.dumps(plugin), capture_output=True, text=True,
                              env=env, timeout=30)
        assert done.returncode == 1, done.stdout
        err: dict[str, object] = json.loads(done.stdout)
        return err

    def ipcache() -> dict[str, int]:
        return {e["prefix"]: e["identity"] for e in rt.agent.call("BpfIpcacheList")["entries"]}

    before = ipcache()
    assert before[f"{ds['ipv4']}/32"] == ds["identity"]
    unused, gateway = (str(a) for a in list(ipaddress.ip_network(SUBNET).hosts())[-3:-1])
    # refused for the address (it is not the namespace's): the gateway is not written
    err = add(f"{unused}/24", gateway, "gcgw1")
    assert err["code"] == 100 and str(tie["ipv4"]) in str(err["msg"]), err
    assert f"{gateway}/32" not in ipcache()
    # a gateway that is another container's address: refused, that container stays itself
    err = add(f"{tie['ipv4']}/24", str(ds["ipv4"]), "gcgw2")
    assert err["code"] == 100 and f"gateway {ds['ipv4']}" in str(err["msg"]), err
    assert str(ds["name"]) in str(err["msg"])
    assert ipcache() == before


def test_a_published_port_reaches_the_container_through_its_programs(rt: Runtime) -> None:
    """`podman run -p` on a garrison network: the conflist had no portmap, so podman
    accepted the mapping, `podman port` listed it, and the port timed out. Now the host
    reaches the container on it, through garrison's programs (a flow record to it)."""
    port = free_ports(1)[0]
    name = f"gc-published{TAG}"
    rt.names.append(name)
    rt.podman("run", "-d", "--network", NET, "-p", f"127.0.0.1:{port}:80", "--name", name,
              "--label", "app=published", "--rootfs", "/:O", sys.executable,
              str(STARWARS / "deathstar.py"), "--listen", "0.0.0.0:80")
    ep = rt.labelled(name)
    t0 = time.time_ns()

    def landed() -> bool:
        done = subprocess.run(["curl", "-s", "-m", "2", "-X", "POST",
                               f"http://127.0.0.1:{port}/v1/request-landing"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout == "Ship landed\n"

    wait_for(landed, f"POST to the published port {port}", timeout=15)
    rec = rt.agent.wait_flow(lambda r: r.time >= t0 and r.destination.ip == ep["ipv4"]
                             and r.destination.port == 80)
    assert rec.destination.pod_name == name
    rt.podman("rm", "-f", "-t", "0", name)
    assert rt.endpoint(name) is None


def test_an_add_for_an_interface_the_namespace_lacks_makes_nothing(
    rt: Runtime, galaxy: Galaxy
) -> None:
    """CNI ADD governs the interface the plugins before it made; it never makes one. With a
    CNI_IFNAME the namespace does not have (a chain whose interface plugin names it
    otherwise, or a bad prevResult), the agent used to add a veth of its own into the
    container, with prevResult's address and a route, and report success. Now the ADD is
    refused, naming the interface, and the container's network is as it was."""
    tie = galaxy.tiefighter
    sandbox = rt.podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}",
                        str(tie["name"])).stdout.strip()

    def inside() -> str:
        return subprocess.run(
            ["nsenter", f"--net={sandbox}", "sh", "-c", "ip -o link; ip -o addr; ip route"],
            capture_output=True, text=True, check=True).stdout

    before = inside()
    conf = json.loads((rt.dir / "net.d" / f"{NET}.conflist").read_text())
    hosts = list(ipaddress.ip_network(SUBNET).hosts())
    plugin = {**conf["plugins"][-1], "cniVersion": "1.0.0", "name": NET, "prevResult": {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "vethx"}, {"name": "eth5", "sandbox": sandbox}],
        "ips": [{"interface": 1, "address": f"{hosts[-4]}/24", "gateway": str(hosts[0])}],
    }}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "gcnoif" + TAG, "CNI_NETNS": sandbox,
           "CNI_IFNAME": "eth5", "CNI_PATH": "/usr/lib/cni", "GARRISON_PURE": "1",
           "CNI_ARGS": f"K8S_POD_NAME=gc-noif{TAG}"}
    done = subprocess.run([str(rt.dir / "bin" / "garrison-cni")], input=json.dumps(plugin),
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 1, done.stdout
    err = json.loads(done.stdout)
    assert err["code"] == 100 and "eth5" in err["msg"], err
    assert rt.endpoint(f"gc-noif{TAG}") is None
    assert inside() == before


def test_a_missed_del_on_another_network_leaves_the_endpoint(rt: Runtime) -> None:
    """`podman network connect` to a second garrison network while the agent is down: the
    ADD fails (no agent) and podman's DEL for that network is recorded for the agent. On
    start the agent carried it out by container id alone and removed the container's
    endpoint on its first network: the running container was unenforced. A recorded DEL now
    removes only an endpoint on the DEL's network."""
    install_second_network(rt)
    rt.run("keepme", "app=keepme", "sleep", "600")
    name = f"gc-keepme{TAG}"
    ep = rt.labelled(name)
    rt.agent.stop()
    try:
        done = rt.podman("network", "connect", NET2, name, check=False)
        assert done.returncode != 0 and "start it with `garrison agent`" in done.stderr
        pending = list((rt.agent.workdir / "state" / "cni-pending").glob("*.json"))
        assert [p.stem for p in pending] == [ep["container_id"]]
    finally:
        rt.agent.start()
    still = rt.endpoint(name)
    assert still is not None and still["ipv4"] == ep["ipv4"]
    assert rt.agent.call("CniCheck", container_id=ep["container_id"],
                         ipv4=ep["ipv4"])["problems"] == []
    assert not list((rt.agent.workdir / "state" / "cni-pending").glob("*.json"))
    rt.podman("rm", "-f", "-t", "0", name)
    assert rt.endpoint(name) is None


def test_a_container_also_on_another_network_is_named_in_the_log(rt: Runtime) -> None:
    """A container on a garrison network and on one without garrison-cni has an interface
    garrison does not govern (here it also carries the container's routes to that network):
    its traffic there bypasses every policy, egress included. Nothing said so; the agent's
    log now names the container, the other network and its address."""
    (rt.dir / "net.d" / f"{PLAIN}.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": PLAIN, "plugins": [{
            "type": "ptp", "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET3}]]}}]}))
    name = f"gc-mixed{TAG}"
    rt.names.append(name)
    rt.podman("run", "-d", "--network", f"{NET},{PLAIN}", "--name", name, "--label",
              "app=mixed", "--rootfs", "/:O", "sleep", "600")
    rt.labelled(name)
    other = rt.podman("inspect", "--format",
                      f"{{{{(index .NetworkSettings.Networks \"{PLAIN}\").IPAddress}}}}",
                      name).stdout.strip()
    assert ipaddress.ip_address(other) in ipaddress.ip_network(SUBNET3)
    wait_for(lambda: f"container {name} is also on {PLAIN} ({other})" in rt.agent.log(),
             "the agent's warning", timeout=10)
    rt.podman("rm", "-f", "-t", "0", name)


def test_a_renamed_containers_old_name_can_be_used_again(rt: Runtime) -> None:
    """`podman rename web web-old; podman run --name web ...` (a blue/green swap): the running
    container's endpoint keeps the name it was added under, so the new container's ADD was
    refused (`endpoint 'web' already exists`) and it could not start. Now the new one
    starts, its endpoint named `NAME-<its id>` while the name is taken, and the log says so;
    the old container's endpoint is untouched."""
    rt.run("blue", "app=blue", "sleep", "600")
    name = f"gc-blue{TAG}"
    old = rt.labelled(name)
    rt.podman("rename", name, f"{name}-old")
    rt.names.append(f"{name}-old")
    done = rt.run("blue", "app=blue-new", "sleep", "600", check=False)
    assert done.returncode == 0, done.stderr
    cid = rt.podman("inspect", "--format", "{{.Id}}", name).stdout.strip()
    new = rt.labelled(f"{name}-{cid[:12]}")
    assert new["container_id"] == cid and new["labels"] == ["app=blue-new"]
    assert f"endpoint {name} is container {str(old['container_id'])[:12]}'s" in rt.agent.log()
    still = rt.endpoint(name)
    assert still is not None and still["container_id"] == old["container_id"]
    assert rt.agent.call("CniCheck", container_id=old["container_id"],
                         ipv4=old["ipv4"])["problems"] == []
    rt.podman("rm", "-f", "-t", "0", name, f"{name}-old")
    assert rt.endpoint(name) is None and rt.endpoint(f"{name}-{cid[:12]}") is None
