"""Typed protocol errors shared by the sans-io parsers.

A peer's bad bytes raise a `RemoteProtocolError` (never another exception type). It carries
what to answer: an HTTP status for HTTP/1.1, an HTTP/2 error code for GOAWAY/RST_STREAM, or
nothing (Kafka: the connection is closed). The engine turns it into a clean close and an ERROR
flow record; nothing fails open.
"""

from __future__ import annotations


class ParserError(Exception):
    """Base of every error a garrison parser raises on its input."""


class RemoteProtocolError(ParserError):
    """The peer sent bytes that violate the protocol or a configured limit."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_code = error_code

    def __repr__(self) -> str:
        extra = f", status={self.status}" if self.status is not None else ""
        extra += f", error_code={self.error_code}" if self.error_code is not None else ""
        return f"{type(self).__name__}({self.message!r}{extra})"


class LocalProtocolError(ParserError):
    """garrison itself asked for something the protocol state does not allow (a bug guard)."""
