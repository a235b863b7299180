"""Who holds an ipcache prefix when a CIDR rule names the address of an endpoint or the host.

The ipcache is one longest-prefix table for every kind of address: a local endpoint's /32,
a remote endpoint's /32, the host's addresses and the prefixes policies name (CIDR
identities). Peers inside the cluster are matched by their identity, CIDR rules are for
addresses outside it (Cilium; ../shared/docs/POLICY-SEMANTICS.md "Peers"): so where a policy
names exactly the /32 of an endpoint or of the host, the endpoint's (or host's) entry stays in
the kernel, and the CIDR identity is kept aside here, to be written back once that address
is no longer held (the endpoint deleted). Without this a `toCIDR: [<endpoint>/32]` replaced
the endpoint's entry (its traffic then carried a CIDR identity) and deleting the policy
deleted the endpoint's entry altogether.

Sans-io: the kernel side (`garrison.agent.kernel`) asks what to write and writes it.
"""

from __future__ import annotations

from ipaddress import IPv4Network


class IPCacheClaims:
    """The CIDR identities policies want per prefix, and the prefixes endpoints and the host
    hold (whose entries a CIDR identity must never replace)."""

    def __init__(self) -> None:
        self._cidr: dict[IPv4Network, int] = {}
        self._held: dict[IPv4Network, int] = {}

    def set_cidr(self, prefix: IPv4Network, identity: int) -> int | None:
        """A policy names `prefix`: the identity to write, or None when the prefix is held."""
        self._cidr[prefix] = identity
        return None if prefix in self._held else identity

    def delete_cidr(self, prefix: IPv4Network) -> bool:
        """No policy names `prefix` any more: True when its kernel entry is the CIDR's (and is
        to be deleted), False when an endpoint or the host holds it."""
        self._cidr.pop(prefix, None)
        return prefix not in self._held

    def hold(self, prefix: IPv4Network, identity: int) -> None:
        """An endpoint or the host has `prefix` (its entry is written, whatever CIDR wants)."""
        self._held[prefix] = identity

    def release(self, prefix: IPv4Network) -> int | None:
        """The holder of `prefix` is gone: the CIDR identity to write back in its place, or
        None when no policy names it (the entry is to be deleted)."""
        self._held.pop(prefix, None)
        return self._cidr.get(prefix)

    def held(self, prefix: IPv4Network) -> int | None:
        return self._held.get(prefix)

    def held_by(self, identity: int) -> set[IPv4Network]:
        return {prefix for prefix, holder in self._held.items() if holder == identity}
