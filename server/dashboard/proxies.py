"""The client address of a request that may have come through a reverse proxy.

Behind nginx every request comes from the proxy's address, so a per-address limit (the
sign-in limiter) would block everyone after one user's failures. ``X-Forwarded-For`` names
the real client, but anyone can send that header: it is believed only from the trusted
proxies listed by the operator, and then read the standard way, right to left, skipping
trusted proxies: the first other address is the client (what a trusted proxy saw; the
entries left of it were written by the client and may be lies). A header that is too
long, has too many entries or holds something other than an address where the walk
reads falls back to the peer address, with a reason to count.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.device.core.errors import UsageError

__all__ = ["MAX_FORWARDED_BYTES", "MAX_FORWARDED_HOPS", "ClientAddress", "TrustedProxies"]

#: Characters of ``X-Forwarded-For`` (all its lines joined) read at most.
MAX_FORWARDED_BYTES = 1024
#: Entries of ``X-Forwarded-For`` read at most (a real chain has a few).
MAX_FORWARDED_HOPS = 16

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ClientAddress:
    """Who sent a request, and why a forwarded header was not used (None: it was, or
    there was none to use)."""

    host: str
    ignored: str | None = None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d: one client, one name.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """Addresses or networks (``127.0.0.1``, ``10.0.0.0/8``, ``::1``) whose
    ``X-Forwarded-For`` is believed; none: the peer address is the client."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        nets: list[_Network] = []
        for e in entries:
            try:
                nets.append(ipaddress.ip_network(str(e).strip(), strict=False))
            except ValueError:
                raise UsageError(f"trusted proxy {e!r} is not an IP address or network "
                                 "(e.g. 127.0.0.1, ::1, 10.0.0.0/8)") from None
        self.networks = tuple(nets)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusted(self, host: str) -> bool:
        """Whether ``host`` (a peer or a forwarded entry) is one of the proxies."""
        addr = _address(host)
        return addr is not None and any(addr in n for n in self.networks)

    def client(self, peer: str, forwarded: list[str]) -> ClientAddress:
        """The client of a request from ``peer`` carrying these ``X-Forwarded-For``
        lines (in arrival order)."""
        if not forwarded:
            return ClientAddress(peer)
        if not self.trusted(peer):
            return ClientAddress(peer, "untrusted_peer")
        text = ",".join(forwarded)
        if len(text) > MAX_FORWARDED_BYTES:
            return ClientAddress(peer, "too_long")
        hops = text.split(",")
        if len(hops) > MAX_FORWARDED_HOPS:
            return ClientAddress(peer, "too_many")
        host = peer
        for entry in reversed(hops):
            addr = _address(entry)
            if addr is None:
                return ClientAddress(peer, "bad_address")
            host = str(addr)
            if not any(addr in n for n in self.networks):
                return ClientAddress(host)
        return ClientAddress(host)  # every hop a proxy: the furthest one is the client
