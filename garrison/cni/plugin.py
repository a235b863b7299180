"""`garrison-cni`: the CNI verbs, each a thin call to the local agent's API.

ADD asks the agent to govern the container's host-side veth (endpoint named after the
container, programs attached, ipcache entry written) before the runtime starts the container,
and fails the start when no agent answers (fail closed). DEL always succeeds: with no agent it
records the delete under the agent's state directory for the agent to carry out on start.
CHECK asks the agent whether the programs and map entries are in place. STATUS (spec 1.1)
says whether the agent can take an ADD; GC (spec 1.1) removes the endpoints of this network's
containers that the runtime no longer lists.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, BinaryIO, TextIO

from garrison.cni import spec, wire
from garrison.cni.spec import CNIError

DEFAULT_SOCKET = "/run/garrison/agent.sock"  # garrison.agent.config.DEFAULT_SOCKET
DEFAULT_STATE_DIR = "/var/lib/garrison"  # garrison.agent.config.DEFAULT_STATE_DIR
# A runtime sends kilobytes (a GC's list of every attachment: ~100 bytes each); more is refused
# before it is held in memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
PENDING_DIR = "cni-pending"
AGENT_TIMEOUT = 20.0
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")


def pending_dir(state_dir: str) -> str:
    return os.path.join(state_dir, PENDING_DIR)


def record_pending_delete(state_dir: str, container_id: str, network: str) -> str:
    """Note a DEL the agent could not take; it carries it out on its next start."""
    directory = pending_dir(state_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{container_id}.json")
    tmp = os.path.join(directory, f".{container_id}.{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump({"container_id": container_id, "network": network, "time": time.time()}, fh)
    os.replace(tmp, path)
    return path


def _call(conf: spec.NetConf, method: str, **params: Any) -> dict[str, Any]:
    path = wire.cni_socket_for(conf.agent_socket)
    try:
        return wire.call(path, method, params, AGENT_TIMEOUT)
    except wire.AgentUnreachable as exc:
        raise CNIError(
            spec.TRY_AGAIN_LATER,
            f"no garrison agent answers on {conf.agent_socket}: start it with `garrison agent` "
            "(as root); the container is not started without its policy",
            str(exc),
        ) from None
    except wire.AgentRefused as exc:
        raise CNIError(spec.AGENT_REFUSED, f"garrison agent: {exc}") from None
    except (OSError, ValueError) as exc:  # a timeout, a broken answer
        raise CNIError(spec.TRY_AGAIN_LATER, f"garrison agent at {path}: {exc}") from None


def _container_id(env: spec.Environment) -> str:
    if not _CONTAINER_ID.match(env.container_id):
        raise CNIError(spec.INVALID_ENVIRONMENT, f"CNI_CONTAINERID {env.container_id!r}: "
                       "expected letters, digits, '_', '.' or '-'")
    return env.container_id


def cmd_add(env: spec.Environment, conf: spec.NetConf) -> dict[str, Any]:
    attachment = spec.container_attachment(conf.prev_result, env)
    container_id = _container_id(env)
    name = env.args.get("K8S_POD_NAME") or container_id[:12]
    _call(
        conf, "CniAdd", container_id=container_id, name=name,
        namespace=env.args.get("K8S_POD_NAMESPACE") or "",
        netns=env.netns, interface=env.ifname, ipv4=attachment.ipv4,
        gateway=attachment.gateway, network=conf.name,
    )
    return spec.add_result(conf)


def cmd_del(env: spec.Environment, conf: spec.NetConf) -> None:
    container_id = _container_id(env)
    try:
        _call(conf, "CniDel", container_id=container_id, network=conf.name)
    except CNIError as exc:
        # DEL must succeed: the agent carries it out on its next start
        try:
            record_pending_delete(conf.state_dir, container_id, conf.name)
        except OSError as err:
            raise CNIError(
                spec.IO_FAILURE,
                f"no garrison agent took the DEL and it cannot be recorded for the agent in "
                f"{pending_dir(conf.state_dir)}: {err.strerror}; stateDir in the conflist must "
                "be the agent's --state-dir", exc.msg,
            ) from None


def cmd_check(env: spec.Environment, conf: spec.NetConf) -> None:
    if not conf.check_supported:
        raise CNIError(spec.INCOMPATIBLE_VERSION, f"CHECK needs cniVersion {spec.CHECK_SINCE} "
                       f"or later, not {conf.cni_version}")
    attachment = spec.container_attachment(conf.prev_result, env)
    state = _call(conf, "CniCheck", container_id=_container_id(env), ipv4=attachment.ipv4)
    if state.get("problems"):
        raise CNIError(spec.NOT_ENFORCED, "garrison: " + "; ".join(state["problems"]))


def _since_11(conf: spec.NetConf, verb: str) -> None:
    if not conf.status_gc_supported:
        raise CNIError(spec.INCOMPATIBLE_VERSION, f"{verb} needs cniVersion "
                       f"{spec.STATUS_GC_SINCE} or later, not {conf.cni_version}")


def cmd_status(conf: spec.NetConf) -> None:
    _since_11(conf, "STATUS")
    try:
        ready = _call(conf, "CniStatus").get("ready")
    except CNIError as exc:
        raise CNIError(spec.NOT_AVAILABLE, exc.msg, exc.details) from None
    if not ready:
        raise CNIError(spec.NOT_AVAILABLE, "the garrison agent's datapath is not loaded")


def cmd_gc(conf: spec.NetConf) -> None:
    _since_11(conf, "GC")
    _call(conf, "CniGc", network=conf.name, valid=conf.valid_attachments())


def run(environ: Mapping[str, str], stdin: BinaryIO, stdout: TextIO) -> int:
    version = spec.SPEC_VERSION
    try:
        env = spec.Environment.from_environ(environ)
        if env.command == "VERSION":
            stdout.write(json.dumps(spec.version_result()))
            return 0
        try:
            data = stdin.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise CNIError(spec.IO_FAILURE, f"reading the network configuration: {exc}") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise CNIError(spec.INVALID_NETWORK_CONFIG,
                           f"network configuration on stdin is larger than "
                           f"{MAX_CONFIG_BYTES >> 20} MiB: refused")
        conf = spec.NetConf.parse(data, DEFAULT_SOCKET, DEFAULT_STATE_DIR)
        version = conf.cni_version
        if env.command == "ADD":
            stdout.write(json.dumps(cmd_add(env, conf)))
        elif env.command == "DEL":
            cmd_del(env, conf)
        elif env.command == "CHECK":
            cmd_check(env, conf)
        elif env.command == "STATUS":
            cmd_status(conf)
        else:
            cmd_gc(conf)
        return 0
    except CNIError as exc:
        stdout.write(json.dumps(exc.to_json(version)))
        return 1
    except Exception as exc:  # never a traceback to the runtime: an error object
        err = CNIError(spec.AGENT_REFUSED, f"garrison-cni: {type(exc).__name__}: {exc}")
        stdout.write(json.dumps(err.to_json(version)))
        return 1


def main() -> int:
    return run(os.environ, sys.stdin.buffer, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
