"""Per-client-address rate limiting through Flask-Limiter.

Counts live in ``rate_limit.storage_uri``: ``memory://`` counts per worker;
point it at Redis or Memcached for one count across workers and hosts. Note
that an RA gateway enrolls all its devices from one address: size the limit
for the gateway's batch, not for a single device.

When that shared storage is unreachable, enrollment goes on: each worker
counts in its own memory (the same limits, per worker) until the storage
answers again (Flask-Limiter re-checks it after 1, 2, 4 ... 32 s), and a
storage error never turns a request into a 500. A storage that does not
answer costs each request at most :data:`STORAGE_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import math
import time

from flask import Blueprint, Flask, Response, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import TooManyRequests

from .config import RateLimitSettings, read_secret_file
from .errors import text_response

# Redis connect and read timeouts unless the storage URI sets its own (redis-py reads
# socket_connect_timeout and socket_timeout from the query string, and they win).
STORAGE_TIMEOUT_SECONDS = 0.5


def init_rate_limit(app: Flask, settings: RateLimitSettings) -> None:
    limiter = Limiter(
        get_remote_address,
        app=app,
        default_limits=[settings.limit],
        storage_uri=settings.storage_uri,
        storage_options=_storage_options(settings),
        in_memory_fallback_enabled=not settings.storage_uri.startswith("memory://"),
        swallow_errors=True,
        headers_enabled=False,  # its Retry-After would ride on every 200; only a 429 gets one
        enabled=settings.enabled,
    )
    app.extensions["est_limiter"] = limiter

    @app.errorhandler(TooManyRequests)
    def _too_many(exc: TooManyRequests) -> Response:
        current = limiter.current_limit
        retry = max(1, math.ceil(current.reset_at - time.time())) if current else 1
        return text_response(
            429, f"too many requests from this address (limit {exc.description}); retry in {retry} s", {"Retry-After": str(retry)}
        )


def _storage_options(settings: RateLimitSettings) -> dict:
    if not settings.storage_uri.startswith(("redis://", "rediss://")):
        return {}
    options = {"socket_connect_timeout": STORAGE_TIMEOUT_SECONDS, "socket_timeout": STORAGE_TIMEOUT_SECONDS}
    if settings.storage_password_file is not None:
        options["password"] = read_secret_file(settings.storage_password_file, "rate_limit.storage_password_file")
    return options


def exempt(app: Flask, blueprint: Blueprint) -> None:
    """Exempt a blueprint whose callers must never be throttled (probes, scrapes, CRL and OCSP).

    A request filter, which Flask-Limiter asks before anything else, rather than its blueprint
    exemption, which it finds through its limit resolution on every request: about 80 us of CPU
    per OCSP answer or probe, as much as the OCSP answer itself.
    """
    exempt_blueprints = app.extensions.setdefault("est_rate_limit_exempt", set())
    if not exempt_blueprints:
        app.extensions["est_limiter"].request_filter(lambda: request.blueprint in exempt_blueprints)
    exempt_blueprints.add(blueprint.name)
