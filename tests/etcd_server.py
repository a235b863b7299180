"""A real etcd (Debian's etcd 3.4) for tests: started on free loopback ports, stopped by PID.

`EtcdServer.restart()` keeps the data directory and ports, as an etcd restart in production
does, so clients can be tested for resuming where they were.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

ETCD = shutil.which("etcd")


def etcd_skip_reason() -> str | None:
    if ETCD is None:
        return "needs etcd: apt-get install etcd-server"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """One etcd member on 127.0.0.1; `url` is its client URL."""

    def __init__(
        self,
        *,
        name: str = "ge-etcd",
        extra_args: tuple[str, ...] = (),
        netns: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """With `netns`, etcd runs in that network namespace (ours, made by the test) on
        `host`, ports 2379/2380 (the namespace is private: nothing else listens there)."""
        self.name = name
        self.netns = netns
        self.host = host
        self.data_dir = Path(tempfile.mkdtemp(prefix="ge-etcd-"))
        self.client_port = 2379 if netns else _free_port()
        self.peer_port = 2380 if netns else _free_port()
        self.url = f"http://{host}:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.with_suffix(".log")

    def start(self, timeout_s: float = 20.0) -> None:
        assert ETCD is not None
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *self._enter(),
                ETCD,
                "--name",
                self.name,
                "--data-dir",
                str(self.data_dir / "data"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                self.peer_url,
                "--initial-advertise-peer-urls",
                self.peer_url,
                "--initial-cluster",
                f"{self.name}={self.peer_url}",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.tail()}")
            if self.netns is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                        pass
                except OSError:
                    time.sleep(0.05)
                    continue
            if self._healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not become healthy in {timeout_s} s: {self.tail()}")

    def _healthy(self) -> bool:
        etcdctl = shutil.which("etcdctl")
        if etcdctl is None:
            return True
        done = subprocess.run(
            [
                *self._enter(),
                etcdctl,
                "--endpoints",
                self.url,
                "--command-timeout=1s",
                "endpoint",
                "health",
            ],
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        return done.returncode == 0

    def _enter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
