"""Back-off after failed password checks, per client address and per admin account, kept in the store.

Every password check (dashboard sign-in, admin API Basic auth, EST Basic auth)
first calls :func:`check`: while the client address or the account is backing
off, the request is answered 429 with ``Retry-After`` and no password is
hashed. Each failed check is counted by :func:`failed`: after
``admin.lockout_after`` failures in a row the next check must wait
``admin.lockout_seconds``, doubling with every further failure up to
``admin.lockout_max_seconds``. Attempts refused while blocked are not counted
(they cost no write). A count is forgotten once ``2 x lockout_max_seconds``
pass without a failure; a successful admin sign-in clears its account's count.

EST Basic auth backs off per address only: an account rule there would let
anyone lock the gateway's account, and with it the pumps, out.

The counts are rows in the store, which every gunicorn worker and every server
behind a load balancer share, so the back-off holds however requests are
spread. (Flask-Limiter's ``limits`` storage would be the other home, but its
default ``memory://`` counts per worker; correctness would depend on running
Redis.) IPv6 clients are counted per /64, the block one host usually holds.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Optional

from flask import current_app

from . import metrics
from .errors import TooManyRequests
from .proxy import client_key
from .state import state
from .store import AuditEvent, AuthFailures, utcnow


def subjects(address: str, account: Optional[str] = None) -> list[str]:
    """The store's keys for a client address (IPv6 by /64) and, if given, an account name."""
    return [f"address:{client_key(address)}"] + ([f"account:{account}"] if account else [])


def check(surface: str, address: str, account: Optional[str] = None) -> list[AuthFailures]:
    """Raise 429 while the address or account is backing off; else the counts found (for :func:`succeeded`)."""
    found = state().store.auth_failures(subjects(address, account))
    now = utcnow()
    until = max((f.blocked_until for f in found), default=now)
    if until > now:
        retry = math.ceil((until - now).total_seconds())
        metrics.password_refused(surface, "backoff")
        raise TooManyRequests(f"too many failed password attempts from this address or for this account; retry in {retry} s", retry)
    return found


def failed(surface: str, address: str, account: Optional[str] = None, *, actor: str = "") -> None:
    """Count a failed check; audit the back-off it starts, if any."""
    settings = state().settings.admin
    metrics.password_refused(surface, "wrong_password")

    def delay(failures: int) -> timedelta:
        if failures < settings.lockout_after:
            return timedelta(0)
        return timedelta(seconds=min(settings.lockout_max_seconds, settings.lockout_seconds * 2 ** min(failures - settings.lockout_after, 32)))

    forget_before = utcnow() - timedelta(seconds=2 * settings.lockout_max_seconds)
    counted = state().store.record_auth_failure(subjects(address, account), forget_before, delay)
    blocked = [c for c in counted if c.blocked_until > c.last_failure]
    if blocked:
        detail = "; ".join(
            f"{c.subject}: {c.failures} failed password checks, next check in {math.ceil((c.blocked_until - c.last_failure).total_seconds())} s"
            for c in blocked
        )
        event = AuditEvent("auth-backoff", "refused", actor=actor, client_address=address, detail=f"{surface}: {detail}")
        try:
            state().store.add_audit(event)
        except Exception:
            current_app.logger.exception("could not write the audit event for a password back-off")


def succeeded(account: Optional[str], found: list[AuthFailures]) -> None:
    """A correct password for ``account``: forget its failures (the address keeps its own count)."""
    if account and any(f.subject == f"account:{account}" for f in found):
        state().store.clear_auth_failures(f"account:{account}")
