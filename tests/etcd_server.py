"""A real etcd (Debian's etcd 3.4) for tests: started on free loopback ports, stopped by PID.

`EtcdServer.restart()` keeps the data directory and ports, as an etcd restart in production
does, so clients can be tested for resuming where they were.

`EtcdServer(tls=make_pki(dir))` serves clients over TLS (`https://` URL) with the test PKI's
server certificate, and with `client_cert_auth` (the default) wants a client certificate
issued by the PKI's CA, as a production etcd with `--client-cert-auth` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class EtcdPKI:
    """PEM files made by `make_pki`: a CA, a server certificate for 127.0.0.1 and a client
    certificate it issued, and a second CA that issued nothing of these (a wrong CA)."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_key: Path


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _issue(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext_file))
    return cert, key


def make_pki(directory: Path, *, server_ips: tuple[str, ...] = ("127.0.0.1",)) -> EtcdPKI:
    """A fresh CA in `directory` (which the caller made and removes), a server certificate
    for `server_ips` (IP SANs) and a client certificate, with the `openssl` CLI."""
    ca = _make_ca(directory, "ca")
    sans = ",".join(f"IP:{ip}" for ip in server_ips)
    server = _issue(directory, "server", ca, f"subjectAltName={sans}\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
    client = _issue(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    other = _make_ca(directory, "other-ca")
    return EtcdPKI(directory, ca[0], *server, *client, *other)


class EtcdServer:
    """One etcd member on 127.0.0.1; `url` is its client URL."""

    def __init__(
        self,
        *,
        name: str = "ge-etcd",
        extra_args: tuple[str, ...] = (),
        netns: str | None = None,
        host: str = "127.0.0.1",
        tls: EtcdPKI | None = None,
        client_cert_auth: bool = True,
        client_port: int | None = None,
        data_prefix: str = "ge-etcd-",
    ) -> None:
        """With `netns`, etcd runs in that network namespace (ours, made by the test) on
        `host`, ports 2379/2380 (the namespace is private: nothing else listens there).
        With `tls`, clients speak TLS to it (and, with `client_cert_auth`, must show a
        certificate of the PKI's CA); peers stay plaintext on loopback."""
        self.name = name
        self.netns = netns
        self.host = host
        self.data_dir = Path(tempfile.mkdtemp(prefix=data_prefix))
        self.client_port = client_port or (2379 if netns else _free_port())
        self.peer_port = 2380 if netns else _free_port()
        self.tls = tls
        # "NAME:PASSWORD" for the health check once a test has turned etcd's auth on.
        self.etcdctl_user: str | None = None
        self.client_cert_auth = client_cert_auth
        self.url = f"{'https' if tls else 'http'}://{host}:{self.client_port}"
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
                *self._tls_args(),
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

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        args = ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key)]
        if self.client_cert_auth:
            args += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        return args

    def _etcdctl_tls(self) -> list[str]:
        if self.tls is None:
            return []
        return ["--cacert", str(self.tls.ca), "--cert", str(self.tls.client_cert),
                "--key", str(self.tls.client_key)]

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
                *self._etcdctl_tls(),
                *(["--user", self.etcdctl_user] if self.etcdctl_user else []),
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


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Until `predicate()` holds (what the etcd-backed tests wait for: watches to deliver,
    leases to expire), or AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
