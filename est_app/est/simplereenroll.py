"""``POST simplereenroll``: a device renews (same key) or rekeys (new key) with its current certificate.

The CSR must name the same subject and subjectAltName as the certificate the
device authenticated with over TLS; the old certificate is marked superseded.
A certificate whose device was deleted (kept valid with ``--keep-certificate``,
or left valid by a deletion before deleting revoked) is refused: it would mint
certificates no device list shows.
The new certificate follows the profile of the label the old one was issued
on, whatever path the request came in on (clients such as strongSwan cannot
reach labelled paths); only the response encoding is the path's.
"""

from cryptography import x509
from flask import Blueprint, g

from ..auth import check_proof_of_possession, device_identity
from ..ca import issued_subject
from ..encoding import ESTResponse
from ..errors import Forbidden
from ..state import state
from .issuance import certs_only_response, issue_replacement, orphan_message, read_csr

bp = Blueprint("simplereenroll", __name__)


def _san(obj) -> set:
    try:
        return set(obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


@bp.post("/simplereenroll")
@bp.post("/<label>/simplereenroll")
def simplereenroll() -> ESTResponse:
    g.identity = identity = device_identity()
    record = state().store.get_certificate(identity.name)
    profile = state().profile_named(record.label) if record else None
    if profile is None:
        where = f"on label {record.label!r}, which this server no longer serves" if record else "outside this server's records"
        raise Forbidden(f"certificate {identity.name} was issued {where}; enroll afresh")
    if record.status != "valid":  # checked again under the write lock; this spares a signature
        raise Forbidden(f"certificate {identity.name} is {record.status}; re-enroll with the device's current certificate")
    if record.device_id is None:  # likewise
        raise Forbidden(orphan_message(identity.name))
    csr = read_csr(profile)
    current = identity.certificate
    if issued_subject(csr.subject) != current.subject:
        raise Forbidden(
            f"CSR subject {csr.subject.rfc4514_string()!r} differs from the certificate's {current.subject.rfc4514_string()!r}"
        )
    if _san(csr) != _san(current):
        raise Forbidden("CSR subjectAltName differs from the certificate's; re-enrollment keeps the same names")
    check_proof_of_possession(csr, identity, profile)
    return certs_only_response(issue_replacement(csr, profile, identity), profile)
