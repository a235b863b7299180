"""The Star Wars demo as assertions: a real agent, endpoints in namespaces, the deathstar app in
two replicas, curl run with `garrison endpoint exec`, the example policies imported with
`garrison policy import`, the verdicts read back from `garrison observe` and the access log.

Stage 0 (no policy): both ships land. Stage 1 (L3/L4): the tiefighter lands on both replicas,
the xwing's SYN is dropped (curl times out, exit 28) and a `Policy denied DROPPED` record names
both identities. Stage 2 (L7): the tiefighter's `POST /v1/request-landing` lands, its
`PUT /v1/exhaust-port` gets the proxy's 403 and never reaches the app, and the access log says
so field by field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from garrison.flows.record import (
    DropReasonDesc,
    FlowRecord,
    FlowType,
    TrafficDirection,
    Verdict,
)

from .agent_harness import (  # noqa: F401 (fixtures)
    STARWARS,
    AgentEndpoint,
    AgentProcess,
    app_requests,
    fixture_agent,
    fixture_clean,
    http_request,
    records_of,
)

pytestmark = pytest.mark.privileged

L3_L4 = STARWARS / "sw_l3_l4_policy.yaml"
L7 = STARWARS / "sw_l3_l4_l7_policy.yaml"
CURL_TIMEOUT = 2.0
DENIED_BODY = b"Access denied\r\n"


def labels(own: str) -> list[str]:
    return sorted([*(f"k8s:{kv}" for kv in own.split(",")),
                   "k8s:io.kubernetes.pod.namespace=default"])


DEATHSTAR_LABELS = labels("class=deathstar,org=empire")
TIEFIGHTER_LABELS = labels("class=tiefighter,org=empire")
XWING_LABELS = labels("class=xwing,org=alliance")


@dataclass(frozen=True)
class Galaxy:
    deathstars: tuple[AgentEndpoint, AgentEndpoint]
    tiefighter: AgentEndpoint
    xwing: AgentEndpoint


@pytest.fixture(scope="module")
def galaxy(agent: AgentProcess) -> Galaxy:
    ds1 = agent.add_endpoint("ds1", "org=empire,class=deathstar", 2)
    ds2 = agent.add_endpoint("ds2", "org=empire,class=deathstar", 3)
    tie = agent.add_endpoint("tie", "org=empire,class=tiefighter", 4)
    xw = agent.add_endpoint("xwing", "org=alliance,class=xwing", 5)
    assert ds1.identity == ds2.identity  # one identity per label set
    assert len({ds1.identity, tie.identity, xw.identity}) == 3
    agent.deathstar(ds1, keep=True)  # stopped with the module's agent
    agent.deathstar(ds2, keep=True)
    return Galaxy((ds1, ds2), tie, xw)


@dataclass(frozen=True)
class Answer:
    exit_code: int
    status: int
    body: bytes
    seconds: float


def curl(agent: AgentProcess, ship: AgentEndpoint, method: str, ds: AgentEndpoint,
         path: str) -> Answer:
    """`garrison endpoint exec SHIP -- curl -s -i -m 2 -X METHOD http://DS/PATH`."""
    start = time.monotonic()
    done = agent.exec_in(ship, "curl", "-s", "-i", "-m", str(CURL_TIMEOUT), "-X", method,
                         f"http://{ds.ip}{path}")
    seconds = time.monotonic() - start
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return Answer(done.returncode, status, body, seconds)


def assert_lands(answer: Answer) -> None:
    assert (answer.exit_code, answer.status, answer.body) == (0, 200, b"Ship landed\n")


def assert_no_answer(answer: Answer) -> None:
    """curl's own timeout expired (exit 28) with nothing received."""
    assert answer.exit_code == 28, answer
    assert answer.body == b"" and answer.status == 0
    assert CURL_TIMEOUT <= answer.seconds < CURL_TIMEOUT + 10  # + the garrison command's start


def since(records: list[FlowRecord], t0: int) -> list[FlowRecord]:
    return [r for r in records if r.time >= t0]


def test_stage0_without_policy_every_ship_lands(
    agent: AgentProcess, galaxy: Galaxy, clean: None
) -> None:
    ds1, ds2 = galaxy.deathstars
    assert_lands(curl(agent, galaxy.tiefighter, "POST", ds1, "/v1/request-landing"))
    assert_lands(curl(agent, galaxy.xwing, "POST", ds2, "/v1/request-landing"))
    listed = agent.cli_json("endpoint", "list")["endpoints"]
    assert {e["name"]: (e["ingress_enforcement"], e["egress_enforcement"]) for e in listed} == {
        ep.name: (False, False) for ep in (ds1, ds2, galaxy.tiefighter, galaxy.xwing)
    }


def test_stage1_l3_l4_policy_drops_the_xwing(
    agent: AgentProcess, galaxy: Galaxy, clean: None
) -> None:
    ds1, ds2 = galaxy.deathstars
    tie, xwing = galaxy.tiefighter, galaxy.xwing
    agent.import_file(L3_L4)
    t0 = time.time_ns()
    assert_lands(curl(agent, tie, "POST", ds1, "/v1/request-landing"))
    assert_lands(curl(agent, tie, "POST", ds2, "/v1/request-landing"))
    before = app_requests(ds1)
    assert_no_answer(curl(agent, xwing, "POST", ds1, "/v1/request-landing"))
    assert app_requests(ds1) == before + 1  # the question itself, nothing else

    drop = agent.wait_flow(lambda r: r.time >= t0 and r.verdict is Verdict.DROPPED
                           and r.source.ip == xwing.ip, cli=True)
    assert drop.type is FlowType.L3_L4 and drop.l7 is None
    assert drop.drop_reason_desc is DropReasonDesc.POLICY_DENIED
    assert (drop.source.identity, drop.destination.identity) == (xwing.identity, ds1.identity)
    assert list(drop.source.labels) == XWING_LABELS
    assert list(drop.destination.labels) == DEATHSTAR_LABELS
    assert (drop.destination.ip, drop.destination.port) == (ds1.ip, 80)
    assert (drop.source.pod_name, drop.destination.pod_name) == (xwing.name, ds1.name)
    assert drop.traffic_direction is TrafficDirection.INGRESS
    assert drop.l4 is not None and drop.l4.flags is not None and drop.l4.flags.syn
    assert not drop.l4.flags.ack
    records = since(agent.flows(cli=True), t0)
    allowed = [r for r in records_of(records, tie, ds1) if r.verdict is Verdict.FORWARDED]
    assert allowed and allowed[0].source.identity == tie.identity
    assert not [r for r in records if r.source.ip == tie.ip and r.verdict is Verdict.DROPPED]
    # what the operator reads: Hubble's compact line
    text = agent.cli("observe", "--pod", xwing.name, "--verdict", "DROPPED").stdout
    assert any(
        f"(ID:{xwing.identity})" in line and f"(ID:{ds1.identity})" in line
        and "Policy denied DROPPED" in line for line in text.splitlines()
    ), text


def test_stage2_l7_policy_lands_and_denies_by_request(
    agent: AgentProcess, galaxy: Galaxy, clean: None
) -> None:
    ds1, ds2 = galaxy.deathstars
    tie, xwing = galaxy.tiefighter, galaxy.xwing
    agent.import_file(L7)
    t0 = time.time_ns()
    assert_lands(curl(agent, tie, "POST", ds1, "/v1/request-landing"))
    before = app_requests(ds2)
    denied = curl(agent, tie, "PUT", ds2, "/v1/exhaust-port")
    assert (denied.exit_code, denied.status, denied.body) == (0, 403, DENIED_BODY)
    assert app_requests(ds2) == before + 1, "the denied request reached the app"
    assert xwing.connect(ds1.ip, 80, timeout=0.5) is None  # still dropped at L3/L4

    rec = agent.wait_access_record(
        lambda r: r.get("l7", {}).get("type") == "REQUEST"
        and r["l7"].get("http", {}).get("method") == "PUT"
        and r["source"].get("ip") == tie.ip
    )
    assert rec["verdict"] == "DROPPED"
    assert rec["Type"] == "L7"
    assert rec["traffic_direction"] == "INGRESS"
    assert rec["drop_reason_desc"] == "POLICY_DENIED"
    http = rec["l7"]["http"]
    assert http["method"] == "PUT"
    assert http["url"] == f"http://{ds2.ip}/v1/exhaust-port"
    assert http["protocol"] == "HTTP/1.1"
    src, dst = rec["source"], rec["destination"]
    assert (src["identity"], src["labels"], src["namespace"], src["ip"]) == (
        tie.identity, TIEFIGHTER_LABELS, "default", tie.ip)
    assert (dst["identity"], dst["labels"], dst["namespace"], dst["ip"], dst["port"]) == (
        ds2.identity, DEATHSTAR_LABELS, "default", ds2.ip, 80)
    assert (src["pod_name"], dst["pod_name"]) == (tie.name, ds2.name)
    assert [p["name"] for p in rec["ingress_denied_by"]] == ["rule1"]
    assert "ingress_allowed_by" not in rec
    response = agent.wait_access_record(
        lambda r: r.get("l7", {}).get("type") == "RESPONSE"
        and r["l7"].get("http", {}).get("code") == 403 and r["destination"].get("ip") == tie.ip
    )
    assert response["verdict"] == "DROPPED" and response["is_reply"] is True

    landed = agent.wait_access_record(
        lambda r: r.get("l7", {}).get("http", {}).get("method") == "POST"
        and r["l7"]["type"] == "REQUEST" and r["source"].get("ip") == tie.ip
    )
    assert landed["verdict"] == "FORWARDED"
    assert [p["name"] for p in landed["ingress_allowed_by"]] == ["rule1"]
    # the proxy's records reach `garrison observe` too, as the same record type
    l7 = [r for r in since(agent.flows(cli=True), t0) if r.type is FlowType.L7]
    assert {(r.verdict, r.l7.http.method if r.l7 and r.l7.http else "") for r in l7} >= {
        (Verdict.FORWARDED, "POST"), (Verdict.DROPPED, "PUT")}
