"""``POST serverkeygen``: the server makes the key pair and returns key and certificate.

The CSR says who the certificate is for and, by its own key's type, which key
type is wanted (among the label's ``serverkeygen_key_types``). The answer is
``multipart/mixed``: an ``application/pkcs8`` part, then a certs-only part,
each rendered by the label's encoding. The private key is never stored or logged,
and the answer carries ``Cache-Control: no-store`` so no cache along the way keeps it.
"""

from cryptography.hazmat.primitives import serialization
from flask import Blueprint, g

from ..auth import check_proof_of_possession, enroller_required
from ..encoding import CERTS_ONLY, PKCS8, ESTResponse
from ..state import state
from .issuance import read_csr, requester

bp = Blueprint("serverkeygen", __name__)


@bp.post("/serverkeygen")
@bp.post("/<label>/serverkeygen")
@enroller_required
def serverkeygen() -> ESTResponse:
    csr = read_csr()
    check_proof_of_possession(csr, g.identity, g.profile)
    enrollment = state().enrollment
    asking = requester(g.identity)
    # With approval, the key is made only when the approved request is collected (and never stored).
    private_key, certificate = state().approval.admit(
        csr, g.profile, asking, "serverkeygen", lambda approved: enrollment.serverkeygen(approved, g.profile, asking)
    )
    pkcs8 = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    response = ESTResponse([(PKCS8, pkcs8), (CERTS_ONLY, enrollment.certs_only(certificate, g.profile))])
    response.headers["Cache-Control"] = "no-store"
    return response
