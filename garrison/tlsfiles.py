"""TLS files given on the command line, read and checked before anything connects or listens,
and what gRPC's TLS failures mean, for every TLS user of garrison: the etcd client
(`--kvstore-ca/-cert/-key`, `garrison.kvstore.etcd`) and the flow API's server and readers
(`--flow-api-tls-*`, `--flow-api-ca/-cert/-key`, `garrison.cluster.flowapi`).

Every check raises `TLSFileError`, one line naming the flag, the file, what is wrong and what to
give instead (the commands turn it into a usage error). A CA not given means the system's CA
roots (OpenSSL's default CA file, `SSL_CERT_FILE` if set; gRPC's built-in roots where there is
none), never grpcio's bundled list silently.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from pathlib import Path


class TLSFileError(ValueError):
    """A TLS file that cannot be used, in one line naming the flag, the file and the fix."""


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """What gRPC's credentials take (PEM bytes; None: not given, or gRPC's built-in roots)."""

    ca: bytes | None
    key: bytes | None
    cert: bytes | None
    # What the peer's certificate is verified against, for messages.
    ca_source: str


def system_roots(ca_flag: str) -> tuple[bytes | None, str]:
    """The system's CA bundle as OpenSSL finds it (`SSL_CERT_FILE`, else its default file),
    or None (gRPC's built-in roots) when there is none to read; and its description."""
    path = ssl.get_default_verify_paths().cafile
    if path:
        try:
            return Path(path).read_bytes(), f"the system's CA roots ({path}; no {ca_flag})"
        except OSError:
            pass
    return None, f"gRPC's built-in CA roots (no system CA file; no {ca_flag})"


def read_file(flag: str, path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFileError(
            f"{flag} {path}: cannot read it ({exc.strerror or exc}); give {what}"
        ) from None


def load_ca(flag: str, path: Path, what: str) -> bytes:
    """A CA bundle (PEM) that OpenSSL loads; `what` says which CA, for the message."""
    ca = read_file(flag, path, what)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=ca.decode("ascii", errors="replace")
        )
    except (ssl.SSLError, ValueError):
        raise TLSFileError(f"{flag} {path}: no PEM certificate in it; give {what}") from None
    return ca


def _no_password() -> bytes:
    raise TLSFileError("encrypted")


def load_cert_pair(
    cert_flag: str, cert_file: Path, key_flag: str, key_file: Path, whose: str
) -> tuple[bytes, bytes]:
    """A certificate (PEM) and its unencrypted private key, checked to belong together;
    `whose` names the certificate in messages ("the client certificate")."""
    cert = read_file(cert_flag, cert_file, f"{whose} (PEM)")
    key = read_file(key_flag, key_file, f"{whose}'s private key (PEM)")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise TLSFileError(
            f"{cert_flag} {cert_file}: no PEM certificate in it; give {whose} (PEM)"
        )
    if b"PRIVATE KEY-----" not in key:
        raise TLSFileError(
            f"{key_flag} {key_file}: no PEM private key in it; give {whose}'s private key (PEM)"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            cert_file, key_file, password=_no_password
        )
    except TLSFileError:
        raise TLSFileError(
            f"{key_flag} {key_file}: the key is encrypted; give it unencrypted"
            f" (openssl pkey -in {key_file} -out KEY) and readable by root only"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSFileError(
                f"{key_flag} {key_file} is not the key of {cert_flag} {cert_file}: give the"
                " key the certificate was issued for"
            ) from None
        raise TLSFileError(
            f"{cert_flag} {cert_file} / {key_flag} {key_file}: not a usable certificate and"
            f" key ({exc.reason or exc}); give PEM files"
        ) from None
    except OSError as exc:
        raise TLSFileError(
            f"{cert_flag} {cert_file} / {key_flag} {key_file}: cannot read them"
            f" ({exc.strerror or exc})"
        ) from None
    return cert, key


class TLSFailure(enum.Enum):
    """What a gRPC connection failure (UNAVAILABLE, its details text) says about TLS."""

    NAME_MISMATCH = "the certificate does not name the host dialled"
    UNTRUSTED = "the certificate does not verify against the CA"
    CLIENT_CERT_REFUSED = "the server wants a client certificate, or refused the one shown"
    NO_HANDSHAKE = "the peer did not complete a TLS handshake"
    CLOSED = "the peer closed the connection (a TLS server met by a plaintext client)"


def classify_tls_failure(details: str) -> TLSFailure | None:
    """The TLS cause in gRPC's details of a failed connection; None when it names none."""
    if "Hostname Verification" in details or "Peer name" in details:
        return TLSFailure.NAME_MISMATCH
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return TLSFailure.UNTRUSTED
    if any(
        mark in details
        for mark in ("TSI_DATA_CORRUPTED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")
    ):
        return TLSFailure.CLIENT_CERT_REFUSED
    if any(
        mark in details
        for mark in ("Handshake read failed", "WRONG_VERSION_NUMBER", "Tls handshake failed")
    ):
        return TLSFailure.NO_HANDSHAKE
    if "Socket closed" in details:
        return TLSFailure.CLOSED
    return None


def verify_reason(details: str) -> str:
    """OpenSSL's reason after CERTIFICATE_VERIFY_FAILED in gRPC's details."""
    reason = details.partition("CERTIFICATE_VERIFY_FAILED")[2].strip(": ")
    return reason.removesuffix(": OK").strip() or "verify failed"
