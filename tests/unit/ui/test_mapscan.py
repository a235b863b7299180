"""The map's reader (`garrison.flows.mapscan`): the map it makes from access-log lines is the
one `ServiceMapBuilder.add` makes from each line decoded whole, hostile lines included."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.flows.flowdict import not_a_record
from garrison.flows.mapscan import FirstLabels, MapFields, MapScan, SynFields
from garrison.flows.servicemap import ServiceMapBuilder

DEMO = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"
DEMO_LINES = [line for line in DEMO.read_bytes().splitlines() if line.strip()]


def line_by_line(lines: list[bytes]) -> tuple[dict[str, Any], list[str]]:
    """The reference: each line decoded whole with orjson and `add`ed (the store's old way)."""
    builder, bad = ServiceMapBuilder(), []
    for line in lines:
        try:
            flow = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            bad.append(f"not JSON: {exc}")
            builder.skipped += 1
            continue
        if type(flow) is not dict:
            bad.append("not a JSON object")
            builder.skipped += 1
            continue
        if why := not_a_record(flow):  # as `garrison observe` skips it
            bad.append(why)
            builder.skipped += 1
            continue
        builder.add(flow)
    return builder.result(), bad


def scanned(lines: list[bytes], window: int = 4096) -> tuple[dict[str, Any], list[str]]:
    builder, bad = ServiceMapBuilder(), []
    scan = MapScan(builder, window)
    for at in range(0, len(lines), 5):  # in batches, as the store gives them
        for _, why in scan.add_lines(lines[at:at + 5]):
            bad.append(why)
            builder.skipped += 1
    scan.flush()
    return builder.result(), bad


def assert_same(lines: list[bytes], window: int = 4096) -> dict[str, Any]:
    expected = line_by_line(lines)
    assert scanned(lines, window) == expected
    return expected[0]


def with_time(line: bytes, ns: int) -> bytes:
    """A demo line at another time (garrison's fixed-width UTC text)."""
    flow = orjson.loads(line)
    s, frac = divmod(1_796_000_000_000_000_000 + ns, 1_000_000_000)
    flow["time"] = f"2026-12-07T{(s // 3600) % 24:02d}:{(s // 60) % 60:02d}:{s % 60:02d}" \
                   f".{frac:09d}Z"
    return orjson.dumps(flow)


def test_the_demo_log_makes_the_same_map() -> None:
    result = assert_same(DEMO_LINES)
    assert result["records"] == 81
    names = {n["name"] for n in result["nodes"]}
    assert {"deathstar", "tiefighter", "xwing"} <= names


def test_a_long_log_repeated_at_other_times_counts_every_record() -> None:
    """Records alike but for their time are counted once per distinct record: the counts,
    first and last times (of the map, each edge, each rule) and the retransmitted SYNs (the
    same demo SYNs again within 64 s) must still be those of every line."""
    times = list(range(3000))
    random.Random(7).shuffle(times)  # not in order: the first is not always the earliest
    lines = [with_time(DEMO_LINES[i % len(DEMO_LINES)], t * 7_000_000)
             for i, t in enumerate(times)]
    result = assert_same(lines)
    assert result["records"] == 3000
    assert result["retried_syns"] > 0
    assert result["first_time"] < result["last_time"]


@pytest.mark.parametrize("window", [1, 2, 7])
def test_a_small_window_gives_the_builder_the_same(window: int) -> None:
    lines = [with_time(DEMO_LINES[i % len(DEMO_LINES)], i * 50_000_000) for i in range(400)]
    assert_same(lines, window)


HOSTILE: list[bytes] = [
    b"not json at all",
    b'{"time": "2026-12-05T11:59:39.547156290Z", "verdict": ',
    b"[1, 2, 3]",
    b'"a string"',
    b"null",
    b"42",
    b"{" * 5000 + b"}" * 5000,
    b'{"junk": ' + b"[" * 800 + b"]" * 800 + b"}",  # deeper than msgspec goes, fine for orjson
    b'{"time": "2026-12-05T11:59:39.547156290Z", "junk": "\xff\xfe"}',  # not UTF-8
    '{"source": {"pod_name": "d\u00e9athstar", "identity": 5}}'.encode(),  # UTF-8, not ASCII
    b'{"source": {"identity": "256", "namespace": "default"}, "Type": "L3_L4"}',
    b'{"source": {"identity": 99999999999999999999999}, "Type": "L3_L4"}',
    b'{"source": {"identity": 18446744073709551615}, "verdict": "DROPPED"}',
    b'{"source": {"identity": 1.0}, "verdict": "FORWARDED"}',
    b'{"source": {"identity": true}, "verdict": "FORWARDED"}',
    b'{"time": 12345, "verdict": "FORWARDED"}',
    b'{"time": "2026-12-05T11:59:39Z", "verdict": "FORWARDED", "Type": "L7", '
    b'"l7": {"http": {"method": "GET", "url": "/x"}}}',
    b'{"time": "2026-13-99T99:99:99.999999999Z", "verdict": "FORWARDED"}',
    b'{"time": "2026-12-05T11:59:39.547156290Z", "time": "2026-12-05T11:59:40.000000000Z"}',
    b'{"l7": null, "verdict": "FORWARDED"}',
    b'{"l7": {}, "verdict": "FORWARDED"}',
    b'{"Type": "L7", "l7": {"kafka": {"api_key": "produce", "topics": ["a", "a", 3]}}}',
    b'{"Type": "L7", "l7": {"kafka": {"api_key": 0, "topic": "t"}}, "is_reply": true}',
    b'{"Type": "L7", "l7": {"kafka": {"api_key": "fetch", "topic": "t", "error_code": null}}, '
    b'"is_reply": true}',
    b'{"Type": "L7", "l7": {"grpc": {"service": "s", "method": "m", "status": false}}, '
    b'"is_reply": true}',
    b'{"Type": "L7", "l7": {"http": {"code": "200"}}, "is_reply": true}',
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"l4": {"ICMPv4": {"type": 8}}}',
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"l4": {"ICMPv4": {"destination_port": 8}}}',
    b'{"Type": "L3_L4", "event_type": {"type": 5}, "verdict": "DROPPED", '
    b'"l4": {"UDP": {"destination_port": 53}}, "ingress_denied_by": [{"name": 7}, 3]}',
    b'{"ingress_allowed_by": [{"name": ["x"]}], "Type": "L7", "l7": {"kafka": {"topics": 7}}}',
    b'{"aggregate": {"ingress_flow_count": 41}, "Type": "L7", "verdict": "DROPPED", '
    b'"l7": {"http": {"method": "PUT", "url": "/v1/exhaust-port"}}}',
    b'{"aggregate": {"ingress_flow_count": "41"}, "Type": "L7", "verdict": "DROPPED", '
    b'"l7": {"http": {"method": "PUT", "url": "/v1/exhaust-port"}}}',
    b'{"source": {"labels": ["k8s:app=<script>alert(1)</script>", 7]}}',
    b'{"is_reply": 1, "Type": "L7", "l7": {"http": {"method": "GET", "url": "/"}}}',
    b"{}",
    # one node (namespace and identity), other labels: the first record's are the node's
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"source": {"identity": 4242, "namespace": "ns", "labels": ["k8s:app=one"]}}',
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"source": {"identity": 4242, "namespace": "ns", "labels": ["k8s:app=two", 3]}}',
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"source": {"identity": 4243, "namespace": "ns", "labels": "k8s:app=three"}}',
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"source": {"identity": 4243, "namespace": "ns", "labels": ["k8s:app=four"]}}',
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"source": {"identity": 4244, "namespace": "ns", "labels": [' + b"[" * 600 + b"]" * 600
    + b']}}',
    # endpoints known by address only: the map names them by it
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"source": {"identity": 2, "ip": "198.51.100.7"}, "l4": {"UDP": {"destination_port": 53}}}',
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"source": {"identity": 2, "ip": "198.51.100.8"}, "l4": {"UDP": {"destination_port": 53}}}',
    b'{"Type": "L3_L4", "event_type": {"type": 1}, "verdict": "DROPPED", '
    b'"source": {"identity": 2}, "IP": {"source": "198.51.100.9"}, '
    b'"l4": {"UDP": {"destination_port": 53}}}',
]


def _as_record(line: bytes) -> bytes | None:
    """A hostile object without a `time` or `verdict` (no flow record, so skipped) with them
    added, so that its other fields still reach the map."""
    try:
        flow = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(flow) is not dict or not_a_record(flow) is None:
        return None
    if not isinstance(flow.get("time"), str):
        flow["time"] = "2026-12-05T11:59:39.547156290Z"
    if not isinstance(flow.get("verdict"), str):
        flow["verdict"] = "FORWARDED"
    return json.dumps(flow, ensure_ascii=False).encode()  # orjson stops at 255 levels


HOSTILE += [line for line in map(_as_record, HOSTILE) if line is not None]


def test_hostile_lines_are_counted_and_named_as_line_by_line() -> None:
    lines = [DEMO_LINES[0], *HOSTILE, *DEMO_LINES, *HOSTILE]
    result = assert_same(lines)
    assert result["skipped"] > 0


@pytest.mark.parametrize("line", HOSTILE)
def test_each_hostile_line_alone(line: bytes) -> None:
    assert_same([line, *DEMO_LINES[:3], line])


def test_a_huge_line_is_one_record_or_one_bad_line() -> None:
    flow = orjson.loads(DEMO_LINES[10])
    flow["Summary"] = "x" * (8 << 20)
    assert_same([orjson.dumps(flow), orjson.dumps(flow)[: 4 << 20], *DEMO_LINES[:5]])


def test_a_float_out_of_range_where_the_map_does_not_look_is_the_one_difference() -> None:
    """Documented in the module: msgspec reads 1e400 as JSON (it is, by its grammar), orjson
    does not; so such a line is a record of the map rather than a line skipped."""
    line = DEMO_LINES[0][:-1] + b', "junk": 1e400}'
    result, bad = scanned([line])
    assert (result["records"], result["skipped"], bad) == (1, 0, [])
    assert line_by_line([line])[0]["skipped"] == 1


# -- what the reader reads: every field `add` reads of a record it counts alike ---------------


def schema_paths(kind: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The field paths a msgspec type holds (list items as "[]")."""
    info = msgspec.inspect.type_info(kind) if not isinstance(kind, msgspec.inspect.Type) \
        else kind
    paths: set[tuple[str, ...]] = set()
    if isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            paths |= schema_paths(member, prefix)
    elif isinstance(info, (msgspec.inspect.StructType, msgspec.inspect.TypedDictType)):
        for f in info.fields:
            paths.add((*prefix, f.encode_name))
            paths |= schema_paths(f.type, (*prefix, f.encode_name))
    elif isinstance(info, msgspec.inspect.VarTupleType):
        paths |= schema_paths(info.item_type, (*prefix, "[]"))
    elif isinstance(info, msgspec.inspect.AnyType):
        paths.add((*prefix, "*"))
    return paths


class Noting(Mapping[str, Any]):
    """A record that notes the path of every field read from it."""

    def __init__(self, value: dict[str, Any], path: tuple[str, ...],
                 read: set[tuple[str, ...]]) -> None:
        self._value, self._path, self._read = value, path, read

    def __getitem__(self, key: str) -> Any:
        self._read.add((*self._path, key))
        return noting(self._value[key], (*self._path, key), self._read)

    def __contains__(self, key: object) -> bool:
        self._read.add((*self._path, str(key)))
        return key in self._value

    def __iter__(self) -> Iterator[str]:
        raise AssertionError(f"the map iterated {self._path}: it reads named fields only")

    def __len__(self) -> int:
        return len(self._value)


def noting(value: Any, path: tuple[str, ...], read: set[tuple[str, ...]]) -> Any:
    if isinstance(value, dict):
        return Noting(value, path, read)
    if isinstance(value, list):
        return [noting(v, (*path, "[]"), read) if isinstance(v, dict) else v for v in value]
    return value


def test_the_map_reads_only_fields_the_reader_decodes() -> None:
    """If `ServiceMapBuilder.add` learns to read a field, `MapFields` must name it, or
    records differing in it would be counted as one; and `retried_syn` reads only what
    `SynFields` decodes of a denied SYN."""
    alike = schema_paths(MapFields) | schema_paths(FirstLabels)
    syn = schema_paths(SynFields)
    assert ("l7", "*") in syn  # only whether it is there is read: see below
    decode = msgspec.json.Decoder(MapFields).decode
    builder = ServiceMapBuilder()
    checked = 0
    for line in [*DEMO_LINES, *HOSTILE]:
        if not line.isascii():
            continue  # read the builder's own way
        try:
            fields = decode(line)
        except (msgspec.DecodeError, RecursionError):
            continue
        tcp = fields.l4.TCP if fields.l4 is not None else None
        maybe_retried = fields.verdict == "DROPPED" and tcp and tcp.flags and tcp.flags.SYN
        read: set[tuple[str, ...]] = set()
        builder.add(noting(orjson.loads(line), (), read))
        assert read - alike - (syn if maybe_retried else set()) == set(), line
        if maybe_retried:
            read = set()
            builder.retried_syn(noting(orjson.loads(line), (), read))
            assert {p for p in read if p[0] != "l7"} - syn == set(), line
            assert {p for p in read if p[0] == "l7"} <= {("l7",)}
            checked += 1
        checked += 1
    assert checked > len(DEMO_LINES)


# -- random records: whatever the fields hold, both ways agree --------------------------------


def values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([1 << 63, -(1 << 64)]),
        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(
            ["", "DROPPED", "FORWARDED", "AUDIT", "ERROR", "L7", "L3_L4", "default", "5",
             "2026-12-05T11:59:39.547156290Z", "2026-12-05T11:59:39Z", "ingress[0]",
             "http://x/v1/ships/7", "déjà"]))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
            ["type", "http", "grpc", "kafka", "TCP", "flags", "SYN", "ACK", "ip", "identity",
             "namespace", "pod_name", "labels", "destination_port", "source_port", "code",
             "status", "url", "method", "topics", "topic", "api_key", "error_code", "name",
             "kind", "rule", "ingress_flow_count"]), inner, max_size=4)), max_leaves=8)


FIELDS = ["time", "verdict", "Type", "is_reply", "source", "destination", "l4", "l7", "IP",
          "event_type", "aggregate", "ingress_allowed_by", "egress_allowed_by",
          "ingress_denied_by", "egress_denied_by"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(DEMO_LINES) - 1),
                          st.dictionaries(st.sampled_from(FIELDS), values(), max_size=3),
                          st.lists(st.sampled_from(FIELDS), max_size=2)),
                min_size=1, max_size=12),
       st.integers(1, 5))
def test_random_changes_to_demo_records_agree(
    changes: list[tuple[int, dict[str, Any], list[str]]], window: int,
) -> None:
    lines = list(DEMO_LINES)
    for index, replaced, removed in changes:
        flow = copy.deepcopy(orjson.loads(DEMO_LINES[index]))
        flow.update(replaced)
        for name in removed:
            flow.pop(name, None)
        # the standard library writes any integer, and UTF-8 unescaped
        line = json.dumps(flow, ensure_ascii=False).encode()
        lines.insert(random.Random(index).randrange(len(lines)), line)
    assert_same(lines, window)
