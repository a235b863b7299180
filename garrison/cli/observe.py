"""`garrison observe` and `garrison accesslog summary|export`: review flow records.

Sources: `--input-file PATH` (repeatable; an access log with its rotated and gzip-compressed
backups, or `-` for standard input), `--cluster` (every node's flow API, the nodes read from
etcd, merged in time order: docs/cluster.md), else the local agent's in-memory ring over its
API. `--follow` keeps reading: new lines of the file (across rotation), or new records.

Records flow as JSON objects from the source through the query to the printer; a line that is
no flow record is counted, named on standard error (the first few), and skipped: it is never
printed as if it matched. Exit codes: 0 done, 1 a source could not be read or held bad
lines (with --cluster: a node did not answer; the others' records are shown), 2 bad usage (a
filter, a field mask), 3 no agent answered (with --cluster: etcd, or no node, answered).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from garrison.agent.config import DEFAULT_SOCKET
from garrison.cli import progress
from garrison.cli.flow_api_args import add_flow_api_reader_flags, flow_api_reader_flags_given
from garrison.cli.flowargs import add_filter_flags, build_query
from garrison.cli.kvstore_args import add_etcd_client_flags
from garrison.flows.export import FieldMask, FieldMaskError, csv_header, csv_row
from garrison.flows.flowdict import flow_of, not_a_record
from garrison.flows.query import CompiledQuery, FilterError, FlowQuery
from garrison.flows.reader import FlowSourceError, LogFollower, log_files, open_lines
from garrison.flows.render import (
    RenderOptions,
    render_compact_flow,
    render_dict_flow,
    render_table,
    safe_text,
    table_header,
    table_row,
)

EXIT_OK = 0
EXIT_SOURCE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

AGENT_DEFAULT_LAST = 100  # the agent's ring holds a few thousand: show the newest
FOLLOW_POLL_S = 0.25
TABLE_PAGE = 1000  # rows aligned together, as a tabwriter flushes
MAX_REPORTED_BAD_LINES = 5

Flow = tuple[dict[str, Any], bytes]  # the decoded object and its line as read


class UsageError(Exception):
    """Bad flags found after parsing: printed and exit 2."""


class NothingAnsweredError(Exception):
    """`--cluster`: no node's flow API answered (exit 3)."""


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class ReadStats:
    """What a read saw besides matches: lines that were no flow record."""

    read: int = 0
    bad: int = 0
    reported: int = 0
    failed: int = 0  # --cluster: nodes whose records are not shown

    def bad_line(self, where: str, reason: str) -> None:
        self.bad += 1
        if self.reported < MAX_REPORTED_BAD_LINES:
            self.reported += 1
            print(f"garrison: {where}: not a flow record ({reason}); skipped", file=sys.stderr)

    def report(self) -> None:
        if self.bad > self.reported:
            print(f"garrison: {self.bad} lines in all were not flow records and were skipped",
                  file=sys.stderr)


def _decode(line: bytes, where: Callable[[], str], stats: ReadStats) -> dict[str, Any] | None:
    return _decode_flow(line, where, stats)[0]


def _decode_flow(line: bytes, where: Callable[[], str],
                 stats: ReadStats) -> tuple[dict[str, Any] | None, bytes]:
    """The record of a line (None: it is no record, and `stats` says why) and its own line:
    of Hubble's `{"flow": ...}`, the flow's."""
    try:
        outer = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        stats.bad_line(where(), f"not JSON: {exc}")
        return None, line
    if not isinstance(outer, dict):
        stats.bad_line(where(), "not a JSON object")
        return None, line
    d = flow_of(outer)
    why = not_a_record(d)
    if why is not None:
        stats.bad_line(where(), why)
        return None, line
    return d, line if d is outer else orjson.dumps(d)


def matches_in_lines(
    lines: Iterable[bytes], name: str, query: CompiledQuery, stats: ReadStats
) -> Iterator[Flow]:
    """The hot loop: a substring pre-test, then JSON, then the whole query."""
    may_match, matches = query.may_match, query.matches
    count = 0
    for count, line in enumerate(lines, 1):
        if not may_match(line):
            continue
        d, own = _decode_flow(line, lambda n=count: f"{name}:{n}", stats)  # type: ignore[misc]
        if d is not None and matches(d):
            yield d, own
    stats.read += count


def file_matches(
    inputs: list[str], query: CompiledQuery, stats: ReadStats, *, backups: bool,
    show_progress: bool = False,
) -> Iterator[Flow]:
    logs = [log for path in inputs for log in log_files(path, include_backups=backups)]
    if not show_progress or progress.total_bytes(logs) < progress.MIN_BYTES:
        for log in logs:
            yield from matches_in_lines(open_lines(log), log.name, query, stats)
        return
    with progress.ReadProgress(logs) as bar:
        for log in logs:
            yield from matches_in_lines(bar.track(log, open_lines(log)), log.name, query, stats)


def select(flows: Iterable[Flow], first: int | None, last: int | None) -> Iterable[Flow]:
    if first is not None:
        return _first(flows, first)
    if last is not None:
        return deque(flows, maxlen=last) if last else ()
    return flows


def _first(flows: Iterable[Flow], n: int) -> Iterator[Flow]:
    if n <= 0:
        return
    for i, flow in enumerate(flows, 1):
        yield flow
        if i >= n:
            return


class AgentSource:
    """The agent's ring over its local API (imported only when used: grpc is slow to load)."""

    def __init__(self, socket: Path) -> None:
        from garrison.agent.api import AgentClient

        self._client = AgentClient(socket)

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self._client.call(method, **params)

    def _flows(self, data: dict[str, Any], stats: ReadStats) -> list[Flow]:
        out = []
        for text in data.get("flows", []):
            line = text.encode() if isinstance(text, str) else bytes(text)
            d = _decode(line, lambda: "agent", stats)
            if d is not None:
                out.append((d, line))
        return out

    def recent(
        self, query: FlowQuery, stats: ReadStats, first: int | None, last: int | None
    ) -> tuple[list[Flow], int]:
        params: dict[str, Any] = {"query": query.to_dict()}
        if first is not None:
            params["first"] = first
        else:
            params["limit"] = AGENT_DEFAULT_LAST if last is None else last
        data = self.call("Flows", **params)
        return self._flows(data, stats), int(data.get("cursor", 0))

    def since(self, query: FlowQuery, cursor: int, stats: ReadStats) -> tuple[list[Flow], int]:
        data = self.call("FlowsSince", query=query.to_dict(), cursor=cursor)
        missed = int(data.get("missed", 0))
        if missed:
            print(f"garrison: {missed} records left the agent's ring before they were read "
                  "(it keeps only the newest; the agent's --access-log has every one: "
                  "observe --input-file PATH)", file=sys.stderr)
        return self._flows(data, stats), int(data.get("cursor", cursor))

    def rule_keys(self) -> list[dict[str, Any]]:
        data = self.call("PolicyGet")
        return [ref for p in data.get("policies", []) for ref in p.get("rule_refs", [])]


# ---------------------------------------------------------------------------------------------
# The cluster: every node's flow API (garrison.cluster.relay)


def _check_cluster_flags(args: argparse.Namespace) -> None:
    if args.kvstore_endpoints and not args.cluster:
        raise UsageError("--kvstore-endpoints names etcd for --cluster: add --cluster")
    if args.cluster and args.input_file:
        raise UsageError("--cluster reads the nodes' flow APIs, --input-file a log: give one")
    given = flow_api_reader_flags_given(args)
    if given and not args.cluster:
        raise UsageError(f"{given[0]} is for reading the nodes' flow APIs: add --cluster")


def _cluster_source(args: argparse.Namespace) -> Any:
    """The nodes' flow APIs, etcd from --kvstore-endpoints or from the local agent's status."""
    from garrison.agent.api import AgentUnreachableError
    from garrison.cli.flow_api_args import flow_api_reader_tls
    from garrison.cli.kvstore_args import etcd_client_options
    from garrison.cluster.relay import ClusterFlowSource
    from garrison.kvstore.base import KVStoreError
    from garrison.kvstore.etcd import parse_endpoints

    try:
        flow_tls = flow_api_reader_tls(args)  # the files checked before anything is asked
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    endpoints = args.kvstore_endpoints
    if not endpoints:
        agent = AgentSource(args.socket)
        try:
            cluster = agent.call("Status").get("cluster")
        except AgentUnreachableError as exc:
            raise AgentUnreachableError(
                f"{exc}; or give --kvstore-endpoints URL to find the nodes in etcd") from None
        finally:
            agent.close()
        if not cluster or not cluster.get("endpoints"):
            raise UsageError(f"the agent at {args.socket} is not in a cluster (--kvstore "
                             "sqlite): give --kvstore-endpoints URL, or drop --cluster")
        # the agent's status lists HOST:PORT; its TLS line says whether they are https://
        scheme = "https://" if cluster.get("tls") else "http://"
        endpoints = ",".join(scheme + str(e) for e in cluster["endpoints"])
    try:
        parse_endpoints(endpoints)
    except KVStoreError as exc:
        raise UsageError(f"--kvstore-endpoints: {exc}") from None
    try:
        options = etcd_client_options(args, endpoints)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return ClusterFlowSource(endpoints, tls=options.tls, auth=options.auth, flow_tls=flow_tls)


def _timed(node: str, texts: list[str], stats: ReadStats) -> list[tuple[int, Flow]]:
    from garrison.cluster.flowmerge import flow_time_ns

    out = []
    for text in texts:
        line = text.encode()
        d = _decode(line, lambda: f"node {node}", stats)
        if d is None:
            continue
        t = flow_time_ns(d)
        if t is None:
            stats.bad_line(f"node {node}", f"its time {d.get('time')!r} is not RFC 3339")
            continue
        out.append((t, (d, line)))
    return out


def _node_failed(failure: object, stats: ReadStats, what: str) -> None:
    stats.failed += 1
    print(f"garrison: {failure}; {what}", file=sys.stderr)


def _cluster_recent(args: argparse.Namespace, query: FlowQuery, stats: ReadStats,
                    last: int | None = None) -> list[Flow]:
    """Every node's matching records, merged in time order, --first / --last applied to the
    whole (each node sent its own first or last N)."""
    from garrison.cluster.flowmerge import merge_recent

    source = _cluster_source(args)
    try:
        if last is None:
            last = AGENT_DEFAULT_LAST if args.last is None else args.last
        answers, failures = source.recent(query.to_dict(), args.first, last)
    finally:
        source.close()
    for failure in failures:
        _node_failed(failure, stats, "its records are not shown")
    if not answers:
        where = ",".join(source.store.endpoints)
        raise NothingAnsweredError(
            "no node's flow API answered (named above)" if failures
            else f"etcd at {where} lists no node: are the agents running with --kvstore etcd?")
    merged = merge_recent([_timed(a.node, a.flows, stats) for a in answers], args.first,
                          None if args.first is not None else last)
    return merged


def _follow_cluster(args: argparse.Namespace, query: FlowQuery, printer: Printer,
                    stats: ReadStats) -> None:
    """What --last / --since select on every node, then every node's new records, in time
    order (each held a moment so that a record a slower node reports takes its place)."""
    from garrison.cluster.flowmerge import SortBuffer, merge_recent
    from garrison.cluster.relay import (
        ClusterFollower,
        FlowsArrived,
        NodeFailed,
        NodeJoined,
        NodeLeft,
        NodeListFailed,
        NodeRecovered,
    )

    started_ns = time.time_ns()
    backlog = args.last is not None or query.since_ns is not None
    last = args.last if args.last is not None else (AGENT_DEFAULT_LAST if backlog else 0)
    source = _cluster_source(args)
    follower = None
    try:
        answers, failures = source.recent(query.to_dict(), None, last)
        for failure in failures:
            _node_failed(failure, stats, "following the others; retrying it")
        for d, line in merge_recent([_timed(a.node, a.flows, stats) for a in answers], None,
                                    last):
            printer.emit(d, line)
        printer.flush()
        follower = ClusterFollower(source, query.to_dict(), started_ns, poll_s=FOLLOW_POLL_S)
        follower.start({a.node: (a.ring, a.cursor) for a in answers}, [f.node for f in failures])
        buffer: SortBuffer[Flow] = SortBuffer(delay_s=2 * FOLLOW_POLL_S)
        while True:
            for event in follower.get(FOLLOW_POLL_S):
                if isinstance(event, FlowsArrived):
                    for t, flow in _timed(event.node, event.flows, stats):
                        buffer.add(t, flow, time.monotonic())
                    if event.missed:
                        print(f"garrison: node {event.node}: {event.missed} records left its "
                              "ring before they were read", file=sys.stderr)
                elif isinstance(event, NodeFailed):
                    _node_failed(event.failure, stats, "following the others; retrying it")
                elif isinstance(event, NodeRecovered):
                    print(f"garrison: node {event.node} ({event.address}) answers again",
                          file=sys.stderr)
                elif isinstance(event, NodeJoined):
                    print(f"garrison: node {event.node} ({event.address or 'no flow API'}) "
                          "joined: following it", file=sys.stderr)
                elif isinstance(event, NodeLeft):
                    print(f"garrison: node {event.node} left the cluster", file=sys.stderr)
                elif isinstance(event, NodeListFailed):
                    print(f"garrison: cannot re-read the nodes: {event.reason}; following the "
                          "nodes known", file=sys.stderr)
            for d, line in buffer.drain(time.monotonic()):
                printer.emit(d, line)
            printer.flush()
    finally:
        if follower is not None:
            follower.close()
        source.close()


# ---------------------------------------------------------------------------------------------
# Printers


class Printer:
    """Writes flows in one of observe's formats to a binary stream."""

    def __init__(self, fmt: str, options: RenderOptions, mask: FieldMask | None,
                 out: IO[bytes]) -> None:
        self.fmt, self.options, self.mask, self.out = fmt, options, mask, out
        self._rows: list[tuple[str, ...]] = []
        self._chunk: list[bytes] = []
        self._header_done = False

    def emit(self, d: dict[str, Any], line: bytes) -> None:
        fmt = self.fmt
        if fmt == "json":
            text = line if self.mask is None else orjson.dumps(self.mask.apply(d))
            self._chunk.append(text + b"\n")
        elif fmt == "jsonpb":  # Hubble's GetFlowsResponse: {"flow", "node_name", "time"}
            text = line if self.mask is None else orjson.dumps(self.mask.apply(d))
            node, when = d.get("node_name"), d.get("time")
            tail = b',"node_name":' + orjson.dumps(node) if isinstance(node, str) and node else b""
            if isinstance(when, str):
                tail += b',"time":' + orjson.dumps(when)
            self._chunk.append(b'{"flow":' + text + tail + b"}\n")
        elif fmt == "compact":
            self._chunk.append(render_compact_flow(d, self.options).encode() + b"\n")
        elif fmt == "dict":
            self._chunk.append(render_dict_flow(d, self.options).encode() + b"\n")
        else:
            self._rows.append(table_row(d, self.options))
            if len(self._rows) >= TABLE_PAGE:
                self._table_page()
        if len(self._chunk) >= 512:
            self.out.write(b"".join(self._chunk))
            self._chunk.clear()

    def _table_page(self) -> None:
        rows = self._rows if self._header_done else [table_header(self.options), *self._rows]
        if len(rows) > 0 and (self._rows or not self._header_done):
            self._chunk.append(render_table(rows).encode() + b"\n")
            self._header_done = True
        self._rows = []

    def flush(self) -> None:
        if self._rows:
            self._table_page()
        if self._chunk:
            self.out.write(b"".join(self._chunk))
            self._chunk.clear()
        self.out.flush()


def _color(choice: str, stream: IO[Any]) -> bool:
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return stream.isatty()


def _mask(args: argparse.Namespace, allowed: tuple[str, ...]) -> FieldMask | None:
    if not args.field_mask:
        return None
    if args.output not in allowed:
        raise UsageError(f"--field-mask applies to -o {' and -o '.join(allowed)}, "
                         f"not -o {args.output}")
    try:
        return FieldMask.parse(args.field_mask)
    except FieldMaskError as exc:
        raise UsageError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# The commands


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from garrison.agent.api import AgentUnreachableError, APIError
        from garrison.kvstore.base import KVStoreError

        try:
            return fn(args)
        except (FilterError, UsageError) as exc:
            print(f"garrison: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (KVStoreError, NothingAnsweredError) as exc:
            print(f"garrison: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except FlowSourceError as exc:
            print(f"garrison: {exc}", file=sys.stderr)
            return EXIT_SOURCE
        except AgentUnreachableError as exc:
            print(f"garrison: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except APIError as exc:
            print(f"garrison: {exc}", file=sys.stderr)
            return EXIT_SOURCE

    return run


def _gather(args: argparse.Namespace, query: FlowQuery, stats: ReadStats,
            output_streams_to_terminal: bool = False) -> Iterable[Flow]:
    """The matching flows of the source, --first / --last applied (no follow); reading files,
    a progress bar on a terminal that nothing else is printed to meanwhile."""
    _check_cluster_flags(args)
    if args.cluster:
        return _cluster_recent(args, query, stats)
    if args.input_file:
        compiled = query.compile()
        found = file_matches(args.input_file, compiled, stats, backups=not args.no_backups,
                             show_progress=progress.wanted(sys.stderr,
                                                           output_streams_to_terminal))
        return select(found, args.first, args.last)
    agent = AgentSource(args.socket)
    try:
        recent, _ = agent.recent(query, stats, args.first, args.last)
    finally:
        agent.close()
    return recent


@_guarded
def observe(args: argparse.Namespace) -> int:
    query = build_query(args)
    if args.print_raw_filters:
        sys.stdout.write(_raw_filters_yaml(query))
        return EXIT_OK
    mask = _mask(args, ("json", "jsonpb", "dict"))
    out = sys.stdout.buffer
    options = RenderOptions(
        node_name=args.print_node_name,
        color=args.output in ("compact", "dict") and _color(args.color, sys.stdout),
        policy_names=args.print_policy_names,
    )
    printer = Printer(args.output, options, mask, out)
    if args.output == "dict" and mask is not None:
        printer = _MaskedDictPrinter("dict", options, mask, out)
    stats = ReadStats()
    if args.follow:
        _follow(args, query, printer, stats)
    else:
        streaming = args.last is None and sys.stdout.isatty()
        for d, line in _gather(args, query, stats, streaming):
            printer.emit(d, line)
        printer.flush()
    stats.report()
    return EXIT_SOURCE if stats.bad or stats.failed else EXIT_OK


def _raw_filters_yaml(query: FlowQuery) -> str:
    """Hubble's `--print-raw-filters`: the allow and deny lists as YAML, a filter a JSON text."""
    lines = []
    for name, filters in query.compile().raw_filters().items():
        lines.append(f"{name}:")
        for f in filters:
            text = orjson.dumps(f).decode().replace("'", "''")
            lines.append(f"    - '{text}'")
    return "".join(line + "\n" for line in lines)


class _MaskedDictPrinter(Printer):
    """`-o dict --field-mask`: one `path: value` line per masked field."""

    def emit(self, d: dict[str, Any], line: bytes) -> None:
        from garrison.flows.export import lookup

        assert self.mask is not None
        lines = []
        for path in self.mask.paths:
            found, value = lookup(d, path)
            if found:
                text = value if isinstance(value, str) else orjson.dumps(value).decode()
                lines.append(safe_text(f"{'.'.join(path)}: {text}"))
        self._chunk.append(("\n".join(lines) + "\n------------\n").encode())


def _follow(args: argparse.Namespace, query: FlowQuery, printer: Printer,
            stats: ReadStats) -> None:
    """Print what is there (when --last / --first / --since asks for it), then new records
    until interrupted."""
    if args.first is not None:
        raise UsageError("--first and --follow cannot be combined (as in Hubble): --first "
                         "stops after N records; write --last N --follow")
    _check_cluster_flags(args)
    if args.cluster:
        _follow_cluster(args, query, printer, stats)
        return
    backlog = args.last is not None or query.since_ns is not None
    if args.input_file:
        if len(args.input_file) != 1 or args.input_file[0] == "-":
            raise UsageError("--follow reads one file: give one --input-file PATH (not -)")
        path = args.input_file[0]
        compiled = query.compile()
        if log_files(path, include_backups=False)[0].compressed:
            raise UsageError(f"--follow: access log {path} is compressed, a rotated backup "
                             "that no longer grows: read it without --follow")
        follower = LogFollower(path, start_at_end=not backlog)
        try:
            pending = follower.poll()
            if backlog:
                # what the file held when we started, with --first/--last; then the rest
                for d, line in select(matches_in_lines(pending, path, compiled, stats),
                                      args.first, args.last):
                    printer.emit(d, line)
                printer.flush()
            while True:
                for d, line in matches_in_lines(follower.poll(), path, compiled, stats):
                    printer.emit(d, line)
                printer.flush()
                time.sleep(FOLLOW_POLL_S)
        finally:
            follower.close()
    agent = AgentSource(args.socket)
    try:
        recent, cursor = agent.recent(query, stats, args.first, args.last if backlog else 0)
        for d, line in recent:
            printer.emit(d, line)
        printer.flush()
        while True:
            time.sleep(FOLLOW_POLL_S)
            new, cursor = agent.since(query, cursor, stats)
            for d, line in new:
                printer.emit(d, line)
            printer.flush()
    finally:
        agent.close()


@_guarded
def summary(args: argparse.Namespace) -> int:
    from garrison.flows.summary import RuleKey, SummaryBuilder, SummaryConfig, rule_keys

    query = build_query(args)
    if args.interval is not None and args.interval < 1:
        raise UsageError(f"--interval {args.interval}: expected 1 or more seconds")
    if args.top < 0:
        raise UsageError(f"--top {args.top}: expected 0 or more groups")
    _check_cluster_flags(args)  # before the agent is asked for its rules
    if args.what_if:
        return _what_if(args, query)
    known: list[RuleKey] | None = None
    if args.policy:
        from garrison.policies.errors import PolicyValidationError
        from garrison.policies.loader import load_paths

        try:
            known = rule_keys(load_paths(args.policy).policies)
        except PolicyValidationError as exc:
            raise UsageError(f"--policy: {exc}") from exc
    elif args.cluster and not args.input_file:
        source = _cluster_source(args)
        try:  # the cluster's policies, from etcd
            known = rule_keys(source.policies())
        finally:
            source.close()
    elif not args.input_file:
        agent = AgentSource(args.socket)
        try:
            known = [RuleKey.from_dict(ref) for ref in agent.rule_keys()]
        finally:
            agent.close()
    try:
        config = SummaryConfig(top=args.top, interval_s=args.interval)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    builder = SummaryBuilder(config, known_rules=known)
    stats = ReadStats()
    for d, _ in _gather(args, query, stats):
        builder.add(d)
    result = builder.result(skipped=stats.bad)
    if args.output == "json":
        sys.stdout.buffer.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2))
        sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    else:
        from rich.console import Console

        from garrison.cli.accesslog_view import render_summary

        # piped or captured: wide enough that tables do not wrap into unreadable columns
        width = None if sys.stdout.isatty() else 160
        console = Console(highlight=False, width=width, no_color=args.color == "never" or None,
                          force_terminal=True if args.color == "always" else None)
        render_summary(result, console)
    stats.report()
    return EXIT_SOURCE if stats.bad or stats.failed else EXIT_OK


def _what_if(args: argparse.Namespace, query: Any) -> int:
    """`summary --what-if POLICY...`: replay the matching records against the candidate."""
    from garrison.flows.whatif import WhatIf
    from garrison.policies.errors import PolicyValidationError
    from garrison.policies.loader import load_paths

    paths = [path for group in args.what_if for path in group]
    try:
        candidate = load_paths(paths).policies
    except PolicyValidationError as exc:
        raise UsageError(f"--what-if: {exc}") from exc
    replay = WhatIf(candidate)
    stats = ReadStats()
    for d, _ in _gather(args, query, stats):
        replay.add(d)
    report = replay.report()
    if args.output == "json":
        sys.stdout.buffer.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
        sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    else:
        from rich.console import Console

        from garrison.cli.accesslog_view import render_whatif

        width = None if sys.stdout.isatty() else 200  # a row names the rules in full
        console = Console(highlight=False, width=width, no_color=args.color == "never" or None,
                          force_terminal=True if args.color == "always" else None)
        render_whatif(report, console)
    stats.report()
    return EXIT_SOURCE if stats.bad or stats.failed else EXIT_OK


@_guarded
def export(args: argparse.Namespace) -> int:
    query = build_query(args)
    mask = _mask(args, ("jsonl", "csv"))
    stats = ReadStats()
    target: IO[bytes]
    if args.out and args.out != "-":
        try:
            target = open(args.out, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise FlowSourceError(f"--out {args.out}: cannot create: {exc.strerror}") from exc
    else:
        target = sys.stdout.buffer
    try:
        flows = _gather(args, query, stats,
                        target is sys.stdout.buffer and sys.stdout.isatty())
        if args.output == "csv":
            text = io.TextIOWrapper(target, encoding="utf-8", newline="", write_through=True)
            writer = csv.writer(text)
            writer.writerow(csv_header(mask))
            for d, _ in flows:
                writer.writerow(csv_row(d, mask))
            text.flush()
            text.detach()
        else:
            chunk: list[bytes] = []
            for d, line in flows:
                chunk.append((line if mask is None else orjson.dumps(mask.apply(d))) + b"\n")
                if len(chunk) >= 512:
                    target.write(b"".join(chunk))
                    chunk.clear()
            target.write(b"".join(chunk))
        target.flush()
    finally:
        if target is not sys.stdout.buffer:
            target.close()
    stats.report()
    return EXIT_SOURCE if stats.bad or stats.failed else EXIT_OK


# ---------------------------------------------------------------------------------------------
# Registration


def _sources(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("source (default: the local agent)")
    group.add_argument("--input-file", action="append", metavar="PATH",
                       help="an access log (JSON lines; its rotated PATH.N and gzip backups "
                       "are read too, oldest first), or - for standard input; repeatable")
    group.add_argument("--no-backups", action="store_true",
                       help="read only the named file, not its rotated backups")
    group.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                       help="agent API socket; with --cluster, the agent that names etcd "
                       "(default: %(default)s)")
    group.add_argument("--cluster", action="store_true",
                       help="every node of the cluster: the nodes from etcd, each node's flow "
                       "API (port 4244), merged in time order; a node that does not answer is "
                       "named on standard error, the others are shown (docs/cluster.md)")
    group.add_argument("--kvstore-endpoints", metavar="URL[,URL]",
                       help="with --cluster: etcd's client URLs (http:// or https://HOST:PORT);"
                       " default: the ones the local agent (--socket) uses")
    add_etcd_client_flags(group)
    add_flow_api_reader_flags(group)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "observe", help="flow records from the agent or access-log files, Hubble-style",
        description="Show flow records, filtered, in Hubble's formats. Without --input-file "
        f"it reads the agent's recent records (the last {AGENT_DEFAULT_LAST} unless --first/"
        "--last say otherwise), with --cluster every node's, merged in time order; from "
        "files, every matching record.",
    )
    _sources(p)
    add_filter_flags(p)
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", choices=["compact", "json", "jsonpb", "dict", "table"],
                     default="compact",
                     help="compact: Hubble's one-line form; json: one record per line, as "
                     "logged; jsonpb: as Hubble's -o json/jsonpb ({\"flow\": RECORD, "
                     "\"node_name\", \"time\"}); dict: one field per line; table: columns "
                     "(default: %(default)s)")
    out.add_argument("-f", "--follow", action="store_true",
                     help="keep printing new records (a file across rotation, or the agent)")
    out.add_argument("--field-mask", action="append", metavar="PATHS",
                     help="only these fields (time,source.pod_name,l7.http), for -o "
                     "json/jsonpb/dict")
    out.add_argument("--print-policy-names", action="store_true",
                     help="name the policy rules that allowed or denied")
    out.add_argument("--print-node-name", action="store_true", help="show the node name")
    out.add_argument("--print-raw-filters", action="store_true",
                     help="print the allow and deny filters the flags make (as Hubble's) and "
                     "exit without reading any record")
    out.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                     help="colour the verdict (default: on a terminal; NO_COLOR turns it off)")
    p.set_defaults(func=observe)

    log = sub.add_parser("accesslog", help="summarise and export access logs")
    lsub = log.add_subparsers(dest="accesslog_command", metavar="SUBCOMMAND", required=True)
    s = lsub.add_parser(
        "summary", help="verdicts, top denied, rate over time, use of every policy rule",
        description="Sum up the matching records: counts by verdict, the most frequent "
        "denials, decisions per second over time and how often each policy rule allowed or "
        "denied. Rules that never matched are listed when the policies are known: --policy, "
        "or the agent's policies when reading from the agent.",
    )
    _sources(s)
    add_filter_flags(s)
    s.add_argument("-o", "--output", choices=["table", "json"], default="table",
                   help="table for people, json (one object) for scripts")
    s.add_argument("--policy", action="append", metavar="PATH",
                   help="policy files or directories in force: lists rules never matched")
    s.add_argument("--what-if", action="append", nargs="+", metavar="POLICY",
                   help="replay the records against these candidate policy files or "
                   "directories instead, and list what they would newly deny or allow, by "
                   "source, destination and request")
    s.add_argument("--top", type=int, default=10, metavar="N",
                   help="denied groups to show (default: %(default)s)")
    s.add_argument("--interval", type=int, metavar="SECONDS",
                   help="time-series bucket (default: chosen for at most 60 buckets)")
    s.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the verdicts: auto on a terminal (NO_COLOR turns it off)")
    s.set_defaults(func=summary)

    e = lsub.add_parser("export", help="matching records as JSON lines or CSV",
                        description="Write the matching records for a log pipeline: JSON "
                        "lines as the access log has them, or CSV with a header row.")
    _sources(e)
    add_filter_flags(e)
    e.add_argument("-o", "--output", choices=["jsonl", "csv"], default="jsonl",
                   help="jsonl: one flow record per line; csv: one row per record")
    e.add_argument("--field-mask", action="append", metavar="PATHS",
                   help="only these fields; with CSV, these are the columns")
    e.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    e.set_defaults(func=export)
