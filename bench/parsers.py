"""Parse (+ match) cost per request for each L7 parser, on captured real-client traffic.

Run: .venv/bin/python bench/parsers.py

Runs bench/parsers_http1.py, bench/parsers_http2.py and bench/parsers_kafka.py (each also
runnable alone) and prints one table. Each section carries its own reference measured in the
same run — the bare codec underneath (llhttp via httptools; h2) — as its first row, and the
ratio of every row to that first row. Kafka's first row is the parse of a Produce v9 frame.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parsers_http1
import parsers_http2
import parsers_kafka

from garrison.proxy.deny import grpc_permission_denied_headers


def http1_reference(requests: int = 20_000, rounds: int = 5) -> dict[str, object]:
    """llhttp (through httptools) alone on the same curl GET, collecting headers."""
    import httptools

    request = parsers_http1.FIXTURE.read_bytes()

    class Sink:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    best = float("inf")
    for _ in range(rounds):
        sink = Sink()
        parser = httptools.HttpRequestParser(sink)
        t0 = time.perf_counter()
        for _ in range(requests):
            sink.headers = []
            parser.feed_data(request)
        best = min(best, time.perf_counter() - t0)
    return _row("reference: httptools (llhttp) alone", best, requests)


def http2_reference(requests: int = 20_000, rounds: int = 3) -> dict[str, object]:
    """h2 alone: the same calls received and answered trailers-only (compare with the
    `parse+match+deny` row, which does the same work plus garrison's wrapper and matcher)."""
    import h2.config
    import h2.connection
    import h2.events

    start, calls = parsers_http2.record(requests)
    deny = grpc_permission_denied_headers()
    best = float("inf")
    for _ in range(rounds):
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        conn.receive_data(start)
        conn.data_to_send()
        spent = 0.0
        for chunk in calls:
            t0 = time.perf_counter()
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.RequestReceived):
                    conn.send_headers(ev.stream_id, deny, end_stream=True)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            spent += time.perf_counter() - t0
            conn.data_to_send()
        best = min(best, spent)
    return _row("reference: h2 alone, receive + trailers-only", best, requests)


def _row(name: str, seconds: float, requests: int) -> dict[str, object]:
    return {
        "name": name,
        "requests_per_s": requests / seconds,
        "us_per_request": seconds / requests * 1e6,
    }


AIMS = {"http1": "parse + match < 5 us", "http2": "-", "kafka": "header + topics < 10 us"}


def main() -> int:
    print(f"{'section':8} {'case':44} {'req/s':>12} {'us/req':>9} {'ratio':>7}")
    for section, module in (
        ("http1", parsers_http1),
        ("http2", parsers_http2),
        ("kafka", parsers_kafka),
    ):
        rows = module.results()
        if section == "http1":
            rows.insert(0, http1_reference())
        elif section == "http2":
            rows.insert(0, http2_reference())
        base = float(str(rows[0]["us_per_request"])) if rows else 1.0
        for row in rows:
            us = float(str(row["us_per_request"]))
            rps = float(str(row["requests_per_s"]))
            print(f"{section:8} {row['name']!s:44} {rps:12,.0f} {us:9.2f} {us / base:7.2f}")
        print(f"{'':8} aim: {AIMS[section]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
