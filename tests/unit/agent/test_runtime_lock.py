"""CNI DEL looks its endpoint up and deletes it under the agent's lock, as ADD does: a
container that took the name meanwhile (a rename, a missed DEL) keeps its endpoint."""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path
from typing import Any

from garrison.agent.endpoints import EndpointRecord, EndpointRegistry
from garrison.agent.runtime import RuntimeEndpoints

POOL = ipaddress.IPv4Network("198.18.0.0/15")


class _Agent:
    """The parts of `Agent` the CNI DEL uses: its lock, its registry, `delete_endpoint`
    (which takes the lock, as the agent's does)."""

    def __init__(self, path: Path) -> None:
        self.lock = threading.RLock()
        self.endpoints = EndpointRegistry(path, POOL)

    def delete_endpoint(self, name: str) -> EndpointRecord:
        with self.lock:
            return self.endpoints.remove(name)


def _record(name: str, container: str, ip: str) -> EndpointRecord:
    return EndpointRecord(0, name, "default", ("app=web",), ip, netns_path=f"/run/netns/{ip}",
                          ifname="eth0", owned=("clsact",), container_id=container,
                          extra={"network": "garrison"})


def test_a_del_waiting_for_the_lock_never_deletes_the_container_that_took_the_name(
    tmp_path: Path,
) -> None:
    agent: Any = _Agent(tmp_path / "endpoints.json")
    agent.endpoints.add(_record("web", "aaaa", "198.18.0.7"))
    runtime = RuntimeEndpoints(agent)
    answers: list[dict[str, Any]] = []
    with agent.lock:  # another thread is busy: the old container goes, a new one is "web"
        deleting = threading.Thread(
            target=lambda: answers.append(runtime.delete({"container_id": "aaaa",
                                                          "network": "garrison"})))
        deleting.start()
        time.sleep(0.2)
        agent.endpoints.remove("web")
        agent.endpoints.add(_record("web", "bbbb", "198.18.0.8"))
    deleting.join(5)
    assert answers == [{"deleted": None}]
    assert agent.endpoints.get("web").container_id == "bbbb"
