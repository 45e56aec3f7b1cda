"""The CRLs and the OCSP responder, without authentication.

``GET /crl`` (DER) and ``GET /crl.pem``: the top-level CA's CRL; but after a rollover (docs/CA_ROLLOVER.md),
a retired CA's as long as its ``crl_url`` names that path (as its certificates do), the same for ``/crl/<label>``.
``GET /crl/<label>`` and ``GET /crl/<label>.pem``: the CRL of the CA that issues on that label
(its own ``ca``, or the top-level CA's). ``GET /crl/issuer/<issuer id>`` (``.pem``): any CA's, one
retired by a rollover too. ``/ocsp`` (POST, and GET per RFC 6960 A.1) answers for every CA.
With the database down the CRLs held are served, and OCSP answers ``tryLater`` rather than guess a status.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import datetime, timezone
from typing import Optional
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from flask import Blueprint, Response
from sqlalchemy.exc import OperationalError

from .. import metrics
from ..encoding import Base64Encoding, read_body
from ..errors import NotFound
from ..revocation import CRLCache
from ..state import state

bp = Blueprint("revocation", __name__)
OCSP_RESPONSE = "application/ocsp-response"
PEM_LINES = Base64Encoding(64)
TRY_LATER = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(Encoding.DER)

log = logging.getLogger(__name__)


@bp.get("/crl")
def crl_der() -> Response:
    return _der(_retired_crl("/crl") or state().crl)


@bp.get("/crl.pem")
def crl_pem() -> Response:
    return _pem(_retired_crl("/crl") or state().crl)


@bp.get("/crl/<label>")
def label_crl_der(label: str) -> Response:
    return _der(_retired_crl(f"/crl/{label}") or _label_crl(label))


@bp.get("/crl/<label>.pem")
def label_crl_pem(label: str) -> Response:
    return _pem(_retired_crl(f"/crl/{label}") or _label_crl(label))


@bp.get("/crl/issuer/<issuer>")
def issuer_crl_der(issuer: str) -> Response:
    return _der(_issuer_crl(issuer))


@bp.get("/crl/issuer/<issuer>.pem")
def issuer_crl_pem(issuer: str) -> Response:
    return _pem(_issuer_crl(issuer))


def _retired_crl(path: str) -> Optional[CRLCache]:
    """The CRL of a CA retired by a rollover whose ``crl_url`` names ``path``: its certificates carry that address."""
    app_state = state()
    for authority in app_state.authorities.retired:
        url = app_state.authorities.settings[authority.issuer_id].crl_url
        if url and urlsplit(url).path == path:
            return app_state.crls[authority.issuer_id]
    return None


def _issuer_crl(issuer: str) -> CRLCache:
    """Any CA's CRL by issuer id, a CA retired by a rollover too (``est-admin ca status`` shows the ids)."""
    crl = state().crls.get(issuer)
    if crl is None:
        raise NotFound(f"no CA here has the issuer id {issuer!r}: see est-admin ca status")
    return crl


def _label_crl(label: str) -> CRLCache:
    app_state = state()
    if label not in app_state.settings.labels:
        raise NotFound(f"unknown EST label {label!r}: /crl/<label> serves the CRL of a configured label's CA")
    return app_state.crls[app_state.authorities.for_label(label).issuer_id]


def _der(crl: CRLCache) -> Response:
    return Response(crl.current().der, content_type="application/pkix-crl")


def _pem(crl: CRLCache) -> Response:
    body = PEM_LINES.encode(crl.current().der)
    return Response(b"-----BEGIN X509 CRL-----\n" + body + b"\n-----END X509 CRL-----\n", content_type="application/x-pem-file")


@bp.post("/ocsp")
def ocsp_post() -> Response:
    return _ocsp(read_body())


@bp.get("/ocsp/<path:encoded>")
def ocsp_get(encoded: str) -> Response:
    try:
        request_der = base64.b64decode(encoded, validate=False)
    except (binascii.Error, ValueError):
        request_der = b""
    return _ocsp(request_der)


def _ocsp(request_der: bytes) -> Response:
    try:
        answer = state().ocsp.respond(request_der, datetime.now(timezone.utc))
    except OperationalError as exc:  # only the status lookup reads the store; malformed and unauthorized still answer
        log.warning("OCSP: the database is unavailable, answering tryLater: %s", " ".join(str(exc.orig or exc).split())[:200])
        answer = TRY_LATER
    metrics.ocsp_answered(answer)
    return Response(answer, content_type=OCSP_RESPONSE)
