"""The cluster's flow view: a node's read-only flow API (real gRPC on loopback TCP over a real
flow ring), the time-ordered merge, and `garrison observe --cluster` against a real etcd that
lists real flow servers and one dead address (docs/cluster.md, issue 16 §3)."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import re
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from garrison.cluster.flowapi import (
    MAX_REQUEST_BYTES,
    SERVICE,
    FlowAPIClient,
    FlowAPIError,
    FlowAPIServer,
)
from garrison.cluster.flowmerge import SortBuffer, flow_time_ns, merge_recent
from garrison.cluster.keys import NodeRecord, parse_host_port
from garrison.flows.codec import format_time
from garrison.flows.query import FlowQuery
from garrison.flows.record import FlowRecord
from garrison.flows.store import FlowStore, StoreConfig
from tests.etcd_server import EtcdServer, etcd_skip_reason

DEMO = Path(__file__).resolve().parents[1] / "data" / "flows" / "starwars-demo.log"
RECORDS = [FlowRecord.from_json(line) for line in DEMO.read_bytes().splitlines() if line]
BASE_NS = 1_796_000_000_000_000_000


def stamped(record: FlowRecord, offset_ms: int, node: str) -> FlowRecord:
    return replace(record, time=BASE_NS + offset_ms * 1_000_000, node_name=node)


@contextlib.contextmanager
def flow_server(store: FlowStore) -> Iterator[FlowAPIServer]:
    server = FlowAPIServer(store, "127.0.0.1", 0)
    server.start()
    try:
        yield server
    finally:
        server.stop(0)


def raw_call(address: str, method: str, payload: bytes) -> bytes:
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        result: bytes = channel.unary_unary(method)(payload, timeout=5)
        return result


# -- the server: read-only, bounded, never crashed by a request ---------------------------------


def test_the_flow_api_serves_the_ring_read_only() -> None:
    store = FlowStore()
    store.extend(stamped(r, i, "n1") for i, r in enumerate(RECORDS[:30]))
    with flow_server(store) as server:
        client = FlowAPIClient(server.address)
        try:
            newest = client.call("Flows", query={}, limit=5)
            assert newest["cursor"] == 30
            assert [FlowRecord.from_json(f) for f in newest["flows"]] == [
                stamped(r, i, "n1") for i, r in enumerate(RECORDS[:30])][-5:]
            oldest = client.call("Flows", query={}, first=2)
            assert [json.loads(f)["time"] for f in oldest["flows"]] == [
                format_time(BASE_NS), format_time(BASE_NS + 1_000_000)]
            dropped = FlowQuery.of([("verdict", "DROPPED", False)]).to_dict()
            only = client.call("Flows", query=dropped, limit=1000)["flows"]
            assert only and all(json.loads(f)["verdict"] == "DROPPED" for f in only)
            store.add(stamped(RECORDS[30], 30, "n1"))
            since = client.call("FlowsSince", query={}, cursor=30)
            assert since == {"flows": [stamped(RECORDS[30], 30, "n1").to_json()],
                             "cursor": 31, "missed": 0, "ring": newest["ring"]}
            assert re.fullmatch("[0-9a-f]{16}", since["ring"])
        finally:
            client.close()
        # Nothing else is there: not the agent's methods, not under the agent's service name.
        for method in (f"/{SERVICE}/EndpointDelete", f"/{SERVICE}/PolicyImport",
                       "/garrison.Agent/PolicyDelete", "/garrison.Agent/Flows"):
            with pytest.raises(grpc.RpcError) as caught:
                raw_call(server.address, method, b"{}")
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, method


@pytest.mark.parametrize(("payload", "why"), [
    (b"\xff\xfe not json", "the request is not UTF-8 JSON: 'utf-8' codec can't decode"),
    (b"{", "the request is not UTF-8 JSON: Expecting property name"),
    (b"[1, 2]", "the request is not a JSON object"),
    (b'{"limit": -1}', "limit: expected a non-negative integer, got -1"),
    (b'{"limit": "9"}', "limit: expected a non-negative integer, got '9'"),
    (b'{"first": true}', "first: expected a non-negative integer, got True"),
    (b'{"query": []}', "query: expected a JSON object"),
    (b'{"query": {"terms": [{"name": "http-path", "values": ["("]}]}}',
     "not a regular expression"),
    (b'{"query": {"terms": [{"name": "no-such-flag", "values": ["x"]}]}}',
     "unknown filter --no-such-flag"),
    (b'{"query": {"since_ns": "yesterday"}}', "since_ns: expected an integer"),
])
def test_a_bad_request_is_refused_and_the_server_serves_on(payload: bytes, why: str) -> None:
    store = FlowStore()
    store.extend(RECORDS[:3])
    with flow_server(store) as server:
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(server.address, f"/{SERVICE}/Flows", payload)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert why in (caught.value.details() or "")
        assert len(json.loads(raw_call(server.address, f"/{SERVICE}/Flows", b"{}"))["flows"]) == 3


def test_an_oversized_request_is_refused_and_a_huge_limit_is_the_ring() -> None:
    store = FlowStore(StoreConfig(capacity=1000))
    store.extend(RECORDS)
    with flow_server(store) as server:
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(server.address, f"/{SERVICE}/Flows", b" " * (MAX_REQUEST_BYTES + 1))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        doc = json.loads(raw_call(server.address, f"/{SERVICE}/Flows", b'{"limit": 1e400}'
                                  .replace(b"1e400", str(10**30).encode())))
        assert len(doc["flows"]) == len(RECORDS)


def test_a_taken_address_is_an_error_naming_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FlowAPIError, match=(
                rf"--flow-api 127.0.0.1:{port}: cannot listen .*; give an address of this node "
                "and a free port, or --flow-api none")):
            FlowAPIServer(FlowStore(), "127.0.0.1", port).start()


def test_a_client_names_why_a_node_did_not_answer() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    client = FlowAPIClient(address, timeout_s=2)
    with pytest.raises(FlowAPIError, match=r"^unreachable \("):
        client.call("Flows", query={})
    client.close()
    with pytest.raises(ValueError, match="is not IPV4:PORT"):
        FlowAPIClient("node-1:4244")


# -- records and merging ------------------------------------------------------------------------


def test_a_node_record_names_its_flow_api_and_old_records_still_decode() -> None:
    me = NodeRecord("n1", ipaddress.IPv4Address("198.19.0.1"),
                    ipaddress.IPv4Network("198.18.1.0/24"), "198.19.0.1:4244")
    assert NodeRecord.decode(me.key, me.encode()) == me
    old = b'{"ip":"198.19.0.1","name":"n1","pod_cidr":"198.18.1.0/24"}'
    assert NodeRecord.decode(me.key, old).flow_api == ""
    assert replace(me, flow_api="").encode() == old  # unchanged for a node without one
    assert parse_host_port("198.19.0.1:4244") == (ipaddress.IPv4Address("198.19.0.1"), 4244)
    for bad in ("198.19.0.1", "198.19.0.1:99999", "host:80", ":80", "198.19.0.1:-1"):
        with pytest.raises(ValueError, match="is not IPV4:PORT"):
            parse_host_port(bad)


def test_merge_orders_nodes_by_time_and_takes_first_or_last_of_the_whole() -> None:
    a = [(10, "a10"), (30, "a30"), (50, "a50")]
    b = [(20, "b20"), (30, "b30"), (40, "b40")]
    assert merge_recent([a, b], None, None) == ["a10", "b20", "a30", "b30", "b40", "a50"]
    assert merge_recent([a, b], None, 2) == ["b40", "a50"]
    assert merge_recent([a, b], 3, None) == ["a10", "b20", "a30"]
    assert merge_recent([a, b], None, 0) == []
    assert flow_time_ns({"time": "2026-12-05T11:59:39.547156290Z"}) == 1_796_471_979_547_156_290
    assert flow_time_ns({"time": "yesterday"}) is None and flow_time_ns({}) is None


def test_the_sort_buffer_holds_each_record_its_delay_then_orders_them() -> None:
    buf: SortBuffer[str] = SortBuffer(delay_s=0.5, max_held=3)
    buf.add(20, "b20", now=0.0)
    assert buf.drain(now=0.2) == []
    buf.add(10, "a10", now=0.3)  # older, from a slower node: still goes out first
    assert buf.drain(now=0.6) == []  # a10 waits its own delay, b20 behind it
    assert buf.drain(now=0.8) == ["a10", "b20"]
    for t in (4, 3, 2, 1):
        buf.add(t, f"x{t}", now=1.0)
    assert buf.drain(now=1.0) == ["x1"]  # more than max_held: the oldest go out at once
    assert buf.drain(now=1.0, everything=True) == ["x2", "x3", "x4"]


# -- `garrison observe --cluster` against a real etcd --------------------------------------------


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    reason = etcd_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with EtcdServer(name="gr-relay-unit") as server:
        yield server


def run_cli(*argv: str) -> tuple[int, str, str]:
    from garrison.cli.main import main

    out, err = io.BytesIO(), io.StringIO()
    wrapper = io.TextIOWrapper(out, encoding="utf-8")
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = wrapper, err
    try:
        rc = main(list(argv))
        wrapper.flush()
    finally:
        sys.stdout, sys.stderr = old
    return rc, out.getvalue().decode(), err.getvalue()


def test_observe_cluster_merges_nodes_names_a_dead_one_and_sums_up(etcd: EtcdServer) -> None:
    from garrison.kvstore.etcd import EtcdKVStore

    ring1, ring2 = FlowStore(), FlowStore()
    # node 1 holds the even offsets, node 2 the odd ones: only a merge puts them in order
    for i, record in enumerate(RECORDS[:20]):
        (ring1 if i % 2 == 0 else ring2).add(stamped(record, i, "n1" if i % 2 == 0 else "n2"))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    with flow_server(ring1) as s1, flow_server(ring2) as s2, EtcdKVStore(etcd.url) as store:
        nodes = {"n1": s1.address, "n2": s2.address, "n3": dead}
        try:
            for name, address in nodes.items():
                rec = NodeRecord(name, ipaddress.IPv4Address("127.0.0.1"),
                                 ipaddress.IPv4Network(f"198.18.{len(name)}.0/24"), address)
                store.put(rec.key, rec.encode())
            rc, out, err = run_cli("observe", "--cluster", "--kvstore-endpoints", etcd.url,
                                   "--last", "6", "-o", "json")
            assert rc == 1, err
            got = [json.loads(line) for line in out.splitlines()]
            assert [(d["time"], d["node_name"]) for d in got] == [
                (format_time(BASE_NS + i * 1_000_000), "n1" if i % 2 == 0 else "n2")
                for i in range(14, 20)]
            lines = err.splitlines()
            assert len(lines) == 1, err
            assert lines[0].startswith(f"garrison: node n3 ({dead}): unreachable (")
            assert lines[0].endswith("; its records are not shown")
            # filters are the nodes' own
            rc, out, _ = run_cli("observe", "--cluster", "--kvstore-endpoints", etcd.url,
                                 "--verdict", "DROPPED", "-o", "json")
            dropped = [json.loads(line) for line in out.splitlines()]
            want = [i for i, r in enumerate(RECORDS[:20]) if r.verdict.name == "DROPPED"]
            assert [d["time"] for d in dropped] == [
                format_time(BASE_NS + i * 1_000_000) for i in want]
            rc, out, err = run_cli("accesslog", "summary", "--cluster", "--kvstore-endpoints",
                                   etcd.url, "--last", "20", "-o", "json")
            assert rc == 1 and "node n3" in err
            summary = json.loads(out)
            assert summary["records_read"] == 20, summary
            assert summary["first_time"] == format_time(BASE_NS)
            # every node away: nothing to show, exit 3
            store.delete(NodeRecord("n1", ipaddress.IPv4Address("127.0.0.1"),
                                    ipaddress.IPv4Network("198.18.2.0/24")).key)
            store.delete("state/nodes/v1/n2")
            rc, out, err = run_cli("observe", "--cluster", "--kvstore-endpoints", etcd.url)
            assert rc == 3 and out == ""
            assert err.splitlines()[-1] == "garrison: no node's flow API answered (named above)"
        finally:
            for name in nodes:
                store.delete(f"state/nodes/v1/{name}")
    rc, _, err = run_cli("observe", "--cluster", "--kvstore-endpoints", etcd.url)
    assert rc == 3
    assert err == f"garrison: etcd at {etcd.url.removeprefix('http://')} lists no node: are the" \
        " agents running with --kvstore etcd?\n"


def test_observe_cluster_usage_errors() -> None:
    rc, _, err = run_cli("observe", "--kvstore-endpoints", "http://127.0.0.1:1")
    assert rc == 2 and "--kvstore-endpoints names etcd for --cluster: add --cluster" in err
    rc, _, err = run_cli("observe", "--cluster", "--input-file", str(DEMO))
    assert rc == 2 and "give one" in err
    rc, _, err = run_cli("observe", "--cluster", "--kvstore-endpoints", "https://127.0.0.1:1")
    assert rc == 2 and "TLS is not supported yet" in err
    rc, _, err = run_cli("observe", "--cluster", "--socket", "/nonexistent/agent.sock")
    assert rc == 3
    assert "or give --kvstore-endpoints URL to find the nodes in etcd" in err


def test_follow_merges_live_streams_and_names_nodes_that_leave_join_or_stop(
    etcd: EtcdServer, tmp_path: Path,
) -> None:
    import subprocess
    import threading
    import time

    from garrison.kvstore.etcd import EtcdKVStore

    ring1, ring2, ring3 = FlowStore(), FlowStore(), FlowStore()
    ring1.add(stamped(RECORDS[0], 0, "n1"))  # before the follow: not shown
    garrison = str(Path(sys.executable).with_name("garrison"))
    with (flow_server(ring1) as s1, flow_server(ring2) as s2, flow_server(ring3) as s3,
          EtcdKVStore(etcd.url) as store):
        def publish(name: str, address: str) -> None:
            rec = NodeRecord(name, ipaddress.IPv4Address("127.0.0.1"),
                             ipaddress.IPv4Network("198.18.9.0/24"), address)
            store.put(rec.key, rec.encode())

        publish("n1", s1.address)
        publish("n2", s2.address)
        proc = subprocess.Popen(
            [garrison, "observe", "--cluster", "--follow", "-o", "json",
             "--kvstore-endpoints", etcd.url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        out: list[str] = []
        err: list[str] = []
        for stream, sink in ((proc.stdout, out), (proc.stderr, err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")),
                             daemon=True).start()

        def wait(sink: list[str], predicate: Callable[[str], bool], what: str,
                 timeout_s: float = 20) -> None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if any(predicate(line) for line in list(sink)):
                    return
                assert proc.poll() is None, "".join(err)
                time.sleep(0.05)
            raise AssertionError(f"no {what}: {out} {err}")

        try:
            time.sleep(1.5)  # the follow has read where every ring ends
            # node 2 reports a record older than node 1's, in the same moment: time order
            ring1.add(stamped(RECORDS[1], 20, "n1"))
            ring2.add(stamped(RECORDS[2], 10, "n2"))
            wait(out, lambda line: '"n1"' in line, "node 1's record")
            assert [json.loads(line)["node_name"] for line in out] == ["n2", "n1"], out
            # a node joins: said, and followed from the start of the follow
            publish("n3", s3.address)
            # what it recorded before the follow began is not shown, what came after is
            ring3.add(stamped(RECORDS[5], 25, "n3"))
            ring3.add(replace(RECORDS[3], time=time.time_ns(), node_name="n3"))
            wait(err, lambda line: line == f"garrison: node n3 ({s3.address}) joined: "
                 "following it\n", "join line")
            wait(out, lambda line: '"n3"' in line, "node 3's record")
            # a node stops answering: named once; it leaves etcd: said
            s2.stop(0)
            wait(err, lambda line: line.startswith(f"garrison: node n2 ({s2.address}): "
                                                   "unreachable ("), "node 2 named")
            store.delete("state/nodes/v1/n2")
            wait(err, lambda line: line == "garrison: node n2 left the cluster\n", "leave line")
            ring1.add(stamped(RECORDS[4], 40, "n1"))
            wait(out, lambda line: format_time(BASE_NS + 40_000_000) in line, "node 1's record")
            # node 1's agent restarts at once on the same address: a new ring, whose cursor
            # is already past the old one's; what it recorded since the follow began shows
            port = s1.port
            s1.stop(0)
            fresh = FlowStore()
            fresh.extend(stamped(RECORDS[i], 50 + i, "n1") for i in range(6))
            now_ns = time.time_ns()
            fresh.add(replace(RECORDS[7], time=now_ns, node_name="n1"))
            again = FlowAPIServer(fresh, "127.0.0.1", port)
            again.start()
            try:
                wait(out, lambda line: format_time(now_ns) in line,
                     "the restarted node's new record")
            finally:
                again.stop(0)
            assert [json.loads(line)["node_name"] for line in out] == [
                "n2", "n1", "n3", "n1", "n1"]
        finally:
            proc.terminate()
            proc.wait(10)
            for name in ("n1", "n2", "n3"):
                store.delete(f"state/nodes/v1/{name}")


def test_status_shows_the_flow_api_and_names_why_there_is_none() -> None:
    from garrison.cluster.status import cluster_lines, cluster_problems

    base = {"endpoints": ["198.19.0.250:2379"], "connected": True, "node": "n1", "nodes": {}}
    assert cluster_lines({"cluster": {**base, "flow_api": "198.19.0.201:4244"}})[2] == (
        "Flow API:        198.19.0.201:4244 (read-only, plaintext: `garrison observe --cluster`)")
    failed = {**base, "flow_api": None, "flow_api_error": "no flow API for `observe --cluster`:"
              " --flow-api 198.19.0.201:4244: cannot listen (...)"}
    assert cluster_lines({"cluster": failed})[2] == (
        "Flow API:        none (this node's flows are not in `observe --cluster`)")
    assert cluster_problems({"cluster": failed}) == [failed["flow_api_error"]]


def test_agent_flow_api_flag_is_checked_before_anything_starts() -> None:
    rc, _, err = run_cli("agent", "--flow-api", "198.19.0.1:4244")
    assert rc == 2
    assert err == "garrison agent: --flow-api serves the cluster's flow view: it needs " \
        "--kvstore etcd\n"
    rc, _, err = run_cli("agent", "--kvstore", "etcd", "--kvstore-endpoints",
                         "http://127.0.0.1:1", "--pod-cidr", "198.18.9.0/24",
                         "--flow-api", "node1:4244")
    assert rc == 2
    assert err == "garrison agent: --flow-api: 'node1:4244' is not IPV4:PORT (e.g. " \
        "198.19.0.1:4244), auto or none\n"
