"""What the CNI specification (1.0.0) says a plugin reads and writes — pure, no I/O.

A runtime runs the plugin with the verb and container in environment variables and the
network configuration on stdin; the plugin prints a result (ADD), nothing (DEL, CHECK) or a
version object, and on failure an error object `{cniVersion, code, msg, details}` with a
code from the spec and a non-zero exit.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

SPEC_VERSION = "1.0.0"  # what the plugin writes when no configuration says otherwise
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CHECK_SINCE = "0.4.0"
STATUS_GC_SINCE = "1.1.0"
VERBS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
# the key libcni 1.2.0-1.2.2 sent the same list under (1.2.3 sends both)
OLD_VALID_ATTACHMENTS = "cni.dev/attachments"

# error codes of the specification (SPEC.md, "Error")
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50  # STATUS: cannot service ADD
# 100 and up are the plugin's own
AGENT_REFUSED = 100
NOT_ENFORCED = 101


class CNIError(Exception):
    """A failure the plugin reports as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = SPEC_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


# NamedTuples, not dataclasses: the plugin starts once per container, and dataclasses (with
# the inspect module it imports) is ~6 ms of its start.
class Environment(NamedTuple):
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = {}
    path: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Environment:
        command = environ.get("CNI_COMMAND", "")
        if command not in VERBS:
            raise CNIError(
                INVALID_ENVIRONMENT,
                f"CNI_COMMAND {command!r} is not one of {', '.join(VERBS)}",
                "the runtime sets CNI_COMMAND; run this plugin from a container runtime",
            )
        needed = {
            "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
            "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
            "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),  # DEL may come without a netns
        }.get(command, ())
        missing = [name for name in needed if not environ.get(name)]
        if missing:
            raise CNIError(
                INVALID_ENVIRONMENT, f"missing environment variables: {', '.join(missing)}"
            )
        return cls(
            command,
            environ.get("CNI_CONTAINERID", ""),
            environ.get("CNI_NETNS", ""),
            environ.get("CNI_IFNAME", ""),
            parse_args(environ.get("CNI_ARGS", "")),
            environ.get("CNI_PATH", ""),
        )


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K=V;K2=V2` (the spec's form); a part without `=` is ignored."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


class NetConf(NamedTuple):
    """The plugin's entry of the network configuration, as the runtime hands it over.

    `agent_socket`: the agent's API socket (`agentSocket`, default the agent's default);
    `state_dir`: the agent's state directory (`stateDir`), where a DEL the agent could not
    take is recorded for it to carry out on start."""

    cni_version: str
    name: str
    plugin_type: str
    agent_socket: str
    state_dir: str
    prev_result: Mapping[str, Any] | None
    raw: Mapping[str, Any]

    @classmethod
    def parse(cls, data: bytes, default_socket: str, default_state_dir: str) -> NetConf:
        try:
            conf = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CNIError(DECODING_FAILURE, f"network configuration is not JSON: {exc}") from None
        if not isinstance(conf, dict):
            raise CNIError(DECODING_FAILURE, "network configuration is not a JSON object")
        version = conf.get("cniVersion")
        if not isinstance(version, str) or not version:
            raise CNIError(INVALID_NETWORK_CONFIG, "network configuration has no cniVersion")
        if version not in SUPPORTED_VERSIONS:
            raise CNIError(
                INCOMPATIBLE_VERSION,
                f"incompatible CNI version {version}; garrison-cni supports "
                f"{', '.join(SUPPORTED_VERSIONS)}",
            )
        for key in ("name", "type"):
            if not isinstance(conf.get(key), str) or not conf[key]:
                raise CNIError(INVALID_NETWORK_CONFIG, f"network configuration has no {key}")
        for key in ("agentSocket", "stateDir"):
            if key in conf and not isinstance(conf[key], str):
                raise CNIError(UNSUPPORTED_FIELD, f"{key}={conf[key]!r}: expected a path string")
        prev = conf.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise CNIError(INVALID_NETWORK_CONFIG, "prevResult is not a JSON object")
        return cls(
            version, conf["name"], conf["type"], conf.get("agentSocket") or default_socket,
            conf.get("stateDir") or default_state_dir, prev, conf,
        )

    @property
    def check_supported(self) -> bool:
        return _version_key(self.cni_version) >= _version_key(CHECK_SINCE)

    @property
    def status_gc_supported(self) -> bool:
        return _version_key(self.cni_version) >= _version_key(STATUS_GC_SINCE)

    def valid_attachments(self) -> list[str]:
        """GC: the container ids the runtime still has attached to this network. A GC
        without the list is refused: read as "none is valid" it would take the programs off
        every running container of the network."""
        key = next((k for k in (VALID_ATTACHMENTS, OLD_VALID_ATTACHMENTS) if k in self.raw), "")
        if not key:
            raise CNIError(INVALID_NETWORK_CONFIG,
                           f"GC without {VALID_ATTACHMENTS} (the runtime's current attachments): "
                           "nothing was removed")
        raw = self.raw[key]
        if not isinstance(raw, list) or not all(
            isinstance(a, dict) and isinstance(a.get("containerID"), str) for a in raw
        ):
            raise CNIError(INVALID_NETWORK_CONFIG,
                           f"{key}: expected a list of {{containerID, ifname}}")
        return [a["containerID"] for a in raw]


class ContainerAttachment(NamedTuple):
    """The container's interface in `prevResult`: its name, namespace, first IPv4 address and
    that address's gateway (the host's side of the link)."""

    ifname: str
    sandbox: str
    ipv4: str
    gateway: str


def container_attachment(prev: Mapping[str, Any] | None, env: Environment) -> ContainerAttachment:
    if prev is None:
        raise CNIError(
            INVALID_NETWORK_CONFIG,
            "no prevResult: garrison-cni is a chained plugin; list it after ptp with "
            "host-local in the conflist, as `garrison cni install` writes it",
        )
    interfaces = prev.get("interfaces")
    ips = prev.get("ips")
    if not isinstance(interfaces, list) or not isinstance(ips, list):
        raise CNIError(INVALID_NETWORK_CONFIG, "prevResult has no interfaces or ips list")
    index = next(
        (
            i for i, itf in enumerate(interfaces)
            if isinstance(itf, dict) and itf.get("name") == env.ifname and itf.get("sandbox")
        ),
        None,
    )
    if index is None:
        raise CNIError(
            INVALID_NETWORK_CONFIG,
            f"prevResult has no interface {env.ifname!r} inside a container (CNI_IFNAME)",
        )
    for ip in ips:
        if not isinstance(ip, dict) or ip.get("interface") != index:
            continue
        try:
            iface = ipaddress.ip_interface(str(ip.get("address")))
        except ValueError:
            raise CNIError(
                INVALID_NETWORK_CONFIG, f"prevResult ips: bad address {ip.get('address')!r}"
            ) from None
        if iface.version != 4 or ip.get("version") == "6":
            continue
        return ContainerAttachment(
            env.ifname, str(interfaces[index]["sandbox"]), str(iface.ip),
            str(ip.get("gateway") or ""),
        )
    raise CNIError(
        INVALID_NETWORK_CONFIG, f"prevResult gives interface {env.ifname!r} no IPv4 address"
    )


def version_result() -> dict[str, Any]:
    return {"cniVersion": SPEC_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def add_result(conf: NetConf) -> dict[str, Any]:
    """ADD's result: the previous plugin's, unchanged, in the configuration's version."""
    assert conf.prev_result is not None
    return {**conf.prev_result, "cniVersion": conf.cni_version}
