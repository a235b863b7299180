"""The review page's HTTP server: static assets and JSON over the flow store. Read-only.

Endpoints (GET only; anything else is 405):

- `/` the page; `/static/NAME` its assets (only the files shipped in `garrison/ui/static`);
- `/api/info`: the source, how many records, lines that were no flow record, the policies,
  what is wrong with the source now (`problem`: an agent that does not answer);
- `/api/map?q=FILTER`: the service map (`garrison.flows.servicemap`); without a filter it is
  the one kept up to date while reading, with one it is computed by reading the records again;
  while the inputs are still being read, `loading` says how far (`{"bytes", "done"}`);
- `/api/flows?q=FILTER&before=SEQ&limit=N`: matching records, newest first, from sequence
  number SEQ down; one answer looks at no more than `SCAN_LIMIT` records and says where to go on
  (`next_before`) and whether the start was reached (`complete`);
- `/api/stream?q=FILTER&after=SEQ`: server-sent events, one `flow` event per new matching
  record (follow mode), a comment every 15 s to keep the connection;
- `/api/policy`: per rule the allowed / denied / audited counts and times, the rules never
  matched (when the policies are known) and the audited requests enforcing would deny.

At most `MAX_CONNECTIONS` connections are served at once (more are closed at once), and one
that asks nothing for `IDLE_TIMEOUT_S` is let go: with `garrison agent --ui` the server runs in
the agent's process, and any local user can connect to it.

Every answer carries a content security policy (`default-src 'self'`): the page loads nothing
from elsewhere. Requests whose Host header names another site are refused (a web page that
rebinds its own name to 127.0.0.1 cannot read the log), and so are requests to `/api/` that a
page of another site made the browser send (`Sec-Fetch-Site` other than `same-origin` or
`none`: it could not read the answer, but the work behind it would be done). Filters are read
by the same flags as `garrison observe` (`garrison.ui.filters`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from garrison.flows.query import MATCH_ALL, CompiledQuery, FilterError, FlowDict, flow_side
from garrison.flows.render import (
    flow_type_text,
    policy_names,
    render_host,
    render_identity,
    render_time_text,
    safe_text,
    verdict_text,
)
from garrison.flows.summary import RuleKey
from garrison.ui.filters import parse_filter
from garrison.ui.store import FlowStore

CSP = ("default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
       "object-src 'none'")
PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000
# A connection holds a thread and a descriptor, in the agent's process with `agent --ui`: at
# most this many are served at once (more are closed at once), and one that asks nothing is
# let go after this long (a browser opens a new one when it needs one).
MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 10.0
SCAN_LIMIT = 200_000
STREAM_BATCH = 500
HEARTBEAT_S = 15.0
_STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*\.(?:js|css|html|svg)$")
_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
          "html": "text/html; charset=utf-8", "svg": "image/svg+xml"}


@dataclass
class UIConfig:
    """`allowed_hosts`: the Host header values accepted (None: any, for --allow-remote);
    `known_rules`: the rule sections in force (None: unknown, no never-matched list)."""

    source: str
    allowed_hosts: frozenset[str] | None
    known_rules: list[RuleKey] | None = None
    policies_from: str = ""


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = MAX_CONNECTIONS  # socketserver's 5 drops a burst's SYNs

    def __init__(self, address: tuple[str, int], store: FlowStore, config: UIConfig) -> None:
        self.store, self.config = store, config
        self.stopping = threading.Event()
        self.errors: list[str] = []  # the last five the source had
        self.problem: str | None = None  # what is wrong with the source now
        self._map_cache: tuple[int, dict[str, Any]] | None = None
        self._map_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: the client may try again
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: nothing to report

    def shutdown(self) -> None:
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        super().shutdown()

    def source_error(self, message: str) -> None:
        self.errors = [*self.errors[-4:], message]
        self.problem = message

    def source_ok(self) -> None:
        """The source is read again (an agent that was away answers)."""
        self.problem = None

    def service_map(self) -> dict[str, Any]:
        """The map of everything read, recomputed only when records were added."""
        store = self.store
        with self._map_lock:
            version = store.version
            if self._map_cache is not None and self._map_cache[0] == version:
                return self._map_cache[1]
            with store.changed:
                result = store.builder.result(known_rules=self.config.known_rules)
                result["loading"] = store.loading
            self._map_cache = (version, result)
            return result


class Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server_version = "garrison-ui"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the page polls; a line per request would bury everything else

    # -- answers ------------------------------------------------------------------------------

    def _headers(self, status: int, content_type: str, length: int | None,
                 cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
        self.end_headers()

    def _json(self, value: Any, status: int = 200) -> None:
        body = orjson.dumps(value)
        self._headers(status, "application/json", len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    # -- dispatch -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        allowed = self.server.config.allowed_hosts
        host = (self.headers.get("Host") or "").lower()
        if allowed is not None and host not in allowed:
            self._error(HTTPStatus.FORBIDDEN, f"host {host!r} is not this server's address")
            return
        parts = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path
        site = self.headers.get("Sec-Fetch-Site")
        if path.startswith("/api/") and site not in (None, "same-origin", "none"):
            # another site's page made the browser ask (an <img>, a no-cors fetch): it could
            # not read the answer, but the scan behind it would run all the same, in the
            # agent's process with `agent --ui`
            self._error(HTTPStatus.FORBIDDEN, f"the API answers this page only, not a request"
                        f" another site's page made (Sec-Fetch-Site: {site[:40]})")
            return
        try:
            if path in ("/", "/index.html"):
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(path.removeprefix("/static/"))
            elif path == "/api/info":
                self._info()
            elif path == "/api/map":
                self._map(params)
            elif path == "/api/flows":
                self._flows(params)
            elif path == "/api/stream":
                self._stream(params)
            elif path == "/api/policy":
                self._policy()
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        except FilterError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "the review page is read-only")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _static(self, name: str) -> None:
        if not _STATIC_NAME.match(name):
            self._error(HTTPStatus.NOT_FOUND, "no such asset")
            return
        asset = resources.files("garrison.ui").joinpath("static", name)
        if not asset.is_file():
            self._error(HTTPStatus.NOT_FOUND, "no such asset")
            return
        body = asset.read_bytes()
        self._headers(200, _TYPES[name.rsplit(".", 1)[1]], len(body), cache=name != "index.html")
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- the API ------------------------------------------------------------------------------

    def _query(self, params: dict[str, str]) -> CompiledQuery:
        text = params.get("q", "").strip()
        return parse_filter(text).compile() if text else MATCH_ALL

    def _info(self) -> None:
        store, config = self.server.store, self.server.config
        self._json({
            "source": config.source,
            "records": len(store) - store.stats.bad,  # the store keeps skipped lines too
            "skipped": store.stats.bad,
            "skipped_samples": store.stats.samples,
            "policies": config.policies_from,
            "errors": self.server.errors,
            "problem": self.server.problem,
            "loading": store.loading,
            "read_only": True,
        })

    def _map(self, params: dict[str, str]) -> None:
        query = self._query(params)
        if query.selects_all:
            self._json(self.server.service_map())
            return
        store = self.server.store
        loading = store.loading
        builder = store.scan_map(query)
        self._json({**builder.result(known_rules=self.server.config.known_rules),
                    "loading": loading})

    def _int(self, params: dict[str, str], name: str, default: int, high: int) -> int:
        text = params.get(name, "")
        if not text:
            return default
        if not (text.isascii() and text.isdigit()):
            raise FilterError(f"{name}: expected a number, got {text[:40]!r}")
        return min(int(text), high)

    def _flows(self, params: dict[str, str]) -> None:
        query = self._query(params)
        store = self.server.store
        before = self._int(params, "before", len(store), len(store))
        limit = max(1, self._int(params, "limit", PAGE_LIMIT, MAX_PAGE_LIMIT))
        found, next_before, complete = store.page(query, before, limit, SCAN_LIMIT)
        self._json({
            "total": len(store),
            "records": len(store) - store.stats.bad,
            "flows": [row(seq, d) for seq, d in found],
            "next_before": next_before,
            "complete": complete,
            "loading": store.loading,
        })

    def _stream(self, params: dict[str, str]) -> None:
        query = self._query(params)
        store = self.server.store
        after = self._int(params, "after", len(store), len(store))
        self._headers(200, "text/event-stream", None)
        self.close_connection = True
        self.wfile.write(b"retry: 1000\n\n")
        self.wfile.flush()
        last_beat = time.monotonic()
        while not self.server.stopping.is_set():
            with store.changed:
                if len(store) <= after:
                    store.changed.wait(1.0)
            if len(store) > after:
                found, after = store.matching_after(query, after, STREAM_BATCH)
                if found:
                    self.wfile.write(b"".join(
                        b"event: flow\ndata: " + orjson.dumps(row(seq, d)) + b"\n\n"
                        for seq, d in found))
                self.wfile.write(b"event: total\ndata: " + str(after).encode() + b"\n\n")
                self.wfile.flush()
                last_beat = time.monotonic()
            elif time.monotonic() - last_beat > HEARTBEAT_S:
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
                last_beat = time.monotonic()

    def _policy(self) -> None:
        result = self.server.service_map()
        self._json({
            "policies": self.server.config.policies_from,
            "rules": result["rules"],
            "never_matched": result["never_matched"],
            "audited": result["audited"],
            "nodes": {n["id"]: n["name"] for n in result["nodes"]},
        })


def _side_text(d: FlowDict, which: str) -> str:
    side = flow_side(d, which)
    return f"{render_host(side)} {render_identity(side.identity)}"


def row(seq: int, d: dict[str, Any] | None) -> dict[str, Any]:
    """One line of the flows table: the columns as `garrison observe` prints them (the
    initiator first, as its compact lines do) and the whole record for the detail pane."""
    if d is None:
        return {"seq": seq, "lost": True}
    try:
        src, dst = _side_text(d, "source"), _side_text(d, "destination")
        reply = d.get("is_reply")
        left, right, arrow = (dst, src, "<-") if reply is True else (
            src, dst, "->" if reply is False else "<>")
        return {  # text as observe prints it: controls from the log read as escapes
            "seq": seq,
            "time": safe_text(render_time_text(d.get("time"))),
            "source": safe_text(left),
            "destination": safe_text(right),
            "arrow": arrow,
            "type": safe_text(flow_type_text(d)),
            "verdict": safe_text(verdict_text(d)),
            "verdict_class": str(d.get("verdict", "")),
            "summary": safe_text(str(d.get("Summary", ""))),
            "policies": [safe_text(name) for name in policy_names(d)],
            "record": d,
        }
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        return {"seq": seq, "record": d, "summary": f"unreadable record: {exc}"}


def loopback_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values a browser sends for this server (`host` as in its URL)."""
    names: Iterable[str] = {host, "127.0.0.1", "localhost", "[::1]"}
    with_port = {f"{name}:{port}".lower() for name in names}
    return frozenset(with_port | ({n.lower() for n in names} if port == 80 else set()))
