"""The cluster-wide flow view: `garrison observe --cluster` over three nodes' flow APIs.

    netns gr-ul-<pid>:  bridge gr-br, etcd on 198.19.0.240:2379
        │ 198.19.0.0/24 underlay
    netns gr-n1-<pid> (198.19.0.211): agent, pod CIDR 198.18.211.0/24, gr-ds1 (deathstar)
    netns gr-n2-<pid> (198.19.0.212): agent, pod CIDR 198.18.212.0/24, gr-ds2 (deathstar)
    netns gr-n3-<pid> (198.19.0.213): agent, pod CIDR 198.18.213.0/24, gr-tie, gr-xw

The Star Wars policies are imported on node 3 only; the deathstar replicas on nodes 1 and 2
decide by identities learnt from etcd. Every agent serves its flows read-only on
<node-ip>:4244 (the default); `garrison observe --cluster`, run on node 3 as a user there
would, shows what nodes 1 and 2 recorded in one time-ordered view, filters, follows, and
names a node whose agent is stopped while still showing the others.

Every namespace here is made by this module and deleted by it, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.etcd_server import EtcdServer
from tests.privileged.agent_harness import (
    GARRISON,
    STARWARS,
    AgentEndpoint,
    http_request,
)
from tests.privileged.cluster_harness import (
    CLUSTER_MARKS,
    Node,
    add_endpoint,
    running_cluster,
    wait_for,
)

pytestmark = CLUSTER_MARKS

ETCD_IP = "198.19.0.240"
LEASE_TTL_S = 15  # long enough that a stopped agent's node stays listed during a test
NODE_IP = {n: f"198.19.0.{210 + n}" for n in (1, 2, 3)}
DS1, DS2, TIE, XW = "198.18.211.20", "198.18.212.20", "198.18.213.20", "198.18.213.21"
# A compact line without its time: `Dec  7 12:00:00.123 [node]: ...`
LINE = re.compile(
    r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\.\d{3} \[(?P<node>[^]]+)\]: (?P<rest>.*)$")


@dataclass
class Scene:
    nodes: dict[str, Node]
    etcd: EtcdServer
    endpoints: dict[str, AgentEndpoint]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    # --flow-api: the default, <node-ip>:4244
    with running_cluster(tmp_path_factory, "gr", 3, 210, ETCD_IP, LEASE_TTL_S) as nodes:
        apps: list[subprocess.Popen[bytes]] = []
        try:
            n1, n2, n3 = nodes["gr-n1"], nodes["gr-n2"], nodes["gr-n3"]
            eps = {
                "ds1": add_endpoint(n1, "gr-ds1", "org=empire,class=deathstar", DS1),
                "ds2": add_endpoint(n2, "gr-ds2", "org=empire,class=deathstar", DS2),
                "tie": add_endpoint(n3, "gr-tie", "org=empire,class=tiefighter", TIE),
                "xw": add_endpoint(n3, "gr-xw", "org=alliance,class=xwing", XW),
            }
            assert eps["ds1"].identity == eps["ds2"].identity  # one identity, two nodes
            for ds in ("gr-ds1", "gr-ds2"):
                apps.append(subprocess.Popen(
                    ["ip", "netns", "exec", ds, sys.executable, str(STARWARS / "deathstar.py"),
                     "--listen", "0.0.0.0:80"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                ))
            for node in (n1, n2):
                def knows_the_ships(node: Node = node) -> bool:
                    cache = node.ipcache()
                    return (cache.get(f"{XW}/32") == eps["xw"].identity
                            and cache.get(f"{TIE}/32") == eps["tie"].identity)

                wait_for(knows_the_ships, 15.0, f"{node.name} to know the ships")
            yield Scene(nodes, n1.etcd, eps)
        finally:
            for app in apps:
                app.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    app.wait(10)


def request(ep: AgentEndpoint, dst: str, method: str, path: str) -> tuple[int, bytes]:
    deadline = time.monotonic() + 10
    while True:
        sock = ep.connect(dst, 80, timeout=2.0)
        if sock is not None:
            with sock:
                return http_request(sock, method, path)
        assert time.monotonic() < deadline, f"the deathstar at {dst} never answered"


# The xwing may only talk to deathstars on port 80: node 3 drops its egress elsewhere.
XWING_EGRESS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: gr-xwing-egress
spec:
  endpointSelector:
    matchLabels:
      class: xwing
  egress:
  - toEndpoints:
    - matchLabels:
        class: deathstar
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"""


def import_policy(scene: Scene, path: Path, rules: int, name: str = "rule1") -> None:
    n3 = scene.nodes["gr-n3"]
    done = n3.run("policy", "import", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    for node in scene.nodes.values():
        def applied(node: Node = node) -> bool:
            return any(
                p["name"] == name and p["source"] == str(path) and p["rules"] == rules
                for p in node.api("PolicyGet")["policies"]
            )

        wait_for(applied, 10.0, f"{path.name} to reach {node.name}")


def compact(done: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """(node, line without its time) of `observe --print-node-name` output."""
    out = []
    for line in done.stdout.splitlines():
        m = LINE.match(line)
        assert m is not None, line
        out.append((m["node"], m["rest"]))
    return out


def runs(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One item per run of equal ones (a dropped SYN is sent again, and recorded again)."""
    return [item for i, item in enumerate(items) if i == 0 or items[i - 1] != item]


def records(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def starwars(scene: Scene) -> Scene:
    """L3/L4 then L7 verdicts across the nodes, each in its order (the view must show it)."""
    eps = scene.endpoints
    tie, xw = eps["tie"], eps["xw"]
    egress = scene.nodes["gr-n3"].agent.workdir / "gr-xwing-egress.yaml"
    egress.write_text(XWING_EGRESS)
    import_policy(scene, egress, 1, "gr-xwing-egress")
    import_policy(scene, STARWARS / "sw_l3_l4_policy.yaml", 1)
    assert request(tie, DS1, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
    assert xw.connect(DS1, 80, timeout=1.5) is None  # dropped on node 1
    assert xw.connect(DS2, 80, timeout=1.5) is None  # then on node 2
    assert xw.connect(TIE, 80, timeout=1.5) is None  # then on node 3, leaving the xwing
    import_policy(scene, STARWARS / "sw_l3_l4_l7_policy.yaml", 1)
    assert request(tie, DS2, "POST", "/v1/request-landing") == (200, b"Ship landed\n")
    assert request(tie, DS1, "PUT", "/v1/exhaust-port") == (403, b"Access denied\r\n")
    return scene


def test_every_agent_serves_its_flows_read_only_on_the_node_ip(scene: Scene) -> None:
    for node in scene.nodes.values():
        status = node.api("Status")["cluster"]
        assert status["flow_api"] == f"{node.ip}:4244"
        assert {n: info["flow_api"] for n, info in status["nodes"].items()} == {
            name: f"{other.ip}:4244" for name, other in scene.nodes.items()}
    shown = scene.nodes["gr-n1"].run("status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert ("Flow API:        198.19.0.211:4244 (read-only, plaintext: `garrison observe "
            "--cluster`)") in shown.stdout
    # From node 3: the flow methods answer over the node network, nothing else is there.
    probe = probe_script(NODE_IP[1])
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{scene.nodes['gr-n3'].netns}", sys.executable, "-c",
         probe], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "/garrison.Flows/Flows": "OK",
        "/garrison.Flows/EndpointDelete": "UNIMPLEMENTED",
        "/garrison.Flows/PolicyImport": "UNIMPLEMENTED",
        "/garrison.Agent/EndpointDelete": "UNIMPLEMENTED",
        "/garrison.Agent/PolicyDelete": "UNIMPLEMENTED",
        "/garrison.Agent/Status": "UNIMPLEMENTED",
    }


def probe_script(host: str) -> str:
    return (
        "import grpc, json\n"
        f"ch = grpc.insecure_channel('{host}:4244', options=[('grpc.enable_http_proxy', 0)])\n"
        "out = {}\n"
        "for m in ('/garrison.Flows/Flows', '/garrison.Flows/EndpointDelete',\n"
        "          '/garrison.Flows/PolicyImport', '/garrison.Agent/EndpointDelete',\n"
        "          '/garrison.Agent/PolicyDelete', '/garrison.Agent/Status'):\n"
        "    try:\n"
        "        ch.unary_unary(m)(b'{\"name\": \"gr-ds1\"}', timeout=10)\n"
        "        out[m] = 'OK'\n"
        "    except grpc.RpcError as exc:\n"
        "        out[m] = exc.code().name\n"
        "print(json.dumps(out))\n"
    )


def test_observe_cluster_shows_every_nodes_records_in_time_order(starwars: Scene) -> None:
    n3 = starwars.nodes["gr-n3"]
    tie, xw = starwars.endpoints["tie"], starwars.endpoints["xw"]
    done = n3.run("observe", "--cluster", "--last", "1000", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    got = records(done)
    times = [r["time"] for r in got]
    assert times == sorted(times), "not in time order"
    assert {r["node_name"] for r in got} == {"gr-n1", "gr-n2", "gr-n3"}, Counter(
        r["node_name"] for r in got)
    # The xwing's drops, recorded where the deathstars are, in the order they happened.
    drops = runs([(r["node_name"], r["destination"]["ip"]) for r in got
                  if r["verdict"] == "DROPPED" and r["source"].get("ip") == XW])
    assert drops[:3] == [("gr-n1", DS1), ("gr-n2", DS2), ("gr-n3", TIE)], drops
    denied = [r for r in got if r.get("l7", {}).get("type") == "REQUEST"
              and r["l7"]["http"]["url"].endswith("/v1/exhaust-port")]
    assert len(denied) == 1 and denied[0]["node_name"] == "gr-n1"
    assert denied[0]["verdict"] == "DROPPED"
    assert denied[0]["source"]["identity"] == tie.identity
    assert xw.identity in {r["source"].get("identity") for r in got}
    # another node's endpoint is named as a local one is (its name came through etcd)
    assert denied[0]["source"]["pod_name"] == "gr-tie"

    # What a user reads: the compact lines of the drops and the 403, with their nodes.
    view = n3.run("observe", "--cluster", "--last", "1000", "--print-node-name")
    assert view.returncode == 0, view.stderr
    lines = compact(view)
    xwing_to = re.compile(
        rf"^default/gr-xw:\d+ \(ID:{xw.identity}\) -> default/(gr-ds\d):80 "
        rf"\(ID:{starwars.endpoints['ds1'].identity}\) policy-verdict:none INGRESS DENIED "
        r"\(TCP Flags: SYN\)$")
    shown_drops = runs([(node, m[1]) for node, rest in lines if (m := xwing_to.match(rest))])
    assert shown_drops[:2] == [("gr-n1", "gr-ds1"), ("gr-n2", "gr-ds2")], lines
    egress = re.compile(
        rf"^default/gr-xw:\d+ \(ID:{xw.identity}\) -> default/gr-tie:80 \(ID:{tie.identity}\) "
        r"policy-verdict:none EGRESS DENIED \(TCP Flags: SYN\)$")
    assert {node for node, rest in lines if egress.match(rest)} == {"gr-n3"}, lines
    l7 = [(node, rest) for node, rest in lines if "exhaust-port" in rest]
    assert l7[0] == ("gr-n1", (
        f"default/gr-tie:{denied[0]['source']['port']} (ID:{tie.identity}) -> default/gr-ds1:80 "
        f"(ID:{starwars.endpoints['ds1'].identity}) http-request DROPPED "
        "(HTTP/1.1 PUT http://deathstar/v1/exhaust-port)")), l7
    assert l7[1][0] == "gr-n1" and " http-response " in l7[1][1] and "403" in l7[1][1]


def test_observe_cluster_filters_as_on_one_node(starwars: Scene) -> None:
    n3 = starwars.nodes["gr-n3"]
    done = n3.run("observe", "--cluster", "--from-label", "class=xwing", "--verdict", "DROPPED",
                  "--last", "1000", "-o", "json")
    assert done.returncode == 0, done.stderr
    got = records(done)
    assert got and {(r["node_name"], r["source"]["ip"], r["verdict"]) for r in got} == {
        ("gr-n1", XW, "DROPPED"), ("gr-n2", XW, "DROPPED"), ("gr-n3", XW, "DROPPED")}
    done = n3.run("observe", "--cluster", "--to-pod", "gr-ds2", "--last", "1000", "-o", "json")
    to_ds2 = records(done)
    # node 2 hosts it; node 3 records its ships' connections to it, under its name too
    assert {r["node_name"] for r in to_ds2} == {"gr-n2", "gr-n3"}
    assert {r["destination"]["pod_name"] for r in to_ds2} == {"gr-ds2"}
    done = n3.run("observe", "--cluster", "--node-name", "gr-n1", "--last", "1000", "-o", "json")
    assert {r["node_name"] for r in records(done)} == {"gr-n1"}
    done = n3.run("observe", "--cluster", "--http-status", "403", "-t", "l7", "-o", "json")
    assert [(r["node_name"], r["l7"]["http"]["code"]) for r in records(done)] == [
        ("gr-n1", 403)]
    # --last N is the cluster's last N, --first N its first N
    every = records(n3.run("observe", "--cluster", "--last", "1000", "-o", "json"))
    assert records(n3.run("observe", "--cluster", "--last", "3", "-o", "json")) == every[-3:]
    assert records(n3.run("observe", "--cluster", "--first", "3", "-o", "json")) == every[:3]
    # etcd named explicitly: the same view
    again = n3.run("observe", "--cluster", "--kvstore-endpoints", starwars.etcd.url,
                   "--last", "1000", "-o", "json")
    assert records(again) == every


def test_accesslog_summary_over_the_cluster(starwars: Scene) -> None:
    n3 = starwars.nodes["gr-n3"]
    every = records(n3.run("observe", "--cluster", "--last", "1000", "-o", "json"))
    done = n3.run("accesslog", "summary", "--cluster", "--last", "1000", "-o", "json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["records_read"] == len(every)
    assert summary["first_time"] == every[0]["time"]
    assert summary["last_time"] == every[-1]["time"]
    # the cluster's policies come from etcd: rule1's use is counted
    assert summary["rules"]["policies_given"] is True
    assert any(r["name"] == "rule1" for r in summary["rules"]["matched"]), summary["rules"]
    table = n3.run("accesslog", "summary", "--cluster", "--last", "1000")
    assert table.returncode == 0, table.stderr
    assert "exhaust-port" in table.stdout


class Follower:
    """`garrison observe --cluster --follow -o json` on a node; its lines as they come."""

    def __init__(self, node: Node) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{node.netns}", GARRISON, "observe", "--cluster",
             "--follow", "-o", "json", "--socket", str(node.agent.socket)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str] | None, q: queue.Queue[str]) -> None:
        assert stream is not None
        for line in stream:
            q.put(line.rstrip("\n"))

    def wait_line(self, q: queue.Queue[str], predicate: Callable[[str], bool],
                  timeout_s: float, poke: Callable[[], object] | None = None) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if poke is not None:
                poke()
            try:
                line = q.get(timeout=1.0)
            except queue.Empty:
                assert self.proc.poll() is None, "the follower exited"
                continue
            if predicate(line):
                return line
        raise AssertionError("no such line in time")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_follow_shows_new_flows_of_every_node_and_a_restarted_one(starwars: Scene) -> None:
    n2, n3 = starwars.nodes["gr-n2"], starwars.nodes["gr-n3"]
    xw = starwars.endpoints["xw"]
    follower = Follower(n3)
    try:
        def xwing_dropped_on(node: str) -> Callable[[str], bool]:
            def test(line: str) -> bool:
                r = json.loads(line)
                return bool(r["node_name"] == node and r["verdict"] == "DROPPED"
                            and r["source"].get("ip") == XW)
            return test

        # nothing was printed at the start: a new flow shows, whenever the follower is ready
        follower.wait_line(follower.out, xwing_dropped_on("gr-n2"), 30.0,
                           poke=lambda: xw.connect(DS2, 80, timeout=0.3))
        # node 2's agent stops: named once, the others still followed
        assert n2.agent.stop() == 0
        line = follower.wait_line(follower.err, lambda s: "gr-n2" in s, 20.0)
        assert line.startswith(f"garrison: node gr-n2 ({NODE_IP[2]}:4244): unreachable (")
        assert line.endswith("; following the others; retrying it")
        follower.wait_line(follower.out, xwing_dropped_on("gr-n1"), 30.0,
                           poke=lambda: xw.connect(DS1, 80, timeout=0.3))
        # back (a new agent process, a new ring): its new records follow
        n2.agent.start()
        follower.wait_line(follower.err,
                           lambda s: s == f"garrison: node gr-n2 ({NODE_IP[2]}:4244) answers "
                           "again", 30.0)
        follower.wait_line(follower.out, xwing_dropped_on("gr-n2"), 30.0,
                           poke=lambda: xw.connect(DS2, 80, timeout=0.3))
    finally:
        follower.close()
        if starwars.nodes["gr-n2"].agent.proc is not None and (
                starwars.nodes["gr-n2"].agent.proc.poll() is not None):
            starwars.nodes["gr-n2"].agent.start()


def test_a_stopped_agent_is_named_and_the_others_are_shown(starwars: Scene) -> None:
    n1, n3 = starwars.nodes["gr-n1"], starwars.nodes["gr-n3"]
    xw = starwars.endpoints["xw"]
    assert xw.connect(DS2, 80, timeout=1.0) is None  # one more record on node 2
    n1.agent.stop(signal.SIGKILL)
    try:
        done = n3.run("observe", "--cluster", "--last", "1000", "-o", "json")
        assert done.returncode == 1, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"garrison: node gr-n1 ({NODE_IP[1]}:4244): unreachable (")
        assert lines[0].endswith("; its records are not shown")
        got = records(done)
        assert got and "gr-n1" not in {r["node_name"] for r in got}
        assert any(r["node_name"] == "gr-n2" and r["source"].get("ip") == XW for r in got)
        summary = n3.run("accesslog", "summary", "--cluster", "-o", "json")
        assert summary.returncode == 1 and "node gr-n1" in summary.stderr
        assert json.loads(summary.stdout)["records_read"] > 0
    finally:
        n1.agent.start()
    done = n3.run("observe", "--cluster", "-o", "json")
    assert done.returncode == 0, done.stderr
