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
from ..ca.keygen import generate_key, key_type_of
from ..encoding import CERTS_ONLY, PKCS8, ESTResponse
from ..errors import BadRequest
from ..state import state
from .issuance import issue_for_device, read_csr

bp = Blueprint("serverkeygen", __name__)


@bp.post("/serverkeygen")
@bp.post("/<label>/serverkeygen")
@enroller_required
def serverkeygen() -> ESTResponse:
    csr = read_csr(g.profile)
    check_proof_of_possession(csr, g.identity, g.profile)
    allowed = g.profile.serverkeygen_key_types
    wanted = key_type_of(csr.public_key())
    if wanted not in allowed:
        raise BadRequest(f"serverkeygen key type {wanted or 'of this CSR'} is not allowed here; use a CSR key of: {', '.join(allowed)}")
    private_key = generate_key(wanted)
    certificate = issue_for_device(csr, g.profile, g.identity, "serverkeygen", public_key=private_key.public_key())
    pkcs8 = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    response = ESTResponse([(PKCS8, pkcs8), (CERTS_ONLY, state().authority_for(g.profile).certs_only(certificate, g.profile.certificate))])
    response.headers["Cache-Control"] = "no-store"
    return response
