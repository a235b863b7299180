"""The access-log line of a flow record: the hand-written encoder against orjson (issue 17).

Run: .venv/bin/python bench/flows_encode.py   (GARRISON_PURE=1: the modules from source)

In process, one allowed HTTP/1.1 request record as the proxy builds it (the same endpoints,
rule and header list request after request, a new time each), best of 9 runs of 1,000:

- `record_to_json`: the hand-written encoder (fragments of endpoints, header lists, policy
  lists and HTTP parts kept by identity);
- `orjson.dumps(record_to_dict(r))`: one dict per record, encoded by orjson (the same bytes);
- the same with the endpoint dicts made once (what a per-connection model would keep);
- `record_to_dict` alone, and `orjson.dumps` of one dict made beforehand (orjson's share).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from garrison.flows import codec
from garrison.flows.build import l7_http_request
from garrison.flows.record import Endpoint, FlowRecord, Verdict
from garrison.policies.labels import Labels
from garrison.policies.refs import PolicyKind, RuleRef

T0 = 1_732_190_400_123_456_789
CLIENT = Endpoint.of(31028, Labels.parse(
    "org=empire,class=tiefighter,io.kubernetes.pod.namespace=default"),
    pod_name="tiefighter", ip="198.18.0.2", port=42690)
SERVER = Endpoint.of(16530, Labels.parse(
    "org=empire,class=deathstar,io.kubernetes.pod.namespace=default"),
    pod_name="deathstar", ip="198.18.0.3", port=80)
RULE = RuleRef(PolicyKind.CNP, "default", "rule1", "ingress", 0, 0)
HEADERS = ((b"Host", b"deathstar"), (b"User-Agent", b"wrk"), (b"Content-Length", b"0"))


def record(i: int) -> FlowRecord:
    return l7_http_request(
        time_ns=T0 + i, verdict=Verdict.FORWARDED, direction="ingress", client=CLIENT,
        server=SERVER, method="POST", path="/v1/request-landing", host="deathstar",
        headers=HEADERS, allowed_by=[RULE],
    )


def best_us(records: list[FlowRecord], encode: Callable[[FlowRecord], Any]) -> float:
    for r in records[:100]:
        encode(r)
    best = float("inf")
    for _ in range(9):
        start = time.perf_counter()
        for r in records:
            encode(r)
        best = min(best, (time.perf_counter() - start) / len(records))
    return best * 1e6


def main() -> None:
    records = [record(i) for i in range(1000)]
    line = codec.record_to_json(records[0])
    assert orjson.dumps(codec.record_to_dict(records[0])).decode() == line
    prebuilt = codec.record_to_dict(records[0])
    cases: list[tuple[str, Callable[[FlowRecord], Any]]] = [
        ("hand-written record_to_json", codec.record_to_json),
        ("orjson.dumps(record_to_dict(r))", lambda r: orjson.dumps(codec.record_to_dict(r))),
        ("record_to_dict(r) alone", codec.record_to_dict),
        ("orjson.dumps(one prebuilt dict)", lambda r: orjson.dumps(prebuilt)),
    ]
    for name, encode in cases:
        print(f"{name:40} {best_us(records, encode):6.2f} us/record")
    endpoint_dicts = {id(CLIENT): codec._endpoint_to_dict(CLIENT),
                      id(SERVER): codec._endpoint_to_dict(SERVER)}
    codec._endpoint_to_dict = lambda ep: endpoint_dicts[id(ep)]
    name = "orjson, endpoint dicts made once"
    print(f"{name:40} "
          f"{best_us(records, lambda r: orjson.dumps(codec.record_to_dict(r))):6.2f} us/record")
    print(f"line: {len(line)} bytes")


if __name__ == "__main__":
    main()
