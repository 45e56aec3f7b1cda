"""Probes for systemd, load balancers and orchestrators: ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 ``ok`` whenever the process can answer at all; it
touches nothing. ``/readyz`` answers 200 ``ready`` only when this worker can
issue: the store answers a query on its certificates table, and for every CA
(the top-level ``ca``, each label's own, and those retired by a rollover until they expire) the key, in its file or its
PKCS#11 token, signs a fresh payload that the CA certificate verifies, the certificate is within its validity, and
its CRL in the store is current (when there is none yet, it has expired, or it lacks a revocation
whose own re-sign failed, the probe signs one, as serving the CRL would). Otherwise 503 with one line naming what failed; the
details go to the log, not to the unauthenticated caller. After a CA rollover (docs/CA_ROLLOVER.md)
a ready answer adds one line per CA, issuing and retired: its expiry and how many unexpired,
unrevoked certificates it still has (:func:`authority_status`, shared with ``est-admin ca status``).
:func:`expiry_warnings` names an issuing CA that would cut new certificates short: for the status,
the dashboard and the log at start.

Neither is rate limited nor behind the admin network gate; neither says
anything about a device (the rollover lines give counts per CA only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Optional

import sqlalchemy as sa
from flask import Blueprint, Flask, Response

from .ca import CertificateAuthority
from .ca.signers import KeyUnavailable
from .errors import text_response
from .ratelimit import exempt
from .revocation import CRLCache
from .state import AppState, state
from .store.schema import certificates

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)
NO_STORE = {"Cache-Control": "no-store"}


def init_app(app: Flask) -> None:
    """Register the probes; call after the rate limiter exists, so they can be exempted from it."""
    app.register_blueprint(bp)
    exempt(app, bp)


@bp.get("/healthz")
def healthz() -> Response:
    return text_response(200, "ok", NO_STORE)


@bp.get("/readyz")
def readyz() -> Response:
    failures = []
    app_state = state()
    store_ok = _check("store", failures, _store_answers)
    for authority in app_state.authorities:
        if authority in app_state.authorities.retired and authority.validity_problem():
            continue  # expired since start, and everything it issued with it: nothing left to answer for
        _check(f"{authority.name} key", failures, partial(_ca_key_signs, authority))
        _check(f"{authority.name} certificate", failures, authority.validity_problem)
        if store_ok:  # the CRL lives in the store; one cause is enough to name
            crl_name = "crl" if authority is app_state.authority else f"{authority.name} crl"
            _check(crl_name, failures, partial(_crl_is_fresh, app_state.crls[authority.issuer_id]))
    if failures:
        return text_response(503, "not ready: " + "; ".join(failures), NO_STORE)
    if not any(authority.retired for authority in app_state.authorities):
        return text_response(200, "ready", NO_STORE)
    lines = [f"{s.name}: {s.role}, expires {s.not_after:%Y-%m-%d}, {s.valid_certificates} valid certificates" for s in authority_status(app_state)]
    return text_response(200, "\n".join(["ready", *lines]), NO_STORE)


@dataclass(frozen=True)
class AuthorityStatus:
    """One CA as an operator watches it through a rollover."""

    name: str  # its configuration section: ca, ca.previous[0], labels.pumps.ca
    issuer_id: str  # as records name it; its CRL is at /crl/issuer/<issuer_id>
    role: str  # issuing, or retired (signs CRLs and OCSP answers for what it issued)
    subject: str
    not_after: datetime
    valid_certificates: int  # unexpired and not revoked
    last_expiry: Optional[datetime]  # of its unexpired certificates, revoked too: till then it keeps signing
    warning: Optional[str]


def authority_status(app_state: AppState, now: Optional[datetime] = None) -> list[AuthorityStatus]:
    """Every CA, issuing ones first, with its certificates counted and its :func:`expiry_warnings` warning."""
    warnings = expiry_warnings(app_state, now)
    issuing = {app_state.authority_for(profile).issuer_id for profile in app_state.profiles.values()}
    statuses = []
    for authority in sorted(app_state.authorities, key=lambda a: a.issuer_id not in issuing):
        count, last = app_state.store.unexpired_certificates(authority.issuer_id, authority is app_state.authorities.unrecorded)
        role = "issuing" if authority.issuer_id in issuing else "retired"
        subject = authority.certificate.subject.rfc4514_string()
        not_after = authority.certificate.not_valid_after_utc
        statuses.append(AuthorityStatus(authority.name, authority.issuer_id, role, subject, not_after, count, last, warnings.get(authority.issuer_id)))
    return statuses


def expiry_warnings(app_state: AppState, now: Optional[datetime] = None) -> dict[str, str]:
    """By issuer id, a warning for each issuing CA with less life left than the longest validity it issues: from there on it cuts certificates short."""
    now = now or datetime.now(timezone.utc)
    longest: dict[str, tuple[CertificateAuthority, int]] = {}
    for profile in app_state.profiles.values():
        authority = app_state.authority_for(profile)
        days = max(longest.get(authority.issuer_id, (authority, 0))[1], profile.certificate.validity_days)
        longest[authority.issuer_id] = (authority, days)
    warnings = {}
    for issuer, (authority, days) in longest.items():
        not_after = authority.certificate.not_valid_after_utc
        if (not_after - now).days < days:
            warnings[issuer] = (
                f"{authority.name} expires on {not_after:%Y-%m-%d}, sooner than its longest certificate validity ({days} days): "
                "new certificates are cut short; roll it over (docs/CA_ROLLOVER.md)"
            )
    return warnings


def log_expiry_warnings(app_state: AppState) -> None:
    """Put :func:`expiry_warnings` in the log (at start: each worker, each CLI command)."""
    for warning in expiry_warnings(app_state).values():
        log.warning("%s", warning)


def _check(name: str, failures: list[str], check) -> bool:
    try:
        problem = check()
    except Exception as exc:
        log.warning("readyz: %s check failed", name, exc_info=True)
        problem = f"failed ({type(exc).__name__})"
    if problem:
        failures.append(f"{name} {problem}")
    return not problem


def _store_answers() -> str | None:
    # A query on a real table (not a bare SELECT 1): a store without its schema cannot issue either.
    with state().store.engine.connect() as conn:
        conn.execute(sa.select(sa.literal(1)).select_from(certificates).limit(1)).all()
    return None


def _ca_key_signs(authority: CertificateAuthority) -> str | None:
    """The CA key (a file's or a token's) signs a fresh payload and the CA certificate's public key verifies it."""
    try:
        return authority.signer.probe(authority.certificate.public_key())
    except KeyUnavailable as exc:  # the token is away: say so; the worker re-opens it at the next use
        return exc.problem


def _crl_is_fresh(crl: CRLCache) -> str | None:
    if not crl.is_fresh():
        # None yet, or the newest in the store is past its nextUpdate: sign one now, as the next
        # CRL request would (current() could trust this worker's cached copy instead of the store).
        crl.regenerate()
        if not crl.is_fresh():
            return "is past its nextUpdate and could not be renewed"
    stale_since = crl.resign_if_stale()
    if stale_since is not None:
        return f"is stale: it lacks revocations made since {stale_since:%Y-%m-%d %H:%M:%S} UTC and could not be re-signed"
    return None
