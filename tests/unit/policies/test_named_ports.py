"""Named ports (issue 20 §1): `port: http` resolves per destination endpoint, from the port
names that endpoint declares; a name it does not declare selects nothing on it."""

from __future__ import annotations

import random
import textwrap

import pytest

from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_text
from garrison.policies.mapstate import PROTO_TCP, PROTO_UDP, lookup
from garrison.policies.model import Direction, PortProtocol, Protocol, port_name_problem
from garrison.policies.resolve import PolicyResolver, build_resolver

from .helpers import policies

CNP_INGRESS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {role: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts: [{ports: [{port: http}]}]
"""

KNP_INGRESS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  podSelector: {matchLabels: {role: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: serve-80-tcp}]
"""

CNP_EGRESS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out}
spec:
  endpointSelector: {matchLabels: {role: client}}
  egress:
  - toEndpoints: [{matchLabels: {tier: backend}}]
    toPorts: [{ports: [{port: "http", protocol: TCP}]}]
"""

CLIENT, SERVER_A, SERVER_B = 256, 257, 258
TCP = frozenset


def labels(text: str) -> Labels:
    return endpoint_labels(Labels.parse(text), "default")


def resolver(yaml_text: str) -> PolicyResolver:
    return build_resolver(
        policies(yaml_text),
        [
            (CLIENT, labels("role=client")),
            (SERVER_A, labels("role=server,tier=backend,name=a")),
            (SERVER_B, labels("role=server,tier=backend,name=b")),
        ],
    )


def ingress_ok(r: PolicyResolver, dst: int, port: int, proto: int = PROTO_TCP) -> bool:
    return lookup(r.map_state(dst), Direction.INGRESS, CLIENT, proto, port).allowed


def egress_ok(r: PolicyResolver, dst: int, port: int, proto: int = PROTO_TCP) -> bool:
    return lookup(r.map_state(CLIENT), Direction.EGRESS, dst, proto, port).allowed


def test_port_names_follow_kubernetes_iana_svc_name_rules() -> None:
    for good in ("http", "serve-80-tcp", "h2c", "a", "x" * 15, "8080-web"):
        assert port_name_problem(good) is None, good
    for bad in ("", "x" * 16, "HTTP", "web_api", "8080", "-web", "web-", "web--api", "wéb"):
        assert port_name_problem(bad) is not None, bad


def test_loader_reads_named_ports_of_both_dialects() -> None:
    (cnp,) = load_text(textwrap.dedent(CNP_INGRESS)).policies
    (section,) = cnp.rules[0].ingress or ()
    assert section.to_ports[0].ports == (PortProtocol(0, 0, Protocol.ANY, "http"),)
    (knp,) = load_text(textwrap.dedent(KNP_INGRESS)).policies
    (section,) = knp.rules[0].ingress or ()
    assert section.to_ports[0].ports == (PortProtocol(0, 0, Protocol.TCP, "serve-80-tcp"),)
    # a quoted number stays a number
    text = CNP_INGRESS.replace("port: http", 'port: "8080"')
    (cnp,) = load_text(textwrap.dedent(text)).policies
    assert (cnp.rules[0].ingress or ())[0].to_ports[0].ports == (PortProtocol(8080),)


def test_l7_rules_on_a_named_port_are_accepted() -> None:
    text = CNP_INGRESS.replace(
        "toPorts: [{ports: [{port: http}]}]",
        "toPorts: [{ports: [{port: http}], rules: {http: [{method: GET}]}}]",
    )
    (cnp,) = load_text(textwrap.dedent(text)).policies
    (section,) = cnp.rules[0].ingress or ()
    assert section.to_ports[0].ports == (PortProtocol(0, 0, Protocol.TCP, "http"),)


def test_ingress_name_maps_to_different_numbers_on_different_endpoints() -> None:
    r = resolver(CNP_INGRESS)
    r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})})
    r.set_named_ports(SERVER_B, {"http": TCP({(PROTO_TCP, 9090)})})
    assert ingress_ok(r, SERVER_A, 8080) and not ingress_ok(r, SERVER_A, 9090)
    assert ingress_ok(r, SERVER_B, 9090) and not ingress_ok(r, SERVER_B, 8080)
    # the name's protocol is the declared one (the policy wrote none)
    assert not ingress_ok(r, SERVER_A, 8080, PROTO_UDP)


def test_a_name_the_endpoint_does_not_declare_selects_nothing_never_any_port() -> None:
    r = resolver(CNP_INGRESS)
    r.set_named_ports(SERVER_A, {"metrics": TCP({(PROTO_TCP, 9100)})})
    state = r.map_state(SERVER_A)
    assert state.ingress_enforced
    assert not [k for k in state.entries if k.direction is Direction.INGRESS and
                k.identity == CLIENT]
    for port in (80, 8080, 9100):
        assert not ingress_ok(r, SERVER_A, port)
    # no port names at all: the same
    assert not ingress_ok(r, SERVER_B, 80)


def test_networkpolicy_named_port_with_its_tcp_default_ignores_a_udp_declaration() -> None:
    r = resolver(KNP_INGRESS)
    r.set_named_ports(SERVER_A, {"serve-80-tcp": TCP({(PROTO_TCP, 80)})})
    r.set_named_ports(SERVER_B, {"serve-80-tcp": TCP({(PROTO_UDP, 80)})})
    assert ingress_ok(r, SERVER_A, 80)
    assert not ingress_ok(r, SERVER_B, 80) and not ingress_ok(r, SERVER_B, 80, PROTO_UDP)


def test_declaring_a_name_later_opens_it_and_withdrawing_it_closes_it() -> None:
    r = resolver(CNP_INGRESS)
    assert not ingress_ok(r, SERVER_A, 8080)
    assert r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})}) >= {SERVER_A}
    assert ingress_ok(r, SERVER_A, 8080)
    assert r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})}) == set()
    r.set_named_ports(SERVER_A, {})
    assert not ingress_ok(r, SERVER_A, 8080)


def test_updates_report_the_keys_a_named_port_change_touches() -> None:
    """What the agent writes to the kernel: the key of the new number appears and the one
    of the old number goes."""
    r = resolver(CNP_INGRESS)
    r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})})
    r.updates([SERVER_A])
    r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8081)})})
    touched = r.updates([SERVER_A])[SERVER_A]
    ports = {(k.port, r.entry(SERVER_A, k) is not None) for k in touched
             if k.identity == CLIENT}
    assert ports == {(8080, False), (8081, True)}


def test_egress_name_resolves_against_each_destination() -> None:
    r = resolver(CNP_EGRESS)
    r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})})
    r.set_named_ports(SERVER_B, {"http": TCP({(PROTO_TCP, 9090)})})
    assert egress_ok(r, SERVER_A, 8080) and not egress_ok(r, SERVER_A, 9090)
    assert egress_ok(r, SERVER_B, 9090) and not egress_ok(r, SERVER_B, 8080)


def test_egress_to_any_peer_reaches_each_declaring_identity_on_its_own_number() -> None:
    text = CNP_EGRESS.replace("- toEndpoints: [{matchLabels: {tier: backend}}]\n    toPorts",
                              "- toPorts")
    r = resolver(text)
    r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})})
    assert egress_ok(r, SERVER_A, 8080)
    assert not egress_ok(r, SERVER_B, 8080)  # B declares no name
    r.set_named_ports(SERVER_B, {"http": TCP({(PROTO_TCP, 9090)})})
    assert egress_ok(r, SERVER_B, 9090) and not egress_ok(r, SERVER_B, 8080)


def test_a_named_deny_wins_on_the_number_it_means_there() -> None:
    text = CNP_INGRESS + """  ingressDeny:
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts: [{ports: [{port: admin}]}]
"""
    r = resolver(text.replace("port: http}", "port: 0}"))
    r.set_named_ports(SERVER_A, {"admin": TCP({(PROTO_TCP, 8443)})})
    assert ingress_ok(r, SERVER_A, 80)
    assert not ingress_ok(r, SERVER_A, 8443)
    assert ingress_ok(r, SERVER_B, 8443)  # admin is not a name there


def test_removing_the_policy_removes_its_named_keys() -> None:
    r = resolver(CNP_INGRESS)
    r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})})
    (policy,) = policies(CNP_INGRESS)
    r.remove_policy(policy)
    assert not r.map_state(SERVER_A).ingress_enforced
    assert not [k for k in r.map_state(SERVER_A).entries if k.identity == CLIENT]


# -- policy trace -------------------------------------------------------------------------


def test_parse_named_port() -> None:
    from garrison.policies.model import NamedPort, parse_named_port

    assert parse_named_port("http=8080/TCP") == NamedPort("http", 8080, Protocol.TCP)
    assert parse_named_port("dns=53/udp") == NamedPort("dns", 53, Protocol.UDP)
    assert parse_named_port("web=80") == NamedPort("web", 80, Protocol.TCP)
    for bad, says in (("http", "expected NAME=PORT/PROTO"), ("HTTP=80", "invalid port name"),
                      ("http=0", "not a number 1-65535"), ("http=x/TCP", "not a number"),
                      ("http=80/ICMP", "is not TCP, UDP or SCTP")):
        try:
            parse_named_port(bad)
        except ValueError as exc:
            assert says in str(exc), (bad, exc)
        else:
            raise AssertionError(bad)


def test_trace_resolves_the_destination_port_names() -> None:
    from garrison.policies.model import NamedPort
    from garrison.policies.trace import TraceEndpoint, trace

    pols = policies(KNP_INGRESS)
    src = TraceEndpoint(labels("role=client"), "default")
    dst = TraceEndpoint(labels("role=server"), "default",
                        ports=(NamedPort("serve-80-tcp", 8080),))
    assert trace(pols, src, dst, 8080).allowed
    denied = trace(pols, src, dst, 80)
    assert not denied.allowed and denied.denied_at == "L3_L4"
    # the same destination without port names: the name selects nothing
    bare = TraceEndpoint(labels("role=server"), "default")
    assert not trace(pols, src, bare, 8080).allowed


def test_trace_cli_takes_dst_port_names(tmp_path: object, capsys: object) -> None:
    import json
    from pathlib import Path

    from garrison.cli.main import main

    path = Path(str(tmp_path)) / "p.yaml"
    path.write_text(textwrap.dedent(CNP_INGRESS))
    base = ["policy", "trace", "-f", str(path), "--src-labels", "role=client",
            "--dst-labels", "role=server", "-o", "json"]
    assert main([*base, "--dport", "9090", "--dst-port-name", "metrics=9100/TCP",
                 "--dst-port-name", "http=9090/TCP"]) == 0
    out = json.loads(capsys.readouterr()[0])  # type: ignore[attr-defined]
    assert out["verdict"] == "allowed"
    assert out["destination"]["port_names"] == ["metrics=9100/TCP", "http=9090/TCP"]
    assert out["allowed_by"][0]["name"] == "web"
    assert main([*base, "--dport", "9090"]) == 0
    assert json.loads(capsys.readouterr()[0])["verdict"] == "denied"  # type: ignore[attr-defined]
    assert main([*base, "--dport", "80", "--dst-port-name", "http"]) == 2
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert err == ("garrison policy trace: --dst-port-name 'http': expected NAME=PORT/PROTO, "
                   "e.g. http=8080/TCP\n")


def test_a_port_name_change_recomputes_only_the_endpoints_it_can_reach() -> None:
    r = resolver(CNP_EGRESS)  # the client's egress names `http` toward tier=backend
    assert r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})}) == {CLIENT}
    # the client is no backend: its own port names change no endpoint's policy
    assert r.set_named_ports(CLIENT, {"http": TCP({(PROTO_TCP, 8080)})}) == set()
    ingress = resolver(CNP_INGRESS)  # servers name `http` on their ingress
    assert ingress.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080)})}) == {SERVER_A}


def test_l7_rules_on_a_named_port_redirect_the_number_it_means() -> None:
    from garrison.policies.model import NamedPort
    from garrison.policies.trace import HTTPRequestSpec, TraceEndpoint, trace

    text = CNP_INGRESS.replace(
        "toPorts: [{ports: [{port: http}]}]",
        "toPorts: [{ports: [{port: http}], rules: {http: [{method: GET, path: /ok}]}}]",
    )
    pols = policies(text)
    src = TraceEndpoint(labels("role=client"), "default")
    dst = TraceEndpoint(labels("role=server"), "default", ports=(NamedPort("http", 8080),))
    ok = trace(pols, src, dst, 8080, request=HTTPRequestSpec("GET", "/ok"))
    assert ok.allowed and ok.redirected
    denied = trace(pols, src, dst, 8080, request=HTTPRequestSpec("GET", "/admin"))
    assert not denied.allowed and denied.denied_at == "L7"
    assert not trace(pols, src, dst, 80, request=HTTPRequestSpec("GET", "/ok")).allowed


def test_endpoints_of_one_identity_mapping_a_name_differently_select_nothing() -> None:
    """As Cilium's named-port map: a name that means two numbers on one identity is skipped
    there (never both numbers); its other protocols still resolve."""
    r = resolver(CNP_INGRESS)
    r.set_named_ports(SERVER_A, {"http": TCP({(PROTO_TCP, 8080), (PROTO_TCP, 8081),
                                              (PROTO_UDP, 8080)})})
    assert not ingress_ok(r, SERVER_A, 8080) and not ingress_ok(r, SERVER_A, 8081)
    assert ingress_ok(r, SERVER_A, 8080, PROTO_UDP)


def _random_policy(rnd: random.Random, n: int) -> str:
    direction = rnd.choice(["ingress", "egress"])
    peer_key = "fromEndpoints" if direction == "ingress" else "toEndpoints"
    peers = rnd.choice(["", f"  - {peer_key}: [{{matchLabels: {{role: client}}}}]\n",
                        f"  - {peer_key}: [{{matchLabels: {{tier: backend}}}}]\n"])
    ports = ", ".join(
        rnd.choice(["{port: http}", "{port: metrics, protocol: TCP}", "{port: '80'}",
                    "{port: dns, protocol: UDP}"])
        for _ in range(rnd.randint(1, 2))
    )
    item = peers + "    toPorts" if peers else "  - toPorts"
    subject = rnd.choice(["{role: server}", "{role: client}", "{}"])
    section = rnd.choice([direction, direction + "Deny"]) if rnd.random() < 0.2 else direction
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{n}}}\n"
            f"spec:\n  endpointSelector: {{matchLabels: {subject}}}\n  {section}:\n"
            f"{item}: [{{ports: [{ports}]}}]\n")


def _random_ports(rnd: random.Random) -> dict[str, frozenset[tuple[int, int]]]:
    out = {}
    for name in ("http", "metrics", "dns"):
        if rnd.random() < 0.6:
            out[name] = frozenset({(rnd.choice([PROTO_TCP, PROTO_UDP]),
                                    rnd.choice([53, 80, 8080, 9090]))})
    return out


@pytest.mark.parametrize("seed", range(40))
def test_incremental_named_port_changes_equal_a_fresh_resolve(seed: int) -> None:
    """Port names set before or after identities and policies, changed, identities removed
    and added again: every endpoint's policy equals the one a fresh resolver computes."""
    rnd = random.Random(seed)
    idents = {CLIENT: labels("role=client"), SERVER_A: labels("role=server,tier=backend"),
              SERVER_B: labels("role=server,tier=backend,name=b"),
              259: labels("role=client,tier=backend")}
    pols = [p for n in range(rnd.randint(1, 4)) for p in policies(_random_policy(rnd, n))]
    ports = {i: _random_ports(rnd) for i in idents}
    r = build_resolver(pols[:1], [])
    for ident, labs in idents.items():
        if rnd.random() < 0.5:
            r.set_named_ports(ident, ports[ident])
            r.add_identity(ident, labs)
        else:
            r.add_identity(ident, labs)
            r.set_named_ports(ident, ports[ident])
    for ident in idents:
        r.map_state(ident)
    r.add_policies(pols[1:])
    for _ in range(4):
        ident = rnd.choice(list(idents))
        op = rnd.random()
        if op < 0.5:
            ports[ident] = _random_ports(rnd)
            r.set_named_ports(ident, ports[ident])
        else:
            r.remove_identity(ident)
            for other in r.endpoint_identities():
                assert all(k.identity != ident for k in r.map_state(other).entries)
            r.set_named_ports(ident, ports[ident])
            r.add_identity(ident, idents[ident])
        r.updates(list(idents))
    fresh = build_resolver(pols, [])
    for ident, labs in idents.items():
        fresh.set_named_ports(ident, ports[ident])
        fresh.add_identity(ident, labs)
    for ident in idents:
        got, want = r.map_state(ident), fresh.map_state(ident)
        assert dict(got.entries) == dict(want.entries), (seed, ident)
        assert (got.ingress_enforced, got.egress_enforced) == (
            want.ingress_enforced, want.egress_enforced)
