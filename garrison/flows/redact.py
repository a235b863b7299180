"""Redaction of secrets before a flow record is stored, written or printed.

There is one entry point, `redacted_http()`: the record builders (`garrison.flows.build`) call it
for every HTTP and gRPC record they make, so a record that exists has been redacted. Records
read back from JSON are not redacted again.

By default the values of `Authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie` and
`X-Api-Key` become `[REDACTED]` (names compared case-insensitively; the header stays, so a
review can still see that a client sent credentials), and a password in the userinfo of an
absolute URL is replaced. Query values are kept unless their parameter is named in
`query_params` (`garrison proxy --redact-query-param NAME`): Hubble keeps them by default, and
paths and queries are what L7 policy matches on. Names are compared case-sensitively, as sent,
after percent-decoding (`%74oken` and `token` are one name; `+` reads as a space, as form
decoding has it). Redaction runs on the record only, after the policy decided: what policy
matches on is never redacted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_plus

from garrison.flows.record import HTTP, HTTPHeader

REDACTED = "[REDACTED]"

DEFAULT_SENSITIVE_HEADERS: frozenset[str] = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)

HeaderPairs = Iterable[tuple[str | bytes, str | bytes]]


@dataclass(frozen=True, slots=True)
class RedactionConfig:
    """What to hide. `headers` are header names, any case; `query_params` query parameter
    names, exact case (decoded)."""

    headers: frozenset[str] = DEFAULT_SENSITIVE_HEADERS
    query_params: frozenset[str] = frozenset()
    _lower: frozenset[str] = field(init=False, repr=False, compare=False)
    # Redacted header tuples by the raw header tuple they came from (see redact_headers).
    _memo: dict[tuple[tuple[str | bytes, str | bytes], ...], tuple[HTTPHeader, ...]] = field(
        init=False, repr=False, compare=False
    )
    # HTTP parts by (method, url, raw target, protocol, code, identity of the header tuple).
    _http_memo: dict[tuple[str, str, str, str, int, int], HTTP] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lower", frozenset(name.lower() for name in self.headers))
        object.__setattr__(self, "_memo", {})
        object.__setattr__(self, "_http_memo", {})


DEFAULT_REDACTION = RedactionConfig()


# How many header lists a RedactionConfig remembers; it forgets them all when full.
_MEMO_SIZE = 256


def redact_headers(headers: HeaderPairs, config: RedactionConfig) -> tuple[HTTPHeader, ...]:
    # Runs for every proxied request and response, and a client (or upstream) sends the same
    # header list again and again on a connection: a list seen before gives the same tuple.
    # Only lists without a sensitive header are remembered, so no secret outlives its request.
    memo = config._memo
    if type(headers) is tuple:
        known = memo.get(headers)
        if known is not None:
            return known
    sensitive = config._lower
    out = []
    keep = True
    # Header bytes are ISO-8859-1 on the wire (RFC 9110): latin-1 decodes any byte a peer sends.
    for raw_key, raw_value in headers:
        key = raw_key.decode("latin-1") if isinstance(raw_key, bytes) else raw_key
        if key.lower() in sensitive:
            value = REDACTED
            keep = False
        else:
            value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        out.append(HTTPHeader(key, value))
    result = tuple(out)
    if keep and type(headers) is tuple:
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        memo[headers] = result
    return result


def redact_url(url: str, config: RedactionConfig) -> str:
    url = _redact_userinfo(url)
    if config.query_params:
        url = _redact_query(url, config.query_params)
    return url


def _redact_userinfo(url: str) -> str:
    scheme_end = url.find("://")
    if scheme_end < 0 or "@" not in url:
        return url
    start = scheme_end + 3
    end = len(url)
    for stop in "/?#":
        pos = url.find(stop, start)
        if pos >= 0:
            end = min(end, pos)
    authority = url[start:end]
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{url[:start]}{user}:{REDACTED}@{host}{url[end:]}"


def _redact_query(url: str, names: frozenset[str]) -> str:
    base, question, rest = url.partition("?")
    if not question:
        return url
    query, hash_, fragment = rest.partition("#")
    parts = []
    for part in query.split("&"):
        key, eq, _ = part.partition("=")
        if eq and _named(key, names):
            parts.append(f"{key}={REDACTED}")
        else:
            parts.append(part)
    return f"{base}?{'&'.join(parts)}{hash_}{fragment}"


def _named(key: str, names: frozenset[str]) -> bool:
    if key in names:
        return True
    if "%" not in key and "+" not in key:
        return False
    return unquote(key) in names or unquote_plus(key) in names


def redacted_http(
    *,
    method: str,
    url: str,
    protocol: str,
    headers: HeaderPairs,
    config: RedactionConfig,
    code: int = 0,
    raw_target: str = "",
) -> HTTP:
    """The HTTP part of a record, built with its secrets replaced: the one place redaction
    happens (the record builders call it for every HTTP and gRPC record). `raw_target`, the
    request-target as sent, is redacted as `url` is.

    A keep-alive client asks the same thing with the same headers again and again: the same
    inputs give the same (frozen) HTTP part, which lets the line encoder reuse its JSON."""
    redacted = redact_headers(headers, config)
    memo = config._http_memo
    key = (method, url, raw_target, protocol, code, id(redacted))
    known = memo.get(key)
    if known is not None and known.headers is redacted:
        return known
    http = HTTP(
        method=method,
        url=redact_url(url, config),
        protocol=protocol,
        code=code,
        headers=redacted,
        raw_target=redact_url(raw_target, config) if raw_target else "",
    )
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = http  # holds `redacted`, so its id is not reused while the entry is here
    return http
