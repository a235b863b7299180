"""`garrison accesslog summary` as tables on a terminal (rich).

The summary itself is `garrison.flows.summary`; this module only lays it out: verdict counts,
the top denied groups, decisions per second over time with a bar per bucket, and the
policy rules with their counts and the sections that never matched. Every cell is a `Text`,
so label values and rule names such as `ingress[0]` are never read as rich markup; without a
colour system (a file, a test's `Console(file=io.StringIO(), color_system=None)`) the output
is plain text.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from garrison.flows.render import render_time, safe_text
from garrison.flows.summary import AccessLogSummary, QuietSpan, RateSeries, VerdictCounts
from garrison.flows.whatif import WhatIfReport

BAR_WIDTH = 20
_BAR = "█"
_TIME_WIDTH = len("Nov 21 12:00:00.123")
_VERDICT_STYLE = {"FORWARDED": "green", "DROPPED": "red", "AUDIT": "yellow", "ERROR": "red"}


def render_summary(summary: AccessLogSummary, console: Console) -> None:
    """Print every part of `summary` on `console`."""
    _records(summary, console)
    _verdicts(summary, console)
    _top_denied(summary, console)
    _rate(summary.rate, console)
    _rules(summary, console)


def _time(ns: int | None) -> str:
    return "-" if ns is None else render_time(ns)


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    """Columns named in `right` are numbers (right-aligned); names ending in SEEN or START
    hold a compact time. Both keep their width; the others wrap on a narrow terminal
    instead of being cut off with an ellipsis."""
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for name in columns:
        if name in right:
            table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
        elif name.endswith(("SEEN", "START")):
            table.add_column(name, no_wrap=True, min_width=_TIME_WIDTH)
        else:
            table.add_column(name, overflow="fold")
    return table


def _heading(console: Console, text: str) -> None:
    console.print()
    console.print(Text(text, style="bold"))


def _records(summary: AccessLogSummary, console: Console) -> None:
    line = f"{summary.records_read} records read, {summary.records_skipped} skipped"
    if summary.first_time_ns is not None:
        line += f", from {_time(summary.first_time_ns)} to {_time(summary.last_time_ns)}"
    console.print(Text(line))
    if summary.retried_syns:
        console.print(Text(f"{summary.retried_syns} retransmitted SYNs of denied connection "
                           "attempts are counted as records, not again as decisions"))


def _verdicts(summary: AccessLogSummary, console: Console) -> None:
    _heading(console, "Verdicts")
    table = _table("VERDICT", "RECORDS", "DECISIONS", right=("RECORDS", "DECISIONS"))
    records, decisions = summary.record_verdicts, summary.decision_verdicts
    for name in ("FORWARDED", "DROPPED", "AUDIT", "ERROR", "other"):
        n_records, n_decisions = _count(records, name), _count(decisions, name)
        if name == "other" and not n_records:
            continue
        table.add_row(
            Text(name, style=_VERDICT_STYLE.get(name, "")),
            Text(str(n_records)),
            Text(str(n_decisions)),
        )
    table.add_row(Text("TOTAL"), Text(str(records.total)), Text(str(decisions.total)))
    console.print(table)


def _count(counts: VerdictCounts, name: str) -> int:
    value: int = getattr(counts, name.lower())
    return value


def _top_denied(summary: AccessLogSummary, console: Console) -> None:
    shown, total = len(summary.top_denied), summary.denied_groups
    _heading(console, f"Top denied ({shown} of {total} groups)" if total else "Top denied")
    if not total:
        console.print(Text("No denied decisions."))
        return
    table = _table("COUNT", "SOURCE", "DESTINATION", "WHAT", "FIRST SEEN", "LAST SEEN",
                   right=("COUNT",))
    for group in summary.top_denied:
        table.add_row(
            Text(str(group.count)),
            Text(safe_text(_side(group.source.text, group.source_pods))),
            Text(safe_text(_side(group.destination.text, group.destination_pods))),
            Text(safe_text(group.what or group.protocol or "-")),
            Text(_time(group.first_seen_ns)),
            Text(_time(group.last_seen_ns)),
        )
    console.print(table)


def _side(text: str, pods: tuple[str, ...]) -> str:
    """Source and destination alike: who (identity, namespace, labels), then the pods seen."""
    return f"{text} pods: {', '.join(pods)}" if pods else text


def _rate(rate: RateSeries, console: Console) -> None:
    _heading(console, f"Decisions over time (per {_interval_text(rate.interval_s)})")
    if not rate.buckets:
        console.print(Text("No decisions with a time."))
        return
    extra = [
        name for name in ("AUDIT", "ERROR", "other")
        if any(_count(b.verdicts, name) for b in rate.buckets)
    ]
    columns = ["START", "DECISIONS", "FORWARDED", "DROPPED", *extra, "RATE/s", ""]
    table = _table(*columns, right=tuple(columns[1:-1]))
    most = max(b.count for b in rate.buckets)
    for bucket in rate.rows():
        if isinstance(bucket, QuietSpan):
            # a run of empty buckets is one row, not a column of zeros
            table.add_row(
                Text(render_time(bucket.start_ns)),
                Text("0"),
                *(Text("") for _ in columns[2:-1]),
                Text(f"no decisions until {render_time(bucket.end_ns)} "
                     f"({bucket.buckets} intervals)", style="dim"),
            )
            continue
        counts = [_count(bucket.verdicts, name) for name in ("FORWARDED", "DROPPED", *extra)]
        bar = round(bucket.count / most * BAR_WIDTH) if most else 0
        if bucket.count and not bar:
            bar = 1  # a bucket with decisions is never shown empty
        table.add_row(
            Text(render_time(bucket.start_ns)),
            Text(str(bucket.count)),
            *(Text(str(n)) for n in counts),
            Text(f"{bucket.rate_per_s:.2f}"),
            Text(_BAR * bar),
        )
    console.print(table)


def _interval_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _rules(summary: AccessLogSummary, console: Console) -> None:
    _heading(console, "Policy rules")
    if summary.rules:
        table = _table("RULE", "ALLOWED", "DENIED", "AUDITED", "LAST SEEN",
                       right=("ALLOWED", "DENIED", "AUDITED"))
        for rule in summary.rules:
            table.add_row(
                Text(safe_text(rule.key.text)),
                Text(str(rule.allowed)),
                Text(str(rule.denied)),
                Text(str(rule.audited)),
                Text(_time(rule.last_seen_ns)),
            )
        console.print(table)
    else:
        console.print(Text("No decision named a policy rule."))
    never = summary.never_matched
    if never is None:
        console.print(Text(
            "No policies given, so rules that never matched cannot be listed "
            "(pass --policy)."
        ))
    elif not never:
        console.print(Text("Every rule section of the given policies matched."))
    else:
        console.print(Text("Never matched — candidates for removal:"))
        for key in never:
            console.print(Text(f"  {safe_text(key.text)}"))


def render_whatif(report: WhatIfReport, console: Console) -> None:
    """`accesslog summary --what-if`: what the candidate policies would change."""
    console.print(Text(
        f"{report.records_read} records read: {report.decisions} decisions replayed, "
        f"{report.unchanged} unchanged, {report.skipped} not decisions or not replayable"
    ))
    console.print(Text(
        f"{report.newly_denied} newly denied, {report.newly_allowed} newly allowed "
        "by the candidate policies"
    ))
    if not report.changes:
        return
    _heading(console, "Changes (source, destination, request)")
    table = _table("CHANGE", "COUNT", "SOURCE", "DESTINATION", "REQUEST", "RECORDED", "AT",
                   "CANDIDATE RULES", "LAST SEEN", right=("COUNT",))
    for change in report.changes:
        style = "red" if change.change == "newly denied" else "green"
        table.add_row(
            Text(change.change, style=style),
            Text(str(change.count)),
            Text(safe_text(change.source)),
            Text(safe_text(change.destination)),
            Text(safe_text(change.request)),
            Text(safe_text(change.recorded)),
            Text(safe_text(change.denied_at or "-")),
            Text("\n".join(map(safe_text, change.rules))),
            Text(_time(change.last_ns or None)),
        )
    console.print(table)
