"""Reverse proxies: which peers are trusted, and the client address behind them.

Only a peer inside ``trusted_proxies`` may speak for the client: its
``X-Forwarded-For`` (last hop) becomes the client address used for rate
limiting, records and audit, and its client-certificate header is believed.
The immediate peer stays available as ``environ["est.peer_addr"]``.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Iterable


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def in_networks(address: str | None, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # a dual-stack bind reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in network for network in networks)


@functools.lru_cache(maxsize=4096)  # every request with a password asks; a gateway asks for its one address
def client_key(address: str) -> str:
    """What counts as one client when counting by address: an IPv6 client by its /64 (the block
    one host usually holds), an IPv4-mapped one by its IPv4 address; text that is no address as is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


class TrustedProxies:
    """WSGI middleware applying ``X-Forwarded-For`` from trusted peers only."""

    def __init__(self, app, networks: Iterable[str]) -> None:
        self.app = app
        self.networks = parse_networks(networks)

    def is_trusted(self, address: str | None) -> bool:
        return in_networks(address, self.networks)

    def __call__(self, environ, start_response):
        peer = environ.get("REMOTE_ADDR")
        environ["est.peer_addr"] = peer
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded and self.is_trusted(peer):
            environ["REMOTE_ADDR"] = forwarded.split(",")[-1].strip()
        return self.app(environ, start_response)
