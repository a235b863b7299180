"""What a cluster node's agent attached to its underlay device, kept across restarts.

from_netdev goes on tc ingress of the device that holds the node IP (garrison.cluster.agent),
with a clsact qdisc added when the device had none. A clean stop removes the filter, and the
clsact only when garrison added it. An agent can be killed, though: the next agent then finds
a clsact it did not make, and `garrison agent --cleanup` would not know about the device at
all — garrison's program would stay on the host's interface. So the agent records, in its
state directory (`underlay.json`), which device it attached to and whether the device's clsact
is garrison's; the next agent's stop, or `--cleanup`, removes exactly that, and only while the
device with that index still has the recorded name.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

from garrison.redirect.tc import detach_netdev_program
from garrison.statefile import write_atomically


@dataclass(frozen=True)
class Underlay:
    ifindex: int
    ifname: str
    clsact: bool  # garrison added the device's clsact qdisc


@dataclass(frozen=True)
class Released:
    """What `UnderlayRecord.release` did: `underlay` is None when there was no record;
    `removed` False when the device was gone or renamed (nothing touched)."""

    underlay: Underlay | None
    removed: bool


def interface_name(ifindex: int) -> str | None:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


class UnderlayRecord:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Underlay | None:
        try:
            data = json.loads(self.path.read_text())
            return Underlay(int(data["ifindex"]), str(data["ifname"]), bool(data["clsact"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path}: not an underlay record ({exc}); remove it and "
                             "check the device's tc filters by hand") from exc

    def attached(self, ifindex: int, made_clsact: bool) -> bool:
        """Record from_netdev on `ifindex`; True when the device's clsact is garrison's:
        made by this attach, or by an earlier agent on the same device that did not remove
        it (killed). A record of another device (the node IP moved) is released first."""
        earlier = self.load()
        name = interface_name(ifindex) or ""
        same = earlier is not None and (earlier.ifindex, earlier.ifname) == (ifindex, name)
        if earlier is not None and not same:
            self.release()
        ours = made_clsact or (same and earlier is not None and earlier.clsact)
        write_atomically(self.path, json.dumps(
            {"ifindex": ifindex, "ifname": name, "clsact": ours}))
        return ours

    def release(self) -> Released:
        """Remove from_netdev (and the clsact when garrison's) from the recorded device when
        it is still there under its name, then the record."""
        underlay = self.load()
        removed = False
        if underlay is not None and interface_name(underlay.ifindex) == underlay.ifname:
            detach_netdev_program(underlay.ifindex, remove_qdisc=underlay.clsact)
            removed = True
        self.path.unlink(missing_ok=True)
        return Released(underlay, removed)
