"""Reading the parts of a flow dict, the JSON object of an access-log line with Hubble's
field names: absent or mistyped parts read as empty, and Hubble's own JSON (addresses under
`IP`, ports under `l4`) reads like garrison's."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FlowDict = Mapping[str, Any]


def flow_of(d: dict[str, Any]) -> dict[str, Any]:
    """The flow record a JSON line holds: the object itself, or the `flow` of Hubble's
    `GetFlowsResponse` (`{"flow": {...}, "node_name": ..., "time": ...}`), which
    `hubble observe -o json`/`jsonpb`, Hubble's exporter and `observe -o jsonpb` write."""
    inner = d.get("flow")
    return inner if type(inner) is dict and "verdict" not in d else d


def not_a_record(d: Mapping[str, Any]) -> str | None:
    """Why a JSON object is no flow record, or None: every record (Hubble's too) has a
    `time` and a `verdict` as text; without them it is some other JSON (a line of another
    tool's log, a config). `observe` and the review page skip such a line alike."""
    missing = [k for k in ("time", "verdict") if k not in d]
    mistyped = [k for k in ("time", "verdict") if k in d and not isinstance(d[k], str)]
    if not missing and not mistyped:
        return None
    parts = [f"without {' and '.join(map(repr, missing))}"] if missing else []
    if mistyped:
        parts.append(f"with {' and '.join(map(repr, mistyped))} not text")
    return f"a JSON object {', '.join(parts)}"


def obj(d: Any, key: str) -> Mapping[str, Any]:
    value = d.get(key) if isinstance(d, Mapping) else None
    return value if isinstance(value, Mapping) else {}


_PORTED = ("TCP", "UDP", "SCTP")


def l4_ports(d: FlowDict) -> tuple[int, int]:
    for inner in obj(d, "l4").values():
        if isinstance(inner, Mapping):
            src, dst = inner.get("source_port", 0), inner.get("destination_port", 0)
            if "type" in inner:  # ICMP: shown with the type where a port would be
                dst = inner.get("type", 0)
            return as_int(src), as_int(dst)
    return 0, 0


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)  # protobuf's JSON quotes 64-bit integers
    return 0


@dataclass(frozen=True, slots=True)
class FlowSide:
    """One endpoint of a flow dict, with Hubble's fallbacks (`IP.source`, `l4.*.source_port`)."""

    identity: int
    labels: tuple[str, ...]
    namespace: str
    pod_name: str
    ip: str
    port: int


def flow_side(d: FlowDict, which: str) -> FlowSide:
    """`which` is `source` or `destination`."""
    ep = obj(d, which)
    ip = ep.get("ip")
    if not isinstance(ip, str) or not ip:
        fallback = obj(d, "IP").get(which, "")
        ip = fallback if isinstance(fallback, str) else ""
    port = as_int(ep.get("port", 0))
    if not port:
        src, dst = l4_ports(d)
        port = src if which == "source" else dst
    labels = ep.get("labels")
    return FlowSide(
        identity=as_int(ep.get("identity", 0)),
        labels=tuple(x for x in labels if isinstance(x, str)) if isinstance(labels, list) else (),
        namespace=text_of(ep.get("namespace")),
        pod_name=text_of(ep.get("pod_name")),
        ip=ip,
        port=port,
    )


def side_ip(d: FlowDict, which: str) -> str:
    ip = obj(d, which).get("ip")
    if isinstance(ip, str) and ip:
        return ip
    fallback = obj(d, "IP").get(which)
    return fallback if isinstance(fallback, str) else ""


def side_port(d: FlowDict, which: str) -> int | None:
    """The TCP, UDP or SCTP port of one side, None when the flow has none (Hubble: an ICMP
    flow has no port). Hubble's JSON has it under `l4`; a record without `l4` may still carry
    it on the endpoint."""
    l4 = obj(d, "l4")
    key = "source_port" if which == "source" else "destination_port"
    for name in _PORTED:
        inner = l4.get(name)
        if isinstance(inner, Mapping):
            return as_int(inner.get(key, 0))
    if l4:
        return None
    port = as_int(obj(d, which).get("port", 0))
    return port or None


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


def flow_protocol(d: FlowDict) -> str:
    """`grpc`, `http`, `kafka` for proxy records (a gRPC record also has an `http` part),
    else the L4 protocol in lower case (`tcp`, `udp`, `icmpv4`...), `""` when none is named."""
    l7 = obj(d, "l7")
    if l7:
        for name in ("grpc", "http", "kafka"):
            if name in l7:
                return name
    for name in obj(d, "l4"):
        return str(name).lower()
    return ""


def url_path(url: str) -> str:
    """The path of `scheme://host/path?query` (or of a bare `/path?query`)."""
    if "://" in url:
        rest = url.split("://", 1)[1]
        slash = rest.find("/")
        url = rest[slash:] if slash >= 0 else "/"
    for stop in "?#":
        url = url.split(stop, 1)[0]
    return url or "/"


_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def request_uri_path(url: str) -> str | None:
    """The decoded path of a request URI as Go's `url.ParseRequestURI` reads it (what
    `hubble observe --http-path` matches): an absolute URL or an absolute path; the query
    is cut at `?` (a `#` is part of the path: a request carries no fragment); `%2F` and
    `%20` are decoded. None for what Go refuses (a relative path, a bad `%` escape)."""
    if not url:
        return None
    if _SCHEME.match(url):
        rest = url.split(":", 1)[1]
        if not rest.startswith("//"):
            return None  # `mailto:x`: opaque, no path
        rest = rest[2:]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        path = rest[cut:]
        if path.startswith("?"):
            path = ""
    elif url.startswith("/"):
        path = url
    else:
        return None
    path = path.split("?", 1)[0]
    if _ESCAPE.search(path):
        return None
    return _unquote(path)


def _unquote(text: str) -> str:
    if "%" not in text:
        return text
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            raw.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            raw += text[i].encode()
            i += 1
    return raw.decode("utf-8", "replace")
