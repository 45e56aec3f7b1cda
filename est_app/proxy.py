"""Reverse proxies: which peers are trusted, and the client address behind them.

Only a peer inside ``trusted_proxies`` may speak for the client: its
``X-Forwarded-For`` (last hop) becomes the client address used for rate
limiting, records and audit, and its client-certificate header is believed.
The immediate peer stays available as ``environ["est.peer_addr"]``.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable


class TrustedProxies:
    """WSGI middleware applying ``X-Forwarded-For`` from trusted peers only."""

    def __init__(self, app, networks: Iterable[str]) -> None:
        self.app = app
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def is_trusted(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def __call__(self, environ, start_response):
        peer = environ.get("REMOTE_ADDR")
        environ["est.peer_addr"] = peer
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded and self.is_trusted(peer):
            environ["REMOTE_ADDR"] = forwarded.split(",")[-1].strip()
        return self.app(environ, start_response)
