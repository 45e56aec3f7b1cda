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

from flask import Blueprint, g

from ..auth import check_proof_of_possession, device_identity
from ..encoding import ESTResponse
from ..state import state
from .issuance import certs_only_response, read_csr, requester

bp = Blueprint("simplereenroll", __name__)


@bp.post("/simplereenroll")
@bp.post("/<label>/simplereenroll")
def simplereenroll() -> ESTResponse:
    g.identity = identity = device_identity()
    enrollment = state().enrollment
    profile = enrollment.reenrollment_profile(identity.certificate)
    csr = read_csr()
    check_proof_of_possession(csr, identity, profile)
    asking = requester(identity)
    certificate = state().approval.admit(
        csr, profile, asking, "simplereenroll", lambda approved: enrollment.reenroll(approved, identity.certificate, asking)
    )
    return certs_only_response(certificate, profile)
