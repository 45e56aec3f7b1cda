"""``POST simplereenroll``: a device renews (same key) or rekeys (new key) with its current certificate.

The CSR must name the same subject and subjectAltName as the certificate the
device authenticated with over TLS; the old certificate is marked superseded.
"""

from cryptography import x509
from flask import Blueprint, g

from ..auth import check_proof_of_possession, device_identity
from ..ca import issued_subject
from ..encoding import ESTResponse
from ..errors import Forbidden
from .issuance import certs_only_response, issue_replacement, read_csr

bp = Blueprint("simplereenroll", __name__)


def _san(obj) -> set:
    try:
        return set(obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


@bp.post("/simplereenroll")
@bp.post("/<label>/simplereenroll")
def simplereenroll() -> ESTResponse:
    identity = device_identity()
    csr = read_csr(g.profile)
    current = identity.certificate
    if issued_subject(csr.subject) != current.subject:
        raise Forbidden(
            f"CSR subject {csr.subject.rfc4514_string()!r} differs from the certificate's {current.subject.rfc4514_string()!r}"
        )
    if _san(csr) != _san(current):
        raise Forbidden("CSR subjectAltName differs from the certificate's; re-enrollment keeps the same names")
    check_proof_of_possession(csr, identity, g.profile)
    return certs_only_response(issue_replacement(csr, g.profile, identity), g.profile)
