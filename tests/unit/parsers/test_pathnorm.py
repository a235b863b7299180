"""Request-target normalization: the pinned result for every trick, or the 400."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.parsers.pathnorm import (
    NormalizedTarget,
    UnsafeTargetError,
    normalize_path,
    normalize_target,
    valid_authority,
)

NORMALIZED = [
    # unchanged
    (b"/", "/"),
    (b"/v1/status", "/v1/status"),
    (b"/v1/status/", "/v1/status/"),
    (b"/v1/ships?class=x-wing&page=2", "/v1/ships?class=x-wing&page=2"),
    (b"/a;b=c/d", "/a;b=c/d"),
    (b"/.well-known/x", "/.well-known/x"),
    (b"/a.b/c..d/...", "/a.b/c..d/..."),
    (b"/a|b{c}", "/a|b{c}"),
    (b"/?", "/?"),
    # dot-segments (RFC 3986 5.2.4)
    (b"/v1/../admin", "/admin"),
    (b"/v1/./x", "/v1/x"),
    (b"/v1/x/..", "/v1/"),
    (b"/v1/x/.", "/v1/x/"),
    (b"/v1/x/../", "/v1/"),
    (b"/.", "/"),
    (b"/a/..", "/"),
    (b"/a/b/../../c", "/c"),
    # encoded dots are dots
    (b"/v1/%2e%2e/admin", "/admin"),
    (b"/v1/%2E%2e/admin", "/admin"),
    (b"/%2e/", "/"),
    (b"/v1/.%2e/admin", "/admin"),
    # merged slashes, then dot-segments
    (b"//admin", "/admin"),
    (b"/v1//x///y", "/v1/x/y"),
    (b"/v1//../admin", "/admin"),
    # percent-encoding: unreserved decoded, the rest upper-cased
    (b"/%7euser", "/~user"),
    (b"/%41%62%2D%5f%2e%7E", "/Ab-_.~"),
    (b"/a%20b", "/a%20b"),
    (b"/a%2a%3a", "/a%2A%3A"),
    (b"/a%3fb", "/a%3Fb"),
    (b"/a%25", "/a%25"),
    (b"/a%252e%252e/x", "/a%252e%252e/x"),  # decoded once only: not a dot-segment
    (b"/a%c3%a9", "/a%C3%A9"),
    (b"/a?q=%ff%c0", "/a?q=%FF%C0"),  # the query may carry any bytes (form encodings)
    # the query keeps slashes and dots; its escapes are normalized too
    (b"/a?x=/../y//z", "/a?x=/../y//z"),
    (b"/a?next=%2f%2Fadmin&b=%7e", "/a?next=%2F%2Fadmin&b=~"),
    (b"/a?x=%5c", "/a?x=%5C"),
    (b"/a?x=\\y", "/a?x=\\y"),
    (b"/a?b?c", "/a?b?c"),
    (b"/x/../a?q=1", "/a?q=1"),
]

REJECTED = [
    (b"/v1/%2Fadmin", "encoded slash"),
    (b"/v1/%2fadmin", "encoded slash"),
    (b"/v1/%5Cadmin", "encoded backslash"),
    (b"/v1/%5cadmin", "encoded backslash"),
    (b"/v1/%00", "NUL"),
    (b"/v1?x=%00", "NUL"),
    (b"/v1/%", "percent"),
    (b"/v1/%4", "percent"),
    (b"/v1/%zz", "percent"),
    (b"/v1/%4g", "percent"),
    (b"/v1\\..\\admin", "backslash"),
    (b"/v1/\\admin", "backslash"),
    (b"/\xc3\xa9", "not allowed"),
    (b"/a\x7fb", "not allowed"),
    (b"/a\x00b", "not allowed"),
    (b"/a b", "not allowed"),
    (b"/a\tb", "not allowed"),
    (b"/../x", "above the root"),
    (b"/..", "above the root"),
    (b"/v1/../../x", "above the root"),
    (b"/%2e%2e/x", "above the root"),
    (b"/v1/..;/admin", "parameters"),
    (b"/v1/.;x/admin", "parameters"),
    (b"/%c0%ae%c0%ae/admin", "UTF-8"),
    (b"/%e0%80%ae", "UTF-8"),
    (b"/%ff", "UTF-8"),
    (b"/a#frag", "fragment"),
    (b"/a?x#frag", "fragment"),
]


@pytest.mark.parametrize(("target", "expected"), NORMALIZED)
def test_normalized(target: bytes, expected: str) -> None:
    assert normalize_path(target) == expected
    result = normalize_target(target)
    assert (result.path, result.authority) == (expected, None)


@pytest.mark.parametrize(("target", "reason"), REJECTED)
def test_rejected_with_400(target: bytes, reason: str) -> None:
    with pytest.raises(UnsafeTargetError, match=reason) as caught:
        normalize_target(target)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("target", "path", "authority"),
    [
        (b"http://deathstar/v1/", "/v1/", "deathstar"),
        (b"HTTP://DeathStar:8080/v1/../x?y", "/x?y", "DeathStar:8080"),
        (b"http://deathstar", "/", "deathstar"),
        (b"http://deathstar?q=1", "/?q=1", "deathstar"),
        (b"http://[::1]:80/a", "/a", "[::1]:80"),
        (b"http://10.0.0.1//a/./b", "/a/b", "10.0.0.1"),
    ],
)
def test_absolute_form_is_reduced_to_its_path(target: bytes, path: str, authority: str) -> None:
    result = normalize_target(target)
    assert (result.path, result.authority) == (path, authority)


@pytest.mark.parametrize(
    "target",
    [
        b"https://deathstar/",  # only http towards a cleartext proxy
        b"ftp://deathstar/",
        b"http://user@deathstar/",
        b"http:///v1",
        b"http://dead star/",
        b"http://deathstar:80:80/",
        b"http://deathstar/%2f",
        b"http://deathstar/../x",
        b"deathstar:443",  # authority-form is for CONNECT, refused anyway
        b"v1/relative",
        b"*x",
        b"",
    ],
)
def test_other_forms_rejected(target: bytes) -> None:
    with pytest.raises(UnsafeTargetError):
        normalize_target(target)


def test_asterisk_only_where_allowed() -> None:
    assert normalize_target(b"*", allow_asterisk=True).path == "*"
    assert normalize_target(b"*", allow_asterisk=True) == NormalizedTarget("*")
    with pytest.raises(UnsafeTargetError, match="OPTIONS"):
        normalize_target(b"*")


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("deathstar", True),
        ("deathstar:80", True),
        ("DeathStar.example.com:8080", True),
        ("10.0.0.1", True),
        ("[::1]", True),
        ("[::1]:8080", True),
        ("deathstar:", True),
        ("", False),
        ("user@deathstar", False),
        ("death star", False),
        ("deathstar:80:80", False),
        ("deathstar:123456", False),
        ("[::1", False),
        ("dé", False),
    ],
)
def test_valid_authority(value: str, valid: bool) -> None:
    assert valid_authority(value) is valid


PCHAR = st.sampled_from(
    [*"abcXYZ019-._~!$&'()*+,;=:@", "/", "//", ".", "..", "%2e", "%2E", "%7e", "%41", "%20"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(PCHAR, max_size=30), st.booleans())
def test_normalization_is_idempotent_and_safe(parts: list[str], with_query: bool) -> None:
    target = ("/" + "".join(parts) + ("?q=a/../b" if with_query else "")).encode()
    try:
        path = normalize_path(target)
    except UnsafeTargetError:
        return
    assert normalize_path(path.encode()) == path
    route = path.split("?", 1)[0]
    assert route.startswith("/")
    assert "//" not in route
    segments = route.split("/")
    assert "." not in segments and ".." not in segments
    assert "%2E" not in route and "%7E" not in route
