"""`policy trace` on the Star Wars scenario and on gRPC / Kafka ports: every request, the
verdict, the layer and the rule named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from garrison.cli.main import main
from garrison.policies.labels import Labels, endpoint_labels
from garrison.policies.loader import load_paths
from garrison.policies.trace import (
    GRPCRequestSpec,
    HTTPRequestSpec,
    KafkaRequestSpec,
    TraceEndpoint,
    trace,
)

from .helpers import policies

REPO = Path(__file__).resolve().parents[3]
STARWARS = REPO / "examples" / "starwars"
L3L4 = STARWARS / "sw_l3_l4_policy.yaml"
L7 = STARWARS / "sw_l3_l4_l7_policy.yaml"


def ep(labels: str, ns: str = "default") -> TraceEndpoint:
    return TraceEndpoint(endpoint_labels(Labels.parse(labels), ns), ns)


DEATHSTAR = ep("org=empire,class=deathstar")
TIEFIGHTER = ep("org=empire,class=tiefighter")
XWING = ep("org=alliance,class=xwing")


# (stage file, source, request, allowed, denied_at)
SCENARIO = [
    (L3L4, TIEFIGHTER, HTTPRequestSpec("POST", "/v1/request-landing"), True, None),
    (L3L4, TIEFIGHTER, HTTPRequestSpec("PUT", "/v1/exhaust-port"), True, None),
    (L3L4, XWING, HTTPRequestSpec("POST", "/v1/request-landing"), False, "L3_L4"),
    (L7, TIEFIGHTER, HTTPRequestSpec("POST", "/v1/request-landing"), True, None),
    (L7, TIEFIGHTER, HTTPRequestSpec("PUT", "/v1/exhaust-port"), False, "L7"),
    (L7, TIEFIGHTER, HTTPRequestSpec("GET", "/v1/"), False, "L7"),
    (L7, TIEFIGHTER, HTTPRequestSpec("POST", "/v1/request-landing/../exhaust-port"), False,
     "L7"),
    (L7, XWING, HTTPRequestSpec("POST", "/v1/request-landing"), False, "L3_L4"),
]


@pytest.mark.parametrize(("path", "source", "request_", "allowed", "denied_at"), SCENARIO)
def test_starwars_scenario(
    path: Path,
    source: TraceEndpoint,
    request_: HTTPRequestSpec,
    allowed: bool,
    denied_at: str | None,
) -> None:
    result = trace(load_paths([path]).policies, source, DEATHSTAR, 80, request=request_)
    assert result.allowed is allowed
    assert result.denied_at == denied_at
    assert result.redirected is (path == L7 and denied_at != "L3_L4")
    names = {r.name for r in (result.allowed_by if allowed else result.denied_by)}
    assert names == {"rule1"}


def test_no_policy_allows_and_names_nothing() -> None:
    result = trace((), XWING, DEATHSTAR, 80)
    assert result.allowed and result.allowed_by == [] and result.denied_by == []
    assert not any(step.enforced for step in result.steps)


def test_l7_port_without_l7_flags_is_not_evaluated() -> None:
    result = trace(load_paths([L7]).policies, TIEFIGHTER, DEATHSTAR, 80)
    data = result.to_dict()
    assert data["verdict"] == "allowed"
    assert data["l7"] == "not evaluated"
    assert data["redirected"] is True
    assert any("give L7 flags" in n for n in result.notes)


def test_egress_policy_of_the_source_is_evaluated_first() -> None:
    pols = policies(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: xwing-egress}
        spec:
          endpointSelector: {matchLabels: {class: xwing}}
          egress:
          - toEndpoints: [{matchLabels: {class: tiefighter}}]
        """
    )
    result = trace(pols, XWING, DEATHSTAR, 80)
    assert not result.allowed and result.denied_at == "L3_L4"
    assert result.steps[0].direction.value == "egress" and not result.steps[0].allowed
    assert [r.name for r in result.denied_by] == ["xwing-egress"]


GRPC_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: doors}
spec:
  endpointSelector: {matchLabels: {app: doors}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "50051", protocol: TCP}]
      rules:
        grpc:
        - {service: doors.DoorManager, method: GetName}
        - {service: doors.DoorManager, method: GetStatus}
"""


def test_grpc_rules() -> None:
    pols = policies(GRPC_POLICY)
    client, doors = ep("app=client"), ep("app=doors")
    ok = trace(pols, client, doors, 50051, request=GRPCRequestSpec("doors.DoorManager", "GetName"))
    assert ok.allowed
    no = trace(
        pols, client, doors, 50051, request=GRPCRequestSpec("doors.DoorManager", "SetAccessCode")
    )
    assert not no.allowed and no.denied_at == "L7"


def test_http_rules_apply_to_grpc_calls() -> None:
    pols = policies(
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: doors-http}
        spec:
          endpointSelector: {matchLabels: {app: doors}}
          ingress:
          - toPorts:
            - ports: [{port: "50051", protocol: TCP}]
              rules: {http: [{method: POST, path: "/doors.DoorManager/Get.*"}]}
        """
    )
    client, doors = ep("app=client"), ep("app=doors")
    assert trace(pols, client, doors, 50051,
                 request=GRPCRequestSpec("doors.DoorManager", "GetLocation")).allowed
    assert not trace(pols, client, doors, 50051,
                     request=GRPCRequestSpec("doors.DoorManager", "SetAccessCode")).allowed


KAFKA_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-acl}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: empire-hq}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: empire-announce}
  - fromEndpoints: [{matchLabels: {app: outpost}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: consume, topic: empire-announce}
"""


@pytest.mark.parametrize(
    ("source", "api_key", "topics", "allowed"),
    [
        ("app=empire-hq", 0, ("empire-announce",), True),
        ("app=empire-hq", 0, ("deathstar-plans",), False),
        ("app=empire-hq", 1, ("empire-announce",), False),  # produce role cannot fetch
        ("app=outpost", 1, ("empire-announce",), True),
        ("app=outpost", 0, ("empire-announce",), False),
        ("app=outpost", 1, ("empire-announce", "deathstar-plans"), False),
    ],
)
def test_kafka_rules(source: str, api_key: int, topics: tuple[str, ...], allowed: bool) -> None:
    result = trace(
        policies(KAFKA_POLICY), ep(source), ep("app=kafka"), 9092,
        request=KafkaRequestSpec(api_key, None, "client", topics),
    )
    assert result.allowed is allowed
    if not allowed:
        assert result.denied_at == "L7"


# -- the CLI ------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["policy", "trace", *args])
    out, err = capsys.readouterr()
    return rc, out, err


STAR_ARGS = ["--dst-labels", "org=empire,class=deathstar", "--dport", "80"]


def test_cli_json_denied_at_l7(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "-f", str(L7), "--src-labels", "org=empire,class=tiefighter",
                     *STAR_ARGS, "--http-method", "PUT", "--http-path", "/v1/exhaust-port",
                     "-o", "json")
    assert rc == 0
    data = json.loads(out)
    assert data["verdict"] == "denied"
    assert data["denied_at"] == "L7"
    assert data["redirected"] is True
    assert data["l7"] == "evaluated"
    assert [r["name"] for r in data["denied_by"]] == ["rule1"]


def test_cli_json_denied_at_l3_l4(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "-f", str(L3L4), "--src-labels", "org=alliance,class=xwing",
                     *STAR_ARGS, "-o", "json")
    data = json.loads(out)
    assert rc == 0 and data["verdict"] == "denied" and data["denied_at"] == "L3_L4"
    assert data["redirected"] is False and data["l7"] == "not applicable"
    assert data["steps"][1]["l3_l4"]["drop_reason"] == "POLICY_DENIED"


def test_cli_text_names_rule_and_layer(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "-f", str(L7), "--src-labels", "org=empire,class=tiefighter",
                     *STAR_ARGS, "--http-method", "PUT", "--http-path", "/v1/exhaust-port")
    assert rc == 0
    assert "L3/L4 allowed by CiliumNetworkPolicy default/rule1 ingress[0]" in out
    assert "redirected to the http proxy" in out
    assert "L7 DENIED: " in out
    assert out.rstrip().endswith("Final verdict: DENIED at L7")


@pytest.mark.parametrize(
    "args",
    [
        ["--dport", "0"],
        ["--dport", "80", "--http-method", "GET", "--grpc-service", "a.B", "--grpc-method", "C"],
        ["--dport", "80", "--kafka-api-key", "bogus"],
        ["--dport", "80", "--http-header", "no-colon"],
        ["--dport", "80", "--grpc-service", "a.B"],
    ],
)
def test_cli_bad_usage_exits_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    rc, _, err = cli(capsys, "-f", str(L7), "--src-labels", "a=b",
                     "--dst-labels", "c=d", *args)
    assert rc == 2
    assert "garrison policy trace: " in err


def test_cli_invalid_policy_exits_2_with_file_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n"
        "    - ports: [{port: \"80\", endPort: 90, protocol: TCP}]\n"
        "      rules: {http: [{}]}\n"
    )
    rc, out, err = cli(capsys, "-f", str(bad), "--src-labels", "a=b", "--dst-labels", "c=d",
                       "--dport", "80")
    assert rc == 2 and out == ""
    assert f"{bad}:" in err and "nothing traced" in err


def test_cli_as_a_process() -> None:
    exe = Path(sys.executable).parent / "garrison"
    proc = subprocess.run(
        [str(exe), "policy", "trace", "-f", str(L7), "--src-labels",
         "org=empire,class=tiefighter", *STAR_ARGS, "--http-method", "POST", "--http-path",
         "/v1/request-landing", "-o", "json"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verdict"] == "allowed"


@pytest.mark.parametrize(
    ("path", "verdict", "reason"),
    [
        ("/v1/../v1/request-landing", "allowed", None),  # normalized as the proxy does
        ("/v1//request-landing", "allowed", None),
        ("/v1/request-landing/../../admin", "denied", "no rule"),
        ("/v1/%2Frequest-landing", "denied", "400 Bad Request"),
    ],
)
def test_cli_normalizes_http_path_like_the_proxy(
    capsys: pytest.CaptureFixture[str], path: str, verdict: str, reason: str | None
) -> None:
    rc, out, _ = cli(capsys, "-f", str(L7), "--src-labels", "org=empire,class=tiefighter",
                     *STAR_ARGS, "--http-method", "POST", "--http-path", path, "-o", "json")
    data = json.loads(out)
    assert rc == 0 and data["verdict"] == verdict
    if reason:
        assert reason in data["steps"][1]["l7"]["reason"]


@pytest.mark.parametrize(
    ("method", "headers", "verdict", "reason"),
    [
        ("POST", [], "allowed", None),
        # The proxy's parser (llhttp, strict) answers these before any rule is consulted.
        ("post", [], "denied", "501 Not Implemented"),
        ("FOO", [], "denied", "501 Not Implemented"),
        ("POST", ["Transfer-Encoding: gzip"], "denied", "501 Not Implemented"),
        ("POST", ["Bad Name: x"], "denied", "400 Bad Request"),
        # --http-header Host fields are the request's: two of them, the proxy refuses
        ("POST", ["Host: a.example", "Host: b.example"], "denied", "400 Bad Request"),
    ],
)
def test_cli_validates_the_request_as_the_proxy_does(
    capsys: pytest.CaptureFixture[str],
    method: str,
    headers: list[str],
    verdict: str,
    reason: str | None,
) -> None:
    header_args = [a for h in headers for a in ("--http-header", h)]
    rc, out, _ = cli(capsys, "-f", str(L7), "--src-labels", "org=empire,class=tiefighter",
                     *STAR_ARGS, "--http-method", method, "--http-path", "/v1/request-landing",
                     *header_args, "-o", "json")
    data = json.loads(out)
    assert rc == 0 and data["verdict"] == verdict
    if reason:
        assert data["denied_at"] == "L7"
        assert data["steps"][1]["l7"]["reason"].startswith(f"answered {reason}")


def test_cli_says_endpoint_identities_are_local_to_the_trace(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, out, _ = cli(capsys, "-f", str(L3L4), "--src-labels", "reserved:world", *STAR_ARGS,
                     "-o", "json")
    data = json.loads(out)
    assert rc == 0
    assert (data["source"]["identity"], data["source"]["identity_scope"]) == (2, "reserved")
    assert data["destination"]["identity_scope"] == "trace"
    rc, out, _ = cli(capsys, "-f", str(L3L4), "--src-labels", "reserved:world", *STAR_ARGS)
    assert "note: identity 257 numbered for this trace only" in out


@pytest.mark.parametrize(("flag", "verdict"), [([], "allowed"),
                                                (["--allow-localhost", "policy"], "denied")])
def test_cli_allow_localhost(
    capsys: pytest.CaptureFixture[str], flag: list[str], verdict: str
) -> None:
    """The local host reaches an endpoint under default deny, as the agent's default does;
    `--allow-localhost policy` traces an agent started with it."""
    rc, out, _ = cli(capsys, "-f", str(L3L4), "--src-labels", "reserved:host",
                     "--dst-labels", "org=empire,class=deathstar", "--dport", "8080",
                     *flag, "-o", "json")
    data = json.loads(out)
    assert rc == 0 and data["verdict"] == verdict
    assert data["source"]["identity"] == 1


def test_cli_text_names_allow_localhost(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "-f", str(L3L4), "--src-labels", "reserved:host",
                     "--dst-labels", "org=empire,class=deathstar", "--dport", "8080")
    assert rc == 0
    assert ("L3/L4 allowed by allow-localhost: the local host reaches its endpoints "
            "(--allow-localhost policy turns it off)") in out
    assert out.rstrip().endswith("Final verdict: ALLOWED")


HOST_RULE = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: host-rule
spec:
  endpointSelector:
    matchLabels: {app: api}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: GET
          host: "api.example.com"
"""


@pytest.mark.parametrize(
    ("flags", "verdict"),
    [
        (["--http-host", "api.example.com"], "allowed"),
        (["--http-header", "Host: api.example.com"], "allowed"),
        # a Host given as a header is the host the rules see, as the proxy's are
        (["--http-header", "Host: evil.example.com"], "denied"),
        (["--http-host", "api.example.com", "--http-header", "Host: api.example.com"], "denied"),
    ],
)
def test_cli_takes_the_host_from_a_host_header(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], verdict: str
) -> None:
    policy = tmp_path / "host.yaml"
    policy.write_text(HOST_RULE)
    rc, out, _ = cli(capsys, "-f", str(policy), "--src-labels", "app=client", "--dst-labels",
                     "app=api", "--dport", "80", "--http-method", "GET", "--http-path", "/",
                     *flags, "-o", "json")
    assert rc == 0 and json.loads(out)["verdict"] == verdict
