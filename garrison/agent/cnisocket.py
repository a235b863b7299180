"""The agent's side of `garrison.cni.wire`: the CNI methods of the API handlers, served one
JSON request per connection on a root-only unix socket (thread per connection)."""

from __future__ import annotations

import contextlib
import logging
import os
import socketserver
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from garrison.agent.api import APIError, Handler
from garrison.cni.wire import CNI_METHODS, read_message, write_message

log = logging.getLogger("garrison.agent.cni")


class CNISocketServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._handlers = {m: handlers[m] for m in CNI_METHODS}
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        handlers = self._handlers

        class Request(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(30)
                try:
                    msg = read_message(self.request)
                    fn = handlers.get(str(msg.get("method")))
                    params = msg.get("params")
                    if fn is None or not isinstance(params, dict):
                        answer: dict[str, Any] = {
                            "ok": False, "error": f"no CNI method {msg.get('method')!r}"}
                    else:
                        answer = {"ok": True, "result": fn(params)}
                except APIError as exc:
                    answer = {"ok": False, "error": str(exc)}
                except (OSError, ValueError) as exc:
                    answer = {"ok": False, "error": f"bad request: {exc}"}
                except Exception as exc:  # a bug must not kill the server: the plugin fails
                    log.exception("CNI request failed")
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                with contextlib.suppress(OSError):
                    write_message(self.request, answer)

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.unlink(missing_ok=True)  # a stale socket of a crashed agent
        old = os.umask(0o177)
        try:
            server = socketserver.ThreadingUnixStreamServer(str(self.path), Request)
        finally:
            os.umask(old)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="garrison-cni",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.path.unlink(missing_ok=True)
