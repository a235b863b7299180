"""`policy trace --dst-ip` / `--src-ip`: a peer outside the endpoints, identified as the agent's
ipcache identifies it (the longest prefix the policies name that holds the address, else
world). Without them a CIDR rule could not be traced at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from garrison.cli.main import main

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]
  egressDeny:
  - toCIDR: [203.0.113.7/32]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: in}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.9/32]}}]
"""


@pytest.fixture(name="policy")
def fixture_policy(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    return path


def trace(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    rc = main(["policy", "trace", *args, "-o", "json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else {}), err


@pytest.mark.parametrize(("address", "port", "verdict", "reason"), [
    ("203.0.113.8", 80, "allowed", None),
    ("203.0.113.7", 80, "denied", "POLICY_DENY"),  # the deny's /32 beats the allow
    ("203.0.113.7", 443, "allowed", None),
    ("203.0.113.200", 80, "denied", "POLICY_DENIED"),  # in the except
    ("192.0.2.1", 80, "denied", "POLICY_DENIED"),  # world: no rule
])
def test_egress_to_an_address(capsys: pytest.CaptureFixture[str], policy: Path, address: str,
                              port: int, verdict: str, reason: str | None) -> None:
    rc, data, err = trace(capsys, "-f", str(policy), "--src-labels", "app=a", "--dst-ip",
                          address, "--dport", str(port))
    assert rc == 0, err
    assert data["verdict"] == verdict
    dst = data["destination"]
    assert isinstance(dst, dict) and dst["ip"] == address
    steps = data["steps"]
    assert isinstance(steps, list)
    if reason is not None:
        assert steps[0]["l3_l4"]["drop_reason"] == reason, steps[0]


@pytest.mark.parametrize(("address", "verdict"), [
    ("198.51.100.8", "allowed"), ("198.51.100.9", "denied"), ("192.0.2.1", "denied"),
])
def test_ingress_from_an_address(capsys: pytest.CaptureFixture[str], policy: Path, address: str,
                                 verdict: str) -> None:
    rc, data, err = trace(capsys, "-f", str(policy), "--src-ip", address, "--dst-labels",
                          "app=a", "--dport", "80")
    assert rc == 0, err
    assert data["verdict"] == verdict


def test_the_text_names_the_address_and_its_prefix(capsys: pytest.CaptureFixture[str],
                                                   policy: Path) -> None:
    assert main(["policy", "trace", "-f", str(policy), "--src-labels", "app=a", "--dst-ip",
                 "203.0.113.200", "--dport", "80"]) == 0
    out = capsys.readouterr().out
    assert "-> 203.0.113.200 (cidr:203.0.113.128/25,reserved:world)" in out, out


@pytest.mark.parametrize(("args", "message"), [
    (["--src-labels", "app=a", "--dport", "80"],
     "give --dst-labels (an endpoint) or --dst-ip (an address outside the endpoints)"),
    (["--src-labels", "app=a", "--dst-labels", "app=b", "--dst-ip", "192.0.2.1", "--dport",
      "80"], "--dst-labels and --dst-ip name the same peer: give one"),
    (["--src-ip", "nowhere", "--dst-labels", "app=b", "--dport", "80"],
     "--src-ip 'nowhere': not an IP address"),
])
def test_usage_errors(capsys: pytest.CaptureFixture[str], policy: Path, args: list[str],
                      message: str) -> None:
    assert main(["policy", "trace", "-f", str(policy), *args]) == 2
    assert message in capsys.readouterr().err


HOST_L7 = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: probe}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromEntities: [host, world]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: /healthz}]
"""


def test_ingress_l7_from_the_host_is_dropped_as_the_datapath_drops_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The datapath judges the host's connections at to_container, where no redirect to the
    proxy can happen: it drops them. The trace used to answer ALLOWED at L7."""
    path = tmp_path / "probe.yaml"
    path.write_text(HOST_L7)
    rc, data, err = trace(capsys, "-f", str(path), "--src-labels", "reserved:host",
                          "--dst-labels", "app=a", "--dport", "80", "--http-method", "GET",
                          "--http-path", "/healthz")
    assert rc == 0, err
    assert (data["verdict"], data["denied_at"]) == ("denied", "L3_L4")
    steps = data["steps"]
    assert isinstance(steps, list)
    assert steps[1]["drop_reason"] == "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL"
    # from an address outside the node it depends on where it enters: said in a note
    rc, data, err = trace(capsys, "-f", str(path), "--src-ip", "192.0.2.1", "--dst-labels",
                          "app=a", "--dport", "80", "--http-method", "GET", "--http-path",
                          "/healthz")
    assert data["verdict"] == "allowed"
    notes = data["notes"]
    assert isinstance(notes, list)
    assert any("single-node agent the datapath drops it" in n for n in notes), notes


WORLD_BY_SELECTOR = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-world}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEntities: [all]
  egressDeny:
  - toEndpoints: [{matchLabels: {"reserved:world": ""}}]
"""
SOMEONE_ELSES_CIDR = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other}
spec:
  endpointSelector: {matchLabels: {app: other}}
  egress:
  - toCIDR: [203.0.113.0/24]
"""


@pytest.mark.parametrize("others", [(), (SOMEONE_ELSES_CIDR,)])
def test_a_reserved_world_selector_covers_addresses_a_cidr_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, others: tuple[str, ...]
) -> None:
    """A deny of the `reserved:world` selector used to stop matching 203.0.113.7 as soon as
    any policy (here one for other endpoints) named a prefix holding it: the address then
    has a CIDR identity, which the selector did not select."""
    files = []
    for n, text in enumerate((WORLD_BY_SELECTOR, *others)):
        path = tmp_path / f"{n}.yaml"
        path.write_text(text)
        files += ["-f", str(path)]
    rc, data, err = trace(capsys, *files, "--src-labels", "app=a", "--dst-ip", "203.0.113.7",
                          "--dport", "80")
    assert rc == 0, err
    assert data["verdict"] == "denied"
    steps = data["steps"]
    assert isinstance(steps, list)
    assert steps[0]["l3_l4"]["drop_reason"] == "POLICY_DENY"
