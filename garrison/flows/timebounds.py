"""`--since` and `--until`: the time forms `hubble observe` reads, and garrison's few more."""

from __future__ import annotations

import re
from datetime import UTC
from email.utils import parsedate_to_datetime

from garrison.flows.codec import parse_time
from garrison.flows.errors import FilterError
from garrison.flows.record import FlowDecodeError

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")
_UNIT_NS = {
    "ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
    "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000,
}
_GO_MAX_DURATION_NS = (1 << 63) - 1  # Go's time.Duration is an int64 of nanoseconds
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAIVE = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)$")
# Hubble's short RFC 3339 layouts: to the hour (`2006-01-02T15Z07:00`) or the minute
_SHORT = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2})(:\d{2})?([Zz]|[+-]\d{2}:\d{2})$")


def parse_duration_ns(text: str) -> int | None:
    """A Go duration (`90s`, `5m`, `1h30m`, `1.5h`, `300ms`, `0`, `-5m`) or days (`2d`) in
    nanoseconds; None when `text` is no duration."""
    text = text.strip()
    sign = 1
    if text[:1] in "+-" and text:
        sign, text = (-1 if text[0] == "-" else 1), text[1:]
    if text == "0":
        return 0
    if not text:
        return None
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return sign * int(total) if pos == len(text) and pos else None


def parse_time_bound(text: str, now_ns: int, flag: str = "since") -> int:
    """A `--since` / `--until` value, as Hubble reads it: a duration back from now (`5m`,
    `1h30m`), an RFC 3339 time, also to the minute or hour (`2026-12-05T11:59Z`,
    `2026-12-05T11+01:00`), a date (`2026-12-05`, UTC) or an RFC 1123 time (`Sat, 05 Dec
    2026 11:59:00 +0000`, `... GMT`); and garrison's `now` and `2026-12-05 11:59[:SS]` (UTC)."""
    value = text.strip()
    if value.lower() == "now":
        return now_ns
    duration = parse_duration_ns(value)
    if duration is not None:
        if abs(duration) > _GO_MAX_DURATION_NS:
            raise FilterError(f"--{flag} {text!r}: a duration is at most 2562047h (about 292 "
                              "years, as in Go)")
        return now_ns - duration
    if _DATE.match(value):
        value += "T00:00:00Z"
    elif m := _SHORT.match(value):
        date, hour, minute, zone = m.groups()
        value = f"{date}T{hour}{minute or ':00'}:00{zone}"
    elif m := _NAIVE.match(value):
        date, clock = m.groups()
        if clock.count(":") == 1:
            clock += ":00"
        value = f"{date}T{clock}Z"
    try:
        return parse_time(value)
    except (FlowDecodeError, ValueError):
        pass
    rfc1123 = _rfc1123(value)
    if rfc1123 is not None:
        return rfc1123
    raise FilterError(
        f"--{flag} {text!r}: expected a duration (30s, 5m, 1h30m, 2d), a time "
        "(2026-12-05T11:59:00Z, 2026-12-05T11:59Z, 2026-12-05, 2026-12-05 11:59, "
        "Sat, 05 Dec 2026 11:59:00 +0000) or now"
    )


_RFC1123 = re.compile(r"^[A-Za-z]{3}, \d{1,2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} "
                      r"([+-]\d{4}|GMT|UTC|UT|Z)$")


def _rfc1123(value: str) -> int | None:
    """`Mon, 02 Jan 2006 15:04:05 -0700` (Go's RFC1123Z, what Hubble reads) or with `GMT`;
    other zone names are refused: their offset is not known."""
    if not _RFC1123.match(value):
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp()) * 1_000_000_000  # whole seconds only
