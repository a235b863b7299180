"""HTTP/1.1 parsing cost per request, on a keep-alive connection in steady state.

Run: .venv/bin/python bench/parsers_http1.py [--requests N] [--rounds R]

The request is curl's GET from tests/data/http1/curl_get.bin (curl 7.88, `--http1.1`). One
`HTTP1RequestParser` receives it N times, one `receive_data` per request (a keep-alive
connection, one request per read), and its events are drained:

- `parse`: receive_data + events (llhttp judges the head, target normalized);
- `parse POST` / `parse chunked PUT`: the same with a 5-byte body (Content-Length) and a
  chunked body with one chunk and a trailer, both from tests/unit/parsers/test_http1.py;
- `parse response`: `HTTP1ResponseParser` on curl_get.response.bin (nginx's answer);
- `parse+match`: the same plus `HTTPMatcher.match` of the request against a 10-rule policy
  (method/path/host patterns, two rules with header conditions; the request is allowed by
  the eighth rule), with the header text view an engine would pass.

Times are CPU time of this process (`time.process_time`), not wall-clock time, so that other
work on the machine does not count; `results()` is what the aggregate bench file imports; the
best of R rounds is reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from garrison.parsers.http1 import HTTP1RequestParser, HTTP1ResponseParser, RequestReceived
from garrison.policies.l7rules import HeaderMatch, HTTPRule, L7Protocol, L7RuleSet
from garrison.policies.match_http import HTTPMatcher
from garrison.policies.refs import PolicyKind, RuleRef

FIXTURE = Path(__file__).resolve().parent.parent / "tests/data/http1/curl_get.bin"
RESPONSE = FIXTURE.with_name("curl_get.response.bin")
POST = b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"PUT /v1/logs HTTP/1.1\r\nHost: deathstar\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n"
)

RULES = (
    HTTPRule(method="GET", path="/v1/ships/[0-9]+"),
    HTTPRule(method="POST", path="/v1/request-landing"),
    HTTPRule(method="PUT", path="/v1/exhaust-port", headers=("X-Has-Force: True",)),
    HTTPRule(method="GET", path="/v2/.*", host="deathstar\\.empire\\.gov"),
    HTTPRule(method="DELETE", path="/v1/ships/.*"),
    HTTPRule(path="/healthz", header_matches=(HeaderMatch("X-Probe", "kubelet"),)),
    HTTPRule(method="GET|HEAD", path="/static/.*"),
    HTTPRule(method="GET", path="/v1/(status|version)", host="127\\.0\\.0\\.1"),
    HTTPRule(method="PATCH", path="/v1/ships/[0-9]+/crew"),
    HTTPRule(method="OPTIONS", path="\\*"),
)


def ruleset() -> L7RuleSet:
    return L7RuleSet(
        L7Protocol.HTTP,
        rules=tuple(
            (rule, RuleRef(PolicyKind.CNP, "default", "bench", "ingress", rule_index=i))
            for i, rule in enumerate(RULES)
        ),
    )


def _parse(request: bytes, count: int) -> float:
    parser = HTTP1RequestParser()
    receive, events = parser.receive_data, parser.events
    start = time.process_time()
    for _ in range(count):
        receive(request)
        for _event in events():
            pass
    return time.process_time() - start


def _parse_post(request: bytes, count: int) -> float:
    return _parse(POST, count)


def _parse_chunked(request: bytes, count: int) -> float:
    return _parse(CHUNKED, count)


def _parse_response(request: bytes, count: int) -> float:
    response = RESPONSE.read_bytes()
    parser = HTTP1ResponseParser()
    expect, receive, events = parser.expect_response, parser.receive_data, parser.events
    start = time.process_time()
    for _ in range(count):
        expect("GET")
        receive(response)
        for _event in events():
            pass
    return time.process_time() - start


def _parse_match(request: bytes, count: int) -> float:
    parser = HTTP1RequestParser()
    matcher = HTTPMatcher(ruleset())
    receive, events, match = parser.receive_data, parser.events, matcher.match
    allowed = 0
    start = time.process_time()
    for _ in range(count):
        receive(request)
        for event in events():
            if isinstance(event, RequestReceived):
                verdict = match(event.method, event.path, event.host, event.text_headers)
                allowed += verdict.allowed
    elapsed = time.process_time() - start
    assert allowed == count, "the bench request must be allowed"
    return elapsed


CASES = {
    "http1 parse keep-alive GET (curl)": _parse,
    "http1 parse POST (Content-Length 5)": _parse_post,
    "http1 parse chunked PUT (+ trailer)": _parse_chunked,
    "http1 parse response (nginx 200)": _parse_response,
    "http1 parse+match 10 rules": _parse_match,
}


def results(requests: int = 20000, rounds: int = 5) -> list[dict[str, object]]:
    """One dict per case: name, requests_per_s, us_per_request (best of `rounds`)."""
    request = FIXTURE.read_bytes()
    out: list[dict[str, object]] = []
    for name, case in CASES.items():
        case(request, min(requests, 1000))  # warm up
        best = min(case(request, requests) for _ in range(rounds))
        out.append(
            {
                "name": name,
                "requests_per_s": round(requests / best),
                "us_per_request": round(best / requests * 1e6, 2),
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for row in results(args.requests, args.rounds):
        us, rps = row["us_per_request"], row["requests_per_s"]
        print(f"{row['name']:40} {us:>8} us/request {rps:>10} req/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
