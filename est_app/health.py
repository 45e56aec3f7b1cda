"""Probes for systemd, load balancers and orchestrators: ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 ``ok`` whenever the process can answer at all; it
touches nothing. ``/readyz`` answers 200 ``ready`` only when this worker can
issue: the store answers a query on its certificates table, and for every CA
(the top-level ``ca`` and each label's own) the key, in its file or its
PKCS#11 token, signs a fresh payload that the CA certificate verifies, the certificate is within its validity, and
its CRL in the store is current (when there is none yet, or it has expired,
the probe signs one, as serving the CRL would). Otherwise 503 with one line naming what failed; the
details go to the log, not to the unauthenticated caller.

Neither is rate limited nor behind the admin network gate; neither says
anything about devices.
"""

from __future__ import annotations

import logging
from functools import partial

import sqlalchemy as sa
from flask import Blueprint, Flask, Response

from .ca import CertificateAuthority
from .ca.signers import KeyUnavailable
from .errors import text_response
from .ratelimit import exempt
from .revocation import CRLCache
from .state import state
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
        _check(f"{authority.name} key", failures, partial(_ca_key_signs, authority))
        _check(f"{authority.name} certificate", failures, authority.validity_problem)
        if store_ok:  # the CRL lives in the store; one cause is enough to name
            crl_name = "crl" if authority is app_state.authority else f"{authority.name} crl"
            _check(crl_name, failures, partial(_crl_is_fresh, app_state.crls[authority.issuer_id]))
    if failures:
        return text_response(503, "not ready: " + "; ".join(failures), NO_STORE)
    return text_response(200, "ready", NO_STORE)


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
    return None
