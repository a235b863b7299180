"""Request-target normalization: the one spelling of a path that rules match and upstream gets.

POLICY-SEMANTICS pins it: RFC 3986 dot-segment removal, merge of `//`, percent-decoding of
unreserved characters only. Rules are allowlists and the normalized target is what the proxy
forwards, so upstream receives exactly the string that matched; what remains dangerous is a
string a server could read as a *different* path than the one that matched. Such targets are
refused with `UnsafeTargetError` (status 400) instead of being guessed at.

Pinned meaning (the tests hold every line of it):

- Forms: origin-form `/p?q`; absolute-form `http://authority/p?q` (legal towards proxies) is
  reduced to its origin-form path and the authority is returned for the caller to compare with
  the Host header; asterisk-form `*` only where the caller allows it (HTTP/1.1: OPTIONS).
  Anything else (authority-form, relative references, other schemes) is refused.
- Percent-encoding, path and query: `%XX` of an unreserved character (ALPHA DIGIT `-._~`) is
  decoded; every other escape is kept with upper-case hex (`%2f` → `%2F` where allowed).
  `%` without two hex digits is refused.
- The query (after the first `?`) is kept and normalized only as above: no slash or dot
  processing, `%2F` and `%5C` allowed there (they are data). `%00` is refused everywhere.
- Path only: `//` runs merge into one `/` (before dot-segments, as nginx and Envoy do);
  `.` and `..` segments are removed per RFC 3986 §5.2.4 after decoding, so `/%2e%2e/` is
  `/../`; a `..` that would climb above the root is refused (not clamped), and so is a segment
  that is a dot-segment followed by `;params` (`/..;/`, which Tomcat resolves as `..`).
- Refused outright in the path: encoded slash `%2F`/`%2f` and encoded backslash `%5C`/`%5c`
  (servers disagree on whether they separate segments), a raw backslash (some servers treat it
  as `/`), percent-encoded bytes that are not valid UTF-8 (overlong forms such as `%C0%AE`
  have decoded to `.` in servers before); and in the whole target: `#` (a fragment is never
  sent), bytes outside printable ASCII (controls, space, DEL, non-ASCII).
- Printable ASCII outside RFC 3986's sets (`"<>[]^`{|}`) is kept as sent: it means the same
  to every server and rewriting it would only surprise rule authors.

Pure functions, no state, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from garrison.parsers.errors import RemoteProtocolError

__all__ = [
    "NormalizedTarget",
    "UnsafeTargetError",
    "normalize_path",
    "normalize_target",
    "valid_authority",
]


class UnsafeTargetError(RemoteProtocolError):
    """The request-target cannot be normalized safely; answer 400 and log it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=400)


@dataclass(frozen=True, slots=True)
class NormalizedTarget:
    """`path`: normalized origin-form path with its query (`*` for asterisk-form).

    `authority`: `host[:port]` from an absolute-form target as sent (None otherwise).
    """

    path: str
    authority: str | None = None

    def __init__(self, path: str, authority: str | None = None) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "authority", authority)


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# Targets that need no work: printable ASCII without `%`, `\`, `#`, and in the path no empty
# segment but a trailing one and no segment starting with `.` (it could be a dot-segment).
# Most real requests take this path.
_SEGMENT_CHAR = rb"!$&'()*+,\-.0-9:;=@A-Z\[\]^_`a-z{|}~\"<>"
_SEGMENT_FIRST = rb"!$&'()*+,\-0-9:;=@A-Z\[\]^_`a-z{|}~\"<>"
_SIMPLE_TARGET = re.compile(
    rb"(?:/[" + _SEGMENT_FIRST + rb"][" + _SEGMENT_CHAR + rb"]*)*/?"
    rb"(?:\?[" + _SEGMENT_CHAR + rb"/?]*)?"
)

# Bytes allowed raw anywhere in a target, before percent processing: printable ASCII except
# space, `#`, `\` (checked separately with precise messages) — `%` is handled by the escape pass.
_ALLOWED_RAW = bytes(range(0x21, 0x7F))

_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})?")
_HIGH_ESCAPE = re.compile(rb"%[89A-F]")
_SLASHES = re.compile(r"//+")
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?]*)(.*)", re.DOTALL)
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]+)(?::[0-9]{0,5})?")


def valid_authority(value: str) -> bool:
    """`host[:port]` as a Host header or an absolute-form target carries it (no userinfo).

    reg-name, IPv4 or a bracketed IPv6 literal; a port of at most 5 digits. Percent-escapes and
    userinfo (`user@host`) are refused: no client needs them and servers split them differently.
    """
    return _AUTHORITY.fullmatch(value) is not None


def normalize_target(target: bytes, *, allow_asterisk: bool = False) -> NormalizedTarget:
    """Normalize an HTTP/1.1 request-target (the bytes between the two spaces).

    Raises `UnsafeTargetError` (status 400) for anything listed in the module docstring.
    """
    if not target:
        raise UnsafeTargetError("empty request-target")
    first = target[0]
    if first == 0x2F:  # "/"
        return NormalizedTarget(normalize_path(target))
    if target == b"*":
        if not allow_asterisk:
            raise UnsafeTargetError("asterisk-form target `*` is only valid for OPTIONS")
        return NormalizedTarget("*")
    absolute = _ABSOLUTE.fullmatch(target)
    if absolute is None:
        raise UnsafeTargetError("request-target is neither origin-form nor absolute-form")
    scheme, authority_bytes, rest = absolute.groups()
    if scheme.lower() != b"http":
        raise UnsafeTargetError(f"absolute-form scheme {scheme!r} is not http")
    _check_raw(authority_bytes)
    authority = authority_bytes.decode("ascii")
    if not valid_authority(authority):
        raise UnsafeTargetError(f"invalid authority {authority!r} in absolute-form target")
    if not rest:
        rest = b"/"
    elif rest[0] == 0x3F:  # "http://host?q": the path is empty, i.e. "/"
        rest = b"/" + rest
    return NormalizedTarget(normalize_path(rest), authority)


def normalize_path(target: bytes) -> str:
    """Normalize an origin-form target `/path[?query]`; see the module docstring."""
    if not target or target[0] != 0x2F:
        raise UnsafeTargetError("path does not start with /")
    if _SIMPLE_TARGET.fullmatch(target) is not None:
        return target.decode("ascii")
    qmark = target.find(b"?")
    path, query = (target, None) if qmark < 0 else (target[:qmark], target[qmark + 1 :])
    _check_raw(target)
    if b"\\" in path:
        raise UnsafeTargetError("backslash in path")
    norm_path = _remove_dot_segments(_SLASHES.sub("/", _percent_normalize(path, in_path=True)))
    if query is None:
        return norm_path
    return norm_path + "?" + _percent_normalize(query, in_path=False)


def _check_raw(part: bytes) -> None:
    bad = part.translate(None, _ALLOWED_RAW)
    if bad:
        raise UnsafeTargetError(f"byte {bad[:1]!r} not allowed in a request-target")
    if b"#" in part:
        raise UnsafeTargetError("fragment `#` in request-target")


def _percent_normalize(part: bytes, *, in_path: bool) -> str:
    def fix(match: re.Match[bytes]) -> bytes:
        hex_digits = match.group(1)
        if hex_digits is None:
            raise UnsafeTargetError("invalid percent-escape")
        value = int(hex_digits, 16)
        if value == 0:
            raise UnsafeTargetError("encoded NUL %00 in request-target")
        if in_path and value in (0x2F, 0x5C):
            raise UnsafeTargetError(
                "encoded slash %2F in path" if value == 0x2F else "encoded backslash %5C in path"
            )
        if value in _UNRESERVED:
            return bytes((value,))
        return b"%" + hex_digits.upper()

    if b"%" not in part:
        return part.decode("ascii")
    normalized = _ESCAPE.sub(fix, part)
    if in_path and _HIGH_ESCAPE.search(normalized) is not None:
        try:
            unquote_to_bytes(normalized).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsafeTargetError("percent-encoded bytes in path are not valid UTF-8") from exc
    return normalized.decode("ascii")


def _remove_dot_segments(path: str) -> str:
    # After the `//` merge the only empty segment is a trailing one ("/a/" -> ["a", ""]).
    segments = path.split("/")[1:]
    last = len(segments) - 1
    out: list[str] = []
    for index, segment in enumerate(segments):
        if segment == ".":
            if index == last:
                out.append("")
            continue
        if segment == "..":
            if not out:
                raise UnsafeTargetError("dot-segment climbs above the root")
            out.pop()
            if index == last:
                out.append("")
            continue
        if segment.startswith(".") and segment.split(";", 1)[0] in (".", ".."):
            raise UnsafeTargetError(f"dot-segment with parameters {segment!r}")
        out.append(segment)
    return "/" + "/".join(out)
