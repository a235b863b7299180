"""Putting the review page together: a source, its store, the poller and the server."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from garrison.flows.summary import RuleKey
from garrison.ui.mapcache import MapCache, default_directory
from garrison.ui.server import ReviewServer, UIConfig, loopback_hosts
from garrison.ui.store import AgentFeed, FileSource, FlowStore, Poller, Source

DEFAULT_LISTEN = "127.0.0.1:12000"


class UIError(Exception):
    """Bad usage or a source that cannot be read: the message names the cause and the fix."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def parse_listen(text: str, allow_remote: bool) -> Listen:
    """`HOST:PORT` (`[::1]:PORT` for IPv6); a non-loopback HOST only with allow_remote."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise UIError(f"--listen {text!r}: expected HOST:PORT (127.0.0.1:12000)")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise UIError(f"--listen {text!r}: name the address (127.0.0.1:{port_text})")
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise UIError(f"--listen {text!r}: {host!r} is not an IP address (or localhost)"
                          ) from None
    if not loopback and not allow_remote:
        raise UIError(f"--listen {text}: not a loopback address; the page shows who talked to "
                      "whom, so serving it to the network needs --allow-remote")
    return Listen(host, int(port_text))


class ReviewApp:
    """A running page: `start()` loads the source (before any thread starts: large files are
    read by forked processes), then serves and follows until `stop()`."""

    def __init__(self, source: Source, listen: Listen, *, allow_remote: bool = False,
                 known_rules: list[RuleKey] | None = None, policies_from: str = "") -> None:
        self.source, self.listen = source, listen
        self.allow_remote = allow_remote
        self.known_rules, self.policies_from = known_rules, policies_from
        self.store = FlowStore()
        self.server: ReviewServer | None = None
        self._threads: list[threading.Thread] = []
        self._poller: Poller | None = None

    def start(self) -> str:
        """Start reading, bind, serve in the background; the URL of the page. Files are read
        while the page is served (the map grows until they are read); the agent's ring is read
        first."""
        if isinstance(self.source, FileSource):
            self.source.start(self.store)  # forks the readers: before any thread starts
        else:
            self.source.load(self.store)
        if self.known_rules is None and isinstance(self.source, AgentFeed):
            self.known_rules = [RuleKey.from_dict(r) for r in self.source.rule_keys()]
            self.policies_from = self.policies_from or "the agent's policies"
        family = socket.AF_INET6 if ":" in self.listen.host else socket.AF_INET
        ReviewServer.address_family = family
        try:
            server = ReviewServer((self.listen.host, self.listen.port), self.store, UIConfig(
                source=self.source.describe(),
                allowed_hosts=None,
                known_rules=self.known_rules,
                policies_from=self.policies_from,
            ))
        except OSError as exc:
            raise UIError(f"cannot listen on {self.listen.host}:{self.listen.port}: "
                          f"{exc.strerror} (choose another --listen)") from exc
        port = server.server_address[1]
        self.listen = Listen(self.listen.host, port)
        if not self.allow_remote:
            server.config.allowed_hosts = loopback_hosts(
                self.listen.url.split("//", 1)[1].rsplit(":", 1)[0], port)
        self.server = server
        thread = threading.Thread(target=server.serve_forever, name="garrison-ui-http",
                                  daemon=True)
        thread.start()
        self._poller = Poller(self.source, self.store, on_error=server.source_error,
                              on_ok=server.source_ok)
        self._threads = [thread, self._poller]
        if isinstance(self.source, FileSource):
            loader = threading.Thread(target=self._finish_loading, args=(self.source, server),
                                      name="garrison-ui-load", daemon=True)
            loader.start()
            self._threads.append(loader)
        else:
            self._poller.start()
        return self.listen.url

    def _finish_loading(self, source: FileSource, server: ReviewServer) -> None:
        try:
            source.finish(self.store)
        except Exception as exc:  # a file that vanished, a reader that died: said on the page
            server.source_error(f"reading the log failed: {exc}")
            if self.store.loading is not None:
                self.store.loading = {**self.store.loading, "failed": 1}
            return
        if self._poller is not None and not server.stopping.is_set():
            self._poller.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once every input was read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.store.changed:
            while self.store.loading is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.store.changed.wait(left if left is not None else 1.0)
        return True

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.stop()
        close = getattr(self.source, "close", None)
        if isinstance(self.source, FileSource) and close is not None:
            close()  # cancels readers still running
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        if not isinstance(self.source, FileSource):
            close = getattr(self.source, "close", None)
            if close is not None:
                close()


def file_source(paths: list[str], backups: bool = True, cache: bool = True) -> FileSource:
    """`cache`: keep what was read of large logs for the next run (`garrison.ui.mapcache`)."""
    return FileSource(paths, backups=backups,
                      cache=MapCache(default_directory()) if cache else None)


def agent_source(socket_path: Path) -> AgentFeed:
    return AgentFeed(socket_path)
