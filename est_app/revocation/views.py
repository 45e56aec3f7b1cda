"""``GET /crl`` (DER), ``GET /crl.pem`` and the OCSP responder at ``/ocsp`` (POST, and GET per RFC 6960 A.1)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone

from flask import Blueprint, Response

from ..encoding import Base64Encoding, read_body
from ..state import state

bp = Blueprint("revocation", __name__)
OCSP_RESPONSE = "application/ocsp-response"
PEM_LINES = Base64Encoding(64)


@bp.get("/crl")
def crl_der() -> Response:
    return Response(state().crl.current().der, content_type="application/pkix-crl")


@bp.get("/crl.pem")
def crl_pem() -> Response:
    body = PEM_LINES.encode(state().crl.current().der)
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
    return Response(state().ocsp.respond(request_der, datetime.now(timezone.utc)), content_type=OCSP_RESPONSE)
