"""The HTTP side every issuing view shares: the CSR from the body, who asks, the certs-only answer.

What happens between (policy, device, CA, records, audit) is the enrollment
service's (:mod:`est_app.enrollment`), reached as ``state().enrollment``.
"""

from __future__ import annotations

from cryptography import x509
from flask import request

from ..auth import Identity
from ..ca import load_csr
from ..encoding import CERTS_ONLY, PKCS10, ESTResponse, decode_body, read_body
from ..enrollment import Requester
from ..errors import UnsupportedMediaType, request_id
from ..profiles import EnrollmentProfile
from ..state import state


def read_csr() -> x509.CertificateSigningRequest:
    """The request's CSR, decoded and its signature verified (the service holds it to the label's policy)."""
    if request.mimetype != PKCS10:
        raise UnsupportedMediaType(f"Content-Type must be {PKCS10}, not {request.mimetype or 'missing'}")
    return load_csr(decode_body(read_body(), "PKCS#10 CSR"))


def requester(identity: Identity) -> Requester:
    """``identity``, asking from this request's client address."""
    return Requester(identity.requester, request.remote_addr or "", request_id())


def certs_only_response(certificate: x509.Certificate, profile: EnrollmentProfile) -> ESTResponse:
    return ESTResponse([(CERTS_ONLY, state().enrollment.certs_only(certificate, profile))])
