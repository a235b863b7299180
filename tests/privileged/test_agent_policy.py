"""Policy changes through a running agent, checked with real connections between endpoints.

Stateful enforcement (replies of an allowed connection pass, the other side's new
connections do not), relabelling as map writes only (the programs stay attached as they
were), deleting a rule (new connections close, established ones keep passing via conntrack
until they end) and deny over allow. Policies go in with `garrison policy import`, out with
`garrison policy delete`, labels change with `garrison endpoint labels`; the verdicts are read
back from the agent's flow records (the API call `garrison observe` makes; the command itself
is exercised by the Star Wars tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from garrison.flows.record import DropReasonDesc, FlowRecord, FlowType, Verdict

from .agent_harness import (  # noqa: F401 (fixtures)
    AgentEndpoint,
    AgentProcess,
    echo_servers,
    fixture_agent,
    fixture_clean,
    roundtrip,
    tc_filters,
)

pytestmark = pytest.mark.privileged


@dataclass(frozen=True)
class Trio:
    a: AgentEndpoint
    b: AgentEndpoint
    c: AgentEndpoint


@pytest.fixture(scope="module")
def trio(agent: AgentProcess) -> Trio:
    return Trio(
        agent.add_endpoint("pa", "app=a", 11, cli=False),
        agent.add_endpoint("pb", "app=b", 12, cli=False),
        agent.add_endpoint("pc", "app=c", 13, cli=False),
    )


def ingress(name: str, selected: str, peer: str, port: int | None = None,
            deny: bool = False) -> str:
    """A policy selecting app=SELECTED, with one ingress (or ingressDeny) rule from app=PEER
    (to PORT, else to any port)."""
    ports = f"\n    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]" if port else ""
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}}}
spec:
  endpointSelector: {{matchLabels: {{app: {selected}}}}}
  {"ingressDeny" if deny else "ingress"}:
  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]{ports}
"""


def connects(src: AgentEndpoint, dst: AgentEndpoint, port: int) -> bool:
    """A new connection comes up and carries an echo round trip."""
    sock = src.connect(dst.ip, port)
    if sock is None:
        return False
    with sock:
        return roundtrip(sock)


def refused(src: AgentEndpoint, dst: AgentEndpoint, port: int) -> bool:
    """A new connection gets no answer (its SYN is dropped)."""
    sock = src.connect(dst.ip, port, timeout=0.5)
    if sock is None:
        return True
    sock.close()
    return False


def drop_of(agent: AgentProcess, src: AgentEndpoint, dst: AgentEndpoint, port: int,
            t0: int) -> FlowRecord:
    return agent.wait_flow(
        lambda r: r.time >= t0 and r.verdict is Verdict.DROPPED and r.type is FlowType.L3_L4
        and r.source.ip == src.ip and r.destination.ip == dst.ip
        and r.destination.port == port
    )


def test_replies_pass_while_the_reverse_direction_is_denied(
    agent: AgentProcess, trio: Trio, clean: None
) -> None:
    a, b = trio.a, trio.b
    agent.import_policy("a-from-b", ingress("a-from-b", "a", "b", 7000))
    # b's ingress is enforced too, and admits only app=c: nothing from a
    agent.import_policy("b-from-c", ingress("b-from-c", "b", "c"))
    t0 = time.time_ns()
    with echo_servers(a, 7000), echo_servers(b, 7001):
        sock = b.connect(a.ip, 7000)
        assert sock is not None, "b may open a connection to a:7000"
        with sock:
            for i in range(5):  # a's answers enter b, whose ingress does not admit a
                assert roundtrip(sock, b"reply %d" % i)
        assert refused(a, b, 7001), "a opened a connection into b"
    drop = drop_of(agent, a, b, 7001, t0)
    assert (drop.source.identity, drop.destination.identity) == (a.identity, b.identity)
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert drop.l4 is not None and drop.l4.flags is not None and drop.l4.flags.syn
    # the replies were never dropped: no drop from a to b other than the refused SYNs
    drops = [r for r in agent.flows() if r.time >= t0 and r.verdict is Verdict.DROPPED]
    assert {(r.source.ip, r.destination.port) for r in drops} == {(a.ip, 7001)}
    listed = {e["name"]: e for e in agent.cli_json("endpoint", "list")["endpoints"]}
    assert listed[a.name]["ingress_enforcement"] and listed[b.name]["ingress_enforcement"]
    assert not listed[a.name]["egress_enforcement"]


def test_relabel_flips_verdicts_with_map_writes_only(
    agent: AgentProcess, trio: Trio, clean: None
) -> None:
    a, b = trio.a, trio.b
    agent.import_policy("b-from-a", ingress("b-from-a", "b", "a", 7001))
    programs = {ep.name: tc_filters(ep.host_veth) for ep in (a, b)}
    assert all(len(p["ingress"]) == 1 and len(p["egress"]) == 1 for p in programs.values()), (
        programs)
    writes = agent.call("Status")["map_writes"]
    with echo_servers(b, 7001):
        assert connects(a, b, 7001)
        t0 = time.time_ns()
        try:
            out = agent.cli_json("endpoint", "labels", a.name, "--labels", "app=z")
            renamed = agent.refresh(a)
            assert out["identity"] == renamed.identity != a.identity
            assert renamed.labels == ("app=z",)
            assert refused(a, b, 7001), "a kept b's door open under its new labels"
            drop = drop_of(agent, a, b, 7001, t0)
            assert drop.source.identity == renamed.identity
            assert "k8s:app=z" in drop.source.labels
        finally:
            agent.cli("endpoint", "labels", a.name, "--labels", "app=a")
        back = agent.refresh(a)
        assert back.labels == ("app=a",)
        assert connects(a, b, 7001)
    assert {ep.name: tc_filters(ep.host_veth) for ep in (a, b)} == programs, (
        "relabelling touched the attached programs")
    assert agent.call("Status")["map_writes"] > writes


def test_deleting_a_rule_closes_new_connections_not_established_ones(
    agent: AgentProcess, trio: Trio, clean: None
) -> None:
    """What happens to an established connection: it keeps passing. The datapath decides
    policy for a connection's first packet; later packets match its conntrack entry and pass
    until the connection ends (FIN/RST, or the entry times out). Only new connections see
    the rule gone."""
    a, b, c = trio.a, trio.b, trio.c
    agent.import_policy("b-from-a", ingress("b-from-a", "b", "a", 7001))
    # a second policy keeps b's ingress default-deny once b-from-a is gone
    agent.import_policy("b-from-c", ingress("b-from-c", "b", "c", 7001))
    with echo_servers(b, 7001):
        established = a.connect(b.ip, 7001)
        assert established is not None
        with established:
            assert roundtrip(established, b"before")
            t0 = time.time_ns()
            done = agent.cli("policy", "delete", "b-from-a")
            assert "deleted 1 policies" in done.stdout
            assert refused(a, b, 7001), "a new connection passed a deleted rule"
            assert connects(c, b, 7001), "the other rule no longer admits c"
            for i in range(5):
                assert roundtrip(established, b"established %d" % i), (
                    "the established connection was cut")
                time.sleep(0.05)
        assert refused(a, b, 7001)
    drop = drop_of(agent, a, b, 7001, t0)
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    names = [p["name"] for p in agent.cli_json("policy", "get")["policies"]]
    assert names == ["b-from-c"]


def test_deny_beats_allow(agent: AgentProcess, trio: Trio, clean: None) -> None:
    a, b = trio.a, trio.b
    agent.import_policy("b-from-a", ingress("b-from-a", "b", "a"))  # every port (L3 only)
    with echo_servers(b, 7001, 7002):
        assert connects(a, b, 7001) and connects(a, b, 7002)
        t0 = time.time_ns()
        agent.import_policy("b-deny-a", ingress("b-deny-a", "b", "a", 7001, deny=True))
        assert refused(a, b, 7001), "the allow won over the deny"
        assert connects(a, b, 7002), "the deny covers port 7001 only"
        drop = drop_of(agent, a, b, 7001, t0)
        assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENY
        assert (drop.source.identity, drop.destination.identity) == (a.identity, b.identity)
        agent.cli("policy", "delete", "b-deny-a")
        assert connects(a, b, 7001)


def test_bpf_ct_list_reads_as_connections(agent: AgentProcess, trio: Trio, clean: None) -> None:
    """`garrison bpf ct list`: a line a person reads (addresses, ports, protocol and flag
    names, seconds left); `-o json` typed fields, no Python internals."""
    a, b = trio.a, trio.b
    with echo_servers(b, 7300):
        sock = a.connect(b.ip, 7300)
        assert sock is not None
        with sock:
            assert roundtrip(sock)
            source_port = sock.getsockname()[1]
            rows = [r for r in agent.cli_json("bpf", "ct", "list")["entries"]
                    if r["source"] == a.ip and r["source_port"] == source_port]
            text = agent.cli("bpf", "ct", "list").stdout
    [row] = rows
    assert row["protocol"] == "TCP" and (row["destination"], row["destination_port"]) == (
        b.ip, 7300)
    assert (row["src_identity"], row["dst_identity"]) == (a.identity, b.identity)
    assert "ESTABLISHED" in row["flags"] and "SEEN_REPLY" in row["flags"]
    assert {"SYN", "ACK"} <= set(row["tcp_flags_orig"]) and row["expired"] is False
    assert 0 < row["expires_in_s"] <= 21600 and row["packets_orig"] >= 3
    assert all(isinstance(row[k], int) for k in (
        "source_port", "destination_port", "expires_in_s", "packets_orig", "packets_reply"))
    assert "__" not in str(rows) and "." not in "".join(row)  # no TUPLE.SADDR.__WEAKREF__
    [line] = [ln for ln in text.splitlines() if f"{a.ip}:{source_port} ->" in ln]
    assert line.startswith(f"TCP {a.ip}:{source_port} -> {b.ip}:7300 expires=")
    assert "ESTABLISHED" in line and f"identity={a.identity}->{b.identity}" in line
